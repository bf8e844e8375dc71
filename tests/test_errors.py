"""Bad input ends with exit code 2 and one short message naming the bad value and the fix.

Each case runs the real entry point in-process through ``run_cli`` on a folder generated in
``tmp_path``; a few run as subprocesses to prove that no traceback reaches the user.
"""

import importlib.util
import logging
import math
import os
import subprocess
import sys

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from transferkit.cli import run_cli
from transferkit.evaluate import evaluate
from transferkit.export import export
from transferkit.finetune import finetune
from transferkit.predict import predict

from .conftest import CONF_DIR, tiny_overrides, write_bomb_png, write_images


def fails(task, capsys) -> str:
    """Run ``task`` as the CLIs do; return the one-line error it printed."""
    with pytest.raises(SystemExit) as e:
        run_cli(task)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "TRANSFERKIT_DEBUG=1" in err
    return err


def _run(make_cfg, root, out, *extra):
    cfg = make_cfg(*tiny_overrides(root, out, *extra))
    return lambda: finetune(cfg)


def _cfg(name, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(name, overrides=list(overrides))


def test_missing_root(tmp_path, make_cfg, capsys):
    err = fails(_run(make_cfg, tmp_path / "nowhere", tmp_path / "o"), capsys)
    assert "data.root=" in err and "nowhere" in err and "is not a directory" in err


def test_empty_root(tmp_path, make_cfg, capsys):
    (tmp_path / "empty").mkdir()
    err = fails(_run(make_cfg, tmp_path / "empty", tmp_path / "o"), capsys)
    assert "empty" in err and "no class sub-folders" in err and "<class name>" in err


def test_root_with_class_folders_but_no_images(tmp_path, make_cfg, capsys):
    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        (tmp_path / "d" / c / "readme.txt").write_text("not an image")
    err = fails(_run(make_cfg, tmp_path / "d", tmp_path / "o"), capsys)
    assert "holds no readable images" in err


def test_one_class(tmp_path, make_cfg, capsys):
    write_images(tmp_path / "one", ["only"], per_class=10)
    err = fails(_run(make_cfg, tmp_path / "one", tmp_path / "o"), capsys)
    assert "1 class(es)" in err and "'only'" in err and "at least 2" in err


def test_too_few_images_for_the_splits(tmp_path, make_cfg, capsys):
    write_images(tmp_path / "few", ["a", "b"], per_class=2)
    err = fails(_run(make_cfg, tmp_path / "few", tmp_path / "o"), capsys)
    assert "class 'a' has 2 image(s)" in err and "data.val_fraction" in err


def _bad_files(root):
    write_images(root, ["a", "b"], per_class=6)
    (root / "b" / "notes.txt").write_text("not an image")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = root / "b" / "000.png"
    (root / "b" / "truncated.png").write_bytes(good.read_bytes()[:60])


def test_bad_files_are_skipped_and_counted(tmp_path, make_cfg, caplog):
    _bad_files(tmp_path / "bad")
    with caplog.at_level(logging.WARNING):
        summary, _ = finetune(make_cfg(*tiny_overrides(tmp_path / "bad", tmp_path / "o",
                                                       "trainer.max_epochs=1")))  # fmt: skip
    assert "skipped 3 file(s)" in caplog.text
    assert "1 not image files (e.g." in caplog.text and "2 unreadable (e.g." in caplog.text
    assert summary["train_size"] + summary["val_size"] + summary["test_size"] == 12


def test_non_image_files_never_stop_a_run_and_bombs_are_skipped(tmp_path, make_cfg, caplog):
    """A README.txt or labels.csv beside the images used to count as unreadable and stop the
    run under on_bad_image=fail; a decompression bomb raised Pillow's error even under skip."""
    root = tmp_path / "d"
    write_images(root, ["a", "b"], per_class=6)
    (root / "a" / "README.txt").write_text("notes")
    (root / "b" / "labels.CSV").write_text("x,y")
    with caplog.at_level(logging.WARNING):
        summary, _ = finetune(make_cfg(*tiny_overrides(root, tmp_path / "o1",
                                                       "data.on_bad_image=fail")))  # fmt: skip
    assert summary["train_size"] + summary["val_size"] + summary["test_size"] == 12
    assert "2 not image files" in caplog.text
    write_bomb_png(root / "b" / "bomb.png", 3 * Image.MAX_IMAGE_PIXELS)  # 111 bytes
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        summary, _ = finetune(make_cfg(*tiny_overrides(root, tmp_path / "o2")))
    assert "1 decompression bombs (e.g." in caplog.text and "bomb.png" in caplog.text
    assert summary["train_size"] + summary["val_size"] + summary["test_size"] == 12


def test_bad_files_fail_when_asked(tmp_path, make_cfg, capsys):
    _bad_files(tmp_path / "bad")
    err = fails(_run(make_cfg, tmp_path / "bad", tmp_path / "o", "data.on_bad_image=fail"), capsys)
    assert "cannot read image" in err and "data.on_bad_image=skip" in err


def test_bad_on_bad_image_value(tmp_path, make_cfg, capsys, image_folder):
    err = fails(_run(make_cfg, image_folder, tmp_path / "o", "data.on_bad_image=ignore"), capsys)
    assert "'ignore'" in err and "'skip' or 'fail'" in err


def test_every_image_mode_is_converted_and_trains(tmp_path, make_cfg):
    root = tmp_path / "modes"
    for c, (mode, colour) in enumerate([("L", 40), ("RGBA", (200, 0, 0, 128)), ("P", 3),
                                        ("I;16", 50000), ("CMYK", (0, 90, 200, 0))]):  # fmt: skip
        (root / f"c{c}").mkdir(parents=True)
        for i in range(4):
            suffix = ".jpg" if mode == "CMYK" else ".png"
            Image.new(mode, (20 + i, 20), colour).save(root / f"c{c}" / f"{i}{suffix}")
    summary, _ = finetune(make_cfg(*tiny_overrides(root, tmp_path / "o", "trainer.max_epochs=1")))
    assert summary["train_size"] + summary["val_size"] + summary["test_size"] == 20


def test_unknown_backbone_suggests_close_names(image_folder, tmp_path, make_cfg, capsys):
    err = fails(_run(make_cfg, image_folder, tmp_path / "o", "model.backbone=resnet5O"), capsys)
    assert "resnet5O" in err and "resnet50" in err


def test_pretrained_without_network_names_the_offline_options(image_folder, tmp_path, make_cfg,
                                                               capsys, monkeypatch):  # fmt: skip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = fails(_run(make_cfg, image_folder, tmp_path / "o", "model.backbone=resnet18",
                     "model.pretrained=true"), capsys)  # fmt: skip
    assert "resnet18" in err and "model.weights=" in err


