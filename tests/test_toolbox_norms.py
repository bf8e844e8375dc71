"""Normalisation against its definitions: Batch Renormalization (Ioffe, 2017, Algorithm 1),
the head norms, and the backbone's BatchNorm converted to GroupNorm / instance norm / SyncBN."""

import functools

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import GroupNormAct
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from transferkit.models import ImageClassifier
from transferkit.models.norms import NORMS, BatchRenorm1d, convert_backbone_norm, make_norm1d


def _pair(c: int = 5, momentum: float = 0.1):
    torch.manual_seed(0)
    brn = BatchRenorm1d(c, momentum=momentum, warmup_steps=5, ramp_steps=10)
    bn = nn.BatchNorm1d(c, momentum=momentum)
    with torch.no_grad():
        for m in (brn, bn):
            m.weight.copy_(torch.linspace(0.5, 2.0, c))
            m.bias.copy_(torch.linspace(-1.0, 1.0, c))
    return brn, bn


def test_batch_renorm_equals_batchnorm_when_r_is_1_and_d_is_0():
    brn, bn = _pair()
    for _ in range(5):  # the warm-up: rmax = 1, dmax = 0, so r = 1 and d = 0
        assert brn.limits() == (1.0, 0.0)
        x = torch.randn(16, 5) * 3 + 2
        torch.testing.assert_close(brn(x), bn(x))
        torch.testing.assert_close(brn.running_mean, bn.running_mean)
    # after the warm-up: r = 1, d = 0 whenever the batch matches the moving statistics
    brn.num_batches_tracked.fill_(100)
    x = torch.randn(16, 5)
    with torch.no_grad():
        brn.running_mean.copy_(x.mean(0))
        brn.running_std.copy_((x.var(0, unbiased=False) + brn.eps).sqrt())
    torch.testing.assert_close(brn(x), bn(x))


def test_batch_renorm_matches_the_paper_on_a_small_tensor():
    brn = BatchRenorm1d(3, eps=1e-5, momentum=0.1, rmax=1.5, dmax=0.5, warmup_steps=0)
    brn.num_batches_tracked.fill_(10_000)  # past the ramp: rmax, dmax at their final values
    gamma, beta = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.0, -1.0, 0.3])
    mu, sigma = torch.tensor([0.0, 1.0, -1.9]), torch.tensor([1.5, 4.0, 0.25])
    with torch.no_grad():
        brn.weight.copy_(gamma)
        brn.bias.copy_(beta)
        brn.running_mean.copy_(mu)
        brn.running_std.copy_(sigma)
    x = torch.tensor(
        [[1.0, 2.0, -2.0], [2.0, 0.0, -1.0], [3.0, 1.0, -3.0], [6.0, 1.0, -2.0]],
        requires_grad=True,
    )
    y = brn(x)

    # Algorithm 1 of Ioffe (2017), written out
    mu_b = x.mean(0)
    sigma_b = ((x - mu_b) ** 2).mean(0).add(1e-5).sqrt()
    r = (sigma_b / sigma).clamp(1 / 1.5, 1.5).detach()
    d = ((mu_b - mu) / sigma).clamp(-0.5, 0.5).detach()
    expected = gamma * ((x - mu_b) / sigma_b * r + d) + beta
    torch.testing.assert_close(y, expected)
    # both sides of the clipping are exercised: r at 1/rmax and rmax, d at dmax, and free
    assert 1 / 1.5 < r[0] < 1.5 and r[1] == pytest.approx(1 / 1.5) and r[2] == 1.5
    assert d[0] == 0.5 and d[1] == 0.0 and d[2] == pytest.approx(-0.4)
    # r and d are constants for back-propagation
    w = torch.randn(4, 3)
    (gx,) = torch.autograd.grad((y * w).sum(), x, retain_graph=True)
    (ex,) = torch.autograd.grad((expected * w).sum(), x)
    torch.testing.assert_close(gx, ex)
    # moving averages: mu += a (mu_B - mu), sigma += a (sigma_B - sigma)
    torch.testing.assert_close(brn.running_mean, mu + 0.1 * (mu_b.detach() - mu))
    torch.testing.assert_close(brn.running_std, sigma + 0.1 * (sigma_b.detach() - sigma))
    # inference uses the moving statistics
    brn.eval()
    z = torch.randn(2, 3)
    torch.testing.assert_close(brn(z), gamma * (z - brn.running_mean) / brn.running_std + beta)


