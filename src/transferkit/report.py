"""The run report: learning curves from ``metrics.csv``, a confusion matrix, ``report.md``.

Pure functions (read the CSV, find the best / overfitting epoch, the confusion matrix, the
plots) plus :func:`write_run_report`, which ``finetune`` calls on rank zero at the end.
Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import platform
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure  # the object API renders with Agg, no GUI backend
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torchmetrics.classification import MultilabelF1Score
from tqdm.auto import tqdm

from transferkit.callbacks.fit_diagnosis import diagnose_fit
from transferkit.data.samples import per_class_counts
from transferkit.gallery import write_top_losses
from transferkit.io import atomic_write_bytes
from transferkit.models.multilabel import average_precisions

log = logging.getLogger(__name__)

CURVE_KEYS = ("train/loss", "val/loss", "train/acc", "val/acc", "val/f1_macro",
              "val/balanced_acc", "val/map")  # fmt: skip
VERSIONED = ("transferkit", "torch", "timm", "lightning", "torchmetrics", "hydra-core")


# -- learning curves ----------------------------------------------------------------------
def read_epoch_metrics(*paths: str | Path) -> dict[str, list[float]]:
    """Per-epoch train/val loss and accuracy from Lightning's CSV logger file(s).

    Returns ``{"epoch": [1, 2, ...], "train/loss": [...], ...}`` (epochs 1-based, NaN where
    a metric was not logged that epoch, e.g. validation every n epochs). Test rows and
    per-step rows without an epoch are ignored. Several ``paths`` (a resumed run's parts,
    oldest first: :func:`metrics_parts`) join into one table: each part replaces the epochs
    of the parts before it from its first epoch on (a resume from an earlier checkpoint
    abandons what came after it).
    """
    by_epoch: dict[int, dict[str, float]] = {}
    for path in paths:
        part: dict[int, dict[str, float]] = {}
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if not row.get("epoch"):
                    continue
                values = {k: float(row[k]) for k in CURVE_KEYS if row.get(k) not in (None, "")}
                if values:
                    part.setdefault(int(float(row["epoch"])), {}).update(values)
        if part:
            first = min(part)
            by_epoch = {e: v for e, v in by_epoch.items() if e < first} | part
    epochs = sorted(by_epoch)
    table: dict[str, list[float]] = {"epoch": [float(e + 1) for e in epochs]}
    for k in CURVE_KEYS:
        table[k] = [by_epoch[e].get(k, math.nan) for e in epochs]
    return table


def metrics_parts(log_dir: str | Path) -> list[Path]:
    """A run's CSV logs, oldest first: the ``metrics.before-resume-<n>.csv`` that resuming in
    its folder kept aside (Lightning's logger deletes ``metrics.csv``), then ``metrics.csv``."""
    log_dir = Path(log_dir)
    kept = {}
    for p in log_dir.glob("metrics.before-resume-*.csv"):
        n = p.stem.rsplit("-", 1)[-1]
        if n.isdigit():
            kept[int(n)] = p
    parts = [kept[n] for n in sorted(kept)]
    return [*parts, log_dir / "metrics.csv"] if (log_dir / "metrics.csv").is_file() else parts


def best_epoch(epochs: Sequence[float], values: Sequence[float], mode: str) -> float | None:
    """The first epoch with the best value (what ``ModelCheckpoint`` keeps), or None."""
    pairs = [(e, v) for e, v in zip(epochs, values, strict=True) if not math.isnan(v)]
    if not pairs:
        return None
    pick = max if mode == "max" else min
    best = pick(v for _, v in pairs)
    return next(e for e, v in pairs if v == best)


def overfitting_epoch(
    epochs: Sequence[float], train_loss: Sequence[float], val_loss: Sequence[float]
) -> float | None:
    """The epoch of lowest validation loss when the run overfits, else None.

    One definition with the ``fit`` verdict in ``summary.json``: this asks
    ``diagnose_fit`` (the FitDiagnosis callback's rule) about the same curves.
    """
    history = [
        {"epoch": e, "train_loss": t, "val_loss": v}
        for e, t, v in zip(epochs, train_loss, val_loss, strict=True)
        if not (math.isnan(t) or math.isnan(v))
    ]
    verdict = diagnose_fit(history, num_classes=2)  # the class count only matters for underfit
    return verdict["evidence"]["val_loss_min_epoch"] if verdict["fit"] == "overfitting" else None


def plot_learning_curves(
    table: Mapping[str, Sequence[float]], path: str | Path, marks: Mapping[str, float | None]
) -> None:
    """Loss and accuracy per epoch, train vs val, with vertical lines at ``marks``."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    styles = {"best": ("tab:green", "--"), "early stop": ("tab:red", ":"),
              "overfitting": ("tab:purple", "-.")}  # fmt: skip
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "acc"), strict=True):
        for split, marker in (("train", "o"), ("val", "s")):
            xs, ys = _finite(table["epoch"], table[f"{split}/{metric}"])
            ax.plot(xs, ys, marker=marker, label=f"{split}/{metric}")
        for name, epoch in marks.items():
            if epoch is not None:
                colour, line = styles.get(name.split(" (")[0], ("grey", "--"))
                ax.axvline(epoch, color=colour, linestyle=line, label=f"{name}: epoch {epoch:g}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy" if metric == "acc" else "cross-entropy loss")
        ax.set_title("accuracy" if metric == "acc" else "loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def _finite(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    keep = [(x, y) for x, y in zip(xs, ys, strict=True) if not math.isnan(y)]
    return [x for x, _ in keep], [y for _, y in keep]


# -- predictions and the confusion matrix --------------------------------------------------
@torch.no_grad()
def collect_logits(
    model: torch.nn.Module, loader: DataLoader, desc: str = "predict"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over ``loader`` in eval mode, with a progress bar."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False):
        logits.append(model(x.to(device)).float().cpu())
        labels.append(torch.as_tensor(y).cpu())  # device batches hold them on the GPU
    model.train(was_training)
    if not logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor | None = None
) -> dict[str, float]:
    """Loss, top-1 and (with more than 5 classes) top-5 accuracy; multi-label (2-D labels):
    the summed BCE per image, mAP, and macro-F1 at ``thresholds``."""
    if labels.ndim == 2:
        y, probs = labels.long(), logits.sigmoid()
        cut = thresholds if thresholds is not None else 0.5
        n = labels.shape[1]
        return {
            "loss": float(F.binary_cross_entropy_with_logits(logits, labels.float(),
                                                             reduction="sum") / len(logits)),
            "map": average_precisions(probs, y)[1],
            "f1_macro": float(MultilabelF1Score(n, average="macro")((probs >= cut).long(), y)),
        }  # fmt: skip
    out = {
        "loss": float(F.cross_entropy(logits, labels)),
        "acc": float((logits.argmax(-1) == labels).float().mean()),
    }
    if logits.shape[1] > 5:
        top5 = logits.topk(5, dim=-1).indices
        out["acc_top5"] = float((top5 == labels[:, None]).any(-1).float().mean())
    return out


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[true, predicted]`` counts."""
    idx = np.asarray(target, np.int64) * num_classes + np.asarray(pred, np.int64)
    return np.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_rows(cm: np.ndarray, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """Per class: images, correct, accuracy (NaN without images), most confused with."""
    rows = []
    for i, name in enumerate(class_names):
        n = int(cm[i].sum())
        off = cm[i].copy()
        off[i] = 0
        j = int(off.argmax())
        rows.append({
            "class": name, "images": n, "correct": int(cm[i, i]),
            "accuracy": cm[i, i] / n if n else math.nan,
            "confused_with": f"{class_names[j]} ({int(off[j])})" if off[j] else "",
        })  # fmt: skip
    return rows


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str | Path) -> None:
    """Rows (true classes) coloured by their share; counts written in cells when few classes."""
    n = len(class_names)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = min(max(4.0, 0.5 * n + 2), 20.0)
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class")
    ax.set_xticks(range(n), class_names, rotation=45 if n > 4 else 0, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"test confusion matrix: {int(cm.sum())} images, accuracy {acc:.3f}")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                colour = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=colour, fontsize=7)
    _save(fig, path)


