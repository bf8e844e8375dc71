"""``make bench``: what the toolkit costs over a hand-written loop, and what caching buys.

Prints a table and writes ``bench.json`` (path printed at the end):

* ``overhead_full`` / ``overhead_partial``: training images/second of ``transferkit`` (the
  real Trainer path: callbacks, CSV logging, DataModule) divided by a bare PyTorch loop in
  this file (same timm model and weights, resolution, batch size, Adam, frozen blocks and
  frozen BatchNorm, data already in memory as normalised tensors).
* ``cache_speedup_linear_probe`` / ``cache_speedup_partial``: training epoch time without
  the frozen-prefix cache divided by with it (after it is built; build time reported).
* ``data_images_per_second`` / ``model_images_per_second``: the DataModule alone against
  the training step alone, to show which one limits.

    python -m transferkit.bench [--per-class 300] [--epochs 2] [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from transferkit.callbacks.speed import TrainSpeed
from transferkit.cli import CONFIG_DIR
from transferkit.finetune import build
from transferkit.io import write_json

PARTIAL_BLOCKS = 4


def _cfg(per_class: int, epochs: int, out: str, *extra: str) -> Any:
    overrides = [
        f"data.limit_per_class={per_class}",
        f"trainer.max_epochs={epochs}",
        "trainer.limit_val_batches=0",  # throughput of training; no validation to monitor:
        "~callbacks.early_stopping",
        "~callbacks.model_checkpoint",
        "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        f"paths.output_dir={out}",
        *extra,
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="finetune", overrides=overrides)


def toolkit(per_class: int, epochs: int, out: str, *extra: str) -> dict[str, float]:
    """Train through ``finetune.build``; images/s over training epochs (no validation)."""
    torch.manual_seed(0)
    objects = build(_cfg(per_class, epochs, out, *extra))
    trainer = objects["trainer"]
    start = time.perf_counter()
    trainer.fit(objects["model"], datamodule=objects["fit_datamodule"])
    total = time.perf_counter() - start
    speed = next(c for c in trainer.callbacks if isinstance(c, TrainSpeed))
    return {
        "images_per_second": speed.images_per_second,
        "epoch_seconds": speed.seconds / max(1, trainer.current_epoch),
        "setup_seconds": total - speed.seconds,  # includes building a feature cache
    }


def bare_loop(per_class: int, epochs: int, trainable_blocks: int | None) -> dict[str, float]:
    """The loop a user would write: tensors in memory, timm model, Adam, frozen early blocks
    with their BatchNorm in eval mode."""
    import timm
    from timm.models import group_parameters

    from transferkit.data import AnimalMNISTDataModule
    from transferkit.models.backbone import create_backbone

    torch.manual_seed(0)
    dm = AnimalMNISTDataModule(limit_per_class=per_class, augment={"no_aug": True})
    dm.setup()
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("tf_efficientnet_lite0"))
    dm.set_preprocessing(cfg)
    ds = dm.image_dataset("train", train=True)
    n_images = len(dm.splits["train"])
    x = torch.stack([ds[i][0] for i in range(n_images)])
    y = torch.tensor([ds[i][1] for i in range(n_images)])

    backbone: Any = create_backbone("tf_efficientnet_lite0", "embedded")
    model = torch.nn.Sequential(backbone, torch.nn.Linear(int(backbone.num_features), 10))
    frozen_bn: list[torch.nn.Module] = []
    if trainable_blocks is not None:
        groups = group_parameters(backbone, backbone.group_matcher(coarse=False))
        ids = sorted(groups)
        train_names = {n for g in ids[len(ids) - trainable_blocks :] for n in groups[g]}
        for n, p in backbone.named_parameters():
            p.requires_grad_(n in train_names)
        frozen_bn = [
            m for name, m in backbone.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and not any(f"{name}.{p}" in train_names for p, _ in m.named_parameters())
        ]  # fmt: skip
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for m in frozen_bn:
        m.eval()
    batch, n, seconds = 64, 0, 0.0
    x_all, y_all = x, y
    for _ in range(epochs):
        start = time.perf_counter()
        perm = torch.randperm(n_images)
        for i in range(0, n_images, batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(idx)
        seconds += time.perf_counter() - start
    return {"images_per_second": n / seconds, "epoch_seconds": seconds / epochs}


def data_alone(per_class: int, augment: str) -> float:
    """Images/s the DataModule's training loader delivers (no model)."""
    cfg = _cfg(per_class, 1, "/tmp/transferkit_bench_data", f"augment={augment}")
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.setup()
    dm.set_preprocessing({"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"})
    loader = dm.train_dataloader()
    next(iter(loader))  # decode-once happens here
    start, n = time.perf_counter(), 0
    for x, _ in loader:
        n += len(x)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=300, help="training images per class")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    pc, ep = args.per_class, args.epochs
    work = "/tmp/transferkit_bench"
    nocache = "finetune.cache_features=false"
    rows: dict[str, Any] = {}

    def show(name: str, value: float, unit: str) -> None:
        print(f"  {name:<52} {value:>10,.2f} {unit}", flush=True)

    cpu = platform.processor() or platform.machine()
    print(
        f"transferkit bench: {pc * 10:,} training images (64 px, batch 64), {ep} epochs, "
        f"{torch.get_num_threads()} threads, {cpu}"
    )
    bare_loop(10, 1, None)  # warm-up (allocator, thread pool) so the first timing is fair
    for name, blocks, extra in (
        ("full", None, ["finetune=full"]),
        ("partial", PARTIAL_BLOCKS,
         ["finetune=partial", f"finetune.trainable_blocks={PARTIAL_BLOCKS}"]),
    ):  # fmt: skip
        bare = bare_loop(pc, ep, blocks)
        tk = toolkit(pc, ep, f"{work}/{name}", *extra, nocache)
        rows[f"bare_{name}_images_per_second"] = bare["images_per_second"]
        rows[f"toolkit_{name}_images_per_second"] = tk["images_per_second"]
        rows[f"overhead_{name}"] = tk["images_per_second"] / bare["images_per_second"]
        show(f"{name}: bare loop", bare["images_per_second"], "img/s")
        show(f"{name}: transferkit (Trainer, callbacks, CSV logger)", tk["images_per_second"],
             "img/s")  # fmt: skip
        show(f"{name}: toolkit / bare", rows[f"overhead_{name}"], "x")
    for name, extra in (
        ("linear_probe", ["finetune=linear_probe"]),
        ("partial", ["finetune=partial", f"finetune.trainable_blocks={PARTIAL_BLOCKS}"]),
    ):
        off = toolkit(pc, ep, f"{work}/{name}_off", *extra, nocache)
        on = toolkit(pc, ep, f"{work}/{name}_on", *extra, "finetune.cache_features=true")
        rows[f"epoch_seconds_{name}_uncached"] = off["epoch_seconds"]
        rows[f"epoch_seconds_{name}_cached"] = on["epoch_seconds"]
        rows[f"cache_build_seconds_{name}"] = on["setup_seconds"]
        rows[f"cache_speedup_{name}"] = off["epoch_seconds"] / on["epoch_seconds"]
        show(f"{name}: epoch without cache", off["epoch_seconds"], "s")
        show(f"{name}: epoch with cache (built in {on['setup_seconds']:.1f} s)",
             on["epoch_seconds"], "s")  # fmt: skip
        show(f"{name}: cache speed-up", rows[f"cache_speedup_{name}"], "x")
    for augment in ("none", "light"):
        rows[f"data_images_per_second_{augment}"] = data_alone(pc, augment)
        show(f"data pipeline alone, augment={augment}", rows[f"data_images_per_second_{augment}"],
             "img/s")  # fmt: skip
    rows["model_images_per_second_full"] = rows["bare_full_images_per_second"]
    rows["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads"
    rows["torch"] = torch.__version__
    write_json(args.out, rows)
    print(f"wrote {args.out.resolve()}")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows.items()},
                     indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