def test_batch_renorm_warm_up_schedule():
    brn = BatchRenorm1d(2, rmax=3.0, dmax=5.0, warmup_steps=10, ramp_steps=10)
    at = {}
    for step in (0, 10, 15, 20, 100):
        brn.num_batches_tracked.fill_(step)
        at[step] = brn.limits()
    assert at[0] == at[10] == (1.0, 0.0)
    assert at[15] == (2.0, 2.5)
    assert at[20] == at[100] == (3.0, 5.0)


@pytest.mark.parametrize("kind", NORMS)
def test_head_norms_build_and_normalise(kind):
    norm = make_norm1d(kind, 64).train()
    x = torch.randn(8, 64) * 3 + 1
    y = norm(x)
    assert y.shape == x.shape
    if kind in ("batchnorm", "batchrenorm"):  # over the batch, per feature
        torch.testing.assert_close(y.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    if kind in ("layernorm", "instancenorm"):  # over the features, per sample
        torch.testing.assert_close(y.mean(1), torch.zeros(8), atol=1e-5, rtol=0)
    if kind == "groupnorm":
        assert norm.num_groups == 32
        torch.testing.assert_close(y.view(8, 32, 2).mean(-1), torch.zeros(8, 32), atol=1e-3, rtol=0)


def test_unknown_norms_list_the_choices():
    with pytest.raises(ValueError, match=r"'batchnrom'.*batchrenorm"):
        make_norm1d("batchnrom", 8)
    with pytest.raises(ValueError, match=r"'group'.*groupnorm.*model.backbone_norm"):
        convert_backbone_norm(nn.Identity(), "group")


def _bns(model: nn.Module) -> dict[str, _BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}


@pytest.mark.parametrize("kind", ["groupnorm", "instancenorm"])
def test_backbone_batchnorm_to_groupnorm_keeps_affine_and_activation(kind):
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=0)
    before = _bns(model)
    for m in before.values():
        nn.init.normal_(m.weight)
        nn.init.normal_(m.bias)
    old = {
        n: (m.weight.detach().clone(), m.bias.detach().clone(), m.act) for n, m in before.items()
    }
    convert_backbone_norm(model, kind)
    assert not _bns(model)
    new = dict(model.named_modules())
    for name, (w, b, act) in old.items():
        gn = new[name]
        assert isinstance(gn, GroupNormAct) and gn.act is act
        assert gn.num_groups == (
            gn.num_channels if kind == "instancenorm" else min(32, gn.num_channels // 2)
        )
        torch.testing.assert_close(gn.weight.detach(), w)
        x = torch.randn(2, gn.num_channels, 4, 4)
        torch.testing.assert_close(gn(x), act(F.group_norm(x, gn.num_groups, w, b, gn.eps)))
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, model.num_features)


def test_backbone_syncbn_keeps_the_fused_activation_and_runs_without_ddp():
    model = timm.create_model("test_efficientnet", num_classes=0)
    acts = {n: type(m.act) for n, m in _bns(model).items()}
    convert_backbone_norm(model, "syncbn")
    after = _bns(model)
    assert set(after) == set(acts)
    assert all(isinstance(m, nn.SyncBatchNorm) for m in after.values())
    assert {n: type(m.act) for n, m in after.items()} == acts
    model.train()(torch.randn(4, 3, 32, 32))  # one process: plain BatchNorm


def test_classifier_converts_before_computing_blocks():
    kw = dict(image_size=32, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    keep = ImageClassifier("test_efficientnet", 3, **kw)
    gn = ImageClassifier("test_efficientnet", 3, backbone_norm="groupnorm", **kw)
    assert gn.num_blocks == keep.num_blocks and not _bns(gn.backbone)
    assert gn.blocks == keep.blocks  # same parameter names, so freezing means the same
    opt = gn.configure_optimizers()
    gn_params = {id(p) for m in gn.backbone.modules() if isinstance(m, nn.GroupNorm)
                 for p in m.parameters()}  # fmt: skip
    for g in opt.param_groups:
        if any(id(p) in gn_params for p in g["params"]):
            assert g["weight_decay"] == 0.0