def _save(fig: Figure, path: str | Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


# -- report.md ----------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """Python and the versions of the libraries that decide the results."""
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_confusion(cm: np.ndarray, class_names: Sequence[str], out_dir: Path) -> list[str]:
    """``confusion_matrix.png`` and ``per_class.csv`` (images, correct, recall and the class
    most often predicted instead, per class) into ``out_dir``; the report's Markdown."""
    plot_confusion_matrix(cm, class_names, out_dir / "confusion_matrix.png")
    rows = per_class_rows(cm, class_names)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["class", "images", "correct", "recall",
                                              "confused_with"])  # fmt: skip
    writer.writeheader()
    for r in rows:
        writer.writerow(
            {
                **{k: v for k, v in r.items() if k != "accuracy"},
                "recall": "" if math.isnan(r["accuracy"]) else f"{r['accuracy']:.4f}",
            }
        )
    atomic_write_bytes(out_dir / "per_class.csv", text.getvalue().encode())
    lines = confusion_section(cm, class_names, "confusion_matrix.png")
    return [*lines, "", "`per_class.csv` holds this table."]


def confusion_section(cm: np.ndarray, class_names: Sequence[str], png: str) -> list[str]:
    """Markdown: the confusion-matrix image and the per-class accuracy table."""
    lines = [f"![confusion matrix]({png})", "",
             "| class | test images | correct | accuracy | most often predicted instead |",
             "|---|---:|---:|---:|---|"]  # fmt: skip
    rows = per_class_rows(cm, class_names)
    for r in rows:
        lines.append(f"| {r['class']} | {r['images']} | {r['correct']} | "
                     f"{_fmt(r['accuracy'])} | {r['confused_with']} |")  # fmt: skip
    scored = sorted((r for r in rows if r["images"]), key=lambda r: r["accuracy"])
    if len(scored) > 1:
        worst = ", ".join(f"{r['class']} ({r['accuracy']:.2f})" for r in scored[:3])
        lines += ["", f"Worst classes by recall (accuracy within the class): {worst}."]
    return lines


