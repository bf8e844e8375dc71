"""Two-process DDP on CPU (gloo): replicas stay identical through an unfreeze, match a single
process over the same global batches, and frozen weights and BatchNorm buffers never move."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(out: Path, devices: int, regime: str, *flags: str) -> dict[str, dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, str(WORKER), str(out), str(devices), regime, *flags],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return {p.stem: torch.load(p, weights_only=True) for p in out.glob("*.pt")}


@pytest.mark.slow  # processes of a DDP run: `make test-slow` (CI) runs it
@pytest.mark.parametrize("regime", ["gradual", "partial"])
def test_ddp_replicas_identical_and_equal_to_single_process(regime, tmp_path):
    ddp = _run(tmp_path / "ddp", 2, regime)
    single = _run(tmp_path / "single", 1, regime)
    end0, end1, start = ddp["end_rank0"], ddp["end_rank1"], ddp["start_rank0"]
    for k in end0:
        assert torch.equal(end0[k], end1[k]), f"{k} differs between ranks"
        torch.testing.assert_close(end0[k], single["end_rank0"][k], rtol=1e-4, atol=1e-5, msg=k)
    # the first 3 of 6 blocks never train: weights and BatchNorm buffers bit-identical
    prefixes = ("backbone.conv_stem", "backbone.bn1", "backbone.blocks.0.", "backbone.blocks.1.")
    frozen = [k for k in start if k.startswith(prefixes)]
    assert any("running_mean" in k for k in frozen)
    for k in frozen:
        assert torch.equal(start[k], end0[k]) and torch.equal(start[k], end1[k]), k
    trained = [k for k in start if k.startswith("backbone.conv_head")]
    assert trained and all(not torch.equal(start[k], end0[k]) for k in trained)


@pytest.mark.slow  # processes of a DDP run: `make test-slow` (CI) runs it
def test_without_late_sync_replicas_drift_after_unfreeze(tmp_path):
    """What Lightning's BackboneFinetuning does under DDP: the test above would catch it."""
    ddp = _run(tmp_path / "nosync", 2, "gradual", "nosync")
    late = [k for k in ddp["end_rank0"] if k.startswith("backbone.conv_head")]
    diff = max((ddp["end_rank0"][k] - ddp["end_rank1"][k]).abs().max().item() for k in late)
    assert diff > 1e-4
    head = [k for k in ddp["end_rank0"] if k.startswith("head.")]
    assert all(torch.equal(ddp["end_rank0"][k], ddp["end_rank1"][k]) for k in head)


@pytest.mark.slow  # processes of a DDP run: `make test-slow` (CI) runs it
@pytest.mark.parametrize("order", ["fixed", "late_sync_after_unscale"])
def test_fp16_overflow_on_one_rank_after_unfreeze_is_skipped_by_all(order, tmp_path):
    """With a gradient scaler (16-mixed), rank 1 alone overflows in a late-unfrozen parameter.
    The all-reduce runs after backward, before the scaler's inf check: both ranks skip that
    step and halve their scale together. Where it was (after the check), rank 1 skipped,
    rank 0 stepped on the non-finite gradient, and weights and scales drifted apart."""
    flags = ("fp16",) if order == "fixed" else ("fp16", order)
    ddp = _run(tmp_path / order, 2, "gradual", *flags)
    end0, end1 = ddp["end_rank0"], ddp["end_rank1"]
    same = all(torch.equal(end0[k], end1[k]) for k in end0)
    finite = all(torch.isfinite(v).all() for v in (*end0.values(), *end1.values())
                 if v.is_floating_point())  # fmt: skip
    scales = (ddp["scale_rank0"].item(), ddp["scale_rank1"].item())
    if order == "fixed":
        assert same and finite and scales[0] == scales[1] < 65536.0  # the overflow was skipped
    else:
        assert not (same and finite) and scales[0] != scales[1]
