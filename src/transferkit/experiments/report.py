"""The report writer: ``<out>/report.md``, one section per claim in the order of
``EXPERIMENTS``, under a header that says how, where and on what the runs were made."""

from __future__ import annotations

import platform
import time
from pathlib import Path

from transferkit.experiments import (
    depth,
    depth_by_data,
    head_norms,
    optimizers,
    overfitting,
    pretraining,
    second_order,
)
from transferkit.experiments.common import Experiment, Run, log
from transferkit.io import atomic_write_bytes

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in [
        pretraining.EXPERIMENT,
        depth.EXPERIMENT,
        overfitting.EXPERIMENT,
        optimizers.EXPERIMENT,
        second_order.EXPERIMENT,
        head_norms.EXPERIMENT,
        depth_by_data.EXPERIMENT,
    ]
}


def write_report(
    out: Path, results: dict[str, list[Run]], quick: bool, seconds: dict[str, float],
    user: list[str],
) -> Path:  # fmt: skip
    """``<out>/report.md`` with every section, figures and tables; returns its path."""
    import torch

    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    sections, highlights = [], []
    for i, (name, runs) in enumerate(results.items(), 1):
        exp = EXPERIMENTS[name]
        try:
            body, verdicts = exp.section(runs, fig_dir)
        except Exception as e:  # a report with the other sections beats no report
            log.exception("section %s failed", name)
            body, verdicts = f"**This section could not be written**: {type(e).__name__}: {e}\n", []
        minutes = seconds.get(name, 0.0) / 60
        setup = exp.claim
        if quick:
            grids = "; ".join(
                " ".join(f"{k}={v}" for k, v in g.items() if v is not None) for g in exp.quick
            )
            setup += f" **Quick overrides:** `{grids}`."
        more = [g for g in (exp.quick if quick else exp.sweeps) if g]
        extra = ""
        if more and not quick:
            extra = "; `make experiments` also runs " + " and ".join(
                "`" + " ".join(f"{k}={v}" for k, v in g.items() if v is not None) + "`"
                for g in more
            )
        sections.append(
            f"## {i}. {exp.title}\n\n**Setup.** {setup} Config: "
            f"`conf/experiment/{name}.yaml` (run it alone with "
            f'`make finetune ARGS="-m experiment={name}"`{extra}); {len(runs)} runs, '
            f"{minutes:.1f} min. Table: `tables/{name}.csv`.\n\n{body}"
        )
        if verdicts:
            highlights.append(f"- **{exp.title}.** {verdicts[0]}")
    total = sum(seconds.values()) / 60
    command = "make experiments" + (" ARGS=--quick" if quick else "")
    with_user = f" with overrides `{' '.join(user)}`" if user else ""
    summaries = [r["summary"] for runs in results.values() for r in runs if "summary" in r]
    facts = lambda key: ", ".join(sorted({f"{s.get(key)}" for s in summaries}))  # noqa: E731
    head = [
        "# The lecture's claims, measured\n",
        f"Written by `{command}`{with_user} on {time.strftime('%Y-%m-%d')}: "
        f"{sum(len(r) for r in results.values())} runs in {total:.0f} min on "
        f"{_cpu_count()} CPU cores ({platform.machine()}, torch {torch.__version__}, "
        f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}). Backbone: {facts('backbone')} "
        "(ImageNet weights unless a section says otherwise); validation images per run: "
        f"{facts('val_size')}; test images: {facts('test_size')}. Accuracies are on the test "
        "split, of the checkpoint with the best validation accuracy; one seed per run.\n",
    ]
    if quick:
        head.append(
            "**Quick variant**: tiny grids, a few steps and a handful of training images per "
            "class (each section lists its quick overrides). It checks that everything runs; "
            "its numbers support no claim.\n"
        )
    if highlights:
        head.append("**Highlights**\n\n" + "\n".join(highlights) + "\n")
    text = "\n".join(head) + "\n" + "\n".join(sections)
    path = out / "report.md"
    atomic_write_bytes(path, text.encode())
    return path


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