def multilabel_section(
    logits: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor, class_names: Sequence[str]
) -> list[str]:
    """Markdown: per-class average precision, the tuned threshold, and F1 there."""
    probs, y = logits.sigmoid(), labels.long()
    ap, mean_ap = average_precisions(probs, y)
    f1 = MultilabelF1Score(len(class_names), average="none")((probs >= thresholds).long(), y)
    lines = [f"Mean average precision (mAP, over the classes present): {mean_ap:.4f}.", "",
             "| class | test images with it | average precision | threshold | F1 |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for i, name in enumerate(class_names):
        lines.append(f"| {name} | {int(y[:, i].sum())} | {_fmt(float(ap[i]))} | "
                     f"{float(thresholds[i]):.2f} | {_fmt(float(f1[i]))} |")  # fmt: skip
    present = [i for i in range(len(class_names)) if int(y[:, i].sum())]
    worst = sorted(present, key=lambda i: float(ap[i]))[:3]
    lines += [
        "",
        "Worst classes by average precision: "
        + ", ".join(f"{class_names[i]} ({float(ap[i]):.2f})" for i in worst)
        + ".",
    ]
    return lines


def budget_text(b: dict[str, Any]) -> str:
    """``plan.budget`` as one line: epochs, steps, batch and where the figure came from."""
    if not b:
        return "–"
    per_step = f"{b['batch_per_device']} per device × {b['devices']}"
    if b.get("accumulate", 1) > 1:
        per_step += f" × {b['accumulate']} accumulated"
    return (f"{b['epochs']} epochs = {b['steps']} steps of {b['global_batch']} images "
            f"({per_step}), from {b['from']}")  # fmt: skip


def render_report(
    summary: Mapping[str, Any],
    split_counts: Mapping[str, Sequence[int]],
    class_names: Sequence[str],
    curves: Mapping[str, Any] | None,
    confusion: list[str] | None,
    config_yaml: str,
    gallery: list[str] | None = None,
    race_png: str | None = None,
) -> str:
    """``report.md`` text. ``curves``: ``png``, ``marks`` and a ``note``; None: no CSV.
    ``race_png``: the figure of ``finetune=auto``'s race, if it raced."""
    plan = summary.get("plan", {})
    out = ["# transferkit run report", "", "## Plan", "", str(plan.get("reason", "")), ""]
    settings = [(k, budget_text(v) if k == "budget" else v) for k, v in plan.items()
                if k not in ("reason", "measured")]  # fmt: skip
    out += _table(("setting", "value"), settings)
    out += race_section(plan.get("measured"), race_png)
    out += ["", "## Data", ""]
    names = list(split_counts)
    rows = [(c, *(split_counts[s][i] for s in names)) for i, c in enumerate(class_names)]
    rows.append(("**total**", *(sum(split_counts[s]) for s in names)))
    out += _table(("class", *names), rows)
    metric_keys = ("test_acc", "test_f1_macro", "test_balanced_acc", "test_map", "test_loss",
                   "test_acc_top5", "epochs", "global_steps", "trainable_params",
                   "total_params", "fit_seconds", "train_images_per_second",
                   "best_checkpoint")  # fmt: skip
    objective = summary.get("objective") or {}
    rows = [(f"best {objective.get('name', 'val')} (the checkpoint's)", objective.get("value"))]
    rows += [(k, summary.get(k)) for k in metric_keys if k in summary]
    out += ["", "## Final metrics", ""]
    out += _table(("metric", "value"), rows)
    out += ["", "## Learning curves", ""]
    if curves is None:
        out.append("No `metrics.csv` (choose `logger=csv`, the default, to get learning curves).")
    else:
        out += [f"![learning curves]({curves['png']})", "", curves["note"]]
    out += ["", "## Test split: per-class results", ""]
    out += confusion or ["No test split (or `test=false`): no confusion matrix."]
    if gallery:
        out += ["", "## Test split: the worst mistakes", "", *gallery]
    out += ["", "## Configuration", "", "```yaml", config_yaml.rstrip(), "```", ""]
    out += ["## Versions", ""]
    out += _table(("package", "version"), list(versions().items()))
    return "\n".join(out) + "\n"


def race_section(measured: Mapping[str, Any] | None, png: str | None) -> list[str]:
    """``finetune=auto``'s decision: every candidate's short run, its score and cost."""
    if not measured:
        return []
    from transferkit.autodepth import binomial_se

    out = ["", "## How the depth was chosen (finetune=auto)", "", str(measured.get("reason", ""))]
    out += ["", f"Source: {measured.get('source')}; the table's prior was "
            f"{measured.get('prior_blocks')} blocks; the decision took "
            f"{float(measured.get('seconds') or 0):.0f} s.", ""]  # fmt: skip
    rows = [(t["round"] + 1, t["blocks"], t["steps"],
             f"{abs(t['score']):.4f} ± {binomial_se(abs(t['score']), t['val_size']):.4f}",
             t["val_size"], f"{t['seconds']:.1f}",
             {True: "yes", False: "no"}.get(t.get("finished"), "—"))
            for t in measured.get("trials") or []]  # fmt: skip
    if rows:
        out += _table(("round", "trainable blocks", "steps", "validation score ± s.e.",
                       "validation images", "seconds", "ended by early stopping"),
                      rows)  # fmt: skip
    if png:
        out += ["", f"![the race]({png})"]
    return out


def curve_marks(
    table: Mapping[str, Sequence[float]], monitor: str, mode: str, stopped_after: int | None
) -> tuple[dict[str, float | None], str]:
    """The vertical lines of the learning-curve plot and a sentence about each;
    ``stopped_after``: the epochs done when early stopping ended the run (None: it did not)."""
    epochs = table["epoch"]
    best = best_epoch(epochs, table[monitor], mode) if monitor in table else None
    over = overfitting_epoch(epochs, table["train/loss"], table["val/loss"])
    stop = float(stopped_after) if stopped_after else None
    marks = {f"best ({monitor})": best, "early stop": stop, "overfitting": over}
    note = [f"Best checkpoint: epoch {best:g} by `{monitor}` ({mode})." if best else
            f"No `{monitor}` values logged."]  # fmt: skip
    note.append(f"Early stopping ended the run after epoch {stop:g}." if stop else
                "Early stopping did not trigger.")  # fmt: skip
    note.append(
        f"Overfitting: validation loss is lowest at epoch {over:g} and rises afterwards while "
        "training loss keeps falling." if over else
        "No overfitting point: validation loss did not rise while training loss fell."
    )  # fmt: skip
    return marks, " ".join(note)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
    if v is None:
        return "–"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v).replace("|", "\\|").replace("\n", " ")


