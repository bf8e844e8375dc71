"""Every experiment/ config composes with the real conf/ and builds data, model and trainer."""

from pathlib import Path

import pytest

from transferkit.finetune import build

from .conftest import CONF_DIR, tiny_overrides

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


def test_there_are_experiments():
    assert EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds(name, image_folder, tmp_path, make_cfg):
    cfg = make_cfg(f"experiment={name}", *tiny_overrides(image_folder, tmp_path))
    objects = build(cfg)
    assert objects["plan"].total_blocks == objects["model"].num_blocks
    assert objects["trainer"].max_epochs >= 1
