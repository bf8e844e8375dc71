"""Imbalanced classes: class weights, the weighted sampler (under DDP too), the loss
weights, macro-F1 and balanced accuracy, monitor=auto and the worst classes in the report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transferkit.data.balance import class_weights, imbalance_ratio, resolve_mode, sample_weights
from transferkit.data.order import EpochSampler
from transferkit.finetune import finetune

from .conftest import tiny_overrides, write_images

SIZES = np.array([400, 100, 20, 4])


@pytest.mark.parametrize("scheme", ["inverse", "sqrt", "effective"])
def test_class_weights_keep_the_average_weight_per_image_at_one(scheme):
    w = class_weights(SIZES, scheme, beta=0.99)
    assert (w * SIZES).sum() == pytest.approx(SIZES.sum())
    assert np.all(np.diff(w) > 0)  # rarer classes weigh more
    if scheme == "inverse":  # every class carries the same total weight
        assert np.allclose(w * SIZES, (w * SIZES)[0])
    else:  # softer than inverse: the rarest class gains less than 100x
        assert w[-1] / w[0] < SIZES[0] / SIZES[-1]


def test_auto_balances_past_three_to_one():
    assert imbalance_ratio(SIZES) == 100
    assert resolve_mode("auto", SIZES) == "weighted_loss"
    assert resolve_mode("auto", np.array([10, 10, 4])) == "none"
    assert resolve_mode("weighted_loss", np.array([10, 10])) == "weighted_loss"


def test_the_weighted_sampler_balances_classes_and_shares_one_draw_across_ranks():
    labels = np.repeat(np.arange(len(SIZES)), SIZES)
    weights = sample_weights(labels, class_weights(SIZES))
    data = list(range(len(labels)))
    drawn = []
    for epoch in range(5):
        shards = [list(EpochSampler(data, 2, r, seed=3, epoch=epoch, weights=weights))
                  for r in range(2)]  # fmt: skip
        assert len(shards[0]) == len(shards[1]) == len(labels) // 2
        again = list(EpochSampler(data, 2, 0, seed=3, epoch=epoch, weights=weights))
        assert again == shards[0]  # the same draw on every rank, and on resume
        drawn += [i % len(labels) for s in shards for i in s]
        # the shards interleave back into one draw of the whole epoch, as on one device
        g = torch.Generator().manual_seed(3 + epoch)
        whole = torch.multinomial(weights, len(labels), True, generator=g).tolist()
        merged = [i - epoch * len(labels) for pair in zip(*shards, strict=True) for i in pair]
        assert merged == whole
    share = np.bincount(labels[drawn], minlength=len(SIZES)) / len(drawn)
    assert np.allclose(share, 0.25, atol=0.03)  # each class a quarter of the draws


def _imbalanced(tmp_path, make_cfg, *extra):
    write_images(tmp_path / "d", ["a", "b", "c"], per_class=40)
    return finetune(make_cfg(*tiny_overrides(
        tmp_path / "d", tmp_path / "run", "data.limit_per_class=[28,10,3]",
        "data.val_fraction=0.15", "data.test_fraction=0.15", *extra,
    )))  # fmt: skip


def test_an_imbalanced_run_balances_and_monitors_macro_f1(tmp_path, make_cfg, caplog):
    summary, objects = _imbalanced(tmp_path, make_cfg, "data.balance=sampler")
    # the sampler without augmentation repeats identical images: the measured advice
    assert "rarest class about 5 times an epoch" in caplog.text  # 41 / 3 classes / 3 images
    assert "Use augment=light with the sampler" in caplog.text
    assert summary["balance"] == "sampler" and summary["objective"]["name"] == "val/f1_macro"
    assert "smallest class 3, 9:1 imbalance" in summary["plan"]["reason"]
    assert 0 <= summary["test_f1_macro"] <= 1 and 0 <= summary["test_balanced_acc"] <= 1
    assert objects["model"].class_weights is None
    assert "Worst classes by recall" in (tmp_path / "run" / "report.md").read_text()
    loader = objects["fit_datamodule"].train_dataloader()
    assert isinstance(loader.sampler, EpochSampler) and loader.sampler.weights is not None


def test_weighted_loss_weighs_the_loss_by_class(tmp_path, make_cfg):
    summary, objects = _imbalanced(tmp_path, make_cfg)  # balance=auto: the weighted loss
    assert summary["balance"] == "weighted_loss"
    model = objects["model"]
    w = model.class_weights
    assert w is not None and w[2] > w[1] > w[0]
    logits, y = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    expected = torch.nn.functional.cross_entropy(logits, y, weight=w)
    assert torch.allclose(model._loss(logits, y), expected)
    soft = torch.nn.functional.one_hot(y, 3).float()  # soft targets (mixup) agree with hard
    assert torch.allclose(model._loss(logits, soft),
                          (-(soft * logits.log_softmax(-1)) * w).sum(-1).mean())  # fmt: skip


def test_balanced_data_keeps_val_acc_and_no_balancing(image_folder, tmp_path, make_cfg):
    summary, _ = finetune(make_cfg(*tiny_overrides(image_folder, tmp_path / "run")))
    assert summary["balance"] == "none" and summary["objective"]["name"] == "val/acc"


def test_a_limit_per_class_list_needs_one_limit_per_class(image_folder, tmp_path, make_cfg):
    with pytest.raises(ValueError, match="2 limits for 3 classes"):
        finetune(make_cfg(*tiny_overrides(image_folder, tmp_path / "r",
                                          "data.limit_per_class=[5,5]")))  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["monitor=val/map"], "monitor='val/map' is not logged for this task; choose one of"),
        (["monitor=val/loss"], "monitor=val/loss with mode=max would keep the worst epoch: "
                               "set mode=min"),
        (["stop_mode=max"], "stop_monitor=val/loss with stop_mode=max"),
    ],
)  # fmt: skip
def test_a_monitor_the_task_does_not_log_or_the_wrong_mode(extra, says, image_folder, tmp_path,
                                                           make_cfg):  # fmt: skip
    from transferkit.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        finetune(make_cfg(*tiny_overrides(image_folder, tmp_path / "r", *extra)))
    assert says in str(e.value)


@pytest.mark.slow  # processes of a DDP run: `make test-slow` (CI) runs it
def test_the_weighted_sampler_in_a_two_process_ddp_run(tmp_path):
    """Two CPU processes (gloo) with data.balance=sampler: each rank trains on its own
    disjoint share of one weighted draw per epoch, and together they draw the classes
    equally (inverse weights) though the training set is 8:2:1."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    write_images(tmp_path / "images", ["a", "b", "c"], per_class=80)
    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
    }
    r = subprocess.run(
        [sys.executable, "-m", "transferkit.finetune", "trainer=ddp_cpu", "data=image_folder",
         f"data.root={tmp_path / 'images'}", "data.image_size=32", "data.batch_size=8",
         "data.limit_per_class=[64,16,8]", "data.val_fraction=0.1", "data.test_fraction=0.1",
         "data.balance=sampler", "augment=light", "model.backbone=test_efficientnet",
         "model.weights=none", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
         "~callbacks.progress_bar", "logger=none", "report=false", "test=false",
         "+callbacks.draws._target_=tests.sampler_probe.RecordDraws",
         f"+callbacks.draws.out={tmp_path / 'draws'}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    counts = np.zeros(3)
    for epoch in (0, 1):
        r0, r1 = (torch.load(tmp_path / "draws" / f"rank{k}_epoch{epoch}.pt", weights_only=False)
                  for k in (0, 1))  # fmt: skip
        assert (r0["rank"], r1["rank"], r0["replicas"]) == (0, 1, 2)
        labels = r0["labels"].numpy()
        size = len(labels)
        assert np.bincount(labels).tolist() == [64, 16, 8]
        assert torch.equal(r0["weights"], r1["weights"])
        assert torch.allclose(r0["weights"].double(), torch.as_tensor(
            sample_weights(labels, class_weights(np.array([64, 16, 8])))).double())  # fmt: skip
        # disjoint shares of one draw: interleaved, they are the whole epoch's draw
        assert len(r0["indices"]) == len(r1["indices"]) == size // 2
        g = torch.Generator().manual_seed(r0["seed"] + epoch)
        whole = torch.multinomial(r0["weights"], size, True, generator=g).tolist()
        merged = [i - epoch * size for pair in zip(r0["indices"], r1["indices"], strict=True)
                  for i in pair]  # fmt: skip
        assert merged == whole
        counts += np.bincount(labels[merged], minlength=3)
    share = counts / counts.sum()  # 176 draws: about a third each, not 0.73 / 0.18 / 0.09
    assert np.allclose(share, 1 / 3, atol=0.12), share
