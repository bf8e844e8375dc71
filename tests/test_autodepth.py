"""``finetune=auto`` measures the depth: successive halving over candidate depths, the cheapest
within noise of the best, and a run that composes with caching, resume and DDP."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from tests.conftest import tiny_overrides, write_images
from transferkit import autodepth
from transferkit.autodepth import (
    Decision,
    Trial,
    binomial_se,
    halving,
    ladder,
    pick,
    round_steps,
)
from transferkit.errors import ConfigError


def test_binomial_se_is_the_accuracy_noise_on_the_validation_size():
    assert binomial_se(0.9, 1000) == pytest.approx((0.9 * 0.1 / 1000) ** 0.5)
    assert binomial_se(1.0, 100) > 0  # a perfect score on 100 images is not certain
    assert binomial_se(0.9, 100) > binomial_se(0.9, 10_000)


def test_ladder_turns_shares_into_sorted_unique_block_counts():
    assert ladder([0, 0.25, 0.5, "all"], 17) == [0, 4, 8, 17]
    assert ladder(["all", 0, 17, 0.25], 17) == [0, 4, 17]
    with pytest.raises(ConfigError, match=r"race.candidates=1.5"):
        ladder([0, 1.5], 17)
    with pytest.raises(ConfigError, match="empty"):
        ladder([], 17)


def test_pick_takes_the_cheapest_within_noise_and_the_best_beyond_it():
    deep = Trial(blocks=17, steps=20, score=0.90, val_size=200, seconds=30.0, round=1)
    shallow = Trial(blocks=4, steps=20, score=0.88, val_size=200, seconds=10.0, round=1)
    chosen, why = pick([deep, shallow])
    assert chosen is shallow  # 2 points on 200 images: well within one standard error
    assert "within 1 standard error" in why and "cheaper" in why
    big = [Trial(t.blocks, t.steps, t.score, 20_000, t.seconds, 1) for t in (deep, shallow)]
    chosen, why = pick(big)  # the same gap on 20,000 images is real
    assert chosen.blocks == 17 and "scored best" in why
    chosen, _ = pick([deep, shallow], z=0.0)  # z=0: the best, whatever it costs
    assert chosen is deep


def test_the_same_race_at_other_speeds_chooses_the_same_depth():
    """The cost ranks what is left to train, not the clock: measured seconds vary from run
    to run, and with them the depth a seed got (Animal-MNIST 10, Lite1: ½, then ¼)."""
    quarter = Trial(blocks=4, steps=80, score=0.80, val_size=50, seconds=12.8, round=1)
    half = Trial(blocks=8, steps=60, score=0.82, val_size=50, seconds=12.9, round=1,
                 finished=True)  # fmt: skip
    slower = replace(half, seconds=12.7)
    # early stopping ended ½: nothing left to train, however long its round took
    assert pick([quarter, half])[0].blocks == 8 and pick([quarter, slower])[0].blocks == 8
    # neither finished: the fewer blocks, the cheaper the same remaining steps
    unfinished = [replace(half, finished=False, seconds=s) for s in (1.0, 99.0)]
    assert {pick([quarter, u])[0].blocks for u in unfinished} == {4}
    _, why = pick([quarter, replace(half, finished=False)])
    assert "cheaper to finish" in why and "80 steps" in why and "60 steps" in why
    # equal scores: the cheaper is the best, and goes on to the next round
    tie = replace(quarter, score=0.82)
    assert pick([tie, slower], z=0.0)[0].blocks == 8

    def race(clock):
        def run(blocks, steps, rnd):
            return {0: 0.60, 4: 0.80, 8: 0.80}[blocks], 50, clock[blocks], None, steps, False

        return halving([0, 4, 8], run, budget_steps=160, eta=3, z=0.0)

    fast8, fast4 = race({0: 1.0, 4: 9.0, 8: 2.0}), race({0: 1.0, 4: 2.0, 8: 9.0})
    assert fast8[0] == fast4[0] == 4
    assert [t.blocks for t in fast8[1] if t.round == 1] == [4]  # kept whatever the clock


def test_pick_uses_the_paired_error_when_it_has_the_images():
    # 200 validation images; the deeper model gets 6 more right and disagrees on only those
    deep = Trial(blocks=8, steps=20, score=0.83, val_size=200, seconds=20.0, round=1)
    shallow = Trial(blocks=4, steps=20, score=0.80, val_size=200, seconds=10.0, round=1)
    chosen, _ = pick([deep, shallow])  # unpaired: 3 points is within sqrt(se² + se²) ≈ 3.9
    assert chosen is shallow
    right = [True] * 160 + [False] * 40
    paired = {(4, 1): right, (8, 1): right[:160] + [True] * 6 + [False] * 34}
    chosen, why = pick([deep, shallow], paired=paired)  # paired: 6 images of 6 disagreements
    assert chosen is deep and "scored best" in why


def test_halving_keeps_the_better_half_for_a_longer_round():
    calls = []
    quality = {0: 0.70, 4: 0.85, 8: 0.84, 17: 0.60}

    def run(blocks, steps, rnd):
        calls.append((blocks, steps, rnd))
        return quality[blocks] + steps / 10_000, 100_000, float(1 + blocks), None

    blocks, trials, _ = halving([0, 4, 8, 17], run, budget_steps=160, fractions=(0.125, 0.5))
    # the deepest first (the shallower ones' cached prefixes go on from its features);
    # reported in the order of the depths
    assert [c for c in calls if c[2] == 0] == [(17, 20, 0), (8, 20, 0), (4, 20, 0), (0, 20, 0)]
    assert [c for c in calls if c[2] == 1] == [(8, 80, 1), (4, 80, 1)]
    order = [(0, 0), (0, 4), (0, 8), (0, 17), (1, 4), (1, 8)]
    assert blocks == 4 and [(t.round, t.blocks) for t in trials] == order
    # one round, a floor on the steps, and never past the budget
    calls.clear()
    halving([0, 4], run, budget_steps=30, fractions=(0.1,), min_steps=10)
    assert calls == [(4, 10, 0), (0, 10, 0)]
    calls.clear()
    halving([0, 4], run, budget_steps=30, fractions=(0.5, 0.9, 1.0), eta=4, min_steps=10)
    assert calls == [(4, 15, 0), (0, 15, 0), (4, 27, 1)]


def test_keep_close_keeps_what_a_short_round_cannot_tell_from_the_best():
    """The first-round scores of textures at 100 per class (Lite2, seed 1): half the blocks
    (11) scored 0.8675 against 0.878 and 0.876 on 1,600 images and halving dropped it for
    good. Without per-image records that is within the noise: keep_close races it on, and
    here (an invented second round; in the real run the paired error dropped it anyway) it
    overtakes; a candidate far below the best (22 blocks) is still dropped."""
    first = {0: 0.878, 6: 0.876, 11: 0.8675, 22: 0.70}
    second = {0: 0.899, 6: 0.955, 11: 0.975, 22: 0.99}

    def run(blocks, steps, rnd):
        return (first if rnd == 0 else second)[blocks], 1600, 1.0, None

    blocks, trials, _ = halving([0, 6, 11, 22], run, budget_steps=150)
    assert blocks == 6 and sorted(t.blocks for t in trials if t.round == 1) == [0, 6]
    blocks, trials, _ = halving([0, 6, 11, 22], run, budget_steps=150, keep_close=True)
    assert blocks == 11 and sorted(t.blocks for t in trials if t.round == 1) == [0, 6, 11]
    # z=0: nothing is "within noise" but a tie, so it is halving again
    blocks, _, _ = halving([0, 6, 11, 22], run, budget_steps=150, keep_close=True, z=0.0)
    assert blocks == 6


def test_rounds_end_where_the_run_validates_and_record_the_steps_trained():
    calls = []

    def run(blocks, steps, rnd):
        calls.append((blocks, steps, rnd))
        stopped_early = blocks == 8 and rnd == 1
        return 0.8 + blocks / 100, 1000, 1.0, None, 40 if stopped_early else steps

    def every_16(steps):  # a validation every 16 steps
        return -(-steps // 16) * 16

    _, trials, _ = halving([0, 4, 8], run, budget_steps=100, fractions=(0.125, 0.5),
                           snap=every_16)  # fmt: skip
    assert sorted({c[1] for c in calls}) == [16, 64]  # 12.5 → 16 and 50 → 64 steps
    assert [t.steps for t in trials if t.round == 1] == [64, 40]  # as trained
    calls.clear()
    halving([0, 4], run, budget_steps=100, fractions=(0.125, 0.5), snap=lambda s: 96)
    assert calls == [(4, 96, 0), (0, 96, 0)]  # two rounds that end alike are one


def test_round_steps_grow_even_when_the_floor_would_make_them_equal():
    assert round_steps(24, (0.125, 0.5), 10) == [10, 12]
    assert round_steps(8, (0.5, 1.0), 10) == [8, 8]  # the budget caps both


@pytest.mark.parametrize(
    "bad", [{"fractions": ()}, {"fractions": (0.0,)}, {"fractions": (0.5, 0.25)},
            {"fractions": (0.5, 1.5)}, {"eta": 1}],
)  # fmt: skip
def test_halving_refuses_settings_that_cannot_race(bad):
    with pytest.raises(ConfigError, match=r"finetune\.race"):
        halving([0, 4], lambda b, s, r: (0.5, 10, 1.0, None), 100, **bad)


def test_a_ddp_child_takes_rank_zeros_decision_and_never_races(monkeypatch, make_cfg):
    decided = Decision(3, 1, (Trial(3, 10, 0.9, 100, 2.0, 0),), 5.0, "measured", "race")
    monkeypatch.setenv(autodepth.ENV, json.dumps(decided.as_dict()))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(autodepth, "race", lambda *a, **k: pytest.fail("a child raced"))
    got = autodepth.decide(make_cfg(), 6, 1, 100, lambda s: 1)
    assert (got.blocks, got.source, got.trials) == (3, "rank 0", decided.trials)
    monkeypatch.setenv(autodepth.ENV, "{not json")
    with pytest.raises(ConfigError, match=autodepth.ENV):
        autodepth.decide(make_cfg(), 6, 1, 100, lambda s: 1)


def test_processes_an_outside_launcher_started_take_the_table(monkeypatch, make_cfg):
    monkeypatch.delenv(autodepth.ENV, raising=False)
    monkeypatch.setattr(autodepth, "race", lambda *a, **k: pytest.fail("raced"))
    got = autodepth.decide(make_cfg(), 6, 2, 100, lambda s: 1, external="torchrun")
    assert (got.blocks, got.source) == (2, "table") and "torchrun" in got.reason


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    write_images(root, ["ant", "bee", "cat"], per_class=16)
    return root


def test_auto_races_then_trains_the_chosen_depth_as_the_fixed_run_would(make_cfg, folder, tmp_path):
    from transferkit.finetune import finetune

    common = ["trainer.max_epochs=null", "finetune.steps=48", "report=true", "logger=csv"]
    auto_cfg = make_cfg(*tiny_overrides(folder, tmp_path / "auto", "finetune=auto", *common))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary, _ = finetune(auto_cfg)
    # going on from the race's checkpoints is not a run overwriting someone else's folder
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    measured = summary["plan"]["measured"]
    assert measured["source"] == "race" and measured["seconds"] > 0
    total = summary["total_blocks"]
    first = [t for t in measured["trials"] if t["round"] == 0]
    assert [t["blocks"] for t in first] == ladder(list(auto_cfg.finetune.race.candidates), total)
    # 24 training images in batches of 8: 3 steps an epoch, 16 epochs, validated every epoch;
    # rounds of 4 (the floor of 10 steps, in whole epochs) and 8 epochs
    assert all(t["val_size"] == summary["val_size"] and t["steps"] == 12 for t in first)
    second = [t for t in measured["trials"] if t["round"] == 1]
    assert len(second) == 2 and all(t["steps"] == 24 for t in second)
    chosen = measured["blocks"]
    assert summary["plan"]["trainable_blocks"] == chosen
    assert "measured" in summary["plan"]["reason"]
    assert not list((tmp_path / "auto" / "auto").glob("*"))  # the candidates' folders are gone
    report = (tmp_path / "auto" / "report.md").read_text()
    assert "How the depth was chosen" in report and "ended by early stopping" in report
    assert (tmp_path / "auto" / "auto_race.png").is_file()

    assert "goes on from its 24 steps of the race" in measured["reason"]
    assert not (tmp_path / "auto" / "auto" / "continue.ckpt").exists()

    # The race leaves the random state as it found it, and the winner went on from its last
    # round (constant LR): its final weights are those of the fixed run at that depth.
    fixed_cfg = make_cfg(
        *tiny_overrides(
            folder,
            tmp_path / "fixed",
            "finetune=partial",
            f"finetune.trainable_blocks={chosen}",
            *common,
        )
    )
    fixed, _ = finetune(fixed_cfg)
    assert fixed["trainable_blocks"] == chosen and fixed["global_steps"] == summary["global_steps"]
    ours = torch.load(tmp_path / "auto" / "checkpoints" / "last.ckpt", weights_only=True)
    theirs = torch.load(tmp_path / "fixed" / "checkpoints" / "last.ckpt", weights_only=True)
    for name, value in theirs["state_dict"].items():
        torch.testing.assert_close(ours["state_dict"][name], value, msg=name)

    # a resumed run takes the checkpoint's decision and does not race again
    last = tmp_path / "auto" / "checkpoints" / "last.ckpt"
    assert (
        torch.load(last, weights_only=True)["transferkit"]["plan"]["measured"]["blocks"] == chosen
    )
    resumed_cfg = make_cfg(*tiny_overrides(folder, tmp_path / "auto", "finetune=auto", *common,
                                           f"ckpt_path={last}"))  # fmt: skip
    resumed, _ = finetune(resumed_cfg)
    assert resumed["plan"]["measured"]["source"] == "checkpoint"
    assert resumed["plan"]["trainable_blocks"] == chosen


class StopBeforeGoingOn(Callback):
    """Stops the winner's final run before its first step, as a SIGTERM or a crash would."""

    def on_train_start(self, trainer, pl_module):
        if str(trainer.ckpt_path or "").endswith("continue.ckpt"):
            raise RuntimeError("stopped before the first step")


