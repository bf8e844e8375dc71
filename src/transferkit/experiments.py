"""``make experiments``: the lecture's claims, measured on the embedded data, in one report.

    python -m transferkit.experiments                 # every experiment, experiments/report.md
    python -m transferkit.experiments --quick         # CI-sized: small grids, few steps
    python -m transferkit.experiments --only overfitting optimizers
    python -m transferkit.experiments -- model.backbone=test_efficientnet model.weights=none

Each experiment is a Hydra config ``conf/experiment/<name>.yaml`` whose grid is its
``hydra.sweeper.params``, so ``make finetune ARGS="-m experiment=<name>"`` runs it alone. This
driver composes the same configs, runs every grid point in-process through ``finetune``
(plus a few extra sweeps per experiment, listed in ``EXPERIMENTS``), and writes
``<out>/report.md`` with a plot (``figures/``) and the table behind it (``tables/``) for
each claim. Overrides after ``--`` apply to every run; one that names a swept key replaces
the sweep, as on Hydra's command line.

A run whose ``summary.json`` exists with the same overrides is reused (``--rerun`` forces
it), so an interrupted ``make experiments`` continues where it stopped. Checkpoints are
deleted after each run (``--keep-checkpoints`` keeps them).
"""

from __future__ import annotations

import argparse
import csv
import gc
import hashlib
import io
import itertools
import json
import logging
import math
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit.errors import ConfigError
from transferkit.io import atomic_write_bytes, write_json

log = logging.getLogger("transferkit.experiments")
Run = dict[str, Any]  # {"params": {key: value}, "summary": {...}} or {"params", "error"}


@dataclass(frozen=True)
class Experiment:
    """One claim: its config, extra sweeps and quick variant, and how to report it.

    ``sweeps`` and ``quick`` are lists of grids, each ``{key: "v1,v2"}`` merged over the
    config's ``hydra.sweeper.params`` (``{}``: the config's own grid). A value without a
    comma is a plain override; ``None`` drops a key of the config's grid.
    """

    name: str
    title: str
    claim: str
    section: Callable[[list[Run], Path], tuple[str, list[str]]]
    sweeps: tuple[dict[str, str | None], ...] = ({},)
    quick: tuple[dict[str, str | None], ...] = ({},)


