"""Regularisation against its definitions: the L1 term, weight decay on weights only,
inverted dropout, early stopping's config, and the over/under-fitting diagnosis."""

import csv
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from timm.layers import DropPath

from transferkit.callbacks.fit_diagnosis import FitDiagnosis, diagnose_fit
from transferkit.finetune import finetune
from transferkit.models import ImageClassifier
from transferkit.models.heads import LinearHead, MLPHead
from transferkit.policy import Plan
from transferkit.report import metrics_parts, read_epoch_metrics

from .conftest import tiny_overrides

MLP = {"_target_": "transferkit.models.heads.MLPHead", "_partial_": True, "hidden": 16,
       "norm": "batchrenorm", "dropout": 0.0}  # fmt: skip


def _model(**kw) -> ImageClassifier:
    model = ImageClassifier("test_efficientnet", 3, image_size=32, head=MLP, **kw)
    model.set_plan(Plan("partial", model.num_blocks, 2))  # the first blocks frozen
    return model


@pytest.mark.parametrize("scope", ["head", "weights", "all"])
def test_l1_term_is_lambda_times_sum_abs_over_exactly_the_chosen_params(scope):
    lam = 1e-3
    model = _model(l1=lam, l1_scope=scope).eval()
    named = {f"head.{n}": p for n, p in model.head.named_parameters()}
    if scope != "head":
        named |= {f"backbone.{n}": p for n, p in model.backbone.named_parameters()}
    expected = {n for n, p in named.items() if p.requires_grad}
    if scope == "weights":
        expected = {n for n in expected if named[n].ndim > 1}
    frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
    assert frozen and not any(f"backbone.{n}" in expected for n in frozen)
    assert {id(p) for p in model.l1_parameters()} == {id(named[n]) for n in expected}

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        ce = F.cross_entropy(model(x), y)
        total = model.training_step((x, y), 0)
        l1 = lam * sum(named[n].abs().sum() for n in expected)
    assert total - ce == pytest.approx(float(l1), rel=1e-5)


def test_regularization_group_drives_the_model(make_cfg):
    cfg = make_cfg("regularization.l1=1e-5", "regularization.l1_scope=head",
                   "regularization.drop_rate=0.3", "regularization.drop_path_rate=0.1",
                   "regularization.label_smoothing=0.1", "model.weights=none",
                   "model.backbone=test_efficientnet")  # fmt: skip
    assert (cfg.model.l1, cfg.model.l1_scope, cfg.model.label_smoothing) == (1e-5, "head", 0.1)
    model = instantiate(cfg.model, num_classes=3, _recursive_=False)
    assert model.backbone.drop_rate == 0.3
    drops = [m.drop_prob for m in model.backbone.modules() if isinstance(m, DropPath)]
    assert drops and max(drops) > 0  # stochastic depth in the blocks
    with pytest.raises(ValueError, match="l1_scope='bias'"):
        ImageClassifier("test_efficientnet", 3, l1_scope="bias")


@pytest.mark.parametrize("decay_norm_and_bias", [False, True])
def test_weight_decay_skips_norms_and_biases(decay_norm_and_bias):
    wd, lr = 0.1, 0.5
    model = _model(
        optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=wd),
        decay_norm_and_bias=decay_norm_and_bias,
    )
    model.set_plan(Plan("full", model.num_blocks, model.num_blocks))
    opt = model.configure_optimizers()
    names = {id(p): n for n, p in model.named_parameters()}
    norm_types = ("BatchNorm", "BatchRenorm", "LayerNorm", "GroupNorm")
    norms = {f"{m_name}.{p}" for m_name, m in model.named_modules()
             if any(t in type(m).__name__ for t in norm_types)
             for p, _ in m.named_parameters(recurse=False)}  # fmt: skip
    assert any(n.startswith("head.") for n in norms), "the head's Batch Renorm is a norm"
    seen = set()
    for group in opt.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            seen.add(n)
            exempt = n in norms or n.endswith(".bias")
            want = wd if decay_norm_and_bias or not exempt else 0.0
            assert group["weight_decay"] == want, n
    assert seen == set(names.values())
    # what the optimizer does with it: zero gradients, one step = decoupled decay only
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        exempt = (n in norms or n.endswith(".bias")) and not decay_norm_and_bias
        torch.testing.assert_close(p.detach(), before[n] * (1.0 if exempt else 1 - lr * wd))


