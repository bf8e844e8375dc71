"""Collect a depth × data-size sweep (``make sweep-depth``) into a table and a plot.

    python -m transferkit.sweep multirun/sweep-depth

reads every ``summary.json`` under the folder and writes ``sweep.csv``, ``sweep.md`` and
``sweep.png`` (test accuracy and fit time against the number of trainable blocks, one line
per training-set size, the depth ``auto`` picked marked with a star).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Any

from transferkit.errors import NotFoundError
from transferkit.io import atomic_write_bytes

COLUMNS = [
    "per_class", "train_size", "regime", "auto", "trainable_blocks", "total_blocks",
    "epochs", "test_acc", "best_val_acc", "fit_seconds", "train_images_per_second",
]  # fmt: skip


def collect(root: Path) -> list[dict[str, Any]]:
    """One row per run, sorted by size, then auto last, then depth."""
    rows = []
    for path in sorted(root.rglob("summary.json")):
        s = json.loads(path.read_text())
        plan = s["plan"]
        rows.append(
            {
                "per_class": plan["median_per_class"],
                "train_size": s["train_size"],
                "regime": plan["regime"],
                "auto": plan.get("rule") is not None,
                "trainable_blocks": s["trainable_blocks"],
                "total_blocks": s["total_blocks"],
                "epochs": s["epochs"],
                "test_acc": s["test_acc"],
                "best_val_acc": s["best_val_acc"],
                "fit_seconds": s["fit_seconds"],
                "train_images_per_second": s["train_images_per_second"],
            }
        )
    rows.sort(key=lambda r: (r["per_class"], r["auto"], r["trainable_blocks"], r["regime"]))
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """A table per size: depth, accuracy, time; the best depth in bold; auto's choice and its
    gap to the best."""
    out = []
    for size in sorted({r["per_class"] for r in rows}):
        group = [r for r in rows if r["per_class"] == size]
        fixed = [r for r in group if not r["auto"]]
        best = max(fixed, key=lambda r: r["test_acc"]) if fixed else None
        out.append(f"\n**{size} images per class** ({group[0]['train_size']:,} training images)\n")
        out.append("| trainable blocks | regime | epochs | test acc | fit s |")
        out.append("|---|---|---|---|---|")
        for r in group:
            depth = f"{r['trainable_blocks']} of {r['total_blocks']}"
            name = f"auto → {r['regime']}" if r["auto"] else r["regime"]
            acc = f"{r['test_acc']:.3f}"
            if r is best:
                acc = f"**{acc}**"
            if r["auto"] and best:
                acc += f" ({(r['test_acc'] - best['test_acc']) * 100:+.1f} pts vs best)"
            out.append(f"| {depth} | {name} | {r['epochs']} | {acc} | {r['fit_seconds']:.0f} |")
    return "\n".join(out).lstrip() + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for size in sorted({r["per_class"] for r in rows}):
        fixed = sorted(
            (r for r in rows if r["per_class"] == size and not r["auto"] and r["regime"]
             in ("partial", "linear_probe", "full")),
            key=lambda r: r["trainable_blocks"],
        )  # fmt: skip
        if not fixed:
            continue
        x = [r["trainable_blocks"] for r in fixed]
        line = ax_acc.plot(x, [r["test_acc"] for r in fixed], "o-", label=f"{size}/class")[0]
        ax_time.plot(x, [r["fit_seconds"] for r in fixed], "o-", color=line.get_color())
        for r in rows:
            if r["per_class"] == size and r["auto"]:
                ax_acc.plot(r["trainable_blocks"], r["test_acc"], "*", ms=16,
                            color=line.get_color(), mec="black")  # fmt: skip
    ax_acc.set(xlabel="trainable backbone blocks (from the top)", ylabel="test accuracy",
               title="Accuracy vs fine-tuning depth (★ = auto)")  # fmt: skip
    ax_time.set(xlabel="trainable backbone blocks (from the top)", ylabel="fit time (s)",
                title="Fit time vs depth")  # fmt: skip
    ax_acc.legend(title="training images")
    for ax in (ax_acc, ax_time):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write(root: Path) -> list[Path]:
    rows = collect(root)
    if not rows:
        raise NotFoundError(f"no summary.json under {root}; run `make sweep-depth` first.")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    paths = [root / "sweep.csv", root / "sweep.md", root / "sweep.png"]
    atomic_write_bytes(paths[0], buf.getvalue().encode())
    atomic_write_bytes(paths[1], markdown(rows).encode())
    plot(rows, paths[2])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the sweep folder (holds run sub-folders)")
    args = parser.parse_args()
    for p in write(args.root):
        print(p)
    print(markdown(collect(args.root)))


if __name__ == "__main__":
    main()
