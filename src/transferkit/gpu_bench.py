"""``make gpu-bench``: transferkit's training speed on a GPU beside what the same job reaches
without it, in one run on one machine.

Every row trains the same model (the ``ImageClassifier`` that ``finetune.build`` makes, its
fine-tuning plan applied: frozen blocks and their BatchNorm stay frozen) on the same images at
the same resolution, batch size and precision, and reports images/s and peak GPU memory:

* ``ceiling``: the model alone on one synthetic batch already on the GPU
  (:func:`transferkit.precision.time_steps`): nothing to feed, the most the model can do.
* ``trainer``: transferkit through Lightning's Trainer as ``make finetune`` trains: the
  DataModule serving batches as its ``data.*`` settings say, the default callbacks except
  early stopping, checkpoints and the progress bar; no logger, no validation.
* ``bare_loop``: the loop a user would write over the training images held on the GPU as
  normalised tensors (:func:`bare_loop`).
* ``timm_loop``: the same images in the loop of timm's ``train.py`` (:func:`timm_loop`).

Settings: 64 and 224 px; ``finetune=full`` and the default plan (``finetune=table``), fp32
(TF32 matmuls, as ``finetune`` sets them) and the precision and memory format that
``trainer.precision=auto`` measures and picks (:func:`transferkit.precision.resolve`). The
feature cache is off so that all four rows compute the same thing (``make bench`` measures
what the cache buys).

The first ``--warmup`` steps of a row are not timed (cuDNN autotuning, the allocator, workers
starting); clocks are read after ``torch.cuda.synchronize()``. Peak memory is
``torch.cuda.max_memory_allocated`` during the row less what was allocated when it began (the
images the loops keep on the GPU are not counted; the Trainer row's peak does include the
images it moves there itself, ``data.device_batches``). ``gpu-bench.json`` holds the device,
the versions and, per setting, the rows and the ratios ``trainer_over_ceiling`` and
``trainer_over_timm``; the Markdown table printed at the end is the README's.

Without a GPU it says so first, then runs a tiny CPU grid (64 px, fp32, a few steps) to check
the plumbing; those figures are not GPU figures.

    python -m transferkit.gpu_bench [--steps 200] [--batch-size 256] [--sizes 64,224]
        [--regimes full,table] [--out gpu-bench.json] [--quick] [Hydra overrides ...]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, suppress
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn

from transferkit.cli import CONFIG_DIR
from transferkit.finetune import build
from transferkit.io import write_json
from transferkit.precision import Choice, Setting, label, resolve, time_steps

ROWS = ("ceiling", "trainer", "bare_loop", "timm_loop")
LR = 1e-3  # the default optimizer's (conf/optimizer/adam.yaml)
AMP = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
FP32: Setting = ("32-true", False)
NO_GPU = (
    "gpu-bench: no GPU here (torch.cuda.is_available() is False). Running a tiny CPU version "
    "(64 px, fp32, a few steps) only to check the plumbing: its figures are not GPU figures. "
    "Run make gpu-bench on a machine with an NVIDIA GPU for the real table."
)
# steps, warmup, batch_size, sizes, per_class (None: every training image)
DEFAULTS = {
    "gpu": (200, 20, 256, "64,224", None),
    "quick": (30, 5, 256, "64,224", 100),
    "cpu": (3, 1, 8, "64", 4),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Images/s of the Trainer's training batches after the first ``warmup`` steps."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.images, self.seconds = 0, 0.0
        self._start: float | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._start is None and trainer.global_step == self.warmup:
            _sync(self.device)
            self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if self._start is not None:
            self.images += len(batch[0])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(self.device)
        if self._start is not None:
            self.seconds = time.perf_counter() - self._start

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def _batches(n: int, batch: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Indices of full batches, reshuffled every epoch, without end."""
    if n < batch:
        raise ValueError(f"{n} training images cannot fill a batch of {batch}: lower --batch-size")
    while True:
        perm = torch.randperm(n, device=device)
        for i in range(0, n - batch + 1, batch):
            yield perm[i : i + batch]


