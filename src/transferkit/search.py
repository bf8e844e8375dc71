"""After a hyper-parameter search: the best trial, named, and tested once.

Trials optimise the best validation value of ``monitor`` (``finetune.main`` returns it) and
never look at the test split (``hparams_search`` configs set ``test: false``). When the
sweep ends, :class:`BestTrial` (a Hydra callback) reads every trial's ``summary.json``,
writes ``best_trial.json`` (the trial, its overrides, its objective) into the sweep folder,
and evaluates that trial's best checkpoint on the test split once, into ``best_trial_test/``.
It reads the trials' results, so it works with any sweeper (Optuna, the basic grid).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from transferkit.io import write_json
from transferkit.trust import config_targets

log = logging.getLogger("transferkit")


def collect_trials(sweep_dir: Path) -> list[dict[str, Any]]:
    """Each trial of a sweep folder: its folder, overrides and ``objective``."""
    trials = []
    for summary_path in sorted(sweep_dir.glob("*/summary.json")):
        run = summary_path.parent
        objective = json.loads(summary_path.read_text()).get("objective") or {}
        overrides_path = run / ".hydra" / "overrides.yaml"
        overrides: Any = OmegaConf.load(overrides_path) if overrides_path.is_file() else []
        trials.append({"trial": run.name, "run_dir": str(run), "objective": objective,
                       "overrides": list(overrides)})  # fmt: skip
    return trials


def best_trial(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial with the best objective value (``max`` or ``min`` by its mode)."""
    scored = [t for t in trials if t["objective"].get("value") is not None]
    if not scored:
        return None
    sign = 1 if scored[0]["objective"].get("mode", "max") == "max" else -1
    return max(scored, key=lambda t: sign * t["objective"]["value"])


class BestTrial(Callback):
    """Hydra callback: at the end of a multirun, name the best trial and test it once.

    Args:
        test: evaluate the best trial's best checkpoint on the test split.
    """

    def __init__(self, test: bool = True) -> None:
        self.test = test

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        trials = collect_trials(sweep_dir)
        best = best_trial(trials)
        if best is None:
            log.warning("no trial of %s reported an objective: no best trial", sweep_dir)
            return
        result = {**best, "trials": len(trials)}
        checkpoint = Path(best["run_dir"]) / "checkpoints" / "best.ckpt"
        if self.test and checkpoint.is_file():
            result["test"] = self._test(Path(best["run_dir"]), checkpoint, sweep_dir)
        write_json(sweep_dir / "best_trial.json", result)
        o = best["objective"]
        log.info("best trial: %s (%s = %.4f) of %d, overrides %s; written to %s",
                 best["trial"], o["name"], o["value"], len(trials), best["overrides"],
                 sweep_dir / "best_trial.json")  # fmt: skip

    @staticmethod
    def _test(run_dir: Path, checkpoint: Path, sweep_dir: Path) -> dict[str, Any]:
        """The test metrics of the best checkpoint, with the data config that trained it."""
        from transferkit.evaluate import evaluate

        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        assert isinstance(cfg, DictConfig)
        cfg.ckpt, cfg.split, cfg.device = str(checkpoint), "test", "auto"
        cfg.paths.output_dir = str(sweep_dir / "best_trial_test")
        # the trial's own checkpoint: the targets its config names are the user's own
        own = config_targets(OmegaConf.to_container(cfg, resolve=False))
        cfg.allowed_targets = [*cfg.get("allowed_targets", []), *own]
        result = evaluate(cfg)
        return {k: v for k, v in result.items() if k.startswith("test/")} | {
            "output_dir": cfg.paths.output_dir
        }
