"""Normalisation layers for heads, including Batch Renormalization (Ioffe, 2017)."""

from __future__ import annotations

import torch
from torch import nn

NORMS = ("batchnorm", "batchrenorm", "layernorm", "groupnorm", "instancenorm", "none")


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
        g = min(groups, num_features)
        while num_features % g:
            g -= 1
        return nn.GroupNorm(g, num_features)
    if kind == "instancenorm":
        # Over (N, C) features each channel is one value: instance norm normalises each
        # sample over its channels, i.e. GroupNorm with one group.
        return nn.GroupNorm(1, num_features)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose one of {list(NORMS)}.")
