"""Claim 1, pre-training mostly buys development time: pretrained weights against random
init at the same step budget, by epoch and by wall time, at two data sizes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from transferkit.experiments.common import (
    Experiment,
    Run,
    _num,
    _plt,
    curve,
    failures,
    ok_runs,
    publish,
    save_figure,
)


def seconds_to_reach(s: dict[str, Any], target: float) -> float | None:
    """Wall seconds until the validation accuracy first reached ``target`` (None: never)."""
    for t, acc in zip(*curve(s, "val_acc", "seconds"), strict=True):
        if acc >= target:
            return float(t)
    return None


def section_pretraining(runs: list[Run], fig_dir: Path) -> tuple[str, list[str]]:
    plt = _plt()
    good = ok_runs(runs)
    sizes = sorted({int(r["params"].get("data.limit_per_class", 0)) for r in good})
    fig, (ax_e, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    header = ["per class", "weights", "epochs", "best val acc", "test acc", "fit s",
              "s to reach random init's best val acc"]  # fmt: skip
    rows, verdicts, support = [], [], []
    for size, color in zip(sizes, ["tab:blue", "tab:orange", "tab:green", "tab:red"], strict=False):
        by = {r["params"].get("model.weights", "?"): r["summary"] for r in good
              if int(r["params"].get("data.limit_per_class", 0)) == size}  # fmt: skip
        rand = by.get("none")
        for weights, s in sorted(by.items(), key=lambda kv: kv[0] == "none"):
            label = "random init" if weights == "none" else f"pretrained ({weights})"
            style = "--" if weights == "none" else "-"
            ax_e.plot(*curve(s, "val_acc"), style, color=color, label=f"{size}/class, {label}")
            ax_t.plot(*curve(s, "val_acc", "seconds"), style, color=color)
            reach = seconds_to_reach(s, rand["best_val_acc"]) if rand else None
            rows.append([size, label, s["epochs"], _num(s["best_val_acc"]), _num(s["test_acc"]),
                         f"{s['fit_seconds']:.0f}", _num(reach, 1)])  # fmt: skip
        pre = next((v for k, v in by.items() if k != "none"), None)
        if pre is None or rand is None:
            continue
        target = rand["best_val_acc"]
        reach_pre, reach_rand = seconds_to_reach(pre, target), seconds_to_reach(rand, target)
        lead = (pre["test_acc"] - rand["test_acc"]) * 100
        if reach_pre is None or reach_rand is None:
            verdicts.append(
                f"At {size} images per class the pretrained network never reached random "
                f"init's best validation accuracy ({target:.3f}); it ended {lead:+.1f} points "
                "against random init on the test set: **not** what the claim predicts."
            )
            support.append(False)
            continue
        sooner = reach_rand / reach_pre if reach_pre > 0 else math.inf
        first = curve(pre, "val_acc", "seconds")[0][:1]
        at_first = bool(first) and reach_pre <= first[0]  # no earlier measurement: a bound
        when = (
            f"already at its first validation ({reach_pre:.0f} s, so at least {sooner:.0f}× sooner)"
            if at_first
            else f"after {reach_pre:.0f} s ({sooner:.0f}× sooner)"
        )
        verdicts.append(
            f"At {size} images per class the pretrained network reached random init's best "
            f"validation accuracy ({target:.3f}) {when}, where random init needed "
            f"{reach_rand:.0f} s, and ended {abs(lead):.1f} points "
            f"{'ahead' if lead >= 0 else 'behind'} on the test set."
        )
        support.append(reach_pre < reach_rand and lead > 0)
    ax_e.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy by epoch")
    ax_t.set(
        xlabel="wall time since the fit started (s)",
        ylabel="validation accuracy",
        title="... by wall time",
    )
    save_figure(fig, fig_dir / "pretraining.png", (ax_e, ax_t))
    text = publish(fig_dir, "pretraining", header, rows, "pretrained vs random init")
    if verdicts:
        text += " ".join(verdicts) + "\n\n"
    if support and all(support):
        text += (
            "**What this shows and what it does not.** At the same budget pre-training gets "
            "to random init's best accuracy far sooner and ends ahead: it buys development "
            "time. Whether it buys *only* time, i.e. whether random init would catch up given "
            "a long enough schedule and enough data (He et al., 2019, needed ImageNet-scale "
            "data and long schedules for that), is not tested at this budget; the curves only "
            "bound how much time random init would need.\n"
        )
    elif support:
        text += "At some size pre-training did **not** save time or accuracy: see above.\n"
    else:
        text += "Pretrained and random-init runs were not both available: no comparison.\n"
    return text + failures(runs), verdicts


EXPERIMENT = Experiment(
    "pretraining",
    "Pre-training mostly buys development time",
    "ImageNet-pretrained weights against random init, everything trainable, the same "
    "200-step budget, at 100 and 800 images per class. Early stopping is off, so both "
    "spend the whole budget; the checkpoint with the best validation accuracy is "
    "tested.",
    section_pretraining,
    quick=({"data.limit_per_class": "10", "finetune.steps": "6"},),
)
