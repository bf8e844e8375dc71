"""SIGTERM (what SLURM and spot instances send): a resumable last.ckpt at once, an exact
resume, a non-zero exit, and a prompt stop outside the training loop too."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from transferkit.cli import run_cli
from transferkit.finetune import finetune

from .conftest import tiny_overrides, write_images


class SigtermAt(L.Callback):
    """Sends this process SIGTERM after training batch ``batch`` of epoch ``epoch``."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGTERM)


def _base_overrides(root, out, *extra, workers=0):
    # random crops and flips, dropout and shuffling: only exact with every generator restored
    return tiny_overrides(
        root, out, "trainer.max_epochs=2", "augment=light", "finetune=partial",
        "finetune.trainable_blocks=3", "model.drop_rate=0.2", "data.batch_size=4",
        f"data.num_workers={workers}", *extra,
    )  # fmt: skip


_overrides = _base_overrides


def _last(out):
    return torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.mark.parametrize(("epoch", "workers"), [(0, 0), (1, 0), (1, 2)])
def test_sigterm_mid_epoch_checkpoints_at_once_and_resumes_exactly(
    epoch, workers, image_folder, tmp_path, make_cfg, capsys
):
    """With loader workers too (persistent ones): each image's augmentation has its own
    seed, so the workers' generators do not matter."""
    _overrides = functools.partial(_base_overrides, workers=workers)
    full, _ = finetune(make_cfg(*_overrides(image_folder, tmp_path / "full")))

    out = tmp_path / "stopped"
    kill = (
        f"+callbacks.kill={{_target_: tests.test_preemption.SigtermAt, epoch: {epoch}, batch: 1}}"
    )
    with pytest.raises(SystemExit) as stopped:
        run_cli(lambda: finetune(make_cfg(*_overrides(image_folder, out, kill))))
    assert stopped.value.code == 128 + signal.SIGTERM  # schedulers can tell it was stopped
    assert "stopped: SIGTERM" in capsys.readouterr().err
    assert not (out / "summary.json").exists()
    ckpt = _last(out)  # saved at the batch boundary, not at the end of an epoch
    steps_per_epoch = full["global_steps"] // 2
    assert ckpt["global_step"] == epoch * steps_per_epoch + 2
    assert not list(out.rglob("*.tmp"))

    resumed, _ = finetune(
        make_cfg(*_overrides(image_folder, out, f"ckpt_path={out}/checkpoints/last.ckpt"))
    )
    assert resumed["global_steps"] == full["global_steps"]
    # bit-for-bit on CPU: the same batches, crops, flips and dropout masks as the run that
    # was never stopped
    assert resumed["test_acc"] == full["test_acc"]
    assert resumed["test_loss"] == full["test_loss"]
    assert resumed["best_val_acc"] == full["best_val_acc"]
    a, b = _last(tmp_path / "full")["state_dict"], _last(out)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _cli(*args: str, cwd) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TRANSFERKIT_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "transferkit.finetune", *args],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip


def test_sigterm_while_caching_stops_within_seconds_and_exits_non_zero(tmp_path):
    """A real SIGTERM from another process while the frozen-prefix cache is being built."""
    write_images(tmp_path / "images", ["a", "b"], per_class=600, size=64)
    out = tmp_path / "run"
    p = _cli(
        "data=image_folder", f"data.root={tmp_path / 'images'}", "data.image_size=64",
        "model.backbone=tf_efficientnet_lite0", "model.weights=none", "finetune=linear_probe",
        "data.decode_once=false", "finetune.cache_memory_gb=0", "logger=none",
        "trainer.enable_progress_bar=false", f"hydra.run.dir={out}", cwd=tmp_path,
    )  # fmt: skip
    lines = []
    assert p.stdout is not None
    for line in p.stdout:  # wait until caching has started
        lines.append(line)
        if "caching train" in line:
            break
    else:
        pytest.fail("".join(lines))
    sent = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rest = p.communicate(timeout=60)[0]
    took = time.monotonic() - sent
    assert p.returncode == 128 + signal.SIGTERM, "".join(lines) + rest
    assert took < 10, took
    assert "stopped: SIGTERM" in rest and "Traceback" not in rest
    # nothing half-written: no partial cache file, no temporary files, no summary
    assert not list(out.rglob("*.npy")) and not list(out.rglob("*.tmp"))
    assert not (out / "summary.json").exists()


class SigtermInValidation(L.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_validation_batch_end(self, trainer, pl_module, *args) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGTERM)


class SigtermInTest(L.Callback):
    def on_test_batch_end(self, trainer, pl_module, *args) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_validation_stops_at_once_and_resumes_from_the_epoch_before(
    image_folder, tmp_path, make_cfg
):
    full, _ = finetune(make_cfg(*_overrides(image_folder, tmp_path / "full")))
    out = tmp_path / "stopped"
    kill = "+callbacks.kill={_target_: tests.test_preemption.SigtermInValidation, epoch: 1}"
    with pytest.raises(SystemExit) as stopped:
        run_cli(lambda: finetune(make_cfg(*_overrides(image_folder, out, kill))))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert _last(out)["epoch"] == 0  # the end of the previous epoch is the resume point
    resumed, _ = finetune(
        make_cfg(*_overrides(image_folder, out, f"ckpt_path={out}/checkpoints/last.ckpt"))
    )
    assert (resumed["test_acc"], resumed["test_loss"]) == (full["test_acc"], full["test_loss"])


def test_sigterm_during_testing_stops_with_no_summary(image_folder, tmp_path, make_cfg):
    out = tmp_path / "stopped"
    kill = "+callbacks.kill={_target_: tests.test_preemption.SigtermInTest}"
    with pytest.raises(SystemExit) as stopped:
        run_cli(lambda: finetune(make_cfg(*_overrides(image_folder, out, kill))))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert not (out / "summary.json").exists() and not list(out.rglob("*.tmp"))
    assert _last(out)["epoch"] == 1  # training finished: its checkpoints are whole


class _SignalOfWorker(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> bool:
        return signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_loader_workers_ignore_sigterm(image_folder):
    """SLURM signals every process of the step: workers leave stopping to the main process."""
    from transferkit.data.datamodule import training_loader

    loader = training_loader(_SignalOfWorker(), 1, None, seed=0, num_workers=1)
    assert all(bool(b) for b in loader)
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN  # not in the main process
