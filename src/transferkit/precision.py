"""``trainer.precision=auto``: precision and memory format chosen by a short timed probe.

Which of fp32 (with TF32 matmuls), ``bf16-mixed`` and ``channels_last`` trains fastest
depends on the model, its frozen part, the resolution, the batch and the GPU: on an H200
the default model at 64 px ran 3x *slower* in bf16 + channels_last than in fp32, while
large models at 224 px gain from both. So the GPU trainer configs do not guess: before
training, :func:`resolve` times a few optimizer steps of a copy of the actual model (its
plan applied: frozen blocks stay frozen) on a synthetic batch of the actual size, for every
candidate, and takes the fastest. The figures, the choice and the reason go to the log and
``summary.json``.

* An explicit ``trainer.precision`` (or an explicit ``model.channels_last``) always wins.
* Without a CUDA device there is nothing to choose: fp32, no ``channels_last``.
* Under DDP every rank must train alike: rank 0 decides before Lightning starts the other
  processes and hands its choice down in the environment (:data:`ENV`). Processes started
  by an outside launcher (torchrun, ``srun``), on several nodes or forked cannot share a
  decision that early (the caller says so in ``external``), so they do not probe: they take
  fp32 and say how to set it.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from transferkit.errors import ConfigError

log = logging.getLogger(__name__)

#: ``precision,channels_last`` decided by rank 0, inherited by the processes it starts.
ENV = "TRANSFERKIT_PRECISION"
#: A setting: (Lightning precision, channels_last).
Setting = tuple[str, bool]
#: Within this fraction of the fastest, the simpler setting (listed first) is taken.
TIE = 0.02
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


@dataclass
class Choice:
    """The precision and memory format a run trains with, and why."""

    precision: str
    channels_last: bool
    reason: str
    images_per_second: dict[str, float] = field(default_factory=dict)
    probe_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "channels_last": self.channels_last,
            "reason": self.reason,
            "probe_images_per_second": {k: round(v, 1) for k, v in self.images_per_second.items()},
            "probe_seconds": round(self.probe_seconds, 2),
        }


def label(setting: Setting) -> str:
    precision, channels_last = setting
    return precision + (" + channels_last" if channels_last else "")


def candidates(bf16: bool, channels_last: bool | None = None) -> list[Setting]:
    """What the probe times, simplest first: fp32, then ``bf16-mixed`` (``16-mixed`` on GPUs
    without bfloat16), each without and with ``channels_last`` (only the given one when the
    user set it)."""
    layouts = [False, True] if channels_last is None else [channels_last]
    half = "bf16-mixed" if bf16 else "16-mixed"
    return [(p, cl) for p in ("32-true", half) for cl in layouts]


def choose(timings: Mapping[Setting, float], tie: float = TIE) -> Setting:
    """The fastest setting (images/s); one listed earlier wins when within ``tie`` of it.

    Raises:
        ValueError: no timings.
    """
    if not timings:
        raise ValueError("no timings to choose from")
    best = max(timings.values())
    return next(s for s, ips in timings.items() if ips >= best * (1.0 - tie))


def parse_env(value: str) -> Setting:
    """``"bf16-mixed,1"`` → ``("bf16-mixed", True)``."""
    precision, _, cl = value.partition(",")
    if precision not in PRECISIONS or cl not in ("0", "1"):
        raise ConfigError(f"{ENV}={value!r} is not '<precision>,<0|1>'; unset it.")
    return precision, cl == "1"


def time_steps(
    model: torch.nn.Module,
    setting: Setting,
    batch_size: int,
    image_size: int,
    device: torch.device,
    steps: int = 8,
    warmup: int = 3,
) -> float:
    """Training images/s of a copy of ``model`` in ``setting`` on a synthetic batch: forward,
    backward and an Adam step over the trainable parameters, uncompiled (``model.compile``
    is not timed). ``model`` is not changed."""
    precision, channels_last = setting
    trial = copy.deepcopy(model).to(device).train()
    for m in trial.modules():  # timed uncompiled: four compilations would cost minutes
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    if channels_last:
        trial = trial.to(memory_format=torch.channels_last)
    params = [p for p in trial.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-6)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = trial(x).float().square().mean()
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
    sync()
    seconds = time.perf_counter() - start
    del trial, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return batch_size * steps / seconds


Timer = Callable[[Setting], float]


def probe(settings: Sequence[Setting], timer: Timer) -> dict[Setting, float]:
    """Images/s of each setting, timed in turn by ``timer``; 0 for one that runs out of
    memory (a batch that fits in bf16 may not in fp32)."""
    out = {}
    for s in settings:
        try:
            out[s] = timer(s)
        except torch.OutOfMemoryError:
            log.warning("precision probe: %s ran out of GPU memory at this batch", label(s))
            torch.cuda.empty_cache()
            out[s] = 0.0
    return out


def resolve(
    precision: Any,
    channels_last: Any,
    *,
    cuda: bool,
    world_size: int = 1,
    bf16: bool | Callable[[], bool] = True,
    timer: Timer | None = None,
    external: str | None = None,
) -> Choice:
    """The precision and memory format to train with.

    Args:
        precision: ``trainer.precision``; ``auto`` is measured, anything else is kept.
        channels_last: ``model.channels_last``: true/false (kept), or ``auto`` (measured
            with the precision; false when the precision is the user's).
        cuda: training on a CUDA device.
        world_size: processes training together.
        bf16: the GPU supports bfloat16 (or a function that says, called only to probe:
            asking initialises CUDA).
        timer: images/s of one setting (:func:`time_steps` bound to the model and batch).
        external: why the processes of this run cannot share one timing (started by an
            outside launcher, on several nodes, or forked), if so.
    """
    given_cl = None if channels_last in ("auto", None) else bool(channels_last)
    if str(precision) != "auto":
        return Choice(str(precision), bool(given_cl), "set by trainer.precision")
    inherited = os.environ.get(ENV)
    if inherited and int(os.environ.get("LOCAL_RANK", "0") or 0) > 0:  # a process rank 0 started
        p, cl = parse_env(inherited)
        return Choice(p, cl if given_cl is None else given_cl, "rank 0's measured choice")
    if not cuda:
        return Choice("32-true", bool(given_cl), "no CUDA device: fp32")
    if external:
        return Choice(
            "32-true",
            bool(given_cl),
            f"{external}: its processes cannot share one timing, so fp32. Set "
            "trainer.precision (and model.channels_last) to choose.",
        )
    if timer is None:
        raise ValueError("resolve() needs a timer to measure on a CUDA device")
    start = time.perf_counter()
    supported = bf16() if callable(bf16) else bf16
    timings = probe(candidates(supported, given_cl), timer)
    best = choose(timings)
    figures = {label(s): ips for s, ips in timings.items()}
    reason = f"fastest of {len(timings)} measured: " + ", ".join(
        f"{k} {v:,.0f} img/s" for k, v in figures.items()
    )
    choice = Choice(best[0], best[1], reason, figures, time.perf_counter() - start)
    if world_size > 1:  # the processes Lightning starts next inherit it
        os.environ[ENV] = f"{best[0]},{int(best[1])}"
    return choice
