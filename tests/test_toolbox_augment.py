"""Augmentation: every augment config builds its transform from the real conf/; Cutout
zeroes the expected area; mixup / CutMix targets are proper distributions, and the soft-target
loss is the cross-entropy of their definition."""

import functools

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from timm.data.auto_augment import AutoAugment, RandAugment
from timm.data.random_erasing import RandomErasing

from transferkit.data.transforms import BatchMixup, Cutout, build_transform
from transferkit.models import ImageClassifier

PRE = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
       "crop_pct": 1.0}  # fmt: skip


def _ops(tf) -> list:
    out = []
    for t in getattr(tf, "transforms", [tf]):
        out += _ops(t) if hasattr(t, "transforms") else [t]
    return out


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("none", []),
        ("light", []),
        ("strong", [RandAugment, RandomErasing]),
        ("autoaugment", [AutoAugment]),
        ("cutout", [Cutout]),
        ("mixup", []),
    ],
)
def test_augment_configs_build_their_transforms(name, expected, make_cfg):
    cfg = make_cfg(f"augment={name}")
    augment = OmegaConf.to_container(cfg.augment, resolve=True)
    tf = build_transform(PRE, train=True, augment=augment)
    kinds = [type(t) for t in _ops(tf)]
    for cls in expected:
        assert cls in kinds, (name, kinds)
    for cls in {RandAugment, AutoAugment, RandomErasing, Cutout} - set(expected):
        assert cls not in kinds, (name, cls)
    x = tf(Image.new("RGB", (40, 40), (120, 30, 200)))
    assert x.shape == (3, 32, 32)
    assert (cfg.model.mixup is not None) == (name == "mixup")


def test_cutout_holes_and_probability():
    img = torch.ones(3, 64, 64)
    torch.manual_seed(0)
    for _ in range(20):
        out = Cutout(size=6, n_holes=3)(img)
        zeros = (out[0] == 0).sum().item()
        assert 0 < zeros <= 3 * 36  # three 6x6 holes at most, fewer where they overlap
        assert torch.equal(out[0] == 0, out[2] == 0)  # the same hole on every channel
    assert torch.equal(Cutout(size=6, p=0.0)(img), img)
    with pytest.raises(ValueError, match="size >= 1"):
        Cutout(size=0)


@pytest.mark.parametrize("n", [1, 7, 8])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixup_targets_sum_to_one(n, smoothing):
    torch.manual_seed(n)
    mix = BatchMixup(5, smoothing, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
    for _ in range(10):
        x, y = mix(torch.randn(n, 3, 8, 8), torch.randint(5, (n,)))
        assert x.shape == (n, 3, 8, 8) and y.shape == (n, 5)
        torch.testing.assert_close(y.sum(1), torch.ones(n))
        assert (y >= 0).all()
        if smoothing:
            assert (y >= smoothing / 5 - 1e-6).all()


def test_mixup_is_the_convex_combination_of_its_definition():
    torch.manual_seed(0)
    mix = BatchMixup(4, 0.0, mixup_alpha=1.0, cutmix_alpha=0.0)
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    mixed, soft = mix(x.clone(), y)
    lam = soft[0, 0].item()  # sample 0 (class 0) mixed with sample 3 (class 3)
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    one_hot = F.one_hot(y, 4).float()
    torch.testing.assert_close(soft, lam * one_hot + (1 - lam) * one_hot.flip(0))


def test_soft_target_loss_is_cross_entropy_with_probabilities():
    model = ImageClassifier(
        "test_efficientnet", 3, image_size=32, mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0},
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    )  # fmt: skip
    logits = torch.randn(6, 3)
    soft = torch.softmax(torch.randn(6, 3), -1)
    torch.testing.assert_close(model._loss(logits, soft), F.cross_entropy(logits, soft))
    model.train()
    x, y = torch.randn(5, 3, 32, 32), torch.randint(3, (5,))
    loss = model.training_step((x, y), 0)  # an odd batch trains too
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="mixup_alpha=-1"):
        BatchMixup(3, mixup_alpha=-1)


@pytest.mark.parametrize("name", ["strong", "autoaugment"])
def test_policies_never_posterize_to_zero_bits(name, make_cfg):
    """timm's increasing Posterize keeps 4 - 4·level/10 bits: 0 at the top magnitude, which
    Pillow refuses. The shipped policies must stay below that (augment=strong crashed runs)."""
    cfg = make_cfg(f"augment={name}")
    augment = OmegaConf.to_container(cfg.augment, resolve=True)
    tf = build_transform(PRE, train=True, augment=augment)
    policy = next(t for t in _ops(tf) if isinstance(t, (RandAugment, AutoAugment)))
    ops = policy.ops if isinstance(policy, RandAugment) else [o for p in policy.policy for o in p]
    posterize = [op for op in ops if op.name.startswith("Posterize")]
    assert posterize
    for op in posterize:
        for level in (0.0, op.magnitude_max or 10.0):  # both ends of the magnitude range
            assert op.level_fn(level, op.hparams)[0] >= 1, (name, op.name, level)
            op.prob, op.magnitude, op.magnitude_std = 1.0, level, 0.0
            op(Image.new("RGB", (8, 8), (120, 30, 200)))  # Pillow accepts it