def test_a_final_run_stopped_before_its_first_step_keeps_the_race_to_resume_from(
    make_cfg, folder, tmp_path
):
    """The winner's race state was deleted when its final run stopped before an epoch ended:
    the race's work was lost, and there was no last.ckpt to resume from."""
    from transferkit.finetune import finetune

    common = ["trainer.max_epochs=null", "finetune.steps=48"]
    stop = "+callbacks.stop._target_=tests.test_autodepth.StopBeforeGoingOn"
    with pytest.raises(RuntimeError, match="before the first step"):
        finetune(make_cfg(*tiny_overrides(folder, tmp_path / "auto", "finetune=auto", *common,
                                          stop)))  # fmt: skip
    last = tmp_path / "auto" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 24  # the winner's two rounds: 12 + 12 steps
    chosen = saved["transferkit"]["plan"]["measured"]["blocks"]
    assert not (tmp_path / "auto" / "auto" / "continue.ckpt").exists()
    resumed, _ = finetune(make_cfg(*tiny_overrides(folder, tmp_path / "auto", "finetune=auto",
                                                   *common, f"ckpt_path={last}")))  # fmt: skip
    assert resumed["plan"]["measured"]["source"] == "checkpoint"  # no second race
    assert resumed["trainable_blocks"] == chosen and resumed["global_steps"] == 48


