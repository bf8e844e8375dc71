"""A checkpoint from a stranger runs no code: planted Hydra targets are refused by every entry
point that loads checkpoints, unless the user allows them."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from transferkit.checkpoint_io import load_classifier
from transferkit.cli import run_cli
from transferkit.errors import UntrustedCheckpointError
from transferkit.evaluate import evaluate
from transferkit.export import export
from transferkit.finetune import finetune
from transferkit.predict import predict
from transferkit.trust import TargetPolicy, check_targets, is_builtin_target

from .conftest import CONF_DIR, tiny_overrides, write_images


class MyHead(nn.Sequential):
    """A user's own head, outside transferkit."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(nn.Linear(in_features, num_classes))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("trust")
    write_images(base / "images", ["ant", "bee", "cat"], per_class=12)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("finetune", overrides=tiny_overrides(base / "images", base / "run",
                                                           "trainer.max_epochs=1"))  # fmt: skip
    finetune(cfg)
    return base


def _plant(trained, tmp_path, head) -> tuple:
    """A copy of a real checkpoint whose head node is ``head``; the marker file shows
    whether the planted command ran."""
    ckpt = torch.load(trained / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["head"] = head
    path = tmp_path / "planted.ckpt"
    torch.save(ckpt, path)
    return path


def _copy(marker) -> dict:
    """Copies a file to ``marker``: it could as well overwrite or leak any file. Hydra 1.3.8
    blocks shell targets like os.system by itself, not file operations."""
    return {"_target_": "shutil.copy", "_args_": [__file__, str(marker)]}


def _cfg(name, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _entry_points(trained, tmp_path, ckpt):
    out = f"paths.output_dir={tmp_path}/o"
    return {
        "evaluate": lambda: evaluate(_cfg("evaluate", f"ckpt={ckpt}", "data=image_folder",
                                          f"data.root={trained}/images", "split=all", out)),
        "predict": lambda: predict(_cfg("predict", f"ckpt={ckpt}",
                                        f"input={trained}/images/ant", out)),
        "export": lambda: export(_cfg("export", f"ckpt={ckpt}", out)),
        "resume": lambda: finetune(_cfg("finetune", *tiny_overrides(
            trained / "images", tmp_path / "resumed", f"ckpt_path={ckpt}"))),
    }  # fmt: skip


@pytest.mark.parametrize("entry", ["evaluate", "predict", "export", "resume"])
@pytest.mark.parametrize(
    "planted",
    [
        lambda m: _copy(m),  # the head itself
        lambda m: {
            "_target_": "transferkit.models.heads.LinearHead",
            "_partial_": True,
            "dropout": _copy(m),
        },  # nested in a trusted one
        # a transferkit function, not a class: it writes any file it is told to
        lambda m: {"_target_": "transferkit.io.write_json", "path": str(m), "obj": {}},
        # an interpolation that builds a node when instantiate resolves the config
        lambda m: {
            "_target_": "transferkit.models.heads.LinearHead",
            "_partial_": True,
            "dropout": f"${{oc.create:{{_target_: shutil.copy, src: {__file__}, dst: {m}}}}}",
        },
    ],
    ids=["head", "nested", "transferkit-function", "interpolation"],
)
def test_a_planted_target_never_runs(entry, planted, trained, tmp_path, capsys):
    marker = tmp_path / "pwned"
    node = planted(marker)
    ckpt = _plant(trained, tmp_path, node)
    with pytest.raises(SystemExit) as e:
        run_cli(_entry_points(trained, tmp_path, ckpt)[entry])
    assert e.value.code == 2
    err = capsys.readouterr().err
    if isinstance(node.get("dropout"), str):
        assert "interpolations" in err and "oc.create" in err
    else:
        named = "transferkit.io.write_json" if "path" in node else "shutil.copy"
        assert named in err and "allowed_targets=" in err and "trust_remote_code=true" in err
    assert not marker.exists()


def test_the_users_own_head_loads_once_allowed(trained, tmp_path, capsys):
    ckpt = torch.load(trained / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["head"] = {"_target_": "tests.test_trust.MyHead", "_partial_": True}
    ckpt["state_dict"] = {k.replace("head.1.", "head.0."): v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, tmp_path / "mine.ckpt")
    with pytest.raises(UntrustedCheckpointError, match=r"tests\.test_trust\.MyHead"):
        load_classifier(tmp_path / "mine.ckpt")
    for policy in (TargetPolicy(("tests.test_trust.MyHead",)), TargetPolicy(("tests.",)),
                   TargetPolicy(trust_remote_code=True)):  # fmt: skip
        assert isinstance(load_classifier(tmp_path / "mine.ckpt", policy=policy).head, MyHead)
    # the same from the command line's settings
    allow = "allowed_targets=[tests.test_trust.MyHead]"
    cfg = _cfg("predict", f"ckpt={tmp_path}/mine.ckpt", f"input={trained}/images/ant",
               f"paths.output_dir={tmp_path}/o", allow)  # fmt: skip
    assert predict(cfg).exists()


def test_resume_allows_the_targets_of_the_runs_own_config(trained, tmp_path):
    """A run whose config names a user's head resumes from its own checkpoint."""
    extra = ("model.head._target_=tests.test_trust.MyHead", "~model.head.dropout")
    first = tiny_overrides(trained / "images", tmp_path / "run", "trainer.max_epochs=1", *extra)
    finetune(_cfg("finetune", *first))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    again = tiny_overrides(trained / "images", tmp_path / "run", f"ckpt_path={last}", *extra)
    summary, _ = finetune(_cfg("finetune", *again))
    assert summary["epochs"] == 2


@pytest.mark.parametrize(
    ("target", "trusted"),
    [
        ("transferkit.models.heads.LinearHead", True),
        ("transferkit.models.heads.MLPHead", True),
        ("transferkit.models.norms.BatchRenorm1d", True),
        ("transferkit.models.classifier.ImageClassifier", False),  # builds backbones, downloads
        ("transferkit.data.ImageFolderDataModule", False),  # scans any folder
        ("transferkit.models.heads.nn.Linear", False),  # a name that leads elsewhere
        ("transferkit.finetune.os.system", False),
        ("transferkit.io.write_json", False),  # a function: it writes any file
        ("transferkit.models.norms.make_norm1d", False),
        ("transferkit.no_such_module.Thing", False),
        ("os.system", False),
        ("builtins.eval", False),
    ],
)
def test_only_transferkit_heads_and_norms_are_trusted(target, trusted):
    assert is_builtin_target(target) is trusted
    assert TargetPolicy().allows(target) is trusted


def test_an_allowed_package_admits_only_what_it_defines():
    """'allowed_targets=[tests.]' allows tests.test_trust.MyHead, not a name under tests.
    that resolves to os.system or shutil.copy (test_trust imports them)."""
    policy = TargetPolicy(("tests.",))
    assert policy.allows("tests.test_trust.MyHead")
    assert not policy.allows("tests.test_trust.shutil.copy")
    assert not policy.allows("tests.test_trust.torch.save")
    assert TargetPolicy(("tests.test_trust.shutil.copy",)).allows("tests.test_trust.shutil.copy")


def test_allowed_targets_must_be_a_list():
    with pytest.raises(ValueError, match=r"allowed_targets='my_package.MyHead' must be a list"):
        TargetPolicy.from_config({"allowed_targets": "my_package.MyHead"})


def test_every_target_is_found_and_named():
    node = {"head": {"_target_": "x.A", "args": [{"_target_": "y.B"}]}, "opt": {"_target_": 3}}
    with pytest.raises(UntrustedCheckpointError) as e:
        check_targets(node, TargetPolicy(), "file")
    msg = str(e.value)
    assert "head._target_='x.A'" in msg and "head.args[0]._target_='y.B'" in msg
    assert "opt._target_=3" in msg


def test_a_checkpoint_cannot_ask_for_downloads_or_compilation(trained, tmp_path):
    ckpt = torch.load(trained / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["weights"] = "hub"
    torch.save(ckpt, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match=r"sets \['weights'\]"):
        load_classifier(tmp_path / "x.ckpt")


class Evil:
    """Unpickling this runs a shell command: what a pickle-based checkpoint can do."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_resume_never_unpickles_code(trained, tmp_path, capsys):
    """Lightning 2.6 resumes with torch.load(weights_only=False); the trainer's checkpoint IO
    forces weights_only=True, and the entry points refuse such a file with one line."""
    from transferkit.checkpoint_io import AtomicCheckpointIO

    marker = tmp_path / "pwned"
    ckpt = torch.load(trained / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["callbacks"]["evil"] = Evil(marker)
    torch.save(ckpt, tmp_path / "pickled.ckpt")
    with pytest.raises(Exception, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "pickled.ckpt", weights_only=False)
    for entry in _entry_points(trained, tmp_path, tmp_path / "pickled.ckpt").values():
        with pytest.raises(SystemExit) as e:
            run_cli(entry)
        assert e.value.code == 2 and "cannot read checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_a_checkpoint_cannot_hide_a_model_that_downloads(trained, tmp_path):
    """A nested transferkit class that builds a backbone (and could download or read files)
    is not a head: refused like any other code."""
    ckpt = torch.load(trained / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["head"] = {
        "_target_": "transferkit.models.heads.LinearHead", "_partial_": True,
        "dropout": {"_target_": "transferkit.models.classifier.ImageClassifier",
                    "backbone": "resnet18", "num_classes": 2, "pretrained": True},
    }  # fmt: skip
    torch.save(ckpt, tmp_path / "x.ckpt")
    with pytest.raises(UntrustedCheckpointError, match="ImageClassifier"):
        load_classifier(tmp_path / "x.ckpt")


@pytest.mark.parametrize(
    ("key", "value"),
    [("image_size", "big"), ("num_classes", True), ("head", "x"), ("class_names", [1, 2, 3])],
)
def test_hyper_parameters_of_the_wrong_type_are_one_line(key, value, trained, tmp_path):
    ckpt = torch.load(trained / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"][key] = value
    torch.save(ckpt, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match=rf"wrong type: {key}="):
        load_classifier(tmp_path / "x.ckpt")


def test_weights_that_do_not_fit_are_one_line(trained, tmp_path):
    ckpt = torch.load(trained / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["num_classes"] = 5
    ckpt["hyper_parameters"]["class_names"] = list("abcde")
    torch.save(ckpt, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="do not fit the model"):
        load_classifier(tmp_path / "x.ckpt")
