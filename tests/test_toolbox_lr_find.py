"""The learning-rate finder: the sweep moves every optimizer group, the model comes back
untouched, the plot and JSON are written, and ``tune.lr_find=true`` trains at the suggestion."""

import functools
import json

import matplotlib.image
import pytest
import torch

from transferkit.finetune import build, finetune
from transferkit.lr_find import lr_find, run_lr_find, set_base_lr, steepest_descent, unbias

from .conftest import tiny_overrides

SWEEP = ("tune.num_training=25", "tune.min_lr=1e-5", "tune.max_lr=1.0")


def test_the_sweep_scales_every_param_group_and_restores_the_model(
    image_folder, tmp_path, make_cfg
):
    cfg = make_cfg(*tiny_overrides(image_folder, tmp_path, "finetune=partial",
                                   "finetune.trainable_blocks=3", "finetune.layer_decay=0.5",
                                   *SWEEP))  # fmt: skip
    objects = build(cfg)
    model = objects["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[list[float]] = []

    def record(batch, batch_idx):  # a module hook: the finder swaps out the callbacks
        seen.append([g["lr"] for g in model.trainer.optimizers[0].param_groups])

    model.on_train_batch_start = record
    result = run_lr_find(objects, cfg.tune)
    del model.on_train_batch_start

    lrs = torch.tensor(seen)
    assert lrs.shape[0] == 25 and lrs.shape[1] >= 4  # head + 3 blocks, decay/no-decay
    assert torch.allclose(lrs, lrs[:, :1].expand_as(lrs))  # every group at the swept LR
    assert lrs[0, 0] == pytest.approx(1e-5) and (lrs[1:, 0] > lrs[:-1, 0]).all()
    assert result["lr"] == pytest.approx(lrs[:, 0].tolist())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights restored


def test_make_lr_find_writes_a_plot_and_json(image_folder, tmp_path, make_cfg):
    out = tmp_path / "run"
    result = lr_find(make_cfg(*tiny_overrides(image_folder, out, *SWEEP)))
    saved = json.loads((out / "lr_find.json").read_text())
    assert saved["suggestion"] == result["suggestion"] and saved["suggestion"] is not None
    assert saved["configured_lr"] == 1e-3 and len(saved["lr"]) == len(saved["loss"]) == 25
    assert 1e-5 <= saved["suggestion"] <= 1.0
    png = matplotlib.image.imread(out / "lr_find.png")
    assert png.ndim == 3 and png.shape[0] > 300 and png.shape[1] > 500
    assert png[..., :3].std() > 0.05  # not a blank canvas


def test_tune_lr_find_trains_at_the_suggestion(image_folder, tmp_path, make_cfg):
    cfg = make_cfg(*tiny_overrides(image_folder, tmp_path, "tune.lr_find=true",
                                   "trainer.max_epochs=1", "test=false", *SWEEP))  # fmt: skip
    summary, objects = finetune(cfg)
    found = summary["lr_find"]
    assert found["applied"] == found["suggestion"] != found["configured_lr"]
    head = next(g for g in objects["trainer"].optimizers[0].param_groups if g["name"] == "head")
    assert head["lr"] == pytest.approx(found["suggestion"])
    assert summary["epochs"] == 1 and (tmp_path / "lr_find.png").is_file()


def test_bad_finder_settings_name_the_value(image_folder, tmp_path, make_cfg):
    cfg = make_cfg(*tiny_overrides(image_folder, tmp_path, "tune.min_lr=1.0", "tune.max_lr=0.1"))
    with pytest.raises(ValueError, match=r"tune\.min_lr=1\.0"):
        run_lr_find({"trainer": None, "model": None, "datamodule": None}, cfg.tune)

    class M:
        optimizer_factory = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)

    m = M()
    set_base_lr(m, 0.3)  # type: ignore[arg-type]
    assert m.optimizer_factory.keywords == {"lr": 0.3, "momentum": 0.9}
    with pytest.raises(ValueError, match="-1"):
        set_base_lr(m, -1)  # type: ignore[arg-type]


def test_unbias_redoes_the_bias_correction_and_the_suggestion_is_per_decade():
    beta, loss = 0.98, 2.3
    avg, lightning = 0.0, []
    for t in range(5):  # Lightning's recurrence with global_step read after the step
        avg = beta * avg + (1 - beta) * loss
        lightning.append(avg / (1 - beta ** (t + 2)))
    assert lightning[0] == pytest.approx(loss / 2, rel=0.02)  # the artefact
    assert unbias(lightning) == pytest.approx([loss] * 5)
    lrs = [10 ** (-6 + 0.1 * i) for i in range(61)]
    losses = [2.0 - (1.0 if i > 35 else 0.0) for i in range(61)]  # one cliff at 10^-2.5
    assert steepest_descent(lrs, losses) in (lrs[35], lrs[36])
    assert steepest_descent(lrs[:12], losses[:12]) is None
