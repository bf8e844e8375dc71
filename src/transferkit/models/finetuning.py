"""Blocks, freezing and parameter groups, as pure functions over a timm backbone.

A *block* is one group of timm's ``group_matcher(coarse=False)`` (stem, each block, the
final conv ...), ordered from input to output, so "the last k blocks" means the same thing
for every timm family.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from timm.models import group_parameters
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from transferkit.errors import ConfigError


def backbone_blocks(backbone: nn.Module) -> list[list[str]]:
    """Parameter names of each block, input to output.

    Raises:
        TypeError: the model does not implement timm's ``group_matcher``.
    """
    if not hasattr(backbone, "group_matcher"):
        raise ConfigError(
            f"{type(backbone).__name__} has no timm group_matcher, so its blocks are unknown; "
            "use a timm model as model.backbone."
        )
    matcher = backbone.group_matcher(coarse=False)  # type: ignore[operator]
    groups = group_parameters(backbone, matcher)
    return [list(groups[k]) for k in sorted(groups)]


def trainable_names(
    blocks: Sequence[Sequence[str]], k: int, bn_names: Iterable[str] = (), bn_mode: str = "frozen"
) -> set[str]:
    """Parameter names that train when the last ``k`` blocks do.

    With ``bn_mode == "train"`` the BatchNorm affine parameters of frozen blocks train too.
    """
    names = {n for block in blocks[len(blocks) - k :] for n in block} if k else set()
    if bn_mode == "train":
        names |= set(bn_names)
    return names


def batchnorm_modules(backbone: nn.Module) -> dict[str, _BatchNorm]:
    """Every BatchNorm module of the backbone by name (timm's BatchNormAct2d included)."""
    return {n: m for n, m in backbone.named_modules() if isinstance(m, _BatchNorm)}


def batchnorm_param_names(backbone: nn.Module) -> set[str]:
    return {
        f"{n}.{p}" for n, m in batchnorm_modules(backbone).items() for p, _ in m.named_parameters()
    }


def block_of(blocks: Sequence[Sequence[str]]) -> dict[str, int]:
    """Parameter name → block index."""
    return {n: i for i, block in enumerate(blocks) for n in block}


def frozen_stat_modules(
    backbone: nn.Module,
    blocks: Sequence[Sequence[str]],
    k: int,
    bn_mode: str,
    trainable_bn_stats: bool,
) -> list[_BatchNorm]:
    """BatchNorm modules that must stay in eval mode (their statistics fixed).

    Frozen blocks: when ``bn_mode == "frozen"``. Trainable blocks: when
    ``trainable_bn_stats`` is false.
    """
    where = block_of(blocks)
    first_trainable = len(blocks) - k
    out = []
    for name, m in batchnorm_modules(backbone).items():
        params = [f"{name}.{p}" for p, _ in m.named_parameters()]
        idx = where.get(params[0], 0) if params else 0
        frozen = idx < first_trainable
        if (frozen and bn_mode == "frozen") or (not frozen and not trainable_bn_stats):
            out.append(m)
    return out


def is_no_decay(name: str, param: nn.Parameter, norm_names: set[str]) -> bool:
    """Biases, norm weights and other 1-D parameters get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or name in norm_names


def param_groups(
    backbone: nn.Module,
    head: nn.Module,
    blocks: Sequence[Sequence[str]],
    trainable: set[str],
    lr: float,
    weight_decay: float,
    layer_decay: float = 1.0,
    decay_norm_and_bias: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer groups, each with its own explicit ``lr`` and ``weight_decay``.

    One group per (block, decay / no decay) for every block that ever trains, plus the head.
    The head gets ``lr``; block ``i`` from the top gets ``lr · layer_decay ** (i + 1)``.
    Every group is created here, before training, so unfreezing later never adds groups.
    """
    norm_names = {
        f"{n}.{p}"
        for n, m in backbone.named_modules()
        if isinstance(m, (_BatchNorm, nn.LayerNorm, nn.GroupNorm))
        for p, _ in m.named_parameters(recurse=False)
    }
    named = dict(backbone.named_parameters())
    groups: list[dict[str, Any]] = []

    def add(name: str, params: list[tuple[str, nn.Parameter]], group_lr: float) -> None:
        decay = [p for n, p in params if decay_norm_and_bias or not is_no_decay(n, p, norm_names)]
        no_decay = [p for n, p in params if not any(p is q for q in decay)]
        for suffix, ps, wd in (("", decay, weight_decay), ("/no_decay", no_decay, 0.0)):
            if ps:
                groups.append(
                    {"params": ps, "lr": group_lr, "weight_decay": wd, "name": name + suffix}
                )

    head_params = [(f"head.{n}", p) for n, p in head.named_parameters()]
    head_norms = {
        f"head.{n}.{p}"
        for n, m in head.named_modules()
        if isinstance(m, (_BatchNorm, nn.LayerNorm, nn.GroupNorm))
        or "norm" in type(m).__name__.lower()
        for p, _ in m.named_parameters(recurse=False)
    }
    norm_names |= head_norms
    add("head", head_params, lr)
    n_blocks = len(blocks)
    for i in range(n_blocks - 1, -1, -1):
        depth = n_blocks - 1 - i  # 0 for the top block
        params = [(n, named[n]) for n in blocks[i] if n in trainable]
        if params:
            add(f"block{i:02d}", params, lr * layer_decay ** (depth + 1))
    return groups
