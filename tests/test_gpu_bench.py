"""``make gpu-bench`` without a GPU: the no-GPU line, the four rows per setting, the ratios."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from transferkit import gpu_bench
from transferkit.models import ImageClassifier
from transferkit.policy import Plan

TINY = ["model.backbone=test_efficientnet", "model.weights=none"]


def test_cpu_run_writes_every_row_and_the_ratios(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, GPU or not
    out = tmp_path / "gpu-bench.json"
    args = ["--steps", "2", "--batch-size", "4", "--per-class", "3", "--out", str(out), *TINY]
    gpu_bench.main(args)

    printed = capsys.readouterr().out
    assert printed.startswith("gpu-bench: no GPU here (torch.cuda.is_available() is False)")
    result = json.loads(out.read_text())
    assert result["cuda"] is False and result["device"].startswith("cpu")
    assert set(result["versions"]) == {"torch", "torchvision", "timm", "lightning", "cuda"}
    assert result["command"] == "python -m transferkit.gpu_bench " + " ".join(args)
    settings = result["settings"]
    assert [(s["image_size"], s["regime"], s["precision"]) for s in settings] == [
        (64, "full", "32-true"),
        (64, "table", "32-true"),
    ]  # without a GPU: 64 px and fp32 only
    for s in settings:
        rows = s["rows"]
        assert list(rows) == ["ceiling", "trainer", "bare_loop", "timm_loop"]
        assert all(r["images_per_second"] > 0 and r["peak_memory_mib"] is None
                   for r in rows.values())  # fmt: skip
        trainer = rows["trainer"]["images_per_second"]
        assert s["trainer_over_ceiling"] == pytest.approx(
            trainer / rows["ceiling"]["images_per_second"]
        )
        assert s["trainer_over_timm"] == pytest.approx(
            trainer / rows["timm_loop"]["images_per_second"]
        )
        assert f"| 64 px | {s['regime']} | 32-true |" in printed  # the README table


def test_ratios() -> None:
    rows = {"trainer": 50.0, "ceiling": 100.0, "bare_loop": 60.0, "timm_loop": 40.0}
    got = gpu_bench.ratios({k: {"images_per_second": v} for k, v in rows.items()})
    assert got == {"trainer_over_ceiling": 0.5, "trainer_over_timm": 1.25}


def test_batches_are_full_and_reshuffled_every_epoch() -> None:
    torch.manual_seed(0)
    batches = gpu_bench._batches(10, 4, torch.device("cpu"))
    epoch1, epoch2 = [next(batches) for _ in range(2)], [next(batches) for _ in range(2)]
    for epoch in (epoch1, epoch2):  # 10 images, batch 4: two full batches, the rest dropped
        assert all(len(b) == 4 for b in epoch)
        assert len(set(torch.cat(epoch).tolist())) == 8
    assert not torch.equal(torch.cat(epoch1), torch.cat(epoch2))
    with pytest.raises(ValueError, match="cannot fill a batch of 16"):
        next(gpu_bench._batches(10, 16, torch.device("cpu")))


@pytest.mark.parametrize("loop", [gpu_bench.bare_loop, gpu_bench.timm_loop])
def test_loops_train_a_copy_as_the_plan_says(loop, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = ImageClassifier("test_efficientnet", 3, image_size=32)
    model.set_plan(Plan("partial", model.num_blocks, 1))  # the top block and the head train
    copies: list[torch.nn.Module] = []
    real = copy.deepcopy

    def capture(obj, memo=None):  # the loops train a copy: keep it to look at
        out = real(obj, memo)
        if obj is model:
            copies.append(out)
        return out

    monkeypatch.setattr(copy, "deepcopy", capture)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    assert loop(model, x, y, gpu_bench.FP32, 4, 2, 1) > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    trained = copies[0].state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, trained[k])}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    frozen_bn = [
        f"backbone.{n}." for n, m in model.backbone.named_modules() if m in model._eval_bns
    ]
    assert "head.1.weight" in changed and frozen and frozen_bn
    assert not changed & frozen
    assert not [k for k in changed if k.startswith(tuple(frozen_bn))]  # running stats too
