"""transferkit as a library: the wheel carries its configs, and every console script runs
from the installed copy in any directory, with the user's own config folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from transferkit.errors import ConfigError
from transferkit.init import init

from .conftest import write_images

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["transferkit-finetune", "transferkit-evaluate", "transferkit-predict",
           "transferkit-export", "transferkit-lr-find"]  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed without dependencies into a folder of
    its own (the dependencies come from this environment)."""
    base = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(base / "dist"), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (base / "dist").glob("transferkit-*.whl")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target",
         str(base / "site"), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-2000:]
    return base / "site"


def _run(site: Path, cwd: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}  # fmt: skip
    env.pop("TRANSFERKIT_DEBUG", None)
    return subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.mark.slow  # builds and installs the wheel: `make test-slow` (CI) runs it
def test_the_installed_wheel_is_what_runs_and_it_finds_its_configs(installed, tmp_path):
    probe = (
        "import transferkit, transferkit.cli as c; print(transferkit.__file__); print(c.CONFIG_DIR)"
    )
    r = _run(installed, tmp_path, sys.executable, "-c", probe)
    module, conf = r.stdout.split()
    assert Path(module) == installed / "transferkit" / "__init__.py"  # not the source tree
    assert Path(conf) == installed / "transferkit" / "conf"
    assert (Path(conf) / "finetune.yaml").is_file() and str(REPO) not in conf
    env = {**os.environ, "PYTHONPATH": str(installed), "PYTHONWARNINGS": "ignore"}
    runs = {  # all at once: each spends seconds importing torch
        script: subprocess.Popen([str(installed / "bin" / script), "--help"], cwd=tmp_path,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        for script in SCRIPTS
    }  # fmt: skip
    for script, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "Configuration groups" in out, (script, err[-2000:])


def test_init_then_finetune_with_your_own_config_folder(installed, tmp_path):
    """As a user's project would: transferkit-init, then a run whose data and experiment
    come from that folder while everything else comes from the shipped configs."""
    write_images(tmp_path / "images", ["ant", "bee"], per_class=10)
    bin_ = installed / "bin"
    r = _run(installed, tmp_path, str(bin_ / "transferkit-init"), "my_configs",
             "--data-root", str(tmp_path / "images"), "--name", "ants")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "transferkit-finetune --config-dir my_configs experiment=ants" in r.stdout
    r = _run(installed, tmp_path, str(bin_ / "transferkit-finetune"), "--config-dir",
             "my_configs", "experiment=ants", "data.image_size=32",
             "model.backbone=test_efficientnet", "model.weights=none", "trainer.max_epochs=1",
             "trainer.enable_progress_bar=false", "hydra.run.dir=run")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_size"] == 16 and summary["test_acc"] is not None
    saved = (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
    assert str(tmp_path / "images") in saved and "image_size: 32" in saved


def test_init_never_overwrites(tmp_path):
    written = init(tmp_path / "c", "flowers", "/data/flowers")
    assert sorted(p.relative_to(tmp_path / "c").as_posix() for p in written) == [
        "README.md", "data/flowers.yaml", "experiment/flowers.yaml"]  # fmt: skip
    before = {p: p.read_bytes() for p in written}
    (tmp_path / "c" / "README.md").write_text("mine")
    with pytest.raises(ConfigError, match="never overwrites"):
        init(tmp_path / "c", "flowers")
    assert (tmp_path / "c" / "README.md").read_text() == "mine"
    assert all(p.read_bytes() == b for p, b in before.items() if p.name != "README.md")
    with pytest.raises(ConfigError, match="--name"):
        init(tmp_path / "d", "../escape")
    odd = "/data/my #1: images"  # YAML would cut this at " #" and refuse the ": "
    data = init(tmp_path / "e", "odd", odd)[0]
    assert OmegaConf.load(data).root == odd
