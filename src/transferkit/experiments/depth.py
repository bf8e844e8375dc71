"""Claim 2, how deep to fine-tune depends on how much data you have: test accuracy by trainable
depth at each data size, and the depth ``finetune=auto`` picks."""

from __future__ import annotations

import itertools
from pathlib import Path

from transferkit.experiments.common import Experiment, Run, failures, ok_runs, pts, save_csv


def section_depth(runs: list[Run], fig_dir: Path) -> tuple[str, list[str]]:
    from transferkit import sweep

    rows = []
    for r in ok_runs(runs):
        s = r["summary"]
        plan = s["plan"]
        rows.append({
            "per_class": plan["median_per_class"], "train_size": s["train_size"],
            "regime": plan["regime"], "auto": plan.get("rule") is not None,
            "trainable_blocks": s["trainable_blocks"], "total_blocks": s["total_blocks"],
            "epochs": s["epochs"], "test_acc": s["test_acc"], "best_val_acc": s["best_val_acc"],
            "fit_seconds": s["fit_seconds"],
            "train_images_per_second": s["train_images_per_second"],
        })  # fmt: skip
    rows.sort(key=lambda r: (r["per_class"], r["auto"], r["trainable_blocks"]))
    if not rows:
        return "No run finished.\n" + failures(runs), []
    sweep.plot(rows, fig_dir / "depth_sweep.png")
    save_csv(
        fig_dir.parent / "tables" / "depth_sweep.csv",
        sweep.COLUMNS,
        [[r[c] for c in sweep.COLUMNS] for r in rows],
    )
    verdicts, trend = [], []
    for size in sorted({r["per_class"] for r in rows}):
        fixed = [r for r in rows if r["per_class"] == size and not r["auto"]]
        auto = [r for r in rows if r["per_class"] == size and r["auto"]]
        if not fixed:
            continue
        best = max(fixed, key=lambda r: r["test_acc"])
        probe = min(fixed, key=lambda r: r["trainable_blocks"])
        full = max(fixed, key=lambda r: r["trainable_blocks"])
        trend.append((size, best, probe, full))
        line = (
            f"{size}/class: best depth {best['trainable_blocks']} of {best['total_blocks']} "
            f"blocks ({best['test_acc']:.3f}); training {probe['trainable_blocks']} blocks "
            f"costs {(best['test_acc'] - probe['test_acc']) * 100:.1f} points, training all "
            f"{full['trainable_blocks']} costs {(best['test_acc'] - full['test_acc']) * 100:.1f}"
        )
        if auto:
            line += (
                f"; auto picked {auto[0]['trainable_blocks']} "
                f"({pts(auto[0]['test_acc'], best['test_acc'])} points from the best)"
            )
        verdicts.append(line + ".")
    text = sweep.markdown(rows) + "\n![depth sweep](figures/depth_sweep.png)\n\n"
    text += "- " + "\n- ".join(verdicts) + "\n\n"
    if len(trend) > 1:
        # the evidence: what training everything costs against the best shrinks as data grows,
        # and the best depth at the largest size is at least that at the smallest
        full_cost = [b["test_acc"] - f["test_acc"] for _, b, _, f in trend]
        shrinks = all(y <= x + 0.005 for x, y in itertools.pairwise(full_cost))
        deeper = trend[-1][1]["trainable_blocks"] >= trend[0][1]["trainable_blocks"]
        costs = ", ".join(
            f"{c * 100:.1f} at {t[0]}/class" for c, t in zip(full_cost, trend, strict=True)
        )
        if shrinks and deeper and full_cost[0] > full_cost[-1]:
            text += (
                f"Training the whole network costs less the more data there is ({costs} "
                "points below the best depth) and the best depth at the largest size is at "
                "least that at the smallest: the claim holds on this data. Between sizes the "
                "best depth can move by a few blocks within noise (a point is 10 of 1,000 "
                "test images).\n"
            )
        else:
            text += (
                f"What training the whole network costs against the best depth ({costs} "
                "points) does **not** shrink steadily with the data here: this grid does not "
                "support the claim.\n"
            )
    return text + failures(runs), verdicts


EXPERIMENT = Experiment(
    "depth_sweep",
    "How deep to fine-tune depends on how much data you have",
    "Trainable depth (0, a quarter, half and all of the 17 blocks at 10 and 100 images "
    "per class; 0, a quarter and all at 800) at the step budget the auto table gives "
    "each size, and where `finetune=auto` lands.",
    section_depth,
    sweeps=(
        {},
        {
            "data.limit_per_class": "800",
            "finetune.steps": "375",
            "finetune.trainable_blocks": "0,0.25,all",
        },
        {
            "finetune": "auto",
            "finetune.steps": "null",
            "data.limit_per_class": "10,100,800",
            "finetune.trainable_blocks": None,
        },
    ),
    quick=(
        {
            "data.limit_per_class": "5,20",
            "finetune.trainable_blocks": "0,0.5,all",
            "finetune.steps": "6",
        },
        {
            "finetune": "auto",
            "data.limit_per_class": "5,20",
            "finetune.steps": "6",
            "finetune.trainable_blocks": None,
        },
    ),
)
