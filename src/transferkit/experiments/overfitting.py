"""Claim 3, overfitting and its remedies: training and validation loss with no regularisation,
then with one remedy at a time, on a small training set."""

from __future__ import annotations

import math
from pathlib import Path

from transferkit.experiments.common import (
    Experiment,
    Run,
    _num,
    _plt,
    by_param,
    curve,
    failures,
    publish,
    save_figure,
)

REMEDY = "experiment/remedy"


def section_overfitting(runs: list[Run], fig_dir: Path) -> tuple[str, list[str]]:
    good = by_param(runs, REMEDY, "none")
    if not good:
        return "No run finished.\n" + failures(runs), []
    plt = _plt()
    names = list(good)
    cols = min(4, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.3 * cols, 2.8 * nrows), squeeze=False,
                             sharey=True)  # fmt: skip
    base = good.get("none")
    header = ["remedy", "epochs run", "train loss (last)", "val loss (min → last)",
              "gap (last)", "fit verdict", "test acc", "Δ test acc", "effect"]  # fmt: skip
    rows, helped = [], []
    for ax, name in zip(axes.flat, names, strict=False):
        s = good[name]
        ax.plot(*curve(s, "train_loss"), "-", label="train")
        ax.plot(*curve(s, "val_loss"), "o--", ms=3, label="val")
        ev = s.get("fit_evidence") or {}
        if "val_loss_min_epoch" in ev:  # where the validation loss bottomed out
            ax.axvline(ev["val_loss_min_epoch"], color="grey", ls=":", lw=1)
        gap = ev.get("gap_last")
        effect = []
        d_acc = ""
        if base is not None and name != "none":
            d_acc = f"{(s['test_acc'] - base['test_acc']) * 100:+.1f} pts"
        title = f"{name}: {s.get('fit') or '?'}, test {s['test_acc']:.3f}"
        ax.set_title(title + (f", {d_acc}" if d_acc else ""), fontsize=9)
        if base is not None and name != "none":
            base_gap = (base.get("fit_evidence") or {}).get("gap_last")
            if gap is not None and base_gap is not None:
                change = gap - base_gap
                if abs(change) > 0.05 * max(abs(base_gap), 1e-9):
                    effect.append("narrows the gap" if change < 0 else "widens the gap")
            d = s["test_acc"] - base["test_acc"]
            if d >= 0.005:
                effect.append("**raises test acc**")
                helped.append((name, d))
            elif d <= -0.005:
                effect.append("lowers test acc")
        rows.append([
            name, s["epochs"], _num(ev.get("train_loss_last")),
            f"{_num(ev.get('val_loss_min'))} → {_num(ev.get('val_loss_last'))}", _num(gap),
            s.get("fit") or "–", _num(s["test_acc"]), d_acc, ", ".join(effect) or "–",
        ])  # fmt: skip
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    for ax in axes[:, 0]:
        ax.set_ylabel("loss")
    save_figure(fig, fig_dir / "overfitting.png", axes.flat[: len(names)])
    text = publish(fig_dir, "overfitting", header, rows, "train and validation loss per remedy")
    text += (
        "Each panel: training loss (line) and validation loss (dots) per epoch, the epoch of "
        "the lowest validation loss dotted, the fit verdict, the test accuracy and its change "
        "against no remedy.\n\n"
    )
    verdicts = []
    if base is not None:
        verdicts.append(
            f"Without regularisation the fit is '{base.get('fit')}' "
            f"({(base.get('fit_evidence') or {}).get('reason', '')})."
        )
        if helped:
            helped.sort(key=lambda t: -t[1])
            verdicts.append(
                "Remedies that raised test accuracy: "
                + ", ".join(f"{n} ({d * 100:+.1f} pts)" for n, d in helped)
                + "."
            )
        else:
            verdicts.append("No remedy raised test accuracy by half a point or more here.")
    rising = [
        n
        for n, sm in good.items()
        if sm.get("fit") == "ok"
        and (ev := sm.get("fit_evidence") or {}).get("val_loss_last", 0)
        > 1.05 * ev.get("val_loss_min", math.inf)
    ]
    climbing = f" ({', '.join(rising)} here)" if rising else ""
    text += (
        " ".join(verdicts)
        + "\n\n"
        + (
            "The gap is the last validated epoch's validation minus training loss. Under mixup the "
            "training loss is measured against soft targets and is higher by construction, so its "
            "gap is not comparable with the others; early stopping's 'last' is where it stopped. "
            "Every run, the baseline included, tests the checkpoint with the best validation "
            "accuracy, which is itself early stopping by model selection: the early_stopping "
            "row differs mainly in the epochs it trains (the time it saves), not in the weights "
            "tested. The fit verdict is `summary.json`'s rule: the validation loss rose more "
            "than 5% above its minimum *while the training loss kept falling*; a run whose "
            "training loss also rose at the end is called ok even when its validation loss "
            f"climbs{climbing}: read the curves too. "
            "A single seed at 100 training images: differences under a point are noise.\n"
        )
    )
    return text + failures(runs), verdicts


EXPERIMENT = Experiment(
    "overfitting",
    "Overfitting and its remedies",
    "Half the backbone (8 of 17 blocks) trains on 10 images per class for 150 steps "
    "with no regularisation, then with one remedy at a time.",
    section_overfitting,
    quick=({"finetune.steps": "8", "data.limit_per_class": "5"},),
)