def _timed(step: Callable[[torch.Tensor], None], x: torch.Tensor, batch: int, steps: int,
           warmup: int) -> float:  # fmt: skip
    """Images/s of ``step(batch indices)`` over ``steps`` steps after ``warmup`` untimed ones."""
    start = 0.0
    for i, idx in enumerate(islice(_batches(len(x), batch, x.device), warmup + steps)):
        if i == warmup:
            _sync(x.device)
            start = time.perf_counter()
        step(idx)
    _sync(x.device)
    return batch * steps / (time.perf_counter() - start)


def bare_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, setting: Setting, batch: int,
              steps: int, warmup: int) -> float:  # fmt: skip
    """Images/s of the loop a user would write, training a copy of ``model`` on the images
    ``x``: shuffled full batches, cross-entropy, Adam over the trainable parameters,
    ``torch.autocast`` (and a gradient scaler for float16)."""
    net = copy.deepcopy(model).to(x.device).train()  # the model's train() keeps frozen BN frozen
    dtype = AMP.get(setting[0])
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=LR)
    scaler = torch.amp.GradScaler(x.device.type, enabled=dtype == torch.float16)

    def step(idx: torch.Tensor) -> None:
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return _timed(step, x, batch, steps, warmup)


def timm_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, setting: Setting, batch: int,
              steps: int, warmup: int) -> float:  # fmt: skip
    """Images/s of timm's ``train.py`` loop training a copy of ``model`` on the images ``x``.

    Taken from its ``train_one_epoch`` and set-up, with its public utilities:
    ``create_optimizer_v2(model, opt="adam")`` (which leaves frozen parameters out),
    ``create_scheduler_v2(sched="cosine")`` stepped per update as ``--sched-on-updates`` does
    (``step_update(num_updates, metric=loss average)``), ``nn.CrossEntropyLoss``,
    ``torch.autocast`` with ``NativeScaler`` for float16 (none for bfloat16), ``model.train()``,
    inputs made ``channels_last`` per batch, ``optimizer.zero_grad()`` after each update,
    ``loss.item()`` into an ``AverageMeter`` every step, and ``cudnn.benchmark`` on (restored
    after). From its loader: reshuffled every epoch, the last partial batch dropped. The images
    are already on the device, so its loader and prefetcher have nothing left to do.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import AverageMeter, NativeScaler

    device, (precision, channels_last) = x.device, setting
    net = copy.deepcopy(model).to(device)
    optimizer = create_optimizer_v2(net, opt="adam", lr=LR, weight_decay=0.0)
    updates_per_epoch = len(x) // batch
    lr_scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=math.ceil((warmup + steps) / updates_per_epoch),
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    amp_dtype = AMP.get(precision)
    amp_autocast: Callable[[], AbstractContextManager[Any]] = suppress
    if amp_dtype is not None:
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
    use_scaler = amp_dtype == torch.float16 and device.type == "cuda"
    loss_scaler = NativeScaler(device=device.type) if use_scaler else None
    train_loss_fn = nn.CrossEntropyLoss().to(device)
    losses_m = AverageMeter()
    updates = [0]
    net.train()
    optimizer.zero_grad()

    def step(idx: torch.Tensor) -> None:
        inputs, target = x[idx], y[idx]
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            loss = train_loss_fn(net(inputs), target)
        if loss_scaler is not None:
            loss_scaler(loss, optimizer)
        else:
            loss.backward()
            optimizer.step()
        losses_m.update(loss.item(), inputs.shape[0])
        updates[0] += 1
        optimizer.zero_grad()
        lr_scheduler.step_update(num_updates=updates[0], metric=losses_m.avg)

    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = benchmark or device.type == "cuda"  # train.py sets it
    try:
        return _timed(step, x, batch, steps, warmup)
    finally:
        torch.backends.cudnn.benchmark = benchmark


def measure(fn: Callable[[], float], device: torch.device) -> dict[str, float | None]:
    """``fn()``'s images/s and the GPU memory it allocated at its peak (MiB; None on CPU)."""
    base = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    ips = fn()
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return {"images_per_second": ips, "peak_memory_mib": peak}


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The Trainer's images/s over the ceiling's and over timm's loop's."""
    trainer = rows["trainer"]["images_per_second"]
    return {
        "trainer_over_ceiling": trainer / rows["ceiling"]["images_per_second"],
        "trainer_over_timm": trainer / rows["timm_loop"]["images_per_second"],
    }


def _build(size: int, regime: str, setting: Setting, args: Any, out: str, cuda: bool) -> Any:
    """``finetune.build`` for one setting, the trainer stopping after warm-up + timed steps."""
    overrides = [
        *(["trainer=gpu"] if cuda else ["trainer.accelerator=cpu", "trainer.devices=1"]),
        f"trainer.precision={setting[0]}",
        f"model.channels_last={str(setting[1]).lower()}",
        f"data.image_size={size}",
        f"data.batch_size={args.batch_size}",
        *([f"data.limit_per_class={args.per_class}"] if args.per_class else []),
        f"finetune={regime}",
        "finetune.cache_features=false",
        "trainer.max_epochs=1000",
        f"++trainer.max_steps={args.warmup + args.steps}",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "~callbacks.early_stopping",
        "~callbacks.model_checkpoint",
        "~callbacks.last_checkpoint",
        "logger=none",
        f"paths.output_dir={out}",
        *args.overrides,
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="finetune", overrides=overrides)
    torch.manual_seed(0)
    return build(cfg)


def _images(dm: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split as normalised tensors on ``device``, as the Trainer's loader
    delivers them (the DataModule's own transform)."""
    loader = torch.utils.data.DataLoader(dm.image_dataset("train", train=True), batch_size=512)
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs).to(device), torch.cat(ys).to(device)


