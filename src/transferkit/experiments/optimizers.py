"""Claim 4, optimisers differ in speed and in how sensitive they are to the learning rate:
SGD, momentum, AdaGrad, RMSProp and Adam over an LR grid and at the LR finder's suggestion."""

from __future__ import annotations

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
    pts,
    save_csv,
    save_figure,
    table,
)


def section_optimizers(runs: list[Run], fig_dir: Path) -> tuple[str, list[str]]:
    plt = _plt()
    grid: dict[str, dict[float, dict[str, Any]]] = {}
    finder: dict[str, dict[str, Any]] = {}
    for r in ok_runs(runs):
        name = r["params"].get("optimizer", "?")
        s = r["summary"]
        if s.get("lr_find"):
            finder[name] = s
        else:
            lr = float(r["params"].get("optimizer.lr", s.get("lr", 0)) or 0)
            grid.setdefault(name, {})[lr] = s
    if not grid:
        return "No run finished.\n" + failures(runs), []
    lrs = sorted({lr for g in grid.values() for lr in g})
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    best: dict[str, tuple[float, dict[str, Any]]] = {}
    rows = []
    for name, by_lr in grid.items():
        xs = sorted(by_lr)
        line = ax.plot(xs, [by_lr[x]["test_acc"] for x in xs], "o-", label=name)[0]
        b = max(xs, key=lambda x: by_lr[x]["best_val_acc"] or 0)
        best[name] = (b, by_lr[b])
        f = finder.get(name)
        sug = (f or {}).get("lr_find") or {}
        if f and sug.get("applied"):
            ax.plot([sug["applied"]], [f["test_acc"]], "*", ms=15, color=line.get_color(),
                    mec="black")  # fmt: skip
        good_lrs = [x for x in xs if by_lr[x]["test_acc"] >= by_lr[b]["test_acc"] - 0.02]
        rows.append([
            name, *(_num(by_lr[x]["test_acc"]) if x in by_lr else "–" for x in lrs),
            f"{b:g}", f"{min(good_lrs):g}–{max(good_lrs):g}",
            _num(sug.get("suggestion"), 4) if sug.get("suggestion") else "–",
            _num(f["test_acc"]) if f else "–",
        ])  # fmt: skip
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="test accuracy",
           title="LR sensitivity (★ = trained at the LR finder's suggestion)")  # fmt: skip
    save_figure(fig, fig_dir / "optimizers_lr.png", (ax,))

    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, (lr, s) in best.items():
        ax_s.plot(*curve(s, "train_loss", "step"), "-", label=f"{name} (lr {lr:g})")
        ax_t.plot(*curve(s, "train_loss", "seconds"), "-")
    ax_s.set(xlabel="optimizer step", ylabel="training loss (epoch mean)", yscale="log",
             title="Each optimiser at its best grid LR")  # fmt: skip
    ax_t.set(
        xlabel="wall time since the fit started (s)",
        ylabel="training loss",
        yscale="log",
        title="... by time",
    )
    save_figure(fig, fig_dir / "optimizers_curves.png", (ax_s, ax_t))
    header = ["optimizer", *(f"lr {x:g}" for x in lrs), "best LR (val)",
              "LRs within 2 pts", "LR finder", "test acc at finder LR"]  # fmt: skip
    save_csv(fig_dir.parent / "tables" / "optimizers.csv", header, rows)
    text = "Test accuracy per optimiser and learning rate:\n\n" + table(header, rows)
    text += "\n![LR sensitivity](figures/optimizers_lr.png)\n"
    text += "\n![loss curves](figures/optimizers_curves.png)\n\n"
    top = max(best.items(), key=lambda kv: kv[1][1]["test_acc"])
    verdicts = [
        f"Best: {top[0]} at lr {top[1][0]:g} ({top[1][1]['test_acc']:.3f} test accuracy).",
        "At the LR chosen on the validation split: "
        + ", ".join(f"{n} {s['test_acc']:.3f} (lr {lr:g})" for n, (lr, s) in best.items())
        + ".",
    ]
    speed = {}
    for name, (_, s) in best.items():
        below = [r["step"] for r in s.get("history") or [] if r.get("train_loss", 9e9) < 0.5]
        speed[name] = below[0] if below else None
    verdicts.append(
        "Speed, steps until the training loss fell below 0.5 (epoch mean): "
        + ", ".join(f"{n} {v if v is not None else 'never'}" for n, v in speed.items())
        + "."
    )
    best_lrs = {lr for lr, _ in best.values()}
    if len(best_lrs) > 1:
        lo, hi = min(best_lrs), max(best_lrs)
        verdicts.append(
            f"The best learning rate spans {lo:g} to {hi:g} across optimisers, a factor of "
            f"{hi / lo:.0f}: no single LR suits them all, and the 'LRs within 2 pts' column "
            "shows how wide a window each tolerates. The claim holds on this task."
        )
    else:
        verdicts.append(
            f"Every optimiser was best at the same LR ({next(iter(best_lrs)):g}): on this "
            "grid the optimisers do **not** differ in which LR they need."
        )
    hits = []
    for name, f in finder.items():
        sug = (f.get("lr_find") or {}).get("suggestion")
        if sug and name in best:
            hits.append(
                f"{name}: suggests {sug:.2g}, {pts(f['test_acc'], best[name][1]['test_acc'])} "
                "points vs its best grid LR"
            )
    if hits:
        verdicts.append("LR finder: " + "; ".join(hits) + ".")
    return text + " ".join(verdicts) + "\n" + failures(runs), verdicts


EXPERIMENT = Experiment(
    "optimizers",
    "Optimisers: speed and sensitivity to the learning rate",
    "SGD, momentum (0.9), AdaGrad, RMSProp and Adam fine-tune the top two blocks and "
    "the head on 50 images per class for 100 steps, at four learning rates each, and "
    "once more at the LR finder's suggestion (`tune.lr_find=true`).",
    section_optimizers,
    sweeps=({}, {"tune.lr_find": "true", "optimizer.lr": None}),
    quick=(
        {
            "optimizer.lr": "1.0e-3,1.0e-2",
            "finetune.steps": "6",
            "data.limit_per_class": "5",
        },
        {
            "tune.lr_find": "true",
            "tune.num_training": "20",
            "optimizer.lr": None,
            "finetune.steps": "6",
            "data.limit_per_class": "5",
        },
    ),
)
