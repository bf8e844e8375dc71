"""A multi-label data set built from Animal-MNIST: 2 or 3 silhouettes tiled into one image.

    python -m transferkit.data.tiled data/multilabel            # make data-multilabel
    make finetune ARGS="data=csv data.manifest=data/multilabel/labels.csv \\
        data.split_column=split data.label_separator=' ' data.image_size=64"

Each image is a 2 x 2 grid of 28-pixel cells; 2 or 3 cells hold silhouettes of different
animals, the others stay black, and the labels are the set of animals. Train, val and test
images are tiled from disjoint silhouettes (the package's images, split per class with a
fixed seed), so test images hold silhouettes the model never saw. It writes PNG files and
``labels.csv`` (``path,label,split``, the labels separated by spaces).
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

from transferkit.data.animal_mnist import CLASSES, load_animal_mnist
from transferkit.data.samples import stratified_split
from transferkit.io import atomic_write_bytes

CELL = 28


def tile(images: list[np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """One 56 x 56 image and its classes: 2 or 3 silhouettes in random cells of a 2 x 2
    grid, from ``images[c]`` (the silhouettes of class ``c``), of different classes."""
    k = int(rng.integers(2, 4))
    classes = sorted(rng.choice(len(images), size=k, replace=False).tolist())
    cells = rng.choice(4, size=k, replace=False)
    canvas = np.zeros((2 * CELL, 2 * CELL), dtype=np.uint8)
    for c, cell in zip(classes, cells, strict=True):
        pool = images[c]
        r, col = divmod(int(cell), 2)
        canvas[r * CELL : (r + 1) * CELL, col * CELL : (col + 1) * CELL] = pool[
            rng.integers(len(pool))
        ]
    return canvas, classes


def write_tiled(out: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """Write ``sizes[split]`` tiled images per split into ``out``; return the manifest."""
    images, labels = load_animal_mnist()
    train_idx, val_idx, test_idx = stratified_split(labels, [0.1, 0.1], seed, CLASSES)
    rng = np.random.default_rng(seed)
    rows = [("path", "label", "split")]
    for split, index in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        by_class = [images[index][labels[index] == c] for c in range(len(CLASSES))]
        for i in range(sizes.get(split, 0)):
            canvas, classes = tile(by_class, rng)
            rel = f"images/{split}/{i:05d}.png"
            buf = io.BytesIO()
            Image.fromarray(canvas).save(buf, format="PNG")
            atomic_write_bytes(out / rel, buf.getvalue())
            rows.append((rel, " ".join(CLASSES[c] for c in classes), split))
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    manifest = out / "labels.csv"
    atomic_write_bytes(manifest, text.getvalue().encode())
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Tile Animal-MNIST into a multi-label set.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    manifest = write_tiled(args.out, {"train": args.train, "val": args.val, "test": args.test},
                           args.seed)  # fmt: skip
    print(f"wrote {args.train + args.val + args.test} images and {manifest}")


if __name__ == "__main__":
    main()
