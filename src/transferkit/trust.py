"""Which code a checkpoint may make us run.

A Hydra node ``{"_target_": "pkg.name", ...}`` is code: ``instantiate`` imports ``pkg`` and
calls ``name`` with the node's arguments. A checkpoint stores such nodes (the head), so a
``.ckpt`` from a stranger whose head names ``shutil.copy`` would copy files when loaded.
``torch.load(weights_only=True)`` does not help: the node is plain data until it is
instantiated. Nor does Hydra's own blocklist (it stops ``os.system``, not file writes).

The rule for what a file may instantiate:

- by default, transferkit's heads and normalisation layers (``nn.Module`` classes defined
  in ``transferkit.models.heads`` and ``transferkit.models.norms``): nothing else that a
  checkpoint needs, and nothing that reads files, downloads or writes;
- a name the user allows exactly (``allowed_targets=[my_package.MyHead]``);
- a name under a package the user allows (``allowed_targets=[my_package.]``) that resolves
  to something defined in that package (``my_package.x.os.system`` does not);
- anything, with ``trust_remote_code=true``.

Strings with an OmegaConf interpolation (``${...}``) are refused in any case:
``instantiate`` resolves them first, and ``${oc.create:{_target_: ...}}`` builds a new node
from a string, ``${oc.env:...}`` reads the environment.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.utils import get_object
from torch import nn

from transferkit.errors import ConfigError, UntrustedCheckpointError

#: Modules whose ``nn.Module`` classes a checkpoint may instantiate without consent.
BUILTIN_MODULES = ("transferkit.models.heads", "transferkit.models.norms")


@dataclass(frozen=True)
class TargetPolicy:
    """What the user allows a file to instantiate beyond transferkit's own heads and norms.

    Attributes:
        allowed: target names, or package prefixes ending in ``.`` (``my_package.``).
        trust_remote_code: allow any target (the file's author can run any code).
    """

    allowed: tuple[str, ...] = ()
    trust_remote_code: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], also: Iterable[str] = ()) -> TargetPolicy:
        """From the ``allowed_targets`` and ``trust_remote_code`` keys of an entry point's
        config; ``also`` adds targets the user's own config names (they already run them).

        Raises:
            ConfigError: ``allowed_targets`` is not a list of names.
        """
        allowed = cfg.get("allowed_targets") or []
        if isinstance(allowed, str) or not isinstance(allowed, Iterable):
            raise ConfigError(
                f"allowed_targets={allowed!r} must be a list, e.g. "
                "'allowed_targets=[my_package.MyHead]' (quote it for the shell)."
            )
        return cls(tuple([*map(str, allowed), *also]), bool(cfg.get("trust_remote_code", False)))

    def allows(self, target: str) -> bool:
        if self.trust_remote_code or target in self.allowed or is_builtin_target(target):
            return True
        return any(
            a.endswith(".") and target.startswith(a) and _defined_under(target, a[:-1])
            for a in self.allowed
        )


def _defined_under(target: str, package: str) -> bool:
    """``target`` resolves to a class or function defined in ``package`` (or a module of
    it). Only modules under ``package``, which the user trusts, are imported to find out."""
    try:
        obj = get_object(target)
    except Exception:  # not importable: not trusted (instantiate would fail anyway)
        return False
    module = getattr(obj, "__module__", None) or ""
    return module == package or module.startswith(f"{package}.")


def is_builtin_target(target: str) -> bool:
    """``target`` names an ``nn.Module`` class of transferkit's heads or norms."""
    if not target.startswith(tuple(f"{m}." for m in BUILTIN_MODULES)):
        return False
    try:
        obj = get_object(target)
    except Exception:
        return False
    return (
        isinstance(obj, type)
        and issubclass(obj, nn.Module)
        and getattr(obj, "__module__", "") in BUILTIN_MODULES
    )


def find_targets(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``_target_`` in nested mappings and sequences, with the key path to it."""
    for path, key, value in _walk(node, where):
        if key == "_target_":
            yield path, value


def _walk(node: Any, where: str) -> Iterator[tuple[str, Any, Any]]:
    """``(path, key, value)`` of every entry of nested mappings and sequences."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            path = f"{where}.{key}" if where else str(key)
            yield path, key, value
            yield from _walk(value, path)
    elif isinstance(node, Sequence) and not isinstance(node, (str, bytes)):
        for i, value in enumerate(node):
            path = f"{where}[{i}]"
            yield path, i, value
            yield from _walk(value, path)


def config_targets(node: Any) -> list[str]:
    """The literal ``_target_`` names of a (user's) config: the code it already runs."""
    return [t for _, t in find_targets(node) if isinstance(t, str) and "${" not in t]


def check_targets(node: Any, policy: TargetPolicy, source: str) -> None:
    """Refuse a file whose saved configs name code the user has not allowed, or hold an
    interpolation (which ``instantiate`` would resolve).

    Raises:
        UntrustedCheckpointError: names each target or string, where it is, and the way to
            allow it.
    """
    interpolations = [
        (path, value)
        for path, _, value in _walk(node, "")
        if isinstance(value, str) and "${" in value
    ]
    if interpolations:
        listed = ", ".join(f"{where}={value!r}" for where, value in interpolations)
        raise UntrustedCheckpointError(
            f"{source} holds OmegaConf interpolations, which would be resolved (and can build "
            f"and run other code) when it is loaded: {listed}. transferkit never writes them "
            "into a file; do not load it."
        )
    bad = [
        (where, target)
        for where, target in find_targets(node)
        if not isinstance(target, str) or not policy.allows(target)
    ]
    if not bad:
        return
    listed = ", ".join(f"{where}={target!r}" for where, target in bad)
    names = ",".join(sorted({str(t) for _, t in bad}))
    raise UntrustedCheckpointError(
        f"{source} names code that transferkit does not run without your consent: {listed}. "
        "Loading it would import and call that. If you trust whoever made the file, allow "
        f"it with 'allowed_targets=[{names}]' (or a package: 'allowed_targets=[my_package.]'), "
        "or trust_remote_code=true to allow any code."
    )