def test_auto_computes_each_candidates_prefix_once_and_ends_as_the_fixed_run(
    folder, tmp_path, make_cfg, caplog
):
    common = ["augment=none", "finetune.cache_features=true", "trainer.max_epochs=null",
              "finetune.steps=48"]  # fmt: skip
    from transferkit.finetune import finetune

    caplog.set_level(logging.INFO, logger="transferkit")
    auto, objects = finetune(make_cfg(*tiny_overrides(folder, tmp_path / "auto", "finetune=auto",
                                                      *common)))  # fmt: skip
    # what the losing candidates computed is dropped: only the winner's prefix is kept
    assert len({fp for _, fp in objects["datamodule"].prefix_features}) == 1
    computed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("caching ")]
    trials = auto["plan"]["measured"]["trials"]
    assert len({t["round"] for t in trials}) == 2  # a second round, and a final run, went on
    # train and val once per candidate depth, test once for the final run
    depths = len({t["blocks"] for t in trials})
    assert len(computed) == 2 * depths + 1, computed
    # the deepest candidate's from the images; each shallower one's frozen prefix starts
    # with the deeper ones', and only its further modules ran, on their kept features
    messages = [r.getMessage() for r in caplog.records]
    went_on = [m for m in messages if "goes on from the features" in m]
    assert len(went_on) == 2 * (depths - 1), went_on
    chosen = auto["plan"]["measured"]["blocks"]
    depth = f"finetune.trainable_blocks={chosen}"
    fixed_cfg = make_cfg(*tiny_overrides(folder, tmp_path / "fixed", "finetune=partial",
                                         depth, *common))  # fmt: skip
    fixed, _ = finetune(fixed_cfg)
    for key in ("test_acc", "best_val_acc", "test_loss", "global_steps"):
        assert auto[key] == fixed[key], key


