"""Checkpoints: self-contained (no data, no network), and written atomically."""

import shutil

import pytest
import timm
import torch
from hydra.utils import instantiate

from transferkit.checkpoint_io import AtomicCheckpointIO, load_classifier, read_checkpoint
from transferkit.finetune import finetune

from .conftest import tiny_overrides


def test_round_trip_needs_neither_data_nor_network(image_folder, tmp_path, make_cfg, monkeypatch):
    out = tmp_path / "run"
    summary, objects = finetune(make_cfg(*tiny_overrides(image_folder, out)))
    trained = objects["model"].eval()  # holds the best weights: trainer.test loaded them
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = trained(x)

    shutil.rmtree(image_folder)  # no data ...

    def no_network(*args, **kwargs):
        raise AssertionError("loading a checkpoint must not download anything")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_network)  # ... no network
    monkeypatch.setattr(timm.models._hub, "download_cached_file", no_network)
    best = out / "checkpoints" / "best.ckpt"
    ckpt = torch.load(best, weights_only=True)  # plain data: loads with torch's safe unpickler
    assert ckpt["hyper_parameters"]["class_names"] == ["ant", "bee", "cat"]
    assert ckpt["hyper_parameters"]["backbone"] == "test_efficientnet"
    assert ckpt["hyper_parameters"]["head"]["_target_"].endswith("LinearHead")
    assert ckpt["transferkit"]["preprocessing"]["image_size"] == 32

    model = load_classifier(best)
    assert not model.training
    assert model.hparams["class_names"] == ["ant", "bee", "cat"]
    assert model.preprocessing == ckpt["transferkit"]["preprocessing"]
    assert set(model.preprocessing) == {"mean", "std", "interpolation", "image_size", "crop_pct"}
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
    assert summary["best_checkpoint"] == str(best)


def test_saved_preprocessing_wins_over_timm_defaults(image_folder, tmp_path, make_cfg):
    out = tmp_path / "run"
    finetune(make_cfg(*tiny_overrides(image_folder, out, "trainer.max_epochs=1")))
    path = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["transferkit"]["preprocessing"]["mean"] = [0.5, 0.5, 0.5]
    torch.save(ckpt, path)
    assert load_classifier(path).preprocessing["mean"] == [0.5, 0.5, 0.5]


def test_trainer_config_writes_checkpoints_atomically(make_cfg, tmp_path):
    cfg = make_cfg("trainer.accelerator=cpu", f"paths.output_dir={tmp_path}")
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_a_crash_mid_write_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "best.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, path)
    old = path.read_bytes()

    real_save = torch.save

    def crash_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the disk, then ...
        raise KeyboardInterrupt  # ... the process is killed (or the disk is full)

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)

    assert path.read_bytes() == old
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["best.ckpt"]  # no temp file left
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 2}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 2


def test_checkpoint_file_mode_follows_the_umask(tmp_path):
    path = tmp_path / "c.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 0}, path)
    assert path.stat().st_mode & 0o044  # readable by group/others under the usual umask 022


def test_unreadable_or_foreign_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.ckpt")
    (tmp_path / "half.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*half\.ckpt"):
        read_checkpoint(tmp_path / "half.ckpt")
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="not a transferkit checkpoint"):
        read_checkpoint(tmp_path / "plain.pth")
