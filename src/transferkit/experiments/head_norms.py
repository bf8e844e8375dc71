"""Claim 6, at small batches BatchNorm in the head loses accuracy where Batch Renormalization
and GroupNorm hold: an MLP head with each normalisation at several batch sizes."""

from __future__ import annotations

from pathlib import Path

from transferkit.experiments.common import (
    Experiment,
    Run,
    _num,
    _plt,
    failures,
    ok_runs,
    publish,
    save_figure,
)


def section_head_norms(runs: list[Run], fig_dir: Path) -> tuple[str, list[str]]:
    plt = _plt()
    acc: dict[str, dict[int, float]] = {}
    for r in ok_runs(runs):
        norm = r["params"].get("model.head.norm", "?")
        acc.setdefault(norm, {})[int(r["params"].get("data.batch_size", 0))] = r["summary"][
            "test_acc"
        ]
    if not acc:
        return "No run finished.\n" + failures(runs), []
    sizes = sorted({b for v in acc.values() for b in v})
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    rows = []
    for norm, by in acc.items():
        xs = sorted(by)
        ax.plot(xs, [by[x] for x in xs], "o-", label=norm)
        rows.append([norm, *(_num(by.get(b)) for b in sizes)])
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set(xlabel="batch size", ylabel="test accuracy", title="Head normalisation vs batch size")
    save_figure(fig, fig_dir / "head_norms.png", (ax,))
    header = ["norm", *(f"batch {b}" for b in sizes)]
    text = publish(fig_dir, "head_norms", header, rows, "head normalisation")
    verdicts = []
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        change = {n: by[small] - by[large] for n, by in acc.items() if small in by and large in by}
        verdicts.append(
            f"Test accuracy from batch {large} down to batch {small}: "
            + ", ".join(f"{n} {d * 100:+.1f} pts" for n, d in change.items())
            + "."
        )
        bn = change.get("batchnorm")
        holders = [n for n in ("batchrenorm", "groupnorm") if n in change]
        if bn is not None and holders:
            hold = [n for n in holders if change[n] > bn + 0.005]
            if bn < -0.01 and len(hold) == len(holders):
                verdicts.append(
                    f"BatchNorm loses {-bn * 100:.1f} points at batch {small} and "
                    f"{' and '.join(hold)} lose less: the claim holds on this data."
                )
            elif bn >= -0.01:
                verdicts.append(
                    f"BatchNorm does **not** lose accuracy at batch {small} here (at most a "
                    "point): on these features and this budget the claim is not supported."
                )
            else:
                worse = [n for n in holders if n not in hold]
                verdicts.append(
                    f"BatchNorm loses {-bn * 100:.1f} points at batch {small}, but "
                    f"{' and '.join(worse)} {'loses' if len(worse) == 1 else 'lose'} as much "
                    "or more: the claim is only partly supported."
                )
    return text + " ".join(verdicts) + "\n" + failures(runs), verdicts


EXPERIMENT = Experiment(
    "head_norms",
    "Normalisation in the head at small batches",
    "An MLP head with BatchNorm, Batch Renormalization, LayerNorm, GroupNorm or no "
    "norm, trained on the frozen backbone's features (100 images per class, 3 epochs) "
    "at batch sizes 4, 8 and 32. The same epochs at every batch size: batch 4 takes 8× "
    "the steps of batch 32.",
    section_head_norms,
    quick=({"data.limit_per_class": "5", "data.batch_size": "4,32", "trainer.max_epochs": "1"},),
)