def test_missing_logger_package_names_the_pip_install(image_folder, tmp_path, make_cfg, capsys):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    err = fails(_run(make_cfg, image_folder, tmp_path / "o", "logger=wandb"), capsys)
    assert "logger=wandb" in err and "pip install" in err and "logger=csv" in err


def test_missing_onnx_packages_name_the_extra(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "onnxruntime" else real(n, *a))  # fmt: skip
    cfg = _cfg("export", f"ckpt={tmp_path}/x.ckpt", "format=onnx", f"paths.output_dir={tmp_path}")
    err = fails(lambda: export(cfg), capsys)
    assert "onnxruntime" in err and "transferkit[export]" in err and "format=torchscript" in err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    base = tmp_path_factory.mktemp("errors")
    write_images(base / "images", ["ant", "bee", "cat"], per_class=12)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("finetune", overrides=tiny_overrides(base / "images", base / "run",
                                                           "trainer.max_epochs=1"))  # fmt: skip
    finetune(cfg)
    return base / "run" / "checkpoints" / "last.ckpt"


def test_evaluate_on_other_classes(ckpt, tmp_path, capsys):
    write_images(tmp_path / "other", ["ant", "dog"], per_class=4)
    cfg = _cfg("evaluate", f"ckpt={ckpt}", "data=image_folder", f"data.root={tmp_path}/other",
               "split=all", f"paths.output_dir={tmp_path}/o")  # fmt: skip
    err = fails(lambda: evaluate(cfg), capsys)
    assert "['dog']" in err and "not trained on" in err and "'ant', 'bee', 'cat'" in err


