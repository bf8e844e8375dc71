"""``transferkit-predict`` / ``make predict ckpt=PATH input=FILE_OR_DIR``: top-k per image.

Writes a CSV (``path, class_1, prob_1, ..., class_k, prob_k``) atomically and prints its path.
Files that do not decode as images are skipped and counted (``on_bad_image=skip``) or stop
the run (``fail``).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from transferkit.checkpoint_io import load_classifier
from transferkit.cli import CONFIG_DIR, run_cli
from transferkit.data.image_folder import IMAGE_EXTENSIONS, is_image_file
from transferkit.data.order import worker_ignores_stop_signals
from transferkit.data.samples import BadImageError, read_rgb
from transferkit.data.transforms import build_transform
from transferkit.errors import ConfigError, DataError, NotFoundError
from transferkit.evaluate import device_of, require
from transferkit.io import atomic_write_bytes
from transferkit.report import collect_logits
from transferkit.trust import TargetPolicy
from transferkit.tta import TTA, check_tta, tta_preprocessing

log = logging.getLogger("transferkit")


def list_inputs(path: str | Path) -> list[Path]:
    """``path`` itself, or the image files under it (recursively, sorted).

    Raises:
        FileNotFoundError: ``path`` does not exist or a folder holds no image files.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise NotFoundError(f"input={str(path)!r} does not exist; pass an image or a folder.")
    files = sorted(f for f in path.rglob("*") if is_image_file(f))
    if not files:
        raise NotFoundError(
            f"input={str(path)!r} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})."
        )
    return files


class FileDataset(Dataset):
    """Image files → ``(tensor, index)``; an undecodable file gives index ``-1 - i``."""

    def __init__(self, files: list[Path], transform: Callable[[Any], torch.Tensor], size: int):
        self.files, self.transform, self.size = files, transform, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            return self.transform(read_rgb(self.files[i])), i
        except BadImageError:  # unreadable, truncated, or a decompression bomb
            return torch.zeros(3, self.size, self.size), -1 - i


def predict(cfg: DictConfig) -> Path:
    """Top-``cfg.top_k`` classes of every image under ``cfg.input``; returns the CSV path."""
    require(cfg, "ckpt", "input")
    if cfg.on_bad_image not in ("skip", "fail"):
        raise ConfigError(f"on_bad_image must be 'skip' or 'fail', got {cfg.on_bad_image!r}.")
    if int(cfg.top_k) < 1:
        raise ConfigError(f"top_k must be >= 1, got {cfg.top_k}.")
    model = load_classifier(cfg.ckpt, policy=TargetPolicy.from_config(cfg))
    names = [str(n) for n in model.hparams["class_names"] or range(model.hparams["num_classes"])]
    files = list_inputs(cfg.input)
    tta = str(cfg.get("tta", "none"))
    check_tta(tta)
    views = tta_preprocessing(model.preprocessing, tta)
    data = FileDataset(files, build_transform(views, train=False), int(views["image_size"]))
    loader = DataLoader(data, batch_size=int(cfg.batch_size), num_workers=int(cfg.num_workers),
                        worker_init_fn=worker_ignores_stop_signals)  # fmt: skip
    model.to(device_of(cfg.device))
    tested = TTA(model, tta, int(model.preprocessing["image_size"]))
    logits, index = collect_logits(tested, loader, f"predict ({len(files)} images)")
    bad = [files[-1 - int(i)] for i in index if i < 0]
    if bad and cfg.on_bad_image == "fail":
        raise DataError(
            f"cannot read {len(bad)} input file(s), e.g. {bad[0]}. Remove or fix them, or set "
            "on_bad_image=skip."
        )
    if bad:
        log.warning("skipped %d unreadable file(s) (on_bad_image=skip), e.g. %s", len(bad), bad[0])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if model.multilabel:  # every class above its threshold, most probable first
        probs, cut = logits.sigmoid(), torch.as_tensor(model.thresholds)
        writer.writerow(["path", "labels", "probabilities"])
        for i, p in zip(index.tolist(), probs, strict=True):
            if i >= 0:
                chosen = sorted((c for c in range(len(names)) if p[c] >= cut[c]),
                                key=lambda c: -float(p[c]))  # fmt: skip
                writer.writerow([files[i], " ".join(names[c] for c in chosen),
                                 " ".join(f"{float(p[c]):.6f}" for c in chosen)])  # fmt: skip
        what = "labels above their thresholds"
    else:
        k = min(int(cfg.top_k), len(names))
        top_p, top = logits.softmax(-1).topk(k, dim=-1)
        header = (f"{c}_{j}" for j in range(1, k + 1) for c in ("class", "prob"))
        writer.writerow(["path", *header])
        for i, p, t in zip(index.tolist(), top_p.tolist(), top.tolist(), strict=True):
            if i >= 0:
                ranked = [v for j in range(k) for v in (names[t[j]], f"{p[j]:.6f}")]
                writer.writerow([files[i], *ranked])
        what = f"top {k}"
    out = Path(cfg.output)
    atomic_write_bytes(out, buffer.getvalue().encode())
    print(f"predictions for {len(files) - len(bad)} image(s) ({what}) written to {out}")
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    run_cli(lambda: predict(cfg))


if __name__ == "__main__":
    main()