# -- running -------------------------------------------------------------------------------
def expand(grid: dict[str, str]) -> list[dict[str, str]]:
    """Every combination of the comma-separated values, in key order.

    Raises:
        ValueError: a value in another Hydra sweep syntax (``range()``, ``choice()``, ...).
    """
    for key, value in grid.items():
        if any(c in str(value) for c in "()[]{}'\""):
            raise ConfigError(
                f"experiment grid {key}={value}: give a comma-separated list of values; "
                "range(), choice() and quoted values are not expanded by this driver."
            )
    keys = list(grid)
    values = [str(grid[k]).split(",") for k in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def run_name(params: dict[str, str]) -> str:
    """A folder name from the varying overrides (``experiment/remedy=l1`` → ``remedy=l1``)."""
    parts = [f"{k.rsplit('/', 1)[-1]}={v}" for k, v in sorted(params.items())]
    return ",".join(parts).replace("/", "_") or "default"


def _compose(overrides: list[str], hydra_config: bool = False) -> Any:
    from hydra import compose, initialize_config_dir

    from transferkit.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("finetune", overrides=overrides, return_hydra_config=hydra_config)


def plan_runs(
    exp: Experiment, quick: bool, user: list[str]
) -> list[tuple[dict[str, str], list[str]]]:
    """(the params that name the run, the full override list) for every run of ``exp``."""
    from omegaconf import OmegaConf

    base = _compose([f"experiment={exp.name}"], hydra_config=True)
    node = base.hydra.sweeper.get("params")
    params_node = OmegaConf.to_container(node, resolve=False) if node else {}
    assert isinstance(params_node, dict)
    own: dict[str, str | None] = {str(k): str(v) for k, v in params_node.items()}
    user_keys = {o.split("=", 1)[0].lstrip("+~") for o in user}
    sweeps = exp.quick if quick else exp.sweeps
    named = set(own).union(*sweeps)  # keys that any sweep sets name the runs
    runs: list[tuple[dict[str, str], list[str]]] = []
    seen: set[str] = set()
    for extra in sweeps:
        merged = {**own, **extra}
        grid: dict[str, str] = {
            k: v for k, v in merged.items() if v is not None and k not in user_keys
        }
        for params in expand(grid):
            varying = {k: v for k, v in params.items() if k in named}
            name = run_name(varying)
            if name in seen:
                continue
            seen.add(name)
            overrides = [
                f"experiment={exp.name}",
                *(f"{k}={v}" for k, v in params.items()),
                "logger=none",
                "report=false",  # the per-run report.md: this driver writes one for all runs
                "trainer.enable_progress_bar=false",
                *user,
            ]
            runs.append((varying, overrides))
    return runs


def fingerprint(cfg: Any) -> str:
    """A hash of the composed, unresolved config: an edited experiment YAML changes it."""
    from omegaconf import OmegaConf

    return hashlib.sha256(OmegaConf.to_yaml(cfg).encode()).hexdigest()[:16]


def earlier_result(overrides: list[str], config: str, run_dir: Path) -> Run | None:
    """An earlier run in ``run_dir`` of exactly these overrides composing exactly the same
    config (``config``: its ``fingerprint``), if any. Code changes are not detected: use
    ``--rerun`` after them."""
    marker, summary_path = run_dir / "run.json", run_dir / "summary.json"
    if not (marker.exists() and summary_path.exists()):
        return None
    record = json.loads(marker.read_text())
    if record.get("overrides") != overrides:
        return None
    if record.get("config") != config:
        return None
    summary = json.loads(summary_path.read_text())
    return {"summary": summary, "seconds": float(record.get("seconds", 0.0)), "reused": True}


def run_one(overrides: list[str], run_dir: Path, rerun: bool, keep_checkpoints: bool) -> Run:
    """Fit one configuration (or reuse its earlier result); errors are returned, not raised."""
    from transferkit.finetune import finetune

    cfg = _compose(overrides)
    config = fingerprint(cfg)
    earlier = None if rerun else earlier_result(overrides, config, run_dir)
    if earlier is not None:
        return earlier
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg.paths.output_dir = str(run_dir)  # set after composing: the name holds '=' and ','

    start = time.perf_counter()
    try:
        summary, objects = finetune(cfg)
        del objects
    except Exception as e:  # one broken run must not lose the others
        log.exception("run failed: %s", " ".join(overrides))
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - start}
    finally:
        gc.collect()
    seconds = time.perf_counter() - start
    if not keep_checkpoints:
        for sub in ("checkpoints", "cache"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    record = {"overrides": overrides, "config": config, "seconds": round(seconds, 1)}
    write_json(run_dir / "run.json", record)
    return {"summary": summary, "seconds": seconds, "reused": False}


def run_experiment(
    exp: Experiment, out: Path, quick: bool, user: list[str], rerun: bool, keep: bool
) -> list[Run]:
    runs: list[Run] = []
    planned = plan_runs(exp, quick, user)
    for i, (params, overrides) in enumerate(planned, 1):
        label = " ".join(f"{k}={v}" for k, v in params.items()) or "(one run)"
        print(f"[{exp.name} {i}/{len(planned)}] {label}", flush=True)
        result = run_one(overrides, out / "runs" / exp.name / run_name(params), rerun, keep)
        s = result.get("summary")
        if s is not None:
            how = "reused" if result["reused"] else f"{s['fit_seconds']:.0f} s fit"
            print(f"    test acc {_num(s.get('test_acc'))}, {how}", flush=True)
        runs.append({"params": params, **result})
    return runs


def earlier_runs(exp: Experiment, out: Path, quick: bool, user: list[str]) -> list[Run]:
    """The runs of ``exp`` already on disk (an experiment left out with ``--only``)."""
    runs = []
    for params, overrides in plan_runs(exp, quick, user):
        config = fingerprint(_compose(overrides))
        earlier = earlier_result(overrides, config, out / "runs" / exp.name / run_name(params))
        if earlier is not None:
            runs.append({"params": params, **earlier})
    return runs


# -- helpers for the sections -------------------------------------------------------------------
def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def ok_runs(runs: list[Run]) -> list[Run]:
    """Runs that finished with a test and a validation accuracy (the sections need both)."""
    return [
        r
        for r in runs
        if "summary" in r
        and r["summary"].get("test_acc") is not None
        and r["summary"].get("best_val_acc") is not None
    ]


def by_param(runs: list[Run], key: str, default: str) -> dict[str, dict[str, Any]]:
    """The finished runs' summaries by the value of one swept key."""
    return {r["params"].get(key, default): r["summary"] for r in ok_runs(runs)}


def failures(runs: list[Run]) -> str:
    good = {id(r) for r in ok_runs(runs)}
    bad = [r for r in runs if id(r) not in good]
    if not bad:
        return ""
    lines = [
        f"- `{run_name(r['params'])}`: "
        + r.get("error", "no test or validation accuracy (test=false, or no such split)")
        for r in bad
    ]
    return "\n**Runs left out** of the table and plot:\n\n" + "\n".join(lines) + "\n"


def table(header: list[str], rows: Iterable[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def save_csv(path: Path, header: list[str], rows: Iterable[list[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def save_figure(fig: Any, path: Path, axes: Iterable[Any] = ()) -> None:
    """Grid on ``axes``, the legend on the first of them, then a PNG written atomically."""
    import matplotlib.pyplot as plt

    axes = list(axes)
    for ax in axes:
        ax.grid(alpha=0.3)
    if axes:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def publish(fig_dir: Path, name: str, header: list[str], rows: list[list[Any]], alt: str) -> str:
    """Write ``tables/<name>.csv``; return the Markdown table and the link to the figure."""
    save_csv(fig_dir.parent / "tables" / f"{name}.csv", header, rows)
    return table(header, rows) + f"\n![{alt}](figures/{name}.png)\n\n"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve(s: dict[str, Any], key: str, x: str = "epoch") -> tuple[list[float], list[float]]:
    rows = [r for r in s.get("history") or [] if key in r and x in r]
    return [r[x] for r in rows], [r[key] for r in rows]


def seconds_to_reach(s: dict[str, Any], target: float) -> float | None:
    """Wall seconds until the validation accuracy first reached ``target`` (None: never)."""
    for t, acc in zip(*curve(s, "val_acc", "seconds"), strict=True):
        if acc >= target:
            return float(t)
    return None


def pts(a: float, b: float) -> str:
    return f"{(a - b) * 100:+.1f}"


# -- 1. pre-training ------------------------------------------------------------------------
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


# -- 2. depth ---------------------------------------------------------------------------------
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


# -- 3. overfitting -------------------------------------------------------------------------------
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


# -- 4. optimisers -----------------------------------------------------------------------------
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


# -- 5. first vs second order ---------------------------------------------------------------------
SOLVER = "experiment/solver"


def seconds_per_step(s: dict[str, Any]) -> float | None:
    """Wall seconds per optimizer step between the first and the last epoch's end (so the
    feature cache and the sanity check before the first epoch do not count)."""
    hist = s.get("history") or []
    if len(hist) < 2 or hist[-1]["step"] <= hist[0]["step"]:
        return None
    return float((hist[-1]["seconds"] - hist[0]["seconds"]) / (hist[-1]["step"] - hist[0]["step"]))


def section_second_order(runs: list[Run], fig_dir: Path) -> tuple[str, list[str]]:
    good = by_param(runs, SOLVER, "?")
    if not good:
        return "No run finished.\n" + failures(runs), []
    plt = _plt()
    fig, (ax_i, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    header = ["solver", "optimizer steps", "iterations", "loss evaluations",
              "fit s (with caching)", "s per step", "final train loss", "best val acc",
              "test acc"]  # fmt: skip
    rows, stats = [], {}
    for name, s in good.items():
        hist = s.get("history") or []
        last = hist[-1] if hist else {}
        iters = last.get("iterations", s["global_steps"])
        evals = last.get("func_evals", s["global_steps"])
        x_it = [r.get("iterations", r["step"]) for r in hist if "val_loss" in r]
        ax_i.plot(x_it, [r["val_loss"] for r in hist if "val_loss" in r], "o-", ms=3, label=name)
        ax_t.plot(*curve(s, "val_loss", "seconds"), "o-", ms=3)
        per_step = seconds_per_step(s)
        stats[name] = {"iterations": iters, "per_step": per_step}
        rows.append([
            name, s["global_steps"], iters, evals, f"{s['fit_seconds']:.1f}",
            _num(per_step, 3), _num(last.get("train_loss")), _num(s["best_val_acc"]),
            _num(s["test_acc"]),
        ])  # fmt: skip
    ax_i.set(xlabel="iterations (L-BFGS) / steps (Adam)", ylabel="validation loss",
             xscale="log", title="Validation loss by iteration")  # fmt: skip
    ax_t.set(
        xlabel="wall time since the fit started (s)",
        ylabel="validation loss",
        title="... by wall time",
    )
    save_figure(fig, fig_dir / "second_order.png", (ax_i, ax_t))
    text = publish(fig_dir, "second_order", header, rows, "L-BFGS vs Adam")
    text += (
        "Seconds per step are measured between the first and the last epoch's end, so building "
        "the feature cache (the same for both) does not count; the fit time includes it. They "
        "include validation, which runs once per epoch: once per L-BFGS step but once per 16 "
        "Adam steps, so the ratio below overstates the cost of an L-BFGS step somewhat. Early "
        "stopping (validation loss, patience 3) is on for both: compare the step counts with "
        "the budgets.\n\n"
    )
    verdicts = []
    lb, ad = good.get("lbfgs"), good.get("adam")
    t_lb, t_ad = stats.get("lbfgs", {}).get("per_step"), stats.get("adam", {}).get("per_step")
    if lb and ad and t_lb and t_ad:
        ratio = t_lb / t_ad
        fewer = ad["global_steps"] / max(1, lb["global_steps"])
        verdicts.append(
            f"L-BFGS took {lb['global_steps']} steps ({stats['lbfgs']['iterations']} "
            f"iterations) at {t_lb:.2f} s each; Adam took {ad['global_steps']} steps at "
            f"{t_ad:.3f} s each. Each L-BFGS step cost {ratio:.0f}× an Adam step and it took "
            f"{fewer:.0f}× fewer of them: "
            + ("fewer, costlier steps, as claimed." if fewer > 1 and ratio > 1
               else "**not** the claimed trade.")
            + f" Test accuracy: L-BFGS {lb['test_acc']:.3f}, Adam {ad['test_acc']:.3f}; fit "
            f"time {lb['fit_seconds']:.1f} s against {ad['fit_seconds']:.1f} s."
        )  # fmt: skip
    return text + " ".join(verdicts) + "\n" + failures(runs), verdicts


# -- 6. normalisation in the head -----------------------------------------------------------------
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


# -- the registry and the report -----------------------------------------------------------------
EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in [
        Experiment(
            "pretraining",
            "Pre-training mostly buys development time",
            "ImageNet-pretrained weights against random init, everything trainable, the same "
            "200-step budget, at 100 and 800 images per class. Early stopping is off, so both "
            "spend the whole budget; the checkpoint with the best validation accuracy is "
            "tested.",
            section_pretraining,
            quick=({"data.limit_per_class": "10", "finetune.steps": "6"},),
        ),
        Experiment(
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
        ),
        Experiment(
            "overfitting",
            "Overfitting and its remedies",
            "Half the backbone (8 of 17 blocks) trains on 10 images per class for 150 steps "
            "with no regularisation, then with one remedy at a time.",
            section_overfitting,
            quick=({"finetune.steps": "8", "data.limit_per_class": "5"},),
        ),
        Experiment(
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
        ),
        Experiment(
            "second_order",
            "First- vs second-order optimisation",
            "The head alone is fitted on cached frozen features (100 images per class): "
            "L-BFGS full-batch (a budget of 10 steps of up to 20 iterations) against Adam on "
            "batches of 64 (a budget of 300 steps, 19 epochs of 16).",
            section_second_order,
            quick=({"data.limit_per_class": "5", "trainer.max_epochs": "2"},),
        ),
        Experiment(
            "head_norms",
            "Normalisation in the head at small batches",
            "An MLP head with BatchNorm, Batch Renormalization, LayerNorm, GroupNorm or no "
            "norm, trained on the frozen backbone's features (100 images per class, 3 epochs) "
            "at batch sizes 4, 8 and 32. The same epochs at every batch size: batch 4 takes 8× "
            "the steps of batch 32.",
            section_head_norms,
            quick=(
                {"data.limit_per_class": "5", "data.batch_size": "4,32", "trainer.max_epochs": "1"},
            ),
        ),
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    user: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, user = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m transferkit.experiments",
        description="Run the experiments of conf/experiment/ and write one report.",
        epilog="Overrides after -- apply to every run, e.g. -- trainer.accelerator=cpu",
    )
    parser.add_argument("--quick", action="store_true", help="CI-sized grids (a few minutes)")
    parser.add_argument("--out", type=Path, help="output folder (default: experiments, "
                        "or experiments/quick with --quick)")  # fmt: skip
    parser.add_argument("--only", nargs="+", choices=sorted(EXPERIMENTS), metavar="NAME",
                        help=f"run these only: {', '.join(EXPERIMENTS)}")  # fmt: skip
    parser.add_argument("--rerun", action="store_true", help="ignore results of earlier runs")
    parser.add_argument("--keep-checkpoints", action="store_true")
    args = parser.parse_args(argv)
    out = args.out or Path("experiments/quick" if args.quick else "experiments")
    import lightning  # noqa: F401  (it sets its loggers' levels on import: set ours after)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    results: dict[str, list[Run]] = {}
    seconds: dict[str, float] = {}
    for name, exp in EXPERIMENTS.items():
        if args.only and name not in args.only:  # its earlier results, if any, stay reported
            runs = earlier_runs(exp, out, args.quick, user)
        else:
            runs = run_experiment(exp, out, args.quick, user, args.rerun, args.keep_checkpoints)
        if runs:
            results[name] = runs
            seconds[name] = sum(r.get("seconds", 0.0) for r in runs)  # as run, when reused
    path = write_report(out, results, args.quick, seconds, user)
    failed = sum("error" in r for runs in results.values() for r in runs)
    print(f"\nreport written to {path} (runs took {sum(seconds.values()) / 60:.1f} min)")
    if failed:
        print(f"{failed} run(s) failed; see the report", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
