"""Resume: a run interrupted after epoch 1 and resumed ends exactly where an uninterrupted one does.

With augmentation (``augment=light``) and shuffling on: the generators' states travel in the
checkpoint (``RNGState``), so the resumed epochs draw the same batches and crops.
"""

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from transferkit.checkpoint_io import RNGState
from transferkit.finetune import finetune

from .conftest import tiny_overrides


class CrashAfterEpoch(L.Callback):
    """Simulates a killed run: raises as the epoch after ``epoch`` starts, i.e. once the
    checkpoints of ``epoch`` (saved at its end) are on disk."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch + 1:
            raise RuntimeError("simulated crash")


def _overrides(root, out, *extra):
    return tiny_overrides(
        root, out, "trainer.max_epochs=3", "augment=light", "finetune=gradual",
        "finetune.trainable_blocks=0", "finetune.blocks_per_step=2", "model.drop_rate=0.2",
        *extra,
    )  # fmt: skip


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_run_matches_the_uninterrupted_one(workers, image_folder, tmp_path, make_cfg):
    """With loader workers, which draw the resumed epoch's first indices when the loader is
    built: the sampler must already know the epoch then."""
    loader = f"data.num_workers={workers}"
    full, objects = finetune(make_cfg(*_overrides(image_folder, tmp_path / "full", loader)))

    out = tmp_path / "crashed"
    crash = "+callbacks.crash={_target_: tests.test_resume.CrashAfterEpoch, epoch: 0}"
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(make_cfg(*_overrides(image_folder, out, crash, loader)))
    last = out / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0

    resumed, resumed_objects = finetune(
        make_cfg(*_overrides(image_folder, out, f"ckpt_path={last}", loader))
    )
    assert resumed["epochs"] == full["epochs"] == 3
    assert resumed["global_steps"] == full["global_steps"]
    # bit-for-bit on CPU; the tolerance only absorbs float reassociation on other hardware
    assert resumed["best_val_acc"] == pytest.approx(full["best_val_acc"], abs=1e-6)
    assert resumed["test_acc"] == pytest.approx(full["test_acc"], abs=1e-6)
    assert resumed["test_loss"] == pytest.approx(full["test_loss"], abs=1e-6)
    # the end state, not only the best one (which may come from the first epoch)
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)
            for d in (tmp_path / "full", out))  # fmt: skip
    assert a["epoch"] == b["epoch"] == 2
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], rtol=0, atol=1e-6, msg=k)
    moments = lambda c: [s["exp_avg"] for s in c["optimizer_states"][0]["state"].values()]  # noqa: E731
    for x, y in zip(moments(a), moments(b), strict=True):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
    # the fine-tuning schedule resumed too: the gradual unfreeze reached the same depth
    assert resumed_objects["model"].current_trainable == objects["model"].current_trainable


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    cb = RNGState()
    torch.manual_seed(1)
    state = cb.state_dict()
    torch.save(state, tmp_path / "s.pt")
    expected = torch.rand(3)
    torch.manual_seed(2)
    cb.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("every", [1, 2])
def test_resuming_a_run_early_stopping_ended_trains_no_more(every, image_folder, tmp_path,
                                                           make_cfg):  # fmt: skip
    """Lightning keeps why early stopping ended a run in its checkpoint, but not the stop:
    resumed from its last.ckpt, a run it had ended trained on to its next validation (and on
    from there if that one improved). Resuming a finished run must not change its result.
    Validating every epoch, early stopping checks at the epoch's end; every 2, after the
    validation."""
    # no validation improves on the first: early stopping ends the run at the second
    common = ["trainer.max_epochs=6", f"trainer.check_val_every_n_epoch={every}",
              "callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=10",
              "finetune=partial", "finetune.trainable_blocks=1", "logger=csv"]  # fmt: skip
    out = tmp_path / "run"
    first, _ = finetune(make_cfg(*tiny_overrides(image_folder, out, *common)))
    assert first["epochs"] == 2 * every
    # the summary and report say so (the best checkpoint, restored to test, predates the stop)
    assert first["early_stopping"] == {
        "monitor": "val/loss",
        "stopped": True,
        "after_epochs": 2 * every,
        "reason": "patience_exhausted",
    }
    stop_note = f"Early stopping ended the run after epoch {2 * every}."
    assert stop_note in (out / "report.md").read_text()
    last = out / "checkpoints" / "last.ckpt"
    before = torch.load(last, weights_only=True)
    resume = f"ckpt_path={last}"
    resumed, _ = finetune(make_cfg(*tiny_overrides(image_folder, out, *common, resume)))
    assert resumed["global_steps"] == first["global_steps"] == before["global_step"]
    assert resumed["epochs"] == first["epochs"]
    assert resumed["test_acc"] == pytest.approx(first["test_acc"], abs=1e-6)
    after = torch.load(last, weights_only=True)
    assert (after["epoch"], after["global_step"]) == (before["epoch"], before["global_step"])
    # the report still shows the run's curves (the resumed part logged none) and its stop
    report = (out / "report.md").read_text()
    assert "![learning curves]" in report
    assert stop_note in report and resumed["early_stopping"] == first["early_stopping"]
    # its speed and seconds are the run's, not those of the call that trained nothing more
    assert resumed["train_images_per_second"] == first["train_images_per_second"] > 0
    assert resumed["fit_seconds"] > first["history"][-1]["seconds"]
    if every == 2:
        return
    # a longer budget does not undo the stop either: the patience it ran out is in the file
    longer, _ = finetune(make_cfg(*tiny_overrides(image_folder, out, *common, resume,
                                                  "trainer.max_epochs=12")))  # fmt: skip
    assert longer["global_steps"] == first["global_steps"]
    # without early stopping, the resumed run trains on: the way to train longer
    on, _ = finetune(make_cfg(*tiny_overrides(image_folder, out, *common, resume,
                                              "~callbacks.early_stopping")))  # fmt: skip
    assert on["epochs"] == 6 and on["global_steps"] == 3 * first["global_steps"]
    assert on["fit_seconds"] > on["history"][-1]["seconds"] > first["history"][-1]["seconds"]


def test_an_early_stop_is_read_from_checkpoints_of_any_lightning_version():
    from lightning.pytorch.callbacks import EarlyStopping

    from transferkit.checkpoint_io import early_stopped_epochs

    key = EarlyStopping(monitor="val/loss", mode="min").state_key

    def ckpt(**state):
        base = {"wait_count": 1, "stopped_epoch": 0, "best_score": torch.tensor(0.5), "patience": 3}
        return {"callbacks": {key: {**base, **state}}}

    assert early_stopped_epochs(ckpt(stopping_reason=0)) is None  # not stopped
    assert early_stopped_epochs(ckpt()) is None  # before Lightning 2.6: patience left
    assert early_stopped_epochs(ckpt(wait_count=3, stopped_epoch=4)) == (
        5, "no improvement in 3 checks")  # fmt: skip
    stopped = ckpt(
        stopping_reason=3,
        stopped_epoch=2,
        stopping_reason_message="Best score: 0.5. Signaling Trainer to stop.",
    )
    assert early_stopped_epochs(stopped) == (3, "Best score: 0.5")
    # only the states the resumed run's early stopping restores
    other = EarlyStopping(monitor="val/acc", mode="max").state_key
    assert early_stopped_epochs(stopped, {other}) is None
    assert early_stopped_epochs(stopped, {key}) == (3, "Best score: 0.5")
    assert early_stopped_epochs({"callbacks": {"ModelCheckpoint": {"best_model_path": ""}}}) is None


def _trainer(max_epochs=10, min_epochs=None, min_steps=None, current_epoch=0, stopper=None):
    from lightning.pytorch.callbacks import EarlyStopping

    stopper = stopper or EarlyStopping(monitor="val/loss", mode="min")
    loop = SimpleNamespace(max_epochs=max_epochs, min_epochs=min_epochs, min_steps=min_steps)
    return SimpleNamespace(callbacks=[stopper], fit_loop=loop, current_epoch=current_epoch)


@pytest.mark.parametrize(
    ("saved", "limits", "expected"),
    [
        ({"epoch": 2, "global_step": 9}, {}, 3),  # last.ckpt of the stop epoch (index 2)
        ({"epoch": 3, "global_step": 12}, {}, 10),  # saved after it: a resume trained on
        ({"epoch": 2, "global_step": 9}, {"min_epochs": 5}, 5),  # Lightning went on to 5
        ({"epoch": 4, "global_step": 15}, {"min_epochs": 5}, 5),
        ({"epoch": 2, "global_step": 9}, {"min_steps": 20}, 10),  # ... and to min_steps
        ({"epoch": 2, "global_step": 21}, {"min_steps": 20}, 3),  # reached in the stop epoch
        ({"epoch": 6, "global_step": 21}, {"min_steps": 20}, 10),  # stale: no stop there
    ],
)
def test_the_early_stop_cap_follows_lightnings_limits(saved, limits, expected):
    """Only where the first run would have ended: min_epochs and min_steps kept it going
    after the stop, and a checkpoint saved after the stop (by a resume that trained on)
    is not capped."""
    from lightning.pytorch.callbacks import EarlyStopping

    from transferkit.finetune import _keep_early_stop

    trainer = _trainer(**limits)
    state = {"wait_count": 3, "stopped_epoch": 2, "best_score": torch.tensor(0.5),
             "patience": 3, "stopping_reason": 3}  # fmt: skip
    ckpt = {**saved, "callbacks": {EarlyStopping(monitor="val/loss", mode="min").state_key: state}}
    _keep_early_stop(ckpt, "last.ckpt", trainer)
    assert trainer.fit_loop.max_epochs == expected
    without = _trainer(**limits, stopper=EarlyStopping(monitor="val/acc", mode="max"))
    _keep_early_stop(ckpt, "last.ckpt", without)  # another monitor: a fresh early stopping
    assert without.fit_loop.max_epochs == 10


def test_the_summary_says_early_stopping_ended_the_run_only_where_it_did():
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

    from transferkit.finetune import _early_stop_result

    stopper = EarlyStopping(monitor="val/loss", mode="min")
    assert _early_stop_result(_trainer(current_epoch=10, stopper=stopper))["stopped"] is False
    stopper.stopping_reason, stopper.stopped_epoch = EarlyStoppingReason.PATIENCE_EXHAUSTED, 2
    assert _early_stop_result(_trainer(current_epoch=3, stopper=stopper)) == {
        "monitor": "val/loss", "stopped": True, "after_epochs": 3,
        "reason": "patience_exhausted"}  # fmt: skip
    ended = _early_stop_result(_trainer(min_epochs=5, current_epoch=5, stopper=stopper))
    assert ended["after_epochs"] == 5  # min_epochs held it to 5
    assert _early_stop_result(_trainer(current_epoch=7, stopper=stopper))["stopped"] is False
    assert _early_stop_result(SimpleNamespace(callbacks=[])) is None