def test_a_winner_early_stopping_ended_in_the_race_is_the_fixed_run_and_trains_no_more(
    make_cfg, folder, tmp_path
):
    """The race validates when the fixed run does, so early stopping acts as it would there.
    Before, each round validated once: early stopping could not act in the race, and the
    final run trained on (to the whole budget here) where the fixed run had stopped."""
    from transferkit.finetune import finetune

    # no validation after the first improves on it: early stopping ends every run at the
    # second validation, after 2 of its 16 epochs
    common = ["trainer.max_epochs=null", "finetune.steps=48", "callbacks.early_stopping.patience=1",
              "callbacks.early_stopping.min_delta=10"]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto, _ = finetune(make_cfg(*tiny_overrides(folder, tmp_path / "auto", "finetune=auto",
                                                    *common)))  # fmt: skip
    # the race's best checkpoint, tested here, names the run's folder as its own
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    measured = auto["plan"]["measured"]
    assert measured["stopped_steps"] == 6 and measured["stopped_epochs"] == 2
    assert "early stopping ended it" in measured["reason"]
    assert all(t["steps"] == 6 for t in measured["trials"])  # round 2 had nothing to train
    assert all(t["seconds"] == 0 for t in measured["trials"] if t["round"] == 1)
    assert all(t["finished"] for t in measured["trials"])  # evidence: nothing left to train
    chosen = measured["blocks"]
    fixed, _ = finetune(make_cfg(*tiny_overrides(
        folder, tmp_path / "fixed", "finetune=partial", f"finetune.trainable_blocks={chosen}",
        *common)))  # fmt: skip
    assert fixed["global_steps"] == 6 and auto["global_steps"] == 6
    assert auto["test_acc"] == pytest.approx(fixed["test_acc"])
    for kind in ("best", "last"):  # the final run trained nothing: last.ckpt is the race's
        ours = torch.load(tmp_path / "auto" / "checkpoints" / f"{kind}.ckpt", weights_only=True)
        theirs = torch.load(tmp_path / "fixed" / "checkpoints" / f"{kind}.ckpt",
                            weights_only=True)  # fmt: skip
        assert (ours["epoch"], ours["global_step"]) == (theirs["epoch"], theirs["global_step"])
        assert ours["transferkit"]["plan"]["measured"]["blocks"] == chosen  # this run's plan
        for name, value in theirs["state_dict"].items():
            torch.testing.assert_close(ours["state_dict"][name], value, msg=name)
    assert not (tmp_path / "auto" / "auto" / "continue.ckpt").exists()
    # resuming from it takes its decision (not the race candidate's plan) and trains no more
    last = tmp_path / "auto" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["transferkit"]["plan"]
    assert saved["measured"]["blocks"] == chosen
    resumed, _ = finetune(make_cfg(*tiny_overrides(folder, tmp_path / "auto", "finetune=auto",
                                                   *common, f"ckpt_path={last}")))  # fmt: skip
    assert resumed["plan"]["measured"]["source"] == "checkpoint"
    assert resumed["trainable_blocks"] == chosen and resumed["global_steps"] == 6


