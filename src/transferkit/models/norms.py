"""Normalisation layers: head norms, Batch Renormalization (Ioffe, 2017), and conversion of a
backbone's BatchNorm to GroupNorm, instance norm or synchronised BatchNorm."""

from __future__ import annotations

import torch
from timm.layers import GroupNormAct, convert_sync_batchnorm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from transferkit.errors import ConfigError

NORMS = ("batchnorm", "batchrenorm", "layernorm", "groupnorm", "instancenorm", "none")
BACKBONE_NORMS = ("keep", "groupnorm", "instancenorm", "syncbn")


class BatchRenorm1d(nn.Module):
    """Batch Renormalization for ``(N, C)`` features.

    Training uses ``x̂ = (x − μ_B)/σ_B · r + d`` with ``r = clip(σ_B/σ, 1/rmax, rmax)`` and
    ``d = clip((μ_B − μ)/σ, −dmax, dmax)`` (r and d carry no gradient), then ``γ x̂ + β``.
    Inference uses the moving statistics ``μ, σ``. ``rmax`` and ``dmax`` warm up linearly
    from 1 and 0 after ``warmup_steps`` steps of plain BatchNorm, to their final values over
    ``ramp_steps`` steps (the paper's schedule, in steps).
    """

    running_mean: torch.Tensor
    running_std: torch.Tensor
    num_batches_tracked: torch.Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 100,
        ramp_steps: int = 500,
    ) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.rmax_final, self.dmax_final = rmax, dmax
        self.warmup_steps, self.ramp_steps = warmup_steps, ramp_steps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def limits(self) -> tuple[float, float]:
        """Current (rmax, dmax) of the warm-up schedule."""
        t = int(self.num_batches_tracked) - self.warmup_steps
        if t <= 0:
            return 1.0, 0.0
        frac = min(1.0, t / max(1, self.ramp_steps))
        return 1.0 + (self.rmax_final - 1.0) * frac, self.dmax_final * frac

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            x_hat = (x - self.running_mean) / self.running_std
            return x_hat * self.weight + self.bias
        mean = x.mean(0)
        std = (x.var(0, unbiased=False) + self.eps).sqrt()
        rmax, dmax = self.limits()
        with torch.no_grad():
            r = (std / self.running_std).clamp(1.0 / rmax, rmax)
            d = ((mean - self.running_mean) / self.running_std).clamp(-dmax, dmax)
        x_hat = (x - mean) / std * r + d
        with torch.no_grad():
            self.running_mean += self.momentum * (mean.detach() - self.running_mean)
            self.running_std += self.momentum * (std.detach() - self.running_std)
            self.num_batches_tracked += 1
        return x_hat * self.weight + self.bias

    def extra_repr(self) -> str:
        return (
            f"{self.weight.numel()}, eps={self.eps}, momentum={self.momentum}, "
            f"rmax={self.rmax_final}, dmax={self.dmax_final}"
        )


def make_norm1d(kind: str, num_features: int, groups: int = 32) -> nn.Module:
    """A normalisation layer for ``(N, C)`` features.

    Raises:
        ValueError: unknown ``kind``, listing the valid ones.
    """
    if kind == "batchnorm":
        return nn.BatchNorm1d(num_features)
    if kind == "batchrenorm":
        return BatchRenorm1d(num_features)
    if kind == "layernorm":
        return nn.LayerNorm(num_features)
    if kind == "groupnorm":
        return nn.GroupNorm(num_groups(num_features, groups), num_features)
    if kind == "instancenorm":
        # Per-channel instance norm of an (N, C) vector would normalise single values (a
        # constant output), so each sample is normalised over its own features: on vectors
        # instance norm and layer norm coincide (GroupNorm with one group, per-feature affine).
        return nn.GroupNorm(1, num_features)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"unknown norm {kind!r}; choose one of {list(NORMS)}.")


def num_groups(channels: int, groups: int = 32) -> int:
    """The largest divisor of ``channels`` that is at most ``groups`` and leaves at least two
    channels per group (one channel per group would be instance norm, not group norm)."""
    g = max(1, min(groups, channels // 2))
    while channels % g:
        g -= 1
    return g


def convert_backbone_norm(model: nn.Module, kind: str, groups: int = 32) -> nn.Module:
    """Replace every BatchNorm of ``model`` (timm's ``BatchNormAct2d`` included).

    ``groupnorm`` (Wu & He, 2018) and ``instancenorm`` (GroupNorm with one channel per group)
    do not depend on the batch, for small or per-device batches; they start from the
    BatchNorm's affine parameters (its running statistics have no counterpart). ``syncbn``
    synchronises batch statistics across processes under DDP (timm's converter keeps the
    fused activation, which ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` and so
    Lightning's ``sync_batchnorm=True`` silently drop from ``BatchNormAct2d``). ``keep``
    returns ``model`` unchanged.

    Raises:
        ValueError: unknown ``kind``, listing the valid ones.
    """
    if kind not in BACKBONE_NORMS:
        raise ConfigError(
            f"unknown backbone norm {kind!r}; choose one of {list(BACKBONE_NORMS)} "
            "(model.backbone_norm=...)."
        )
    if kind == "keep":
        return model
    if kind == "syncbn":
        return convert_sync_batchnorm(model)
    return _to_groupnorm(model, kind, groups)


def _to_groupnorm(module: nn.Module, kind: str, groups: int) -> nn.Module:
    if isinstance(module, _BatchNorm):
        c = module.num_features
        g = c if kind == "instancenorm" else num_groups(c, groups)
        new = GroupNormAct(c, num_groups=g, eps=module.eps, affine=module.affine, apply_act=False)
        new.act = getattr(module, "act", nn.Identity())  # BatchNormAct2d: keep its activation
        new.drop = getattr(module, "drop", nn.Identity())
        if module.affine:
            with torch.no_grad():
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _to_groupnorm(child, kind, groups))
    return module
