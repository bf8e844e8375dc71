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


def sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each image's loss: cross-entropy, or (multi-label, 2-D labels) the summed BCE."""
    if labels.ndim == 2:
        return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").sum(1)
    return F.cross_entropy(logits, labels, reduction="none")


def top_losses(logits: torch.Tensor, labels: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """Indices of the ``k`` samples with the highest loss, highest first."""
    losses = sample_losses(logits, labels)
    return losses.argsort(descending=True)[: min(k, len(losses))]


def _rows(
    samples: Samples,
    logits: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    k: int,
    thresholds: torch.Tensor | None,
) -> list[dict[str, object]]:
    losses = sample_losses(logits, labels)
    rows = []
    for rank, i in enumerate(top_losses(logits, labels, k).tolist(), 1):
        row: dict[str, object] = {
            "rank": rank,
            "index": i,
            "path": str(samples.paths[i]) if samples.paths is not None else "",
        }
        if labels.ndim == 2:  # multi-label: the sets, and the most confident wrong decision
            probs = logits[i].sigmoid()
            chosen = probs >= (thresholds if thresholds is not None else 0.5)
            wrong = (chosen != labels[i].bool()).nonzero().flatten().tolist()
            worst = max(wrong, key=lambda c: abs(float(probs[c]) - 0.5)) if wrong else None
            row |= {
                "true": " ".join(names[c] for c in labels[i].nonzero().flatten().tolist()),
                "predicted": " ".join(names[c] for c in chosen.nonzero().flatten().tolist()),
                "p_predicted": round(float(probs[worst]), 4) if worst is not None else "",
                "p_true": "",
                "worst": names[worst] if worst is not None else "",  # its most confident error
            }
        else:
            probs = logits[i].softmax(-1)
            pred = int(probs.argmax())
            row |= {
                "true": names[int(labels[i])],
                "predicted": names[pred],
                "p_predicted": round(float(probs[pred]), 4),
                "p_true": round(float(probs[int(labels[i])]), 4),
            }
        row["loss"] = round(float(losses[i]), 4)
        rows.append(row)
    return rows


def write_top_losses(
    samples: Samples,
    logits: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    out_dir: Path,
    title: str,
    k: int = TOP_K,
    thresholds: torch.Tensor | None = None,
) -> list[str]:
    """Write ``top_losses.png`` and ``top_losses.csv`` into ``out_dir``; return the report
    section (markdown lines). ``samples[i]`` must be the image behind ``logits[i]``."""
    if not len(labels):
        return []
    rows = _rows(samples, logits, labels, names, k, thresholds)
    cols = math.ceil(math.sqrt(len(rows)))
    lines = math.ceil(len(rows) / cols)
    fig = Figure(figsize=(2.3 * cols, 2.6 * lines), layout="constrained")
    what = ("true / predicted labels; the most confident wrong one" if labels.ndim == 2
            else "true / predicted, probability")  # fmt: skip
    fig.suptitle(f"{title}: the {len(rows)} highest losses ({what})")
    for n, row in enumerate(rows):
        ax = fig.add_subplot(lines, cols, n + 1)
        image = np.asarray(samples.load(int(row["index"])))  # type: ignore[call-overload]
        ax.imshow(image, interpolation="nearest" if max(image.shape[:2]) < 96 else "antialiased")
        p = row["p_predicted"]
        chance = f"p={p:.2f}  " if isinstance(p, float) else ""
        if row.get("worst"):  # multi-label: which decision was most confidently wrong
            chance = f"{row['worst']} p={p:.2f}  "
        ax.set_title(f"{row['true'] or '-'} / {row['predicted'] or '-'}\n{chance}"
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
