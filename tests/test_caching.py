"""Frozen-prefix caching: exact split of the backbone, the decision rules, and a cached run
that ends with the same metrics as the uncached one."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from transferkit.caching import Split, cache_decision, find_cut, flat_modules, keep
from transferkit.finetune import finetune
from transferkit.models import ImageClassifier
from transferkit.models.finetuning import trainable_names
from transferkit.policy import Plan

from .conftest import tiny_overrides


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet"])
def test_prefix_then_suffix_equals_backbone_at_every_depth(backbone):
    model = ImageClassifier(backbone, num_classes=3, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model.backbone(x)
    for k in range(1, model.num_blocks):
        model.set_plan(Plan("partial", model.num_blocks, k))
        trainable = trainable_names(model.blocks, k)
        cut = find_cut(model.backbone, trainable)
        assert cut is not None and 0 < cut < len(flat_modules(model.backbone) or [])
        split = Split(model.backbone, cut)
        with torch.no_grad():
            torch.testing.assert_close(split.suffix(split.prefix(x)), expected)
        # no trainable parameter in the prefix, every trainable one after it
        prefix_params = {id(p) for m in split._prefix for p in m.parameters()}
        assert not any(p.requires_grad and id(p) in prefix_params for p in model.parameters())


def _decide(model, plan, **kw):
    args = dict(augment={"no_aug": True}, mixup=False)
    args.update(kw)
    model.set_plan(plan)
    trainable = trainable_names(model.blocks, plan.max_trainable)
    return cache_decision("auto", plan, model.backbone, trainable, **args)


def test_cache_decision_rules():
    model = ImageClassifier("test_efficientnet", num_classes=3, image_size=32)
    n = model.num_blocks
    split, why = _decide(model, Plan("linear_probe", n, 0))
    assert split is not None and split.whole_backbone and why.startswith("on")
    split, _ = _decide(model, Plan("partial", n, 2))
    assert split is not None and not split.whole_backbone
    cases = [
        (Plan("partial", n, 2), {"augment": {"scale": [0.8, 1]}}, "augment=none"),
        (Plan("partial", n, 2), {"mixup": True}, "mixup"),
        (Plan("partial", n, 2, bn_mode="adapt"), {}, "bn_mode=adapt"),
        (Plan("gradual", n, 0, schedule=((1, 2),)), {}, "unfreezes"),
        (Plan("full", n, n), {}, "nothing is frozen"),
    ]
    for plan, kw, reason in cases:
        split, why = _decide(model, plan, **kw)
        assert split is None and reason in why, (plan.regime, why)
    dropping = ImageClassifier("test_efficientnet", num_classes=3, image_size=32, drop_rate=0.3)
    split, why = _decide(dropping, Plan("linear_probe", n, 0))
    assert split is None and "forward_head (dropout 0.3)" in why
    deep = ImageClassifier("test_efficientnet", num_classes=3, image_size=32, drop_path_rate=0.2)
    split, why = _decide(deep, Plan("partial", n, 2))
    assert split is None and "DropPath" in why
    # named within the backbone, as a user finds them (blocks.<stage>.<block>.drop_path)
    split, why = _decide(deep, Plan("linear_probe", n, 0))
    assert split is None and "blocks.1.0.drop_path (DropPath" in why, why
    vit = ImageClassifier("test_vit", num_classes=3, image_size=32)
    split, why = _decide(vit, Plan("partial", vit.num_blocks, 2))
    assert split is None and "VisionTransformer" in why
    split, _ = _decide(vit, Plan("linear_probe", vit.num_blocks, 0))
    assert split is not None and split.whole_backbone


@pytest.mark.parametrize("regime", ["linear_probe", "partial"])
def test_cached_and_uncached_training_give_the_same_metrics(regime, image_folder, tmp_path,
                                                           make_cfg):  # fmt: skip
    results = {}
    for cache in ("true", "false"):
        cfg = make_cfg(*tiny_overrides(
            image_folder, tmp_path / cache, f"finetune={regime}", "augment=none",
            f"finetune.cache_features={cache}", "model.head.dropout=0.0",
        ))  # fmt: skip
        if regime == "partial":
            cfg.finetune.trainable_blocks = 2
        summary, _ = finetune(cfg)
        results[cache] = summary
    assert results["true"]["feature_cache"].startswith("on")
    assert results["false"]["feature_cache"].startswith("off")
    for key in ("test_acc", "best_val_acc"):
        assert results["true"][key] == pytest.approx(results["false"][key], abs=1e-6), key
    assert results["true"]["test_loss"] == pytest.approx(results["false"]["test_loss"], rel=1e-4)


def test_cached_linear_probe_keeps_vit_dropout(image_folder, tmp_path, make_cfg):
    """ViT-style backbones apply dropout in a module (head_drop), not through a drop_rate
    attribute: a cached linear probe used to skip it and train a different model."""
    results = {}
    for cache in ("auto", "false"):
        summary, _ = finetune(make_cfg(*tiny_overrides(
            image_folder, tmp_path / cache, "model.backbone=test_vit", "data.image_size=160",
            "finetune=linear_probe", "regularization.drop_rate=0.3", "model.head.dropout=0.0",
            f"finetune.cache_features={cache}",
        )))  # fmt: skip
        results[cache] = summary
    assert "head_drop (Dropout 0.3)" in results["auto"]["feature_cache"]
    for key in ("test_acc", "test_loss", "best_val_acc"):
        assert results["auto"][key] == results["false"][key], key


def test_fingerprint_follows_the_prefix_and_only_the_prefix():
    model = ImageClassifier("test_efficientnet", num_classes=3, image_size=32).eval()
    model.set_plan(Plan("partial", model.num_blocks, 2))
    split = Split(model.backbone, find_cut(model.backbone, trainable_names(model.blocks, 2)))
    before = split.fingerprint()
    assert split.fingerprint() == before
    suffix_param = next(p for m in split._rest for p in m.parameters())
    with torch.no_grad():
        suffix_param.add_(1.0)  # what is trained after the cut does not change the cache
    assert split.fingerprint() == before
    prefix_param = next(p for m in split._prefix for p in m.parameters())
    with torch.no_grad():
        prefix_param.view(-1)[0] += 1e-3
    assert split.fingerprint() != before
    shorter = Split(model.backbone, len(split._prefix) - 1)
    assert shorter.fingerprint() != split.fingerprint()
    # channels_last weights run other kernels: their outputs are not bit for bit the same
    before = split.fingerprint()
    model.to(memory_format=torch.channels_last)
    assert split.fingerprint() != before


def test_kept_features_stay_within_the_budget_oldest_dropped_first():
    store: dict = {}
    mb = torch.zeros(2**18)  # 1 MiB of float32
    labels = torch.zeros(1, dtype=torch.long)
    assert keep(store, ("train", "a"), mb, labels, budget_bytes=2.5 * 2**20)
    assert keep(store, ("val", "a"), mb.clone(), labels, budget_bytes=2.5 * 2**20)
    assert keep(store, ("train", "b"), mb.clone(), labels, budget_bytes=2.5 * 2**20)
    assert list(store) == [("val", "a"), ("train", "b")]  # the oldest went
    assert not keep(store, ("big", "c"), torch.zeros(2**20), labels, budget_bytes=2.5 * 2**20)
    assert not keep(store, ("disk", "d"), np.zeros(4, np.float16), labels, budget_bytes=2**20)
    assert list(store) == [("val", "a"), ("train", "b")]


def test_a_later_run_on_the_same_data_reuses_the_prefix_features(image_folder, tmp_path,
                                                                make_cfg, caplog):  # fmt: skip
    """finetune=auto's rounds and final run share one DataModule: the frozen prefix's outputs
    are computed once per depth, and a run that reuses them ends exactly as one that does not."""
    from hydra.utils import instantiate

    def cfg(name, blocks):
        c = make_cfg(*tiny_overrides(
            image_folder, tmp_path / name, "finetune=partial", "augment=none",
            "finetune.cache_features=true", "model.head.dropout=0.0",
        ))  # fmt: skip
        c.finetune.trainable_blocks = blocks
        return c

    first, _ = finetune(cfg("fresh", 2))
    dm = instantiate(cfg("shared", 2).data)
    finetune(cfg("warm", 2), dm)
    assert {name for name, _ in dm.prefix_features} == {"train", "val", "test"}
    caplog.set_level(logging.INFO, logger="transferkit")
    again, _ = finetune(cfg("shared", 2), dm)
    reused = [r.getMessage() for r in caplog.records if "reused" in r.getMessage()]
    computed = [r for r in caplog.records if r.getMessage().startswith("caching ")]
    assert len(reused) == 3 and not computed
    for key in ("test_acc", "best_val_acc", "test_loss"):
        assert again[key] == first[key], key
    caplog.clear()
    finetune(cfg("deeper", 1), dm)  # another depth, another prefix: computed, then kept too
    assert not [r for r in caplog.records if "reused" in r.getMessage()]
    assert len(dm.prefix_features) == 6


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet"])
def test_a_longer_prefix_goes_on_from_a_shorter_ones_features_exactly(backbone):
    """``finetune=auto`` races the deepest candidate first; a shallower one's frozen prefix
    starts with its modules, so it runs only the modules after them on the kept features,
    to the same outputs (the whole backbone included: its blocks, then forward_head)."""
    from transferkit.caching import FeatureDataset, compute_features

    model = ImageClassifier(backbone, num_classes=3, image_size=32).eval()
    images = torch.utils.data.TensorDataset(torch.randn(10, 3, 32, 32), torch.arange(10) % 3)
    short = Split(model.backbone, 2)
    longer = Split(model.backbone, len(flat_modules(model.backbone) or []) - 1)
    whole = Split(model.backbone, None)
    assert whole.whole_backbone
    x = images.tensors[0]
    with torch.no_grad():
        assert torch.equal(whole.prefix(x), model.backbone(x))
    # each prefix's digests start with the shorter one's
    assert longer.fingerprints()[:2] == short.fingerprints()
    assert whole.fingerprints()[: len(longer._prefix)] == longer.fingerprints()
    kept, labels = compute_features(short, images, 4, 2**30, Path("unused"), "train")
    stem = next(m for m in short._prefix if any(True for _ in m.parameters()))
    calls = []
    hook = stem.register_forward_hook(lambda *_: calls.append(1))
    for split in (longer, whole):
        direct, direct_labels = compute_features(split, images, 4, 2**30, Path("unused"), "train")
        calls.clear()
        chained, chained_labels = compute_features(
            split, FeatureDataset(kept, labels), 4, 2**30, Path("unused"), "train", start=2
        )
        assert not calls  # the first modules did not run again
        assert torch.equal(chained, direct) and torch.equal(chained_labels, direct_labels)
    hook.remove()


def test_a_run_goes_on_from_the_longest_exact_features_kept_for_its_prefix():
    """Of the features kept on the data module for prefixes this one starts with, the
    longest float32 ones are taken (float16 ones would round), with their labels, and the
    images are not read again."""
    from types import SimpleNamespace

    from transferkit.caching import CachedFeatureDataModule, compute_features

    model = ImageClassifier("test_efficientnet", num_classes=3, image_size=32).eval()
    images = torch.utils.data.TensorDataset(torch.randn(10, 3, 32, 32), torch.arange(10) % 3)
    split = Split(model.backbone, 4)

    def kept(cut):
        return compute_features(Split(model.backbone, cut), images, 4, 2**30, Path("u"), "train")

    one, two, three = kept(1), kept(2), kept(3)
    labels = torch.tensor([2, 1, 0, 2, 1, 0, 2, 1, 0, 2])  # only the kept entry has these
    store = {
        ("train", Split(model.backbone, 1).fingerprint()): one,
        ("train", Split(model.backbone, 2).fingerprint()): (two[0], labels),
        ("train", Split(model.backbone, 3).fingerprint()): (three[0].half(), three[1]),
        ("val", Split(model.backbone, 3).fingerprint()): three,  # another split's
    }

    def no_images(*_, **__):
        raise AssertionError("the images were read again")

    source = SimpleNamespace(splits={"train": images}, prefix_features=store, batch_size=4,
                             image_dataset=no_images)  # fmt: skip
    dm = CachedFeatureDataModule(source, split, budget_gb=1.0, disk_dir=Path("u"))
    dm._build("train")
    direct, _ = compute_features(split, images, 4, 2**30, Path("u"), "train")
    assert torch.equal(dm.datasets["train"].features, direct)
    assert torch.equal(dm.datasets["train"].labels, labels)  # from the entry it went on from
    # kept in turn for a later run; the entry it went on from counts as just used, so a
    # memory budget drops the entries no run used first
    two_key = ("train", Split(model.backbone, 2).fingerprint())
    assert list(store)[-2:] == [two_key, ("train", split.fingerprint())]
