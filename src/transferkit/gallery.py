"""The worst mistakes, as a picture: the images with the highest loss (fastai's most used plot).

``top_losses.png`` shows each as a tile with its true class, the predicted class and that
prediction's probability; ``top_losses.csv`` lists them with their file paths (for data that
comes from files), so mislabelled images can be found and fixed. The run report and
``transferkit-evaluate`` write both.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from transferkit.data.samples import Samples
from transferkit.io import atomic_write_bytes

TOP_K = 16


def top_losses(logits: torch.Tensor, labels: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """Indices of the ``k`` samples with the highest cross-entropy, highest first."""
    losses = F.cross_entropy(logits, labels, reduction="none")
    return losses.argsort(descending=True)[: min(k, len(losses))]


def _rows(
    samples: Samples, logits: torch.Tensor, labels: torch.Tensor, names: Sequence[str], k: int
) -> list[dict[str, object]]:
    probs = logits.softmax(-1)
    losses = F.cross_entropy(logits, labels, reduction="none")
    rows = []
    for rank, i in enumerate(top_losses(logits, labels, k).tolist(), 1):
        pred = int(probs[i].argmax())
        rows.append({
            "rank": rank,
            "index": i,
            "path": str(samples.paths[i]) if samples.paths is not None else "",
            "true": names[int(labels[i])],
            "predicted": names[pred],
            "p_predicted": round(float(probs[i, pred]), 4),
            "p_true": round(float(probs[i, int(labels[i])]), 4),
            "loss": round(float(losses[i]), 4),
        })  # fmt: skip
    return rows


def write_top_losses(
    samples: Samples,
    logits: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    out_dir: Path,
    title: str,
    k: int = TOP_K,
) -> list[str]:
    """Write ``top_losses.png`` and ``top_losses.csv`` into ``out_dir``; return the report
    section (markdown lines). ``samples[i]`` must be the image behind ``logits[i]``."""
    if not len(labels):
        return []
    rows = _rows(samples, logits, labels, names, k)
    cols = math.ceil(math.sqrt(len(rows)))
    lines = math.ceil(len(rows) / cols)
    fig = Figure(figsize=(2.3 * cols, 2.6 * lines), layout="constrained")
    fig.suptitle(f"{title}: the {len(rows)} highest losses (true / predicted, probability)")
    for n, row in enumerate(rows):
        ax = fig.add_subplot(lines, cols, n + 1)
        image = np.asarray(samples.load(int(row["index"])))  # type: ignore[call-overload]
        ax.imshow(image, interpolation="nearest" if max(image.shape[:2]) < 96 else "antialiased")
        ax.set_title(f"{row['true']} / {row['predicted']}\np={row['p_predicted']:.2f}  "
                     f"loss {row['loss']:.2f}", fontsize=9, color="firebrick")  # fmt: skip
        ax.set_xticks([])
        ax.set_yticks([])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(out_dir / "top_losses.png", buf.getvalue())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out_dir / "top_losses.csv", text.getvalue().encode())
    wrong = sum(r["true"] != r["predicted"] for r in rows)
    return [
        "![top losses](top_losses.png)",
        "",
        f"The {len(rows)} {title} images with the highest loss ({wrong} of them misclassified); "
        "`top_losses.csv` lists them"
        + (" with their files, to find and fix mislabelled images." if samples.paths else "."),
    ]