def _rows(objects: Any, data: tuple[torch.Tensor, torch.Tensor], setting: Setting, size: int,
          args: Any) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The four rows of one setting; the Trainer (which trains ``objects``' model) last."""
    model, (x, y), device = objects["model"], data, data[0].device
    loop = (setting, args.batch_size, args.steps, args.warmup)
    timer = StepTimer(args.warmup, device)
    trainer = objects["trainer"]
    trainer.callbacks.append(timer)

    def fit() -> float:
        trainer.fit(model, datamodule=objects["fit_datamodule"])
        return timer.images_per_second

    runs: dict[str, Callable[[], float]] = {
        "ceiling": lambda: time_steps(
            model, setting, args.batch_size, size, device, args.steps, args.warmup
        ),
        "bare_loop": lambda: bare_loop(model, x, y, *loop),
        "timm_loop": lambda: timm_loop(model, x, y, *loop),
        "trainer": fit,
    }
    rows = {}
    for name, fn in runs.items():
        rows[name] = measure(fn, device)
        print(f"    {name:<10} {rows[name]['images_per_second']:>10,.0f} images/s", flush=True)
    return {name: rows[name] for name in ROWS}


def _auto(model: nn.Module, size: int, args: Any, device: torch.device) -> Choice:
    """What ``trainer.precision=auto`` with ``model.channels_last=auto`` picks for ``model``."""
    return resolve("auto", "auto", cuda=True, bf16=torch.cuda.is_bf16_supported(),
                   timer=lambda s: time_steps(model, s, args.batch_size, size, device))  # fmt: skip


def run(args: Any, device: torch.device) -> list[dict[str, Any]]:
    """Every setting of the grid, measured: fp32, then (on a GPU) what ``auto`` picks."""
    cuda = device.type == "cuda"
    torch.set_float32_matmul_precision("high")  # as finetune() does: TF32 matmuls
    settings: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as work:
        for size in args.sizes:
            data = None
            for regime in args.regimes:
                out = f"{work}/{size}-{regime}"
                objects = _build(size, regime, FP32, args, f"{out}-fp32", cuda)
                if data is None:
                    data = _images(objects["datamodule"], device)
                # Probe on the fresh model, before the Trainer row trains it.
                choice = _auto(objects["model"], size, args, device) if cuda else None
                print(f"{size} px, finetune={regime}, fp32:", flush=True)
                rows = _rows(objects, data, FP32, size, args)
                entry = {"image_size": size, "regime": regime, "batch_size": args.batch_size}
                settings.append(_setting(entry, "fp32", FP32, "fp32, the baseline", rows))
                if choice is None:
                    continue
                chosen, reason = (choice.precision, choice.channels_last), choice.reason
                if chosen == FP32:
                    reason += " (the fp32 setting: its rows, not measured twice)"
                else:
                    print(f"{size} px, finetune={regime}, auto ({label(chosen)}):", flush=True)
                    objects = _build(size, regime, chosen, args, f"{out}-auto", cuda)
                    rows = _rows(objects, data, chosen, size, args)
                settings.append(_setting(entry, "auto", chosen, reason, rows))
    return settings


def _setting(entry: dict[str, Any], mode: str, setting: Setting, reason: str,
             rows: dict[str, dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    precision = {"precision": setting[0], "channels_last": setting[1], "precision_reason": reason}
    return {**entry, "precision_mode": mode, **precision, "rows": rows, **ratios(rows)}


def table(settings: list[dict[str, Any]]) -> str:
    """The results as a Markdown table: images/s (peak MiB) per row, then the two ratios."""

    def cell(row: dict[str, Any]) -> str:
        mib = row["peak_memory_mib"]
        return f"{row['images_per_second']:,.0f}" + (
            f" ({mib:,.0f} MiB)" if mib is not None else ""
        )

    head = ["size", "finetune", "precision", "model alone", "transferkit", "bare loop",
            "timm loop", "transferkit / model alone", "transferkit / timm"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in settings:
        precision = label((s["precision"], s["channels_last"]))
        if s["precision_mode"] == "auto":
            precision = f"auto: {precision}"
        cells = [f"{s['image_size']} px", s["regime"], precision,
                 *(cell(s["rows"][r]) for r in ROWS),
                 f"{s['trainer_over_ceiling']:.2f}", f"{s['trainer_over_timm']:.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _versions() -> dict[str, str | None]:
    import lightning
    import timm
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "lightning": lightning.__version__,
            "cuda": torch.version.cuda}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="timed steps per row (GPU: 200)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (GPU: 20)")
    parser.add_argument("--batch-size", type=int, help="images per step (GPU: 256)")
    parser.add_argument("--sizes", help="comma-separated resolutions (GPU: 64,224)")
    parser.add_argument("--per-class", type=int, help="training images per class (GPU: all)")
    parser.add_argument("--regimes", default="full,table", help="finetune configs to compare")
    parser.add_argument("--out", type=Path, default=Path("gpu-bench.json"))
    parser.add_argument("--quick", action="store_true", help="GPU: 30 steps, 100 a class")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    kind = "quick" if cuda and args.quick else "gpu" if cuda else "cpu"
    for key, value in zip(("steps", "warmup", "batch_size", "sizes", "per_class"),
                          DEFAULTS[kind], strict=True):  # fmt: skip
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.sizes = [int(s) for s in str(args.sizes).split(",")]
    args.regimes = args.regimes.split(",")
    if cuda:
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
        print(f"gpu-bench: {name}, torch {torch.__version__}, batch {args.batch_size}, "
              f"{args.steps} timed steps after {args.warmup} per row")  # fmt: skip
    else:
        device, name = torch.device("cpu"), f"cpu ({torch.get_num_threads()} threads)"
        print(NO_GPU, flush=True)
        print("gpu-bench: fp32 only: without a CUDA device trainer.precision=auto is fp32")
    settings = run(args, device)
    result = {
        "device": name,
        "cuda": cuda,
        "versions": _versions(),
        "steps": args.steps,
        "warmup": args.warmup,
        "settings": settings,
        "command": " ".join(["python -m transferkit.gpu_bench", *argv]),
    }
    write_json(args.out, result)
    print("\n" + table(settings) + "\n")
    print(f"wrote {args.out.resolve()}")


if __name__ == "__main__":
    main()
