"""Shared fixtures: generated image folders and the real Hydra config, composed as users run it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


def write_images(folder: Path, classes: list[str], per_class: int, size: int = 24, seed: int = 0):
    """Class c gets images whose brightness pattern depends on c, so a model can learn it."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        d = folder / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3), np.float32)
            base[:, : size * (c + 1) // (len(classes) + 1)] = 200
            img = (base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i:03d}.png")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    write_images(root, ["ant", "bee", "cat"], per_class=12)
    return root


@pytest.fixture
def make_cfg() -> Callable[..., DictConfig]:
    def _make(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="finetune", overrides=list(overrides))

    return _make


def tiny_overrides(root: Path, out: Path, *extra: str) -> list[str]:
    """A tiny random-init model on a generated folder: seconds per run. The depth comes from
    the table (``finetune=table``), not from ``finetune=auto``'s race of six short runs; a
    ``finetune=`` in ``extra`` wins (the last override of a group does)."""
    return [
        "finetune=table",
        "data=image_folder",
        f"data.root={root}",
        "data.image_size=32",
        "data.batch_size=8",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
        "model.backbone=test_efficientnet",
        "model.weights=none",
        "trainer.max_epochs=2",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "logger=none",
        f"paths.output_dir={out}",
        *extra,
    ]


def write_bomb_png(path: Path, pixels: int) -> None:
    """A valid PNG of a few hundred bytes that declares ``pixels`` pixels (1-bit, all black):
    Pillow checks the declared size when it opens the file, before decoding anything."""
    import struct
    import zlib

    side = int(pixels**0.5) + 1

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    idat = zlib.compress(row * 16, 9)  # a few rows: enough to open, never decoded in full
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )
