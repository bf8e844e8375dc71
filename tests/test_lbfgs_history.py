"""optimizer=lbfgs through Lightning, and the learning curves kept in summary.json."""

import itertools

import pytest
import torch

from transferkit.finetune import finetune
from transferkit.optim import lbfgs

from .conftest import tiny_overrides


def test_lbfgs_fits_the_head_full_batch_through_lightning(image_folder, tmp_path, make_cfg):
    cfg = make_cfg(*tiny_overrides(
        image_folder, tmp_path / "run", "optimizer=lbfgs", "finetune=linear_probe",
        "data.batch_size=64", "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=1",
    ))  # fmt: skip
    summary, objects = finetune(cfg)
    optimizer = objects["trainer"].optimizers[0]
    assert isinstance(optimizer, torch.optim.LBFGS) and len(optimizer.param_groups) == 1
    hist = summary["history"]
    assert summary["global_steps"] == 3  # one full-batch step per epoch
    # each step ran several iterations, each with its own loss evaluation via the closure
    assert hist[-1]["iterations"] > summary["global_steps"]
    assert hist[-1]["func_evals"] >= hist[-1]["iterations"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert summary["feature_cache"].startswith("on")


def test_lbfgs_refuses_layerwise_lrs_and_weight_decay():
    head, body = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="layer_decay"):
        lbfgs([{"params": [head], "lr": 1.0}, {"params": [body], "lr": 0.5}])
    with pytest.raises(ValueError, match=r"optimizer\.weight_decay=0"):
        lbfgs([{"params": [head], "lr": 1.0}], weight_decay=1e-4)
    merged = lbfgs([{"params": [head], "lr": 0.3}, {"params": [body], "lr": 0.3}])
    assert len(merged.param_groups) == 1 and merged.param_groups[0]["lr"] == 0.3


def test_history_records_curves_per_epoch(image_folder, tmp_path, make_cfg):
    cfg = make_cfg(*tiny_overrides(image_folder, tmp_path / "run", "trainer.max_epochs=4",
                                   "trainer.check_val_every_n_epoch=2"))  # fmt: skip
    summary, _ = finetune(cfg)
    hist = summary["history"]
    assert [r["epoch"] for r in hist] == [0, 1, 2, 3]
    assert [r["step"] for r in hist] == [3, 6, 9, 12]  # 18 images, batch 8
    assert all(b["seconds"] > a["seconds"] for a, b in itertools.pairwise(hist))
    assert all("train_loss" in r and "train_acc" in r and r["lr"] == 1e-3 for r in hist)
    # validation ran after epochs 1 and 3 only, and only those rows carry it
    assert ["val_loss" in r for r in hist] == [False, True, False, True]
    assert 0.0 <= hist[-1]["val_acc"] <= 1.0


def test_lbfgs_config_builds_one_group_with_its_options(make_cfg):
    from hydra.utils import instantiate

    from transferkit.models import ImageClassifier

    cfg = make_cfg("optimizer=lbfgs")
    model = ImageClassifier("test_efficientnet", 3, image_size=32,
                            optimizer=instantiate(cfg.optimizer))  # fmt: skip
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.LBFGS) and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["lr"] == 1.0 and group["max_iter"] == 20 and group["history_size"] == 10
    assert group["line_search_fn"] == "strong_wolfe"
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in group["params"]} == {id(p) for p in trainable}