# -- the run report ------------------------------------------------------------------------
@rank_zero_only
def write_run_report(
    cfg: DictConfig, summary: Mapping[str, Any], objects: Mapping[str, Any]
) -> Path:
    """Write ``report.md``, ``learning_curves.png``, ``confusion_matrix.png`` and the
    top-losses gallery (``top_losses.png``, ``top_losses.csv``) of a run."""
    dm, model, trainer = objects["datamodule"], objects["model"], objects["trainer"]
    out_dir = Path(cfg.paths.output_dir)
    names = list(dm.classes)
    split_counts = {
        s: per_class_counts(dm.splits[s].labels, len(names)).tolist()
        for s in ("train", "val", "test")
        if s in dm.splits
    }
    curves = None
    log_dir = next((lg.log_dir for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
    parts = metrics_parts(log_dir) if log_dir is not None else []
    if not (cfg.get("ckpt_path") or objects.get("resume_from")):  # kept parts: another run's
        parts = [p for p in parts if p.name == "metrics.csv"]
    if parts:  # a resumed run's curves from its start, not only the resumed part's
        table = read_epoch_metrics(*parts)
        if table["epoch"]:
            stopped = (summary.get("early_stopping") or {}).get("after_epochs")
            marks, note = curve_marks(table, cfg.monitor, cfg.mode, stopped)
            plot_learning_curves(table, out_dir / "learning_curves.png", marks)
            curves = {"png": "learning_curves.png", "note": note}
    confusion = gallery = None
    if summary.get("test_loss") is not None:  # the model now holds the tested (best) weights
        model.to(trainer.strategy.root_device)
        logits, labels = collect_logits(model, dm.test_dataloader(), "report: test split")
        if model.multilabel:
            confusion = multilabel_section(logits, labels, model.thresholds, names)
        else:
            cm = confusion_matrix(logits.argmax(-1).numpy(), labels.numpy(), len(names))
            confusion = write_confusion(cm, names, out_dir)
        gallery = write_top_losses(dm.splits["test"], logits, labels, names, out_dir, "test",
                                   thresholds=getattr(model, "thresholds", None))  # fmt: skip
    try:
        config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:  # e.g. ${hydra:...} outside a Hydra app
        config_yaml = OmegaConf.to_yaml(cfg)
    race_png = None
    measured = (summary.get("plan") or {}).get("measured")
    if measured and measured.get("trials"):
        from transferkit.autodepth import plot_race

        if plot_race(measured, out_dir / "auto_race.png", cfg.monitor):
            race_png = "auto_race.png"
    text = render_report(summary, split_counts, names, curves, confusion, config_yaml, gallery,
                         race_png)  # fmt: skip
    path = out_dir / "report.md"
    atomic_write_bytes(path, text.encode())
    print(f"  report: {path}")
    return path
