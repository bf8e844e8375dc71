"""``make transfer-bench``: is ``finetune=auto`` right on data sets, sizes, backbones and
resolutions? The regret of each way to choose the depth, in one command.

    python -m transferkit.transfer_bench                    # the dev grid -> docs/transfer-bench.md
    python -m transferkit.transfer_bench --quick   # Lite0 at 64 px, 10 and 100 per class, 1 seed
    python -m transferkit.transfer_bench --data textures --sizes 10 --seeds 1 2 3
    python -m transferkit.transfer_bench -- trainer.accelerator=cpu   # overrides for every run
    python -m transferkit.transfer_bench --replay 0.125,0.5 0.125,0.75 \
        --replay-table docs/tables/transfer-bench-lite2.csv   # the race replayed, no training

For every cell (data set × images per class × backbone@resolution) and seed it trains:

- every fixed depth (``finetune=partial``: 0, a quarter, half and all of the blocks) at the
  budget the data size gives every regime (the table's steps);
- ``finetune=auto`` (the race; its time includes the decision);
- ``finetune=table`` (the count-keyed table, the old auto);
- a fastai-style recipe (``fine_tune``): one frozen epoch, then every block at
  discriminative LRs (lr/100 for the lowest block … lr for the head) with BatchNorm
  training everywhere, Adam at 2e-3, one-cycle, the same total steps. One cycle spans
  both phases here, where fastai starts a second cycle at the unfreezing.

Regret is the test accuracy, in points, below the best fixed depth in hindsight (each
method's mean over the seeds). The report gives every cell, the mean and worst regret over
the grid, and each method's wall time against the best fixed depth's. Runs that finished
are reused (``--rerun`` repeats them), so an interrupted bench continues where it stopped.
``--replay`` reads the race's choice under other rounds off the fixed runs' validation
curves (:func:`replay`). Data: Animal-MNIST and the development sets of ``make data-dev``
(textures, glyphs); no held-out data set is in the grid.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit.errors import ConfigError
from transferkit.experiments.common import _plt, save_csv, save_figure, split_overrides, table
from transferkit.io import atomic_write_bytes

#: Fixed depths: the shares of the backbone's blocks every cell trains.
DEPTHS = {"depth=0": "0", "depth=1/4": "0.25", "depth=1/2": "0.5", "depth=all": "all"}
FASTAI_LR = 2e-3


@dataclass(frozen=True)
class Cell:
    data: str  # animal_mnist | textures | glyphs
    per_class: int
    backbone: str
    size: int

    @property
    def name(self) -> str:
        short = self.backbone.replace("tf_efficientnet_", "")
        return f"{self.data}/{self.per_class}/{short}@{self.size}"

    def overrides(self, dev_root: Path) -> list[str]:
        data = (["data=animal_mnist"] if self.data == "animal_mnist" else
                ["data=image_folder", f"data.root={dev_root / self.data}"])  # fmt: skip
        return [*data, f"data.limit_per_class={self.per_class}", f"data.image_size={self.size}",
                f"model.backbone={self.backbone}"]  # fmt: skip


def method_overrides(method: str, blocks: int) -> list[str]:
    """The overrides of one way to choose the depth (``blocks``: the backbone's)."""
    if method in DEPTHS:
        return ["finetune=partial", f"finetune.trainable_blocks={DEPTHS[method]}"]
    if method == "auto":
        return ["finetune=auto"]
    if method == "table":
        return ["finetune=table"]
    if method == "fastai":
        decay = 0.01 ** (1 / blocks)  # block i from the top: lr · decay**(i+1); lowest: lr/100
        return [
            "finetune=lp_ft", "finetune.lp_epochs=1", "finetune.final_blocks=all",
            "finetune.ft_lr_scale=0.5", f"finetune.layer_decay={decay:.4f}",
            "finetune.bn_mode=train", "finetune.trainable_bn_stats=true",
            "scheduler=onecycle", f"optimizer.lr={FASTAI_LR}",
        ]  # fmt: skip
    raise ValueError(f"unknown method {method!r}")


METHODS = [*DEPTHS, "auto", "table", "fastai"]
GRID: dict[str, list[Any]] = {
    "data": ["animal_mnist", "textures", "glyphs"],
    "sizes": [10, 100, 500],
    "models": ["tf_efficientnet_lite0@64", "tf_efficientnet_lite0@128", "tf_efficientnet_lite1@64"],
    "seeds": [1, 2, 3],
}
QUICK: dict[str, list[Any]] = {
    "data": ["animal_mnist", "textures", "glyphs"],
    "sizes": [10, 100],
    "models": ["tf_efficientnet_lite0@64"],
    "seeds": [1],
}


def parse_model(spec: str) -> tuple[str, int]:
    name, _, size = spec.partition("@")
    if not size.isdigit():
        raise ValueError(
            f"--models {spec!r}: give backbone@resolution, e.g. tf_efficientnet_lite0@64"
        )
    return name, int(size)


def num_blocks(backbone: str) -> int:
    from transferkit.models.backbone import create_backbone
    from transferkit.models.finetuning import backbone_blocks

    return len(backbone_blocks(create_backbone(backbone, weights="none")))


def run_dir(out: Path, cell: Cell, method: str, seed: int) -> Path:
    return out / "runs" / cell.name.replace("/", "_") / f"{method.replace('/', '_')}-seed{seed}"


def bench(cells: list[Cell], methods: list[str], seeds: list[int], out: Path, dev_root: Path,
          user: list[str], rerun: bool,
          finished_only: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """Run (or reuse) every run; one record per run (``finished_only``: reuse only, and
    leave out the runs not made yet)."""
    from transferkit.experiments.driver import run_one

    blocks = {c.backbone: num_blocks(c.backbone) for c in cells}
    records = []
    total = len(cells) * len(methods) * len(seeds)
    i = 0
    for cell in cells:
        for seed in seeds:
            for method in methods:
                i += 1
                overrides = [
                    *cell.overrides(dev_root),
                    *method_overrides(method, blocks[cell.backbone]),
                    f"seed={seed}", "logger=none", "report=false",
                    "trainer.enable_progress_bar=false", *user,
                ]  # fmt: skip
                print(f"[{i}/{total}] {cell.name} {method} seed {seed}", flush=True)
                r = run_one(overrides, run_dir(out, cell, method, seed), rerun, False,
                            reuse_only=finished_only)  # fmt: skip
                if r.get("missing"):
                    print("    no finished run: left out", flush=True)
                    continue
                rec: dict[str, Any] = {"cell": cell.name, "method": method, "seed": seed,
                                       "seconds": r.get("seconds")}  # fmt: skip
                if "summary" in r:
                    s = r["summary"]
                    measured = (s.get("plan") or {}).get("measured") or {}
                    rec.update(test_acc=s.get("test_acc"), blocks=s.get("trainable_blocks"),
                               total_blocks=s.get("total_blocks"),
                               decision_seconds=measured.get("seconds"), **curve(s))  # fmt: skip
                    how = "reused" if r.get("reused") else f"{r['seconds']:.0f} s"
                    print(f"    test acc {s.get('test_acc'):.4f}, {s.get('trainable_blocks')} "
                          f"blocks, {how}", flush=True)  # fmt: skip
                else:
                    rec["error"] = r.get("error")
                    print(f"    failed: {r.get('error')}", flush=True)
                records.append(rec)
    return records


def curve(s: dict[str, Any]) -> dict[str, Any]:
    """What a run's ``summary.json`` says of its training, for :func:`replay`: its
    validations (step, accuracy), the budget, the steps it trained, whether early stopping
    ended it, and its fit seconds."""
    budget = (s.get("plan") or {}).get("budget") or {}
    return {
        "val_curve": [[int(h["step"]), round(float(h["val_acc"]), 6)]
                      for h in s.get("history") or () if h.get("val_acc") is not None],
        "budget_steps": budget.get("steps"), "steps_per_epoch": budget.get("steps_per_epoch"),
        "steps": s.get("global_steps"), "val_size": s.get("val_size"),
        "stopped": bool((s.get("early_stopping") or {}).get("stopped")),
        "fit_seconds": s.get("fit_seconds"),
    }  # fmt: skip


def summarize(records: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Per cell: each method's mean test accuracy, seconds and blocks over the seeds; the
    best fixed depth; every method's regret (points) and time against the best fixed."""
    cells: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("test_acc") is None:
            continue
        m = cells.setdefault(r["cell"], {}).setdefault(
            r["method"], {"acc": [], "sec": [], "blocks": []}
        )
        m["acc"].append(r["test_acc"])
        m["sec"].append(r["seconds"])
        m["blocks"].append(r["blocks"])
    out: dict[str, Any] = {"cells": {}, "methods": {}}
    for name, by in cells.items():
        fixed = {k: v for k, v in by.items() if k in DEPTHS}
        if not fixed:
            continue
        mean = {k: statistics.fmean(v["acc"]) for k, v in by.items()}
        best = max(fixed, key=lambda k: mean[k])
        best_sec = statistics.fmean(by[best]["sec"])
        row: dict[str, Any] = {"best_fixed": best, "best_acc": mean[best], "best_seconds": best_sec,
               "seeds": len(by[best]["acc"]), "methods": {}}  # fmt: skip
        for k, v in by.items():
            row["methods"][k] = {
                "acc": mean[k],
                "sd": statistics.stdev(v["acc"]) if len(v["acc"]) > 1 else None,
                "seconds": statistics.fmean(v["sec"]),
                "blocks": sorted(set(v["blocks"])),
                "regret": (mean[best] - mean[k]) * 100,
                "time_over_best": statistics.fmean(v["sec"]) / best_sec,
            }
        out["cells"][name] = row
    out["methods"] = aggregate(list(out["cells"].values()), methods)
    # does it hold for each backbone and resolution, and each data size, on its own?
    for key, part in (("by_model", 2), ("by_size", 1)):
        groups: dict[str, list[dict[str, Any]]] = {}
        for name, c in out["cells"].items():
            parts = name.split("/")
            if len(parts) == 3:  # data set / images per class / backbone@resolution
                groups.setdefault(parts[part], []).append(c)
        if len(groups) > 1:
            order = sorted(groups, key=lambda g: (int(g) if g.isdigit() else 0, g))
            out[key] = {g: aggregate(groups[g], methods) for g in order}
    return out


def aggregate(cells: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Each method's mean and worst regret and time over ``cells`` (rows of :func:`summarize`)."""
    out: dict[str, Any] = {}
    for k in methods:
        regrets = [c["methods"][k]["regret"] for c in cells if k in c["methods"]]
        times = [c["methods"][k]["time_over_best"] for c in cells if k in c["methods"]]
        if regrets:
            out[k] = {
                "mean_regret": statistics.fmean(regrets), "worst_regret": max(regrets),
                "mean_time_over_best": statistics.fmean(times), "worst_time_over_best": max(times),
                "cells": len(regrets),
            }  # fmt: skip
    return out


#: The race's default candidates (``finetune.race.candidates``), as the bench's fixed depths.
RACED = ("depth=0", "depth=1/4", "depth=1/2")


class NotReplayable(Exception):
    """A cell and seed whose race the fixed runs cannot tell."""


#: What :func:`replay` needs of each fixed run (:func:`curve`).
NEEDED = ("val_curve", "budget_steps", "steps_per_epoch", "steps", "val_size", "fit_seconds")


def replay(records: list[dict[str, Any]], fractions: Sequence[float], z: float = 1.0,
           eta: int = 2, min_steps: int = 10, candidates: Sequence[str] = RACED,
           keep_close: bool = False) -> dict[str, Any]:  # fmt: skip
    """What ``finetune=auto``'s race would have chosen with other rounds (``fractions``,
    ``z``, ``eta``, ``min_steps``, ``keep_close``: ``finetune.race``'s), replayed from the
    fixed-depth runs of each cell and seed, without training.

    Going on from its checkpoints (the default with a constant LR on one device), a
    candidate's rounds are the first steps of the fixed run at its depth, validated where
    that run validates; so its score at a round's end is that run's best validation up to
    there, and early stopping ends it where it ended that run. The decision is
    :func:`autodepth.halving`'s own, with the independent error of the two scores: the fixed
    runs keep no per-image record, so "within noise" is a little wider than the race's
    paired error. The chosen depth's test accuracy is its fixed run's (the race's winner
    goes on to be that run). It assumes the bench's settings: the runs monitor ``val/acc``
    (the curves are of accuracy) and the race would go on from its checkpoints; give
    ``candidates`` as the race's.

    Returns, per cell (over the seeds it replayed): the depths chosen (blocks, per seed),
    the mean test accuracy and its regret against the best fixed depth over the same seeds,
    and the training seconds over the best fixed depth's, with the depth the real ``auto``
    run chose where the records hold one; the mean and worst over the cells; and the cells
    and seeds it could not replay, with the reason. The seconds are an estimate: each
    fixed run's fit seconds spread evenly over its steps, so one-off costs (the frozen
    prefix's features, the first validation) of a candidate that leaves the race early are
    undercounted, and the candidates' start-up is left out.

    Raises:
        ConfigError: ``fractions`` that are no race's rounds.
    """
    from transferkit.autodepth import round_steps

    round_steps(1000, fractions, min_steps)  # the race's own check of the rounds
    runs: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    actual: dict[tuple[str, int], Any] = {}
    for r in records:
        if r.get("test_acc") is None:
            continue
        runs.setdefault((r["cell"], r["seed"]), {})[r["method"]] = r
        if r["method"] == "auto":
            actual[(r["cell"], r["seed"])] = r.get("blocks")
    cells: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    for (name, seed), every_method in sorted(runs.items()):
        by = {m: every_method[m] for m in candidates if m in every_method}
        try:
            missing = [m for m in candidates if m not in by or not by[m].get("val_curve")]
            if missing:
                raise NotReplayable(f"no validation curve of {', '.join(missing)}")
            unknown = sorted({k for r in by.values() for k in NEEDED if r.get(k) is None})
            if unknown:
                raise NotReplayable(f"its runs do not say their {', '.join(unknown)}")
            chosen, fit, fixed = _replay_one(by, fractions, z, eta, min_steps, keep_close)
        except NotReplayable as e:
            skipped.append(f"{name} seed {seed}: {e}")
            continue
        c = cells.setdefault(name, {"blocks": [], "acc": [], "fit": [], "actual": [],
                                    "fixed": {}})  # fmt: skip
        c["blocks"].append(chosen)
        c["acc"].append(float(fixed[chosen]["test_acc"]))
        c["fit"].append(fit)
        c["actual"].append(actual.get((name, seed)))
        for m, r in every_method.items():  # every fixed depth of this seed, for the best
            if m in DEPTHS:
                c["fixed"].setdefault(m, []).append(r)
    out: dict[str, Any] = {"cells": {}, "skipped": skipped}
    for name, c in cells.items():
        seeds = len(c["acc"])
        fixed_runs = {m: rs for m, rs in c["fixed"].items() if len(rs) == seeds}
        best = max(fixed_runs, key=lambda m: statistics.fmean(r["test_acc"] for r in fixed_runs[m]))
        best_acc = statistics.fmean(r["test_acc"] for r in fixed_runs[best])
        best_fit = [float(r["fit_seconds"]) for r in fixed_runs[best]
                    if r.get("fit_seconds") is not None]  # fmt: skip
        acc = statistics.fmean(c["acc"])
        out["cells"][name] = {
            "blocks": c["blocks"], "actual": c["actual"], "acc": acc, "seeds": seeds,
            "regret": (best_acc - acc) * 100, "best_fixed": best,
            "fit_over_best": (statistics.fmean(c["fit"]) / statistics.fmean(best_fit)
                              if len(best_fit) == seeds else float("nan")),
        }  # fmt: skip
    if out["cells"]:
        regrets = [c["regret"] for c in out["cells"].values()]
        fits = [c["fit_over_best"] for c in out["cells"].values()]
        out.update(mean_regret=statistics.fmean(regrets), worst_regret=max(regrets),
                   mean_fit_over_best=statistics.fmean(fits),
                   worst_fit_over_best=max(fits))  # fmt: skip
    return out


def _replay_one(by: dict[str, dict[str, Any]], fractions: Sequence[float], z: float, eta: int,
                min_steps: int, keep_close: bool = False,
                ) -> tuple[int, float, dict[int, dict[str, Any]]]:  # fmt: skip
    """One cell and seed's race, from its fixed runs ``by`` (method → record): the blocks
    chosen, the seconds the race and the winner's run train, and the runs by blocks."""
    from transferkit.autodepth import halving, snapper

    first = next(iter(by.values()))
    budget, per_epoch = int(first["budget_steps"]), int(first["steps_per_epoch"])
    every = min(int(r["val_curve"][0][0]) for r in by.values())
    if every % per_epoch or math.ceil(budget / per_epoch) % (every // per_epoch):
        raise NotReplayable("its runs do not validate on whole epochs up to the budget, so "
                            "the race scores its rounds at their ends only")  # fmt: skip
    fixed = {int(r["blocks"]): r for r in by.values()}
    reached: dict[int, int] = {}

    def run(blocks: int, steps: int, rnd: int) -> tuple[Any, ...]:
        r = fixed[blocks]
        done = min(steps, int(r["steps"]))
        finished = bool(r["stopped"]) and int(r["steps"]) <= steps
        if not finished and steps % every:
            raise NotReplayable(f"a round of {steps} steps ends between validations")
        seen = [acc for step, acc in r["val_curve"] if step <= done]
        if not seen:
            raise NotReplayable(f"a round of {steps} steps ends before the first validation")
        reached[blocks] = max(reached.get(blocks, 0), done)
        return max(seen), int(r["val_size"]), 0.0, None, done, finished

    def epochs_of(steps: int) -> int:  # policy.epochs_for_steps on one device
        return max(1, math.ceil(steps / per_epoch))

    snap = snapper(every // per_epoch, per_epoch, epochs_of, min_steps)
    chosen, _, _ = halving(sorted(fixed), run, budget, fractions, eta, min_steps, z, snap,
                           keep_close)  # fmt: skip
    reached[chosen] = int(fixed[chosen]["steps"])  # the winner goes on to its end
    fit = sum(float(fixed[b]["fit_seconds"]) / max(1, int(fixed[b]["steps"])) * n
              for b, n in reached.items())  # fmt: skip
    return chosen, fit, fixed


def _f(v: Any, fmt: str = ".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


#: The columns of the report's table of runs (``docs/tables/<report>.csv``): enough to replay
#: the race from it (:func:`replay`, ``--replay-table``).
CSV_COLUMNS = ["cell", "method", "seed", "test_acc", "blocks", "total_blocks", "seconds",
               "decision_seconds", "budget_steps", "steps_per_epoch", "steps", "stopped",
               "val_size", "fit_seconds", "val_curve"]  # fmt: skip


def _csv_value(v: Any) -> Any:
    if isinstance(v, list):  # the validation curve: "step:accuracy ..."
        return " ".join(f"{step}:{acc}" for step, acc in v)
    return v


def read_table(path: Path) -> list[dict[str, Any]]:
    """The runs of a report's table (:data:`CSV_COLUMNS`; an older table has fewer), as
    :func:`bench` gives them."""
    import csv

    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))
    except OSError as e:
        raise ConfigError(f"--replay-table {str(path)!r}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"--replay-table {str(path)!r} is not a text table ({e.reason}): "
                          "give docs/tables/<report>.csv") from e  # fmt: skip
    ints = ("seed", "blocks", "total_blocks", "budget_steps", "steps_per_epoch", "steps",
            "val_size")  # fmt: skip
    floats = ("test_acc", "seconds", "decision_seconds", "fit_seconds")
    out = []
    for line, row in enumerate(rows, 2):
        if not row.get("cell") or not row.get("method") or not row.get("seed"):
            raise ConfigError(f"--replay-table {str(path)!r} is not a transfer-bench table: "
                              "give docs/tables/<report>.csv")  # fmt: skip
        rec: dict[str, Any] = {"cell": row["cell"], "method": row["method"]}
        for k, v in row.items():
            if k in rec or k is None or v in (None, ""):
                continue
            try:
                if k in ints:
                    rec[k] = int(float(v))
                elif k in floats:
                    rec[k] = float(v)
                elif k == "stopped":
                    rec[k] = v == "True"
                elif k == "val_curve":
                    rec[k] = [[int(a), float(b)] for a, b in (p.split(":") for p in v.split())]
                else:
                    rec[k] = v
            except ValueError as e:
                raise ConfigError(f"--replay-table {str(path)!r}, line {line}: {k}={v!r} is "
                                  f"not what the bench writes ({e})") from e  # fmt: skip
        out.append(rec)
    return out


def write_report(summary: dict[str, Any], records: list[dict[str, Any]], methods: list[str],
                 path: Path, command: str, machine: str, left_out: int = 0) -> Path:  # fmt: skip
    fig_dir = path.parent / "figures"
    stem = path.stem
    header = ["cell", "best fixed", *methods]
    rows = []
    for name, c in summary["cells"].items():
        cells = []
        for k in methods:
            m = c["methods"].get(k)
            if m is None:
                cells.append("–")
                continue
            blocks = "/".join(str(b) for b in m["blocks"])
            extra = (
                f" [{blocks}]" if k in ("auto", "table", "fastai") or len(m["blocks"]) > 1 else ""
            )
            cells.append(f"{m['acc']:.3f} ({m['regret']:+.1f}){extra}")
        rows.append([name, f"{c['best_fixed']} {c['best_acc']:.3f}", *cells])
    main = table(header, rows)
    agg_header = ["method", "cells", "mean regret (points)", "worst regret",
                  "mean time / best fixed", "worst time / best fixed"]  # fmt: skip

    def agg(by_method: dict[str, Any]) -> str:
        return table(agg_header, [
            [k, v["cells"], f"{v['mean_regret']:.2f}", f"{v['worst_regret']:.2f}",
             f"{v['mean_time_over_best']:.2f}", f"{v['worst_time_over_best']:.2f}"]
            for k, v in by_method.items()])  # fmt: skip

    save_csv(
        path.parent / "tables" / f"{stem}.csv",
        CSV_COLUMNS,
        [[_csv_value(r.get(k)) for k in CSV_COLUMNS] for r in records],
    )
    plot(summary, methods, fig_dir / f"{stem}.png")
    failed = [r for r in records if r.get("error")]
    seeds = sorted({r["seed"] for r in records})
    partial = (
        [
            f"**{left_out} of the grid's {left_out + len(records)} runs are not made yet and are "
            "left out** (`--finished-only`); a cell without every fixed depth measures regret "
            "against the depths it has.\n"
        ]
        if left_out
        else []
    )
    text = [
        "# transfer-bench: how deep to fine-tune, chosen per data set\n",
        f"Written by `{command}` on {machine}. Seeds: {seeds}. Each cell is data set / images "
        "per class / backbone@resolution. An entry is the mean test accuracy over the seeds, "
        "its regret in points below the best fixed depth of the cell in hindsight (in "
        "brackets the trainable blocks chosen). Fixed depths train `finetune=partial` at 0, "
        "¼, ½ and all blocks at the budget the data size gives every regime. Test sets: "
        "textures 1,600 and glyphs 2,600 images; Animal-MNIST's test split. A difference of "
        "a point is within noise with one seed, and often with three.\n",
        *partial,
        main,
        "\n## Over the grid\n",
        agg(summary["methods"]),
        "\nTime is the wall time of the whole run (data, decision, training, test) over the "
        "best fixed depth's, per cell, averaged over seeds.\n",
    ]
    for model, by_method in (summary.get("by_model") or {}).items():
        text += [f"\n### {model} only\n", agg(by_method)]
    for size, by_method in (summary.get("by_size") or {}).items():
        text += [f"\n### {size} images per class only\n", agg(by_method)]
    text += [
        f"\n![regret per cell](figures/{stem}.png)\n",
    ]
    if failed:
        text.append(
            "\n**Failed runs:**\n\n"
            + "\n".join(
                f"- {r['cell']} {r['method']} seed {r['seed']}: {r['error']}" for r in failed
            )
            + "\n"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, "\n".join(text).encode())
    return path


def plot(summary: dict[str, Any], methods: list[str], path: Path) -> None:
    plt = _plt()
    shown = [m for m in ("auto", "table", "fastai") if m in methods]
    names = list(summary["cells"])
    if not names or not shown:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(shown)
    for i, m in enumerate(shown):
        ys = [summary["cells"][n]["methods"].get(m, {}).get("regret", float("nan")) for n in names]
        axes[0].bar([x + i * width for x in range(len(names))], ys, width, label=m)
        ts = [summary["cells"][n]["methods"].get(m, {}).get("time_over_best", float("nan"))
              for n in names]  # fmt: skip
        axes[1].scatter(ts, ys, label=m, s=18)
    axes[0].set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=45,
                       ha="right", fontsize=7)  # fmt: skip
    axes[0].axhline(0, color="black", lw=0.8)
    axes[0].set_ylabel("regret (test points)")
    axes[1].set_xlabel("wall time / best fixed depth's")
    axes[1].axvline(2, color="grey", ls="--", lw=0.8)
    save_figure(fig, path, axes)


def main(argv: list[str] | None = None) -> int:
    argv, user = split_overrides(list(sys.argv[1:] if argv is None else argv))
    p = argparse.ArgumentParser(prog="python -m transferkit.transfer_bench",
                                description=(__doc__ or "").split("\n\n")[0])  # fmt: skip
    p.add_argument(
        "--quick", action="store_true", help="Lite0 at 64 px, 10 and 100 per class, seed 1"
    )
    p.add_argument("--data", nargs="+", choices=GRID["data"])
    p.add_argument("--sizes", nargs="+", type=int, help="images per class")
    p.add_argument("--models", nargs="+", help="backbone@resolution, e.g. tf_efficientnet_lite0@64")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--methods", nargs="+", choices=METHODS)
    p.add_argument("--out", type=Path, help="run folders (default transfer-bench[/quick])")
    p.add_argument("--report", type=Path, help="default docs/transfer-bench.md, or "
                   "<out>/transfer-bench.md with --quick or a grid of your own")  # fmt: skip
    p.add_argument("--dev-root", type=Path, default=Path("data/dev"), help="make data-dev's folder")
    p.add_argument("--rerun", action="store_true", help="ignore the results of earlier runs")
    p.add_argument("--finished-only", action="store_true",
                   help="run nothing: report the runs of the grid that finished")  # fmt: skip
    p.add_argument("--replay", nargs="+", metavar="SHARES",
                   help="run nothing: replay the race from the fixed depths' runs with other "
                   "rounds, each a comma-separated finetune.race.fractions, e.g. 0.125,0.5 "
                   "0.125,1")  # fmt: skip
    p.add_argument("--replay-table", type=Path, metavar="CSV",
                   help="replay from a report's table (docs/tables/<report>.csv) instead of "
                   "the run folders")  # fmt: skip
    p.add_argument("--replay-z", type=float, help="finetune.race.z of the replay (default 1)")
    p.add_argument("--replay-keep-close", action="store_true",
                   help="replay with finetune.race.keep_close=true (a round also keeps every "
                        "candidate within z standard errors of its best)")  # fmt: skip
    args = p.parse_args(argv)
    if args.replay:
        return replay_main(args, user)
    if args.replay_table is not None or args.replay_z is not None or args.replay_keep_close:
        print("error: --replay-table, --replay-z and --replay-keep-close go with --replay (the "
              "rounds to replay, e.g. --replay 0.125,0.5); without it the grid is trained.",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.finished_only and args.rerun:
        print("error: --finished-only reports earlier runs and --rerun ignores them: give one.",
              file=sys.stderr)  # fmt: skip
        return 2
    grid = dict(QUICK if args.quick else GRID)
    custom = False
    for key in ("data", "sizes", "models", "seeds"):
        if getattr(args, key):
            grid[key], custom = getattr(args, key), True
    methods = args.methods or METHODS
    out = args.out or Path("transfer-bench/quick" if args.quick else "transfer-bench")
    report = args.report or (out / "transfer-bench.md" if args.quick or custom
                             or args.finished_only else Path("docs/transfer-bench.md"))  # fmt: skip
    dev_root = args.dev_root.resolve()
    from transferkit.data.dev import is_current

    for d in grid["data"]:
        try:
            current = d == "animal_mnist" or is_current(dev_root / d)
        except ConfigError as e:  # a malformed dataset.json: it says what to do
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not current:
            print(f"error: {dev_root / d} is missing or of an older layout: run `make "
                  "data-dev` first (or pass --dev-root).", file=sys.stderr)  # fmt: skip
            return 2
    try:
        models = [parse_model(m) for m in grid["models"]]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cells = [Cell(d, n, b, s) for (b, s) in models for d in grid["data"] for n in grid["sizes"]]
    import lightning  # noqa: F401  (it sets its loggers' levels on import: set ours after)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transferkit.console import quiet_third_party

    quiet_third_party()  # the same four messages of our dependencies the CLI drops
    records = bench(cells, methods, grid["seeds"], out, dev_root, user, args.rerun,
                    args.finished_only)  # fmt: skip
    summary = summarize(records, methods)
    import platform

    import torch

    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    command = "python -m transferkit.transfer_bench " + " ".join(
        [*argv, *(["--", *user] if user else [])]
    )
    planned = len(cells) * len(methods) * len(grid["seeds"])
    path = write_report(summary, records, methods, report, command.strip(), machine,
                        left_out=planned - len(records))  # fmt: skip
    from transferkit.io import write_json

    write_json(out / "transfer-bench.json", {"records": records, "summary": summary})
    parts = [("", summary["methods"])]
    for key, label in (("by_model", "{} only"), ("by_size", "{} images per class only")):
        parts += [(label.format(g), by) for g, by in (summary.get(key) or {}).items()]
    for title, by_method in parts:
        if title:
            print(title + ":")
        for k, v in by_method.items():
            print(f"{k:>10}: mean regret {v['mean_regret']:.2f}, worst {v['worst_regret']:.2f} "
                  f"points; time / best fixed {v['mean_time_over_best']:.2f} (worst "
                  f"{v['worst_time_over_best']:.2f}) over {v['cells']} cells")  # fmt: skip
    print(f"report written to {path}")
    return 1 if any(r.get("error") for r in records) else 0


def replay_main(args: argparse.Namespace, user: list[str]) -> int:
    """``--replay``: the race's choices with other rounds, from finished runs."""
    schedules = []
    for spec in args.replay:
        try:
            schedules.append([float(x) for x in spec.split(",")])
        except ValueError:
            print(f"error: --replay {spec!r}: give each round's share of the budget, "
                  "comma-separated, e.g. 0.125,0.5", file=sys.stderr)  # fmt: skip
            return 2
    if args.replay_table is not None:
        try:
            records = read_table(args.replay_table)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        grid = dict(QUICK if args.quick else GRID)
        for key in ("data", "sizes", "models", "seeds"):
            if getattr(args, key):
                grid[key] = getattr(args, key)
        try:
            models = [parse_model(m) for m in grid["models"]]
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        cells = [Cell(d, n, b, s) for (b, s) in models for d in grid["data"]
                 for n in grid["sizes"]]  # fmt: skip
        out = args.out or Path("transfer-bench/quick" if args.quick else "transfer-bench")
        with contextlib.redirect_stdout(io.StringIO()):  # the runs reused: not listed
            records = bench(cells, [*RACED, "depth=all", "auto"], grid["seeds"], out,
                            args.dev_root.resolve(), user, False, finished_only=True)  # fmt: skip
    z = 1.0 if args.replay_z is None else args.replay_z
    for fractions in schedules:
        try:
            r = replay(records, fractions, z=z, keep_close=args.replay_keep_close)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        close = " keep_close=true" if args.replay_keep_close else ""
        print(f"finetune.race.fractions={fractions} z={z:g}{close}:")
        for name, c in r["cells"].items():
            same = [a == b for a, b in zip(c["actual"], c["blocks"], strict=True)
                    if a is not None]  # fmt: skip
            agree = f", the real auto chose the same in {sum(same)}/{len(same)}" if same else ""
            print(f"  {name}: blocks {c['blocks']}, test {c['acc']:.3f}, regret "
                  f"{c['regret']:+.2f} against {c['best_fixed']}, fit time / best's "
                  f"{c['fit_over_best']:.2f}{agree}")  # fmt: skip
        if r["cells"]:
            print(f"  over {len(r['cells'])} cells: mean regret {r['mean_regret']:.2f}, worst "
                  f"{r['worst_regret']:.2f} points; fit time / best fixed "
                  f"{r['mean_fit_over_best']:.2f} (worst "
                  f"{r['worst_fit_over_best']:.2f})")  # fmt: skip
        else:
            print("  nothing to replay: no cell has finished runs of every raced depth "
                  f"({', '.join(RACED)}) with their validation curves")  # fmt: skip
        for why in r["skipped"]:
            print(f"  not replayed: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
