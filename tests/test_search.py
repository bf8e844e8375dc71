"""Hyper-parameter search: trials optimise the validation metric, the best one is named and
tested once; Optuna's sweeper and the SLURM launcher configs compose."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from transferkit.search import best_trial

from .conftest import write_images

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")


@pytest.mark.slow  # an Optuna sweep of two trials: `make test-slow` (CI) runs it
def test_a_two_trial_optuna_search_on_a_tiny_model(tmp_path):
    write_images(tmp_path / "images", ["a", "b", "c"], per_class=10)
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(
        [sys.executable, "-m", "transferkit.finetune", "-m", "hparams_search=optuna",
         "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
         "data=image_folder", f"data.root={tmp_path / 'images'}", "data.image_size=32",
         "data.val_fraction=0.2", "data.test_fraction=0.2", "model.backbone=test_efficientnet",
         "model.weights=none", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
         f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    trials = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert all(t["test_acc"] is None for t in trials)  # the search never saw the test split
    assert all(t["objective"]["name"] == "val/acc" for t in trials)
    best = json.loads((sweep / "best_trial.json").read_text())
    values = [t["objective"]["value"] for t in trials]
    assert best["objective"]["name"] == "val/acc" and best["objective"]["value"] == max(values)
    assert best["trial"] in ("0", "1") and best["trials"] == 2
    assert any(o.startswith("optimizer.lr=") for o in best["overrides"])
    assert 0.0 <= best["test"]["test/acc"] <= 1.0  # tested once, after the search
    assert (sweep / "best_trial_test" / "evaluation.json").is_file()
    optuna = OmegaConf.load(sweep / "optimization_results.yaml")
    assert optuna.best_value == pytest.approx(max(values))  # main returned val/acc


def test_the_best_trial_follows_the_mode():
    trials = [{"trial": str(i), "objective": {"name": "val/loss", "mode": "min", "value": v}}
              for i, v in enumerate([0.5, 0.2, None, 0.9])]  # fmt: skip
    assert best_trial(trials)["trial"] == "1"
    for t in trials:
        t["objective"]["mode"] = "max"
    assert best_trial(trials)["trial"] == "3"
    assert best_trial([]) is None


def test_the_slurm_launcher_composes_with_ddp_and_a_sweep():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from transferkit.distributed import check_multirun

    from .conftest import CONF_DIR

    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                 "hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=4",
                 "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30"]  # fmt: skip
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("finetune", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node,
            launcher.tasks_per_node) == ("gpu", 30, 4, 4)  # fmt: skip
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 4
    # a sweep of DDP jobs is fine there (SLURM starts the ranks), not with the local launcher
    check_multirun(cfg.trainer, multirun=True, launcher=launcher._target_)
    for local in (
        "hydra._internal.BasicLauncher",
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    ):
        with pytest.raises(ValueError, match="hydra/launcher=slurm"):  # both re-launch ranks
            check_multirun(cfg.trainer, multirun=True, launcher=local)