def test_resume_on_other_classes(ckpt, tmp_path, make_cfg, capsys):
    write_images(tmp_path / "other", ["ant", "dog", "emu"], per_class=12)
    err = fails(_run(make_cfg, tmp_path / "other", tmp_path / "o", f"ckpt_path={ckpt}"), capsys)
    assert "do not match" in err and "'dog'" in err and "ckpt_path=null" in err


def test_resume_from_a_missing_checkpoint(image_folder, tmp_path, make_cfg, capsys):
    err = fails(_run(make_cfg, image_folder, tmp_path / "o", f"ckpt_path={tmp_path}/no.ckpt"),
                capsys)  # fmt: skip
    assert "no.ckpt" in err and "does not exist" in err


def test_missing_ckpt_and_input_are_named(tmp_path, capsys):
    err = fails(lambda: predict(_cfg("predict", f"paths.output_dir={tmp_path}")), capsys)
    assert "ckpt=... is required" in err
    cfg = _cfg("predict", f"ckpt={tmp_path}/a.ckpt", f"input={tmp_path}/nothing",
               f"paths.output_dir={tmp_path}")  # fmt: skip
    assert "does not exist" in fails(lambda: predict(cfg), capsys)


def test_predict_fails_on_unreadable_files_when_asked(ckpt, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(b"garbage")
    cfg = _cfg("predict", f"ckpt={ckpt}", f"input={tmp_path}/in", "on_bad_image=fail",
               f"paths.output_dir={tmp_path}")  # fmt: skip
    err = fails(lambda: predict(cfg), capsys)
    assert "x.png" in err and "on_bad_image=skip" in err


def _cli(module, *args, debug=False):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TRANSFERKIT_DEBUG", None)
    if debug:
        env["TRANSFERKIT_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", f"transferkit.{module}", *args],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip


def test_cli_mistyped_hydra_key_names_the_key(tmp_path):
    r = _cli("finetune", "trainer.max_epoch=1", f"hydra.run.dir={tmp_path}")
    assert r.returncode != 0 and "max_epoch" in r.stderr and "Traceback" not in r.stderr
    r = _cli("evaluate", "ckpt=x", "splt=all", f"hydra.run.dir={tmp_path}")
    assert r.returncode != 0 and "splt" in r.stderr and "Traceback" not in r.stderr


def test_cli_class_mismatch_is_one_line_and_debug_shows_the_traceback(ckpt, tmp_path):
    write_images(tmp_path / "other", ["ant", "dog"], per_class=3)
    args = ("evaluate", f"ckpt={ckpt}", "data=image_folder", f"data.root={tmp_path}/other",
            "split=all", f"hydra.run.dir={tmp_path}/o")  # fmt: skip
    r = _cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "'dog'" in r.stderr
    assert "Traceback" in _cli(*args, debug=True).stderr


class BuggyCallback(L.Callback):
    """A programming error inside the run (ours or a library's), not a user mistake."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        {}["val"]


def test_a_bug_keeps_its_traceback_instead_of_a_user_error_line(image_folder, tmp_path, make_cfg,
                                                                capsys):  # fmt: skip
    """Only transferkit.errors types are user errors: a KeyError from inside the run used to
    print `error: 'val'` and exit 2; now it propagates (traceback, exit code 1)."""
    bug = "+callbacks.bug={_target_: tests.test_errors.BuggyCallback}"
    with pytest.raises(KeyError, match="val"):
        run_cli(_run(make_cfg, image_folder, tmp_path / "o", bug))
    assert "error:" not in capsys.readouterr().err


def test_a_key_the_target_does_not_take_is_one_line(image_folder, tmp_path, make_cfg, capsys):
    err = fails(_run(make_cfg, image_folder, tmp_path / "o", "+model.head.dropt=0.1"), capsys)
    assert "dropt" in err and "LinearHead" in err


def test_user_errors_are_typed_and_still_builtin_errors():
    from transferkit.errors import CheckpointNotFoundError, ConfigError, NotFoundError

    assert issubclass(ConfigError, ValueError) and issubclass(NotFoundError, FileNotFoundError)
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)


@pytest.mark.parametrize("extra", [(), ("finetune=partial", "finetune.trainable_blocks=2")])
def test_no_validation_split_trains_its_budget_and_tests_the_last_weights(
    extra, image_folder, tmp_path, make_cfg, caplog
):
    """data.val_fraction=0 used to crash (IndexError, or `error: 'val'` with the cache)."""
    with caplog.at_level(logging.WARNING):
        summary, _ = finetune(make_cfg(*tiny_overrides(
            image_folder, tmp_path / "o", "data.val_fraction=0", "trainer.max_epochs=3", *extra
        )))  # fmt: skip
    assert "no validation images" in caplog.text
    assert summary["val_size"] == 0 and summary["best_val_acc"] is None
    assert summary["epochs"] == 3 and summary["test_acc"] is not None
    assert summary["best_checkpoint"] == str(tmp_path / "o" / "checkpoints" / "last.ckpt")
    if not extra:  # the entry point gives sweepers NaN (a failed trial), not a crash
        from transferkit.finetune import main

        cfg = make_cfg(*tiny_overrides(image_folder, tmp_path / "m", "data.val_fraction=0",
                                       "trainer.max_epochs=1"))  # fmt: skip
        assert math.isnan(main(cfg))


def test_no_validation_split_refuses_what_needs_validation(image_folder, tmp_path, make_cfg,
                                                           capsys):  # fmt: skip
    err = fails(_run(make_cfg, image_folder, tmp_path / "o", "data.val_fraction=0",
                     "finetune=gradual", "finetune.trigger=plateau"), capsys)  # fmt: skip
    assert "finetune.trigger=plateau" in err and "data.val_fraction" in err
    err = fails(_run(make_cfg, image_folder, tmp_path / "o", "data.val_fraction=0",
                     "scheduler=plateau"), capsys)  # fmt: skip
    assert "validation" in err and "data.val_fraction" in err


def test_a_val_folder_without_readable_images_is_refused(tmp_path, make_cfg, capsys):
    root = tmp_path / "d"
    write_images(root / "train", ["a", "b"], per_class=6)
    write_images(root / "test", ["a", "b"], per_class=2)
    for c in ("a", "b"):
        (root / "val" / c).mkdir(parents=True)
        (root / "val" / c / "x.png").write_bytes(b"not a png")
    err = fails(_run(make_cfg, root, tmp_path / "o"), capsys)
    assert f"{root / 'val'} holds no readable images" in err and "data.val_fraction" in err


def test_split_folders_with_other_classes_are_refused(tmp_path, make_cfg, capsys):
    """A class only in val/ or test/ (Cat vs cat) used to become an output with no training
    image, silently."""
    root = tmp_path / "d"
    write_images(root / "train", ["cat", "dog"], per_class=6)
    write_images(root / "val", ["Cat", "dog"], per_class=2)
    write_images(root / "test", ["cat", "dog", "emu"], per_class=2)
    err = fails(_run(make_cfg, root, tmp_path / "o"), capsys)
    assert "val/ has 'Cat' (train/ has 'cat')" in err and "test/ has 'emu'" in err
    assert "['cat', 'dog']" in err and "Rename" in err
