"""Freeze depth works for any timm family, and frozen means frozen: parameters and BatchNorm
buffers bit-identical through training steps, across ``model.train()``."""

import functools

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from transferkit.models import ImageClassifier
from transferkit.models.finetuning import backbone_blocks
from transferkit.policy import Plan

FAMILIES = ["test_efficientnet", "test_resnet", "test_convnext", "test_vit"]


def _model(backbone: str, k: int, **plan_kw) -> ImageClassifier:
    model = ImageClassifier(
        backbone=backbone,
        num_classes=3,
        image_size=32,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
    )
    model.set_plan(Plan("partial", model.num_blocks, k, **plan_kw))
    return model


def _fit_steps(model: ImageClassifier, steps: int = 3, size: int = 32) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps * 4, 3, size, size, generator=g)
    y = torch.randint(0, 3, (steps * 4,), generator=g)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=4))


@pytest.mark.parametrize("backbone", FAMILIES)
def test_last_k_blocks_train_for_every_family(backbone):
    model = _model(backbone, k=2)
    blocks = backbone_blocks(model.backbone)
    assert len(blocks) >= 4
    expected = {n for b in blocks[-2:] for n in b}
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert all(p.requires_grad for p in model.head.parameters())

    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    _fit_steps(model)
    after = model.backbone.state_dict()
    frozen_names = {n for b in blocks[:-2] for n in b}
    changed = {n for n in expected if not torch.equal(before[n], after[n])}
    assert changed, "trainable parameters did not change"
    for n in frozen_names:
        assert torch.equal(before[n], after[n]), f"frozen parameter {n} changed"
    # buffers (BatchNorm running statistics) of frozen blocks stay bit-identical
    frozen_modules = {n.rsplit(".", 1)[0] for n in frozen_names}
    for name, value in after.items():
        if name in frozen_names or name.rsplit(".", 1)[0] not in frozen_modules:
            continue
        assert torch.equal(before[name], value), f"frozen buffer {name} changed"


def test_frozen_batchnorm_survives_train_and_adapt_mode_updates():
    model = _model("test_efficientnet", k=0)
    model.train()
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    _fit_steps(model)
    model.train()  # Lightning and users call this; frozen BN must stay in eval mode
    assert all(not m.training for m in bns)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(before[k], v), k

    adapt = _model("test_efficientnet", k=0, bn_mode="adapt")
    before = {k: v.clone() for k, v in adapt.backbone.state_dict().items()}
    _fit_steps(adapt)
    after = adapt.backbone.state_dict()
    running = [k for k in after if k.endswith("running_mean")]
    assert all(not torch.equal(before[k], after[k]) for k in running)
    affine = [n for n, _ in adapt.backbone.named_parameters()]
    assert all(torch.equal(before[n], after[n]) for n in affine)


def test_bn_mode_train_trains_affine_of_frozen_blocks():
    model = _model("test_efficientnet", k=0, bn_mode="train")
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    _fit_steps(model)
    after = model.backbone.state_dict()
    bn_w = [k for k in after if ".bn" in k and k.endswith("weight")]
    conv_w = [k for k in after if "conv" in k and k.endswith("weight")]
    assert any(not torch.equal(before[k], after[k]) for k in bn_w)
    assert all(torch.equal(before[k], after[k]) for k in conv_w)
    assert all(not torch.equal(before[k], after[k]) for k in after if k.endswith("running_mean"))
