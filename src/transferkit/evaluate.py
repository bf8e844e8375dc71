"""``transferkit-evaluate`` / ``make evaluate ckpt=PATH``: test metrics of a checkpoint.

Loss, accuracy (top-5 with more than 5 classes), a confusion matrix and per-class accuracy on
the test split of the configured data (``data=...``), or on every image of a folder
(``data=image_folder data.root=DIR split=all``). The checkpoint alone defines the model, its
classes and its preprocessing.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from transferkit.checkpoint_io import class_index_map, load_classifier
from transferkit.cli import CONFIG_DIR, run_cli
from transferkit.data.datamodule import ImageDataset
from transferkit.data.order import worker_ignores_stop_signals
from transferkit.data.samples import Samples, concat_samples
from transferkit.data.transforms import build_transform
from transferkit.errors import CheckpointError, ConfigError, DataError
from transferkit.gallery import write_top_losses
from transferkit.io import atomic_write_bytes, write_json
from transferkit.report import (
    classification_metrics,
    collect_logits,
    confusion_matrix,
    multilabel_section,
    write_confusion,
)
from transferkit.trust import TargetPolicy
from transferkit.tta import TTA, check_tta, tta_preprocessing

log = logging.getLogger("transferkit")
SPLITS = ("train", "val", "test", "all")


def require(cfg: DictConfig, *keys: str) -> None:
    """A missing mandatory value (``???``) as a one-line user error naming the override."""
    for key in keys:
        if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, ""):
            raise ConfigError(f"{key}=... is required, e.g. {key}={_EXAMPLES.get(key, 'VALUE')}")


_EXAMPLES = {"ckpt": "outputs/<date>/<time>/checkpoints/best.ckpt", "input": "photo.jpg|DIR"}


def device_of(name: str) -> torch.device:
    """``auto``: the GPU when there is one; otherwise what the user names (cpu, cuda:1, ...)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def split_samples(splits: dict[str, Samples], split: str) -> Samples:
    """One split, or all of them concatenated (``split=all``)."""
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}; choose one of {list(SPLITS)}.")
    if split != "all":
        if split not in splits or not len(splits[split]):
            raise DataError(
                f"the data has no {split!r} images (it has {sorted(splits)}). Choose another "
                "split=..., or split=all for every image."
            )
        return splits[split]
    return concat_samples([splits[s] for s in ("train", "val", "test") if s in splits])


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt`` on ``cfg.split`` of ``cfg.data``; write the results; return them."""
    require(cfg, "ckpt")
    model = load_classifier(cfg.ckpt, policy=TargetPolicy.from_config(cfg))
    names = list(model.hparams["class_names"] or range(model.hparams["num_classes"]))
    names = [str(n) for n in names]
    no_split = {"val_fraction": 0.0, "test_fraction": 0.0} if cfg.split == "all" else {}
    dm = instantiate(cfg.data, **no_split)  # split=all: every image, however few per class
    dm.setup("test")
    label_map = class_index_map(names, dm.classes)  # the folder may hold a subset of classes
    samples = split_samples(dm.splits, cfg.split)
    data_multilabel = samples.labels.ndim == 2
    if data_multilabel != model.multilabel:
        found, trained = ("a set of classes", "one class per image") if data_multilabel else (
            "one class", "sets of classes per image")  # fmt: skip
        raise CheckpointError(
            f"the data gives {found} per image but the checkpoint {cfg.ckpt} was trained on "
            f"{trained}: evaluate it on data labelled the same way (for a CSV, "
            "data.label_separator decides whether a label cell is a list)."
        )
    if data_multilabel:  # multi-label: the data's columns to the checkpoint's
        remapped = np.zeros((len(samples), len(names)), dtype=samples.labels.dtype)
        remapped[:, label_map] = samples.labels
        samples = dataclasses.replace(samples, labels=remapped)
    else:
        samples = dataclasses.replace(samples, labels=label_map[samples.labels])
    tta = str(cfg.get("tta", "none"))
    check_tta(tta)
    # the checkpoint's preprocessing, not the data config's
    transform = build_transform(tta_preprocessing(model.preprocessing, tta), train=False)
    loader = DataLoader(
        ImageDataset(samples, transform),
        batch_size=dm.batch_size,
        worker_init_fn=worker_ignores_stop_signals,
        **dm.loader_settings(),
    )
    model.to(device_of(cfg.device))
    tested = TTA(model, tta, int(model.preprocessing["image_size"]))
    logits, labels = collect_logits(tested, loader, f"evaluate ({cfg.split}: {len(samples)})")
    thresholds = getattr(model, "thresholds", None)
    metrics = {f"{cfg.split}/{k}": v
               for k, v in classification_metrics(logits, labels, thresholds).items()}  # fmt: skip
    out = Path(cfg.paths.output_dir)
    lines = [f"# Evaluation of {cfg.ckpt}", "", f"{len(samples)} images ({cfg.split} split).", ""]
    lines += [f"- {k}: {v:.4f}" for k, v in metrics.items()] + [""]
    result: dict[str, Any] = {"checkpoint": str(cfg.ckpt), "images": len(samples), **metrics,
                              "class_names": names}  # fmt: skip
    if isinstance(thresholds, torch.Tensor):  # multi-label
        lines += multilabel_section(logits, labels, thresholds, names)
        result["thresholds"] = thresholds.tolist()
    else:
        cm = confusion_matrix(logits.argmax(-1).numpy(), labels.numpy(), len(names))
        lines += write_confusion(cm, names, out)
        result["confusion_matrix"] = cm.tolist()
    lines += ["", "## The worst mistakes", ""]
    lines += write_top_losses(samples, logits, labels, names, out, cfg.split,
                              thresholds=thresholds)  # fmt: skip
    atomic_write_bytes(out / "evaluation.md", ("\n".join(lines) + "\n").encode())
    write_json(out / "evaluation.json", result)
    width = max(len(k) for k in metrics)
    print("\ntransferkit evaluation")
    print(f"  {'images':<{width}}  {len(samples):,}")
    for k, v in metrics.items():
        print(f"  {k:<{width}}  {v:.4f}")
    extra = "" if "thresholds" in result else "confusion_matrix.png, per_class.csv, "
    print(f"  written to {out}/evaluation.md (+ .json, {extra}top_losses.png/.csv)")
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_cli(lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
