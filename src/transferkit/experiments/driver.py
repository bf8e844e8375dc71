"""The driver of ``make experiments``: every run planned, run or reused, then one report.

    python -m transferkit.experiments                 # every experiment, experiments/report.md
    python -m transferkit.experiments --quick         # CI-sized: small grids, few steps
    python -m transferkit.experiments --only overfitting optimizers
    python -m transferkit.experiments -- model.backbone=test_efficientnet model.weights=none

Each experiment is a Hydra config ``conf/experiment/<name>.yaml`` whose grid is its
``hydra.sweeper.params``, so ``make finetune ARGS="-m experiment=<name>"`` runs it alone. This
driver composes the same configs, runs every grid point in-process through ``finetune``
(plus a few extra sweeps per experiment, listed in each claim's ``EXPERIMENT``), and writes
``<out>/report.md`` with a plot (``figures/``) and the table behind it (``tables/``) for
each claim. Overrides after ``--`` apply to every run; one that names a swept key replaces
the sweep, as on Hydra's command line.

A run whose ``summary.json`` exists with the same overrides is reused (``--rerun`` forces
it), so an interrupted ``make experiments`` continues where it stopped. Checkpoints are
deleted after each run (``--keep-checkpoints`` keeps them).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from transferkit.errors import ConfigError
from transferkit.experiments.common import (
    Experiment,
    Run,
    _num,
    log,
    run_name,
    split_overrides,
)
from transferkit.experiments.report import EXPERIMENTS, write_report
from transferkit.io import write_json


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
    """A hash of the composed, unresolved config: an edited experiment YAML changes it. A data
    folder that describes itself (``dataset.json``, written by ``make data-dev``) adds its
    description, so runs on a rebuilt data set are not reused."""
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(cfg)
    try:
        root = OmegaConf.select(cfg, "data.root", default=None)
    except Exception:  # an interpolation that cannot be resolved here: the config alone
        root = None
    if root:
        marker = Path(str(root)) / "dataset.json"
        try:
            text += marker.read_text() if marker.is_file() else ""
        except OSError as e:
            raise ConfigError(f"{marker} cannot be read ({e}); fix its permissions or "
                              "rebuild the data set with make data-dev.") from e  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def run_one(overrides: list[str], run_dir: Path, rerun: bool, keep_checkpoints: bool,
            reuse_only: bool = False) -> Run:  # fmt: skip
    """Fit one configuration (or reuse its earlier result); errors are returned, not raised.
    ``reuse_only``: fit nothing; a configuration without an earlier result is ``missing``."""
    from transferkit.finetune import finetune

    cfg = _compose(overrides)
    config = fingerprint(cfg)
    earlier = None if rerun else earlier_result(overrides, config, run_dir)
    if earlier is not None:
        return earlier
    if reuse_only:
        return {"missing": True}
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
    if exp.prepare is not None:
        exp.prepare()
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


def main(argv: list[str] | None = None) -> int:
    argv, user = split_overrides(list(sys.argv[1:] if argv is None else argv))
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
    from transferkit.console import quiet_third_party

    quiet_third_party()  # the same four messages of our dependencies the CLI drops
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
