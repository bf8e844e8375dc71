"""What real users throw at transferkit, as a table: generated data folders and settings.

Each row says what must happen: the run trains (counting what it skipped), or it stops
with one line that names the bad value and the fix (exit code 2). No row may print a
traceback or leave a half-written file behind. Tiny random-init model, one step of each
loop, no report: a row takes about a second.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferkit.cli import run_cli
from transferkit.finetune import finetune

from .conftest import tiny_overrides, write_bomb_png, write_images

CLASSES = ["ant", "bee", "cat"]


@dataclass
class Row:
    """``build`` fills the data root; ``expect`` is ``trains`` or ``error``; ``says`` must
    all appear in the log (trains) or the error line (error)."""

    name: str
    build: Callable[[Path], None]
    expect: str
    says: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()


def _ok(root: Path, per_class: int = 6) -> None:
    write_images(root, CLASSES, per_class=per_class)


def _plus(*extras: Callable[[Path], None]) -> Callable[[Path], None]:
    def build(root: Path) -> None:
        _ok(root)
        for extra in extras:
            extra(root)

    return build


def _bytes(rel: str, data: bytes) -> Callable[[Path], None]:
    return lambda root: (root / rel).write_bytes(data)


def _image(rel: str, mode: str, size=(16, 16), colour=None, **save) -> Callable[[Path], None]:
    def build(root: Path) -> None:
        Image.new(mode, size, colour).save(root / rel, **save)

    return build


def _truncated(rel: str, fmt: str) -> Callable[[Path], None]:
    def build(root: Path) -> None:
        buf = root / "tmp-full"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
            buf, format=fmt
        )
        (root / rel).write_bytes(buf.read_bytes()[:200])
        buf.unlink()

    return build


def _animated(root: Path) -> None:
    frames = [Image.new("P", (16, 16), i * 40) for i in range(4)]
    frames[0].save(root / "ant" / "anim.gif", save_all=True, append_images=frames[1:])


def _bomb(root: Path, times: float = 3) -> None:
    """A 111-byte PNG that declares ``times`` Pillow's pixel limit (over 2x: Pillow raises;
    between 1x and 2x it only warns and would decode hundreds of megabytes)."""
    (root / "bee").mkdir(parents=True, exist_ok=True)
    write_bomb_png(root / "bee" / "bomb.png", int(times * Image.MAX_IMAGE_PIXELS))


def _splits(train, val, test, per_class=4) -> Callable[[Path], None]:
    def build(root: Path) -> None:
        for split, names in (("train", train), ("val", val), ("test", test)):
            write_images(root / split, names, per_class=per_class if split == "train" else 2)

    return build


ROWS = [
    # --- files that are not what they claim -------------------------------------------
    Row("zero-byte file", _plus(_bytes("ant/empty.png", b"")), "trains", ("1 unreadable",)),
    Row("corrupt jpeg", _plus(_bytes("bee/x.jpg", b"\xff\xd8\xff\xe0garbage")), "trains",
        ("1 unreadable",)),
    Row("truncated png", _plus(_truncated("cat/t.png", "PNG")), "trains", ("1 unreadable",)),
    Row("truncated jpeg", _plus(_truncated("cat/t.jpg", "JPEG")), "trains", ("1 unreadable",)),
    Row("non-image files", _plus(_bytes("ant/README.txt", b"hi"), _bytes("bee/labels.csv", b"a"),
        _bytes("cat/.DS_Store", b"\0")), "trains", ("2 not image files",)),
    Row("png named .jpg", _plus(_image("ant/really_png.jpg", "RGB", format="PNG")), "trains"),
    Row("jpeg named .txt", _plus(_image("ant/photo.txt", "RGB", format="JPEG")), "trains",
        ("1 not image files",)),
    Row("upper-case extension", _plus(_image("ant/SHOUT.PNG", "RGB")), "trains"),
    Row("decompression bomb", _plus(_bomb), "trains", ("1 decompression bombs", "bomb.png")),
    Row("bomb Pillow only warns about", _plus(lambda r: _bomb(r, 1.5)), "trains",
        ("1 decompression bombs",)),
    Row("bomb with on_bad_image=fail", _plus(_bomb), "error",
        ("bomb.png", "data.on_bad_image=skip"), ("data.on_bad_image=fail",)),
    Row("corrupt file with on_bad_image=fail", _plus(_bytes("ant/x.png", b"nope")), "error",
        ("x.png", "data.on_bad_image=skip"), ("data.on_bad_image=fail",)),
    # --- pixel modes, bit depths, odd sizes -----------------------------------------------
    Row("modes and bit depths", _plus(
        _image("ant/l.png", "L", colour=9), _image("ant/la.png", "LA", colour=(9, 100)),
        _image("bee/p.png", "P", colour=3), _image("bee/1bit.png", "1", colour=1),
        _image("cat/i16.png", "I;16", colour=60000), _image("cat/f.tif", "F", colour=2.5),
        _image("cat/cmyk.jpg", "CMYK", colour=(1, 2, 3, 4)),
        _image("ant/rgba.png", "RGBA", colour=(1, 2, 3, 0)),
    ), "trains"),
    Row("animated gif", _plus(_animated), "trains"),
    Row("1x1 image", _plus(_image("ant/dot.png", "RGB", size=(1, 1))), "trains"),
    Row("huge image", _plus(_image("bee/big.png", "L", size=(4000, 3000))), "trains"),
    Row("very wide image", _plus(_image("bee/strip.png", "RGB", size=(2000, 2))), "trains"),
    # --- folder layouts -------------------------------------------------------------------
    Row("empty root", lambda root: root.mkdir(parents=True), "error", ("no class sub-folders",)),
    Row("empty class folders", lambda root: [(root / c).mkdir(parents=True) for c in CLASSES],
        "error", ("holds no readable images",)),
    Row("single class", lambda root: write_images(root, ["only"], per_class=6), "error",
        ("1 class(es)", "at least 2")),
    Row("a class with one image", lambda root: (_ok(root), write_images(root, ["emu"], 1)),
        "error", ("class 'emu' has 1 image(s)", "data.val_fraction")),
    Row("a class folder of only bad files", _plus(lambda r: (r / "dog").mkdir(),
        _bytes("dog/x.png", b"bad")), "error", ("['dog']", "no readable training images")),
    Row("split folders with other classes", _splits(CLASSES, ["Ant", "bee", "cat"], CLASSES),
        "error", ("val/ has 'Ant' (train/ has 'ant')",)),
    Row("val folder without images", lambda root: (_splits(CLASSES, [], CLASSES)(root),
        [(root / "val" / c).mkdir(parents=True) for c in CLASSES]), "error",
        ("val holds no readable images", "data.val_fraction")),
    Row("val folder missing a class", _splits(CLASSES, ["ant", "bee"], CLASSES), "trains",
        ("val/ has no class ['cat']",)),
    Row("split folders", _splits(CLASSES, CLASSES, CLASSES), "trains"),
    Row("test folder missing", lambda root: (write_images(root / "train", CLASSES, 6),
        write_images(root / "val", CLASSES, 2)), "trains"),
    Row("no train folder", lambda root: write_images(root / "val", CLASSES, 2), "error",
        ("no 'train' sub-folder",)),
    Row("unicode and spaces in names", lambda root: write_images(
        root, ["café au lait", "日本", "a b  c"], per_class=6), "trains"),
    Row("nested sub-folders", _plus(lambda r: write_images(r / "ant" / "more", ["deep"], 2)),
        "trains"),
    Row("root is a file", lambda root: (root.parent.mkdir(parents=True, exist_ok=True),
        root.write_text("x")), "error", ("is not a directory",)),
    # --- impossible settings --------------------------------------------------------------
    Row("negative epochs", _ok, "error", ("trainer.max_epochs=-2", "positive"),
        ("trainer.max_epochs=-2",)),
    Row("zero epochs", _ok, "error", ("trainer.max_epochs=0",), ("trainer.max_epochs=0",)),
    Row("zero batch", _ok, "error", ("data.batch_size", "got 0"), ("data.batch_size=0",)),
    Row("negative lr", _ok, "error", ("optimizer.lr=-0.001", "positive"),
        ("optimizer.lr=-0.001",)),
    Row("zero lr", _ok, "error", ("optimizer.lr=0",), ("optimizer.lr=0",)),
    Row("negative weight decay", _ok, "error", ("optimizer.weight_decay=-1",),
        ("optimizer.weight_decay=-1",)),
    Row("too many blocks", _ok, "error", ("trainable_blocks=99", "0..6"),
        ("finetune=partial", "finetune.trainable_blocks=99")),
    Row("negative blocks", _ok, "error", ("trainable_blocks=-1",),
        ("finetune=partial", "finetune.trainable_blocks=-1")),
    Row("blocks as words", _ok, "error", ("'half'", "'all'"),
        ("finetune=partial", "finetune.trainable_blocks=half")),
    Row("image size zero", _ok, "error", ("data.image_size=0",), ("data.image_size=0",)),
    Row("negative workers", _ok, "error", ("data.num_workers=-1",), ("data.num_workers=-1",)),
    Row("fractions leave no training", _ok, "error", ("leaves no training",),
        ("data.val_fraction=0.5", "data.test_fraction=0.5")),
    Row("limit_per_class zero", _ok, "error", ("data.limit_per_class",),
        ("data.limit_per_class=0",)),
    Row("missing checkpoint", _ok, "error", ("no.ckpt", "does not exist"),
        ("ckpt_path=/nonexistent/no.ckpt",)),
    Row("unknown regime", _ok, "error", ("'deep'", "linear_probe"), ("finetune.regime=deep",)),
    Row("unknown backbone", _ok, "error", ("resnet5O", "resnet50"),
        ("model.backbone=resnet5O",)),
    Row("unknown norm", _ok, "error", ("'batchy'",), ("model.backbone_norm=batchy",)),
    Row("no validation", _ok, "trains", ("no validation images",), ("data.val_fraction=0",)),
    Row("devices on a missing gpu", _ok, "error", ("trainer settings do not work here",),
        ("trainer.accelerator=gpu",)),
]  # fmt: skip


def _fast(root: Path, out: Path, *extra: str) -> list[str]:
    return tiny_overrides(
        root, out, "trainer.max_epochs=1", "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "report=false",
        "data.batch_size=4", *extra,
    )  # fmt: skip


def _no_half_written_files(out: Path) -> None:
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")], "a temporary file was left"
    for summary in out.rglob("summary.json"):
        json.loads(summary.read_text())
    for ckpt in out.rglob("*.ckpt"):
        torch.load(ckpt, weights_only=True)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_hostile_input(row, tmp_path, make_cfg, capsys, caplog, monkeypatch):
    if row.name == "devices on a missing gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    root, out = tmp_path / "data", tmp_path / "run"
    row.build(root)
    if not root.exists():
        root.mkdir(parents=True)
    monkeypatch.delenv("TRANSFERKIT_DEBUG", raising=False)
    with caplog.at_level(logging.WARNING):
        if row.expect == "error":
            with pytest.raises(SystemExit) as e:
                run_cli(lambda: finetune(make_cfg(*_fast(root, out, *row.overrides))))
            assert e.value.code == 2
            err = capsys.readouterr().err
            assert "Traceback" not in err
            line = err.splitlines()[0]
            assert line.startswith("error: ")
            for text in row.says:
                assert text in line, (text, line)
            assert not (out / "summary.json").exists()
        else:
            summary, _ = run_cli(lambda: finetune(make_cfg(*_fast(root, out, *row.overrides))))
            assert summary["train_size"] > 0 and summary["global_steps"] == 1
            assert (out / "summary.json").exists()
            for text in row.says:
                assert text in caplog.text, (text, caplog.text[-2000:])
    _no_half_written_files(out if out.exists() else tmp_path)


def test_predict_on_a_hostile_folder_skips_and_counts(tmp_path, make_cfg, caplog):
    from hydra import compose, initialize_config_dir

    from transferkit.predict import predict

    from .conftest import CONF_DIR

    _ok(tmp_path / "data")
    finetune(make_cfg(*_fast(tmp_path / "data", tmp_path / "run")))
    inputs = tmp_path / "in"
    write_images(inputs, ["x"], per_class=2)
    _bomb(inputs)  # inputs/bee/bomb.png
    (inputs / "x" / "empty.jpg").write_bytes(b"")
    (inputs / "x" / "notes.txt").write_text("not an image")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("predict", overrides=[
            f"ckpt={tmp_path}/run/checkpoints/last.ckpt", f"input={inputs}",
            f"paths.output_dir={tmp_path}/p",
        ])  # fmt: skip
    with caplog.at_level(logging.WARNING):
        csv = run_cli(lambda: predict(cfg))
    rows = csv.read_text().splitlines()
    assert len(rows) == 1 + 2  # header and the two readable images
    assert "skipped 2 unreadable file(s)" in caplog.text
