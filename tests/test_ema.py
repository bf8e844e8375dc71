"""callbacks=ema: frozen weights and statistics untouched, EMA weights validated, saved and
loaded, and a resumed run continues the average exactly."""

from __future__ import annotations

import pytest
import torch

from transferkit.callbacks.ema import EMA
from transferkit.checkpoint_io import load_classifier
from transferkit.finetune import finetune

from .conftest import tiny_overrides
from .test_resume import CrashAfterEpoch  # noqa: F401  (the crash callback's target)


def _overrides(root, out, *extra):
    return tiny_overrides(root, out, "callbacks=ema", "finetune=partial",
                          "finetune.trainable_blocks=2", "trainer.max_epochs=3",
                          *extra)  # fmt: skip


def test_frozen_weights_stay_bit_identical_and_the_checkpoint_holds_the_ema(
    image_folder, tmp_path, make_cfg
):
    cfg = make_cfg(*_overrides(image_folder, tmp_path / "run", "finetune.cache_features=false"))
    import lightning as L

    from transferkit.finetune import build

    L.seed_everything(cfg.seed)  # as finetune() does: the same random initial weights
    start = {k: v.clone() for k, v in build(cfg)["model"].state_dict().items()}
    summary, objects = finetune(cfg)
    model = objects["model"]
    ema = next(c for c in objects["trainer"].callbacks if isinstance(c, EMA))
    assert summary["global_steps"] > 0 and ema.steps > 0
    end = model.state_dict()
    first = ("backbone.conv_stem", "backbone.bn1", "backbone.blocks.0.", "backbone.blocks.1.")
    frozen = [k for k in start if k.startswith(first)]
    assert any("running_mean" in k for k in frozen)
    assert all(torch.equal(start[k], end[k]) for k in frozen)  # through the EMA, bit for bit
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    raw, averaged = ckpt["current_model_state"], ckpt["state_dict"]
    assert all(torch.equal(raw[k], averaged[k]) and torch.equal(raw[k], start[k]) for k in frozen)
    head = "head.1.weight"
    assert not torch.equal(raw[head], averaged[head])  # the trained head: raw and EMA differ
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    assert torch.equal(best["state_dict"][head], end[head])  # tested: the best EMA weights
    loaded = load_classifier(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert torch.equal(loaded.state_dict()[head], averaged[head])  # predict/export use it


def test_resume_with_ema_is_exact(image_folder, tmp_path, make_cfg):
    full, _ = finetune(make_cfg(*_overrides(image_folder, tmp_path / "full")))
    out = tmp_path / "crashed"
    crash = "+callbacks.crash={_target_: tests.test_resume.CrashAfterEpoch, epoch: 0}"
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(make_cfg(*_overrides(image_folder, out, crash)))
    resume = f"ckpt_path={out}/checkpoints/last.ckpt"
    resumed, _ = finetune(make_cfg(*_overrides(image_folder, out, resume)))
    assert (resumed["test_acc"], resumed["test_loss"]) == (full["test_acc"], full["test_loss"])
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)
            for d in (tmp_path / "full", out))  # fmt: skip
    for key in ("state_dict", "current_model_state"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_the_decay_warms_up_as_timm():
    ema = EMA(decay=0.999)
    assert ema.current_decay() == pytest.approx(0.1)
    ema.steps = 20_000
    assert ema.current_decay() == 0.999
    with pytest.raises(ValueError, match=r"decay=1\.5"):
        EMA(decay=1.5)