@pytest.mark.parametrize("head", [LinearHead(8, 3, dropout=0.5), MLPHead(8, 3, dropout=0.5)])
def test_head_dropout_is_inverted(head):
    drop = next(m for m in head if isinstance(m, torch.nn.Dropout))
    x = torch.ones(200_000)
    drop.eval()
    assert torch.equal(drop(x), x)  # identity at eval
    drop.train()
    torch.manual_seed(0)
    out = drop(x)
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 2.0))  # scaled by 1/(1-p)
    assert out.mean().item() == pytest.approx(1.0, abs=0.01)  # expectation kept
    assert (out == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    head.eval()
    z = torch.randn(5, 8)
    assert torch.equal(head(z), head(z))


def test_early_stopping_is_configurable_and_watches_validation(make_cfg):
    cfg = make_cfg("callbacks.early_stopping.patience=7", "callbacks.early_stopping.min_delta=0.01")
    es = instantiate(cfg.callbacks.early_stopping)
    assert es.monitor == "val/loss" and es.mode == "min"
    assert es.patience == 7 and abs(es.min_delta) == 0.01


def _curve(train, val):
    return [{"epoch": i, "train_loss": t, "val_loss": v}
            for i, (t, v) in enumerate(zip(train, val, strict=True))]  # fmt: skip


@pytest.mark.parametrize(
    ("train", "val", "verdict"),
    [
        ([1.0, 0.5, 0.3, 0.1], [1.0, 0.6, 0.7, 0.9], "overfitting"),  # val turns up at epoch 2
        ([2.2, 2.1, 2.05, 2.0], [2.2, 2.15, 2.1, 2.08], "underfitting"),  # near ln(10)=2.30
        ([1.0, 0.5, 0.3, 0.2], [1.0, 0.6, 0.45, 0.4], "ok"),
        ([1.0, 0.5, 0.3, 0.2], [1.0, 0.6, 0.45, 0.46], "ok"),  # a 2% wiggle is no rise
        ([1.0, 0.5, 0.6, 0.7], [1.0, 0.6, 0.7, 0.9], "ok"),  # both rising: not overfitting
    ],
)
def test_fit_verdicts(train, val, verdict):
    out = diagnose_fit(_curve(train, val), num_classes=10)
    assert out["fit"] == verdict
    assert out["evidence"]["reason"]
    if verdict == "overfitting":
        assert out["evidence"]["val_loss_min_epoch"] == 1
        assert out["evidence"]["val_loss_rising_from_epoch"] == 2
    if verdict == "underfitting":
        assert out["evidence"]["chance_loss"] == round(math.log(10), 4)


def test_fit_diagnosis_edge_cases():
    assert diagnose_fit([], 3)["fit"] is None
    with pytest.raises(ValueError, match="underfit_ratio=2"):
        FitDiagnosis(underfit_ratio=2)
    cb = FitDiagnosis()
    cb.history = _curve([1.0, 0.5], [1.0, 0.9])
    cb.num_classes = 5
    other = FitDiagnosis()
    other.load_state_dict(cb.state_dict())
    assert other.result() == cb.result()


def test_gap_is_logged_per_epoch_and_the_verdict_lands_in_the_summary(
    image_folder, tmp_path, make_cfg
):
    out = tmp_path / "run"
    cfg = make_cfg(*tiny_overrides(image_folder, out, "logger=csv", "trainer.max_epochs=3"))
    summary, _ = finetune(cfg)
    assert summary["fit"] in ("overfitting", "underfitting", "ok")
    assert summary["fit_evidence"]["validated_epochs"] == 3
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    by_epoch: dict[int, dict[str, float]] = {}
    for r in rows:
        for k in ("train/loss", "val/loss", "gap/loss"):
            if r.get(k):
                by_epoch.setdefault(int(r["epoch"]), {})[k] = float(r[k])
    assert sorted(by_epoch) == [0, 1, 2]
    for m in by_epoch.values():
        assert m["gap/loss"] == pytest.approx(m["val/loss"] - m["train/loss"], abs=1e-5)
    assert summary["fit_evidence"]["gap_last"] == pytest.approx(by_epoch[2]["gap/loss"], abs=1e-3)


def test_fit_history_survives_resume(image_folder, tmp_path, make_cfg):
    out = tmp_path / "run"
    finetune(make_cfg(*tiny_overrides(image_folder, out, "trainer.max_epochs=2", "test=false")))
    resumed = tiny_overrides(image_folder, tmp_path / "resumed", "trainer.max_epochs=3",
                             f"ckpt_path={out}/checkpoints/last.ckpt", "test=false")  # fmt: skip
    summary, _ = finetune(make_cfg(*resumed))
    assert summary["fit_evidence"]["validated_epochs"] == 3


def test_resuming_in_the_same_folder_keeps_the_earlier_metrics(image_folder, tmp_path, make_cfg):
    """The README resumes with hydra.run.dir on the old run: Lightning's CSV logger deleted
    the metrics.csv of the run's first part; it is now kept aside."""
    out = tmp_path / "run"
    finetune(make_cfg(*tiny_overrides(image_folder, out, "trainer.max_epochs=2", "test=false",
                                      "logger=csv")))  # fmt: skip
    first = (out / "metrics.csv").read_text()
    assert "val/loss" in first
    resume = f"ckpt_path={out}/checkpoints/last.ckpt"
    finetune(make_cfg(*tiny_overrides(image_folder, out, "trainer.max_epochs=3", "test=false",
                                      "logger=csv", resume)))  # fmt: skip
    assert (out / "metrics.before-resume-1.csv").read_text() == first
    assert (out / "metrics.csv").is_file()  # the resumed part's own log
    # the report's learning curves hold both parts
    assert read_epoch_metrics(*metrics_parts(out))["epoch"] == [1.0, 2.0, 3.0]
    assert read_epoch_metrics(out / "metrics.csv")["epoch"] == [3.0]
