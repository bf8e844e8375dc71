"""Which code a checkpoint may make us run.

A Hydra node ``{"_target_": "pkg.name", ...}`` is code: ``instantiate`` imports ``pkg`` and
calls ``name`` with the node's arguments. A checkpoint stores such nodes (the head, and any
config a later version saves), so a ``.ckpt`` from a stranger whose head names
``os.system`` would run a shell command when loaded. ``torch.load(weights_only=True)`` does
not help: the node is plain data until it is instantiated.

The rule: a target in a file is instantiated only when it names a class defined in
transferkit itself, or the user allowed it (``allowed_targets``, ``trust_remote_code``).
A name under ``transferkit.`` that leads elsewhere (``transferkit.finetune.os.system``) or
to a function is not trusted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.utils import get_object

from transferkit.errors import UntrustedCheckpointError

TRUSTED_PACKAGE = "transferkit"


@dataclass(frozen=True)
class TargetPolicy:
    """What the user allows a file to instantiate beyond transferkit's own classes.

    Attributes:
        allowed: target names, or prefixes ending in ``.`` (``my_package.``), to allow.
        trust_remote_code: allow any target (the file's author can run any code).
    """

    allowed: tuple[str, ...] = ()
    trust_remote_code: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], also: Iterable[str] = ()) -> TargetPolicy:
        """From the ``allowed_targets`` and ``trust_remote_code`` keys of an entry point's
        config; ``also`` adds targets the user's own config names (they already run them)."""
        allowed = [str(t) for t in (cfg.get("allowed_targets") or [])]
        return cls(tuple([*allowed, *also]), bool(cfg.get("trust_remote_code", False)))

    def allows(self, target: str) -> bool:
        if self.trust_remote_code or is_transferkit_class(target):
            return True
        return any(target == a or (a.endswith(".") and target.startswith(a)) for a in self.allowed)


def is_transferkit_class(target: str) -> bool:
    """``target`` names a class defined in a transferkit module (only transferkit modules
    are imported to find out)."""
    if not target.startswith(f"{TRUSTED_PACKAGE}."):
        return False
    try:
        obj = get_object(target)
    except Exception:  # not importable: not trusted (instantiate would fail anyway)
        return False
    module = getattr(obj, "__module__", "") or ""
    return isinstance(obj, type) and module.split(".")[0] == TRUSTED_PACKAGE


def find_targets(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``_target_`` in nested mappings and sequences, with the key path to it."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            path = f"{where}.{key}" if where else str(key)
            if key == "_target_":
                yield path, value
            else:
                yield from find_targets(value, path)
    elif isinstance(node, Sequence) and not isinstance(node, (str, bytes)):
        for i, value in enumerate(node):
            yield from find_targets(value, f"{where}[{i}]")


def config_targets(node: Any) -> list[str]:
    """The literal ``_target_`` names of a (user's) config: the code it already runs."""
    return [t for _, t in find_targets(node) if isinstance(t, str) and "${" not in t]


def check_targets(node: Any, policy: TargetPolicy, source: str) -> None:
    """Refuse a file whose saved configs name code the user has not allowed.

    Raises:
        UntrustedCheckpointError: names each target, where it is, and how to allow it.
    """
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
        f"it with allowed_targets=[{names}] (or a prefix like my_package.), or "
        "trust_remote_code=true to allow any code."
    )