def test_the_paired_record_is_the_best_validations_and_survives_a_checkpoint():
    """The race scores a candidate by its best validation; its image-by-image record must be
    that validation's, also when the best came in an earlier round (a checkpoint ago)."""

    class Trainer:
        sanity_checking = False

    class Module:
        _val_record = None

    def validate(recorder, right):
        module = Module()
        recorder.on_validation_epoch_start(Trainer(), module)
        module._val_record.append(torch.tensor(right))
        recorder.on_validation_epoch_end(Trainer(), module)

    first = autodepth.ValRecorder()
    validate(first, [True, True, False, True])
    validate(first, [True, False, False, True])  # worse: the best stays
    assert first.correct == [True, True, False, True]
    later = autodepth.ValRecorder()  # the next round, from the checkpoint
    later.load_state_dict(first.state_dict())
    validate(later, [False, True, True, True])  # as good, not better: the first of equals
    assert later.correct == [True, True, False, True]
    validate(later, [True, True, True, True])
    assert later.correct == [True] * 4
    assert autodepth.ValRecorder().state_dict() == {}


def test_auto_without_a_validation_split_says_what_to_do(make_cfg, folder, tmp_path):
    from transferkit.finetune import finetune

    cfg = make_cfg(*tiny_overrides(folder, tmp_path / "r", "finetune=auto", "data.val_fraction=0",
                                   "trainer.max_epochs=null", "finetune.steps=10"))  # fmt: skip
    with pytest.raises(ConfigError, match="val_fraction > 0"):
        finetune(cfg)


