"""Resume: a run interrupted after epoch 1 and resumed ends exactly where an uninterrupted one does.

With augmentation (``augment=light``) and shuffling on: the generators' states travel in the
checkpoint (``RNGState``), so the resumed epochs draw the same batches and crops.
"""

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
