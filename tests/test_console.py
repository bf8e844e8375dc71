"""A quiet console: the three known third-party messages are gone, nothing else is."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

from transferkit.console import quiet_third_party

from .conftest import write_images


def test_a_run_prints_no_third_party_noise_and_says_why_bn_is_in_eval_mode(tmp_path):
    write_images(tmp_path / "images", ["a", "b"], per_class=8)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONWARNINGS", None)
    r = subprocess.run(
        [sys.executable, "-m", "transferkit.finetune", "data=image_folder",
         f"data.root={tmp_path / 'images'}", "data.image_size=32",
         "model.backbone=test_efficientnet", "model.weights=none", "finetune=partial",
         "finetune.trainable_blocks=2", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}/r"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "💡 Tip" not in out and "litlogger" not in out
    assert "LeafSpec" not in out
    assert "module(s) in eval mode" not in out
    assert "BatchNorm layer(s) of frozen blocks stay in inference mode on purpose" in out
    assert "will override existing callbacks" not in out
    assert "transferkit summary" in out


EVAL_MODE = "Found 3 module(s) in eval mode at the start of training."
FEW_BATCHES = "The number of training batches (2) is smaller than the logging interval"
FIT_LOOP = "lightning.pytorch.loops.fit_loop"


def test_the_filters_are_precise(caplog):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party()
        for message, module in [(EVAL_MODE, FIT_LOOP), (EVAL_MODE, "my_code"),
                                (FEW_BATCHES, FIT_LOOP)]:  # fmt: skip
            warnings.warn_explicit(message, UserWarning, "x.py", 1, module=module)
    assert [str(w.message) for w in seen] == [EVAL_MODE, FEW_BATCHES]
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("💡 Tip: try our cloud")
        logger.info("GPU available: False, used: False")
    assert "cloud" not in caplog.text and "GPU available" in caplog.text