def test_keep_close_that_is_no_boolean_is_refused_before_the_race(make_cfg, folder, tmp_path):
    from transferkit.finetune import finetune

    cfg = make_cfg(*tiny_overrides(folder, tmp_path / "r", "finetune=auto",
                                   "finetune.race.keep_close=yes", "trainer.max_epochs=null",
                                   "finetune.steps=10"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"keep_close='yes'; give true or false"):
        finetune(cfg)
    assert not (tmp_path / "r" / "auto").exists()  # no candidate ran


def test_a_ddp_child_refuses_a_bad_keep_close_too(monkeypatch, make_cfg, folder, tmp_path):
    """A DDP child never races (it takes rank 0's decision), so the race cannot be where a
    bad value is caught."""
    from transferkit.finetune import finetune

    decided = Decision(3, 1, (Trial(3, 10, 0.9, 100, 2.0, 0),), 5.0, "measured", "race")
    monkeypatch.setenv(autodepth.ENV, json.dumps(decided.as_dict()))
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = make_cfg(*tiny_overrides(folder, tmp_path / "r", "finetune=auto",
                                   "finetune.race.keep_close=1", "trainer.max_epochs=null",
                                   "finetune.steps=10"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"keep_close=1; give true or false"):
        finetune(cfg)


def test_a_race_that_spends_the_whole_budget_still_tests_its_own_weights(
    make_cfg, folder, tmp_path
):
    """With a budget smaller than the shortest race round, the winner's race run is the whole
    run: nothing is left to train, and the test must not look for the race's deleted
    best checkpoint."""
    from transferkit.finetune import finetune

    cfg = make_cfg(*tiny_overrides(folder, tmp_path / "r", "finetune=auto",
                                   "trainer.max_epochs=null", "finetune.steps=6"))  # fmt: skip
    summary, _ = finetune(cfg)
    assert all(t["steps"] == 6 for t in summary["plan"]["measured"]["trials"])
    assert summary["test_acc"] is not None and summary["global_steps"] == 6


def test_the_winner_checkpoint_is_adopted_with_its_best_validation(tmp_path):
    """The run that goes on from the race must see the race's best validation as its own
    (as the fixed run at that depth does): the checkpoint callbacks' state is moved to the
    run's folder with the best checkpoint it names. Without it, Lightning keeps only a
    path into the race's folder, which is deleted, and forgets the best score."""
    race_dir, run_dir = tmp_path / "auto" / "blocks8" / "checkpoints", tmp_path / "checkpoints"
    race_dir.mkdir(parents=True)
    key = "ModelCheckpoint{'monitor': 'val/acc', 'mode': 'max'}"
    state = {
        "dirpath": str(race_dir), "best_model_score": torch.tensor(0.976),
        "best_model_path": str(race_dir / "best.ckpt"),
        "best_k_models": {str(race_dir / "best.ckpt"): torch.tensor(0.976)},
    }  # fmt: skip
    weights = {"head.weight": torch.tensor([0.5, -1.0])}
    torch.save({"state_dict": weights, "callbacks": {key: state}}, race_dir / "best.ckpt")
    torch.save({"callbacks": {key: state, "EarlyStopping{}": {"wait_count": 1}}, "epoch": 1},
               race_dir / "last.ckpt")  # fmt: skip
    autodepth.adopt(race_dir / "last.ckpt", tmp_path / "continue.ckpt", run_dir)
    got = torch.load(tmp_path / "continue.ckpt", weights_only=True)
    moved = got["callbacks"][key]
    assert moved["dirpath"] == str(run_dir)
    assert moved["best_model_path"] == str(run_dir / "best.ckpt")
    assert list(moved["best_k_models"]) == [str(run_dir / "best.ckpt")]
    assert float(moved["best_model_score"]) == pytest.approx(0.976)
    assert got["callbacks"]["EarlyStopping{}"] == {"wait_count": 1} and got["epoch"] == 1
    best = torch.load(run_dir / "best.ckpt", weights_only=True)
    torch.testing.assert_close(best["state_dict"], weights)
    # testing from it restores its callbacks too: they name the run's folder
    assert best["callbacks"][key]["dirpath"] == str(run_dir)


def test_adopt_follows_lightning_through_a_symlinked_run_folder(tmp_path):
    """Lightning stores checkpoint folders as real paths; a run folder reached through a
    symlink must still have its race state moved (it was silently kept before)."""
    real = tmp_path / "real"
    (real / "auto" / "blocks4" / "checkpoints").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real)
    race_dir = link / "auto" / "blocks4" / "checkpoints"  # as the config names it
    stored = os.path.realpath(race_dir)  # as Lightning stores it
    key = "ModelCheckpoint{'monitor': 'val/acc'}"
    state = {"dirpath": stored, "best_model_path": f"{stored}/best.ckpt"}
    torch.save({"callbacks": {key: state}}, race_dir / "best.ckpt")
    torch.save({"callbacks": {key: state}}, race_dir / "last.ckpt")
    autodepth.adopt(race_dir / "last.ckpt", link / "continue.ckpt", link / "checkpoints")
    moved = torch.load(link / "continue.ckpt", weights_only=True)["callbacks"][key]
    assert moved["dirpath"] == os.path.realpath(link / "checkpoints")
    assert moved["best_model_path"] == os.path.realpath(link / "checkpoints" / "best.ckpt")
    assert (real / "checkpoints" / "best.ckpt").is_file()  # the best checkpoint came along


def test_candidates_train_the_recipe_of_the_table_row_and_lr_find_never_goes_on(make_cfg):
    cfg = make_cfg("finetune=auto")
    row = {"max_per_class": 30, "regime": "partial", "trainable_blocks": 0.25, "steps": 150,
           "bn_mode": "adapt", "layer_decay": 0.8}  # fmt: skip
    c = autodepth.candidate_config(cfg, 4, 20, 10, Path("/tmp/x"), rule=row)
    assert (c.finetune.bn_mode, c.finetune.layer_decay) == ("adapt", 0.8)
    assert (c.finetune.trainable_blocks, c.finetune.steps) == (4, 20)
    assert "max_per_class" not in c.finetune and c.finetune.regime == "partial"
    assert autodepth.continuable(cfg, 1)
    assert not autodepth.continuable(make_cfg("finetune=auto", "tune.lr_find=true"), 1)
    assert not autodepth.continuable(make_cfg("finetune=auto", "scheduler=cosine"), 1)
    assert not autodepth.continuable(cfg, 2)


def test_auto_races_without_checkpoint_callbacks(make_cfg, folder, tmp_path):
    """callbacks=none: no callback keeps a best score, yet every candidate has its
    validation accuracy (it used to be refused as 'no validation split')."""
    from transferkit.finetune import finetune

    overrides = tiny_overrides(folder, tmp_path / "r", "finetune=auto", "callbacks=none",
                               "trainer.max_epochs=null", "finetune.steps=48")  # fmt: skip
    cfg = make_cfg(*(o for o in overrides if o != "~callbacks.progress_bar"))
    summary, _ = finetune(cfg)
    trials = summary["plan"]["measured"]["trials"]
    race = cfg.finetune.race  # round 1 every candidate, round 2 the better 1/eta
    candidates = len(ladder(list(race.candidates), summary["total_blocks"]))
    assert len(trials) == candidates + math.ceil(candidates / race.eta)
    assert all(0 <= t["score"] <= 1 for t in trials)


def test_a_checkpoint_decision_is_checked_before_it_is_used(make_cfg, tmp_path, monkeypatch):
    """A resumed run takes the depth its checkpoint names: a value no backbone block count
    allows, or a malformed record, is refused by name instead of trained or crashing."""
    from transferkit.errors import CheckpointError

    monkeypatch.delenv(autodepth.ENV, raising=False)
    path = tmp_path / "last.ckpt"
    for measured, match in (({"blocks": 99, "trials": []}, "99 blocks"),
                            ({"blocks": 2, "trials": [{"evil": 1}]}, "no valid")):  # fmt: skip
        ckpt = {"transferkit": {"plan": {"measured": measured}}, "state_dict": {}}
        hp = {"backbone": "test_efficientnet", "num_classes": 3}
        torch.save({**ckpt, "hyper_parameters": hp}, path)
        cfg = make_cfg("finetune=auto", f"ckpt_path={path}")
        with pytest.raises(CheckpointError, match=match):
            autodepth.decide(cfg, 6, 1, 100, lambda s: 1)
