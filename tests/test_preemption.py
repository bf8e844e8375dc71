"""SIGTERM (what SLURM and spot instances send): a resumable last.ckpt at once, an exact
resume, a non-zero exit, and a prompt stop outside the training loop too."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from transferkit.cli import run_cli
from transferkit.finetune import finetune

from .conftest import tiny_overrides, write_images


class SigtermAt(L.Callback):
    """Sends this process SIGTERM after training batch ``batch`` of epoch ``epoch`` (on one
    rank only when ``rank`` is given)."""

    def __init__(self, epoch: int, batch: int, rank: int | None = None) -> None:
        self.epoch, self.batch, self.rank = epoch, batch, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return
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
    # the speed counts every image once: the stopped part's, saved mid-epoch, and the rest
    speeds = [_last(run)["callbacks"]["TrainSpeed"] for run in (tmp_path / "full", out)]
    assert speeds[0]["images"] == speeds[1]["images"] > 0


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


def test_a_mid_epoch_checkpoint_refuses_other_batch_settings(image_folder, tmp_path, make_cfg,
                                                             capsys):  # fmt: skip
    """The resumed epoch skips the batches done: with another batch size or seed it would
    skip other images than those it trained on."""
    out = tmp_path / "stopped"
    kill = "+callbacks.kill={_target_: tests.test_preemption.SigtermAt, epoch: 0, batch: 1}"
    with pytest.raises(SystemExit):
        run_cli(lambda: finetune(make_cfg(*_overrides(image_folder, out, kill))))
    resume = f"ckpt_path={out}/checkpoints/last.ckpt"
    for changed in ("data.batch_size=2", "seed=7"):
        with pytest.raises(SystemExit) as e:
            run_cli(lambda c=changed: finetune(make_cfg(*_overrides(image_folder, out, resume, c))))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "middle of an epoch (2 batches done)" in err and "end of an epoch" in err


def test_no_checkpoint_between_accumulated_micro_batches(image_folder, tmp_path, make_cfg,
                                                         caplog):  # fmt: skip
    out = tmp_path / "stopped"
    # after batch 2: the first optimizer step is done, the second has half its gradients
    kill = "+callbacks.kill={_target_: tests.test_preemption.SigtermAt, epoch: 0, batch: 2}"
    with caplog.at_level("WARNING"), pytest.raises(SystemExit):
        run_cli(lambda: finetune(make_cfg(*_overrides(
            image_folder, out, kill, "trainer.accumulate_grad_batches=2"))))  # fmt: skip
    assert "an accumulated step" in caplog.text and "none yet" in caplog.text
    assert not (out / "checkpoints" / "last.ckpt").exists()


def _ddp_cli(out, root, *extra):
    repo = str(Path(__file__).resolve().parents[1])  # for the test callback's module
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": repo,
           "PYTHONWARNINGS": "ignore"}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "transferkit.finetune", "trainer=ddp_cpu", "data=image_folder",
         f"data.root={root}", "data.image_size=32", "data.batch_size=4", "augment=light",
         "data.val_fraction=0.25", "data.test_fraction=0.25", "model.backbone=test_efficientnet",
         "model.weights=none", "model.drop_rate=0.2", "finetune=partial",
         "finetune.trainable_blocks=3", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
         "report=false", f"hydra.run.dir={out}", *extra],
        capture_output=True, text=True, timeout=300, env=env, cwd=out.parent,
    )  # fmt: skip


@pytest.mark.slow  # processes of a DDP run: `make test-slow` (CI) runs it
def test_sigterm_under_ddp_stops_every_rank_at_the_same_batch(tmp_path):
    """Two processes (gloo); SIGTERM reaches rank 1 alone. Lightning 2.6's own handling left
    the ranks waiting for each other; here both stop after the same step, save one
    last.ckpt, exit 143, and the resumed run ends bit-identical to one never stopped."""
    write_images(tmp_path / "images", ["a", "b"], per_class=24)
    full = _ddp_cli(tmp_path / "full", tmp_path / "images")
    assert full.returncode == 0, full.stderr[-2000:]
    kill = (
        "+callbacks.kill={_target_: tests.test_preemption.SigtermAt, epoch: 0, batch: 1, rank: 1}"
    )
    stopped = _ddp_cli(tmp_path / "run", tmp_path / "images", kill)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    logs = stopped.stdout + stopped.stderr
    assert logs.count("stopped at epoch 0, step 2") == 2, logs[-3000:]  # both ranks, same step
    resumed = _ddp_cli(tmp_path / "run", tmp_path / "images",
                       f"ckpt_path={tmp_path}/run/checkpoints/last.ckpt")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("full", "run"))
    assert (a["test_acc"], a["test_loss"], a["global_steps"]) == (
        b["test_acc"], b["test_loss"], b["global_steps"])  # fmt: skip
    sa, sb = (_last(tmp_path / d)["state_dict"] for d in ("full", "run"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
