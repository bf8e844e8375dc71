"""``make gpu-check``: a short throughput check for a machine with CUDA.

Runs a few hundred training steps of the default job through the real Trainer path on one
GPU (fp32, then ``bf16-mixed`` with ``channels_last``), then with ``ddp`` on all GPUs when
there are several, and prints images/second for each, with the model alone (synthetic
batches already on the GPU) as the ceiling the data pipeline is measured against.

    python -m transferkit.gpu_check [--steps 300] [--batch-size 256] [Hydra overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from transferkit.cli import CONFIG_DIR
from transferkit.finetune import build


def _overrides(steps: int, batch: int, workers: int, out: str) -> list[str]:
    return [
        "trainer.max_epochs=1000",
        f"+trainer.max_steps={steps}",
        "trainer.limit_val_batches=0",
        "callbacks=none",
        "+callbacks.train_speed._target_=transferkit.callbacks.speed.TrainSpeed",
        "logger=none",
        f"data.batch_size={batch}",
        f"data.num_workers={workers}",
        "data.pin_memory=true",
        f"paths.output_dir={out}",
        "test=false",
    ]


def _fit_speed(overrides: list[str]) -> float:
    from transferkit.callbacks.speed import TrainSpeed

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="finetune", overrides=overrides)
    objects = build(cfg)
    trainer = objects["trainer"]
    trainer.fit(objects["model"], datamodule=objects["fit_datamodule"])
    speed = next(c for c in trainer.callbacks if isinstance(c, TrainSpeed))
    return speed.images_per_second


def _model_only(batch: int, steps: int, bf16: bool) -> float:
    """The training step alone on synthetic data already on the GPU."""
    from transferkit.models import ImageClassifier
    from transferkit.precision import time_steps

    model = ImageClassifier("tf_efficientnet_lite0", 10, image_size=64)
    setting = ("bf16-mixed", True) if bf16 else ("32-true", False)
    return time_steps(model, setting, batch, 64, torch.device("cuda"), steps, warmup=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA device here (torch.cuda.is_available() is False). Run it on "
            "a machine with an NVIDIA GPU and a CUDA build of torch.",
            file=sys.stderr,
        )
        sys.exit(1)
    n_gpus = torch.cuda.device_count()
    print(f"gpu-check: {n_gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    out = tempfile.mkdtemp(prefix="gpu_check_")
    base = _overrides(args.steps, args.batch_size, args.workers, out) + args.overrides
    rows = []
    for name, extra in (
        ("1 GPU, fp32", ["trainer=gpu", "trainer.precision=32-true"]),
        ("1 GPU, bf16-mixed + channels_last",
         ["trainer=gpu", "trainer.precision=bf16-mixed", "model.channels_last=true"]),
    ):  # fmt: skip
        rows.append((name, _fit_speed(base + extra)))
        print(f"  {name:<40} {rows[-1][1]:>10,.0f} images/s (Trainer, real data pipeline)")
    for bf16 in (False, True):
        name = f"model alone, {'bf16 + channels_last' if bf16 else 'fp32'}"
        rows.append((name, _model_only(args.batch_size, min(args.steps, 200), bf16)))
        print(f"  {name:<40} {rows[-1][1]:>10,.0f} images/s (synthetic batches on the GPU)")
    if n_gpus > 1:
        run_dir = Path(out) / "ddp"
        cmd = [sys.executable, "-m", "transferkit.finetune", "trainer=ddp",
               "model.channels_last=true", f"hydra.run.dir={run_dir}",
               *[o for o in base if not o.startswith("paths.")]]  # fmt: skip
        subprocess.run(cmd, check=True)
        ips = json.loads((run_dir / "summary.json").read_text())["train_images_per_second"]
        rows.append((f"{n_gpus} GPUs, ddp, bf16-mixed + channels_last", ips))
        print(f"  {rows[-1][0]:<40} {ips:>10,.0f} images/s")
    else:
        print("  (one GPU: the ddp run needs several)")
    print(json.dumps({name: round(v, 1) for name, v in rows}, indent=2))


if __name__ == "__main__":
    main()
