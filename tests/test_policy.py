"""The rule table in conf/finetune/table.yaml (finetune=table, and the prior and budget of
finetune=auto), as users read and edit it, gives these plans."""

import pytest
from omegaconf import OmegaConf

from transferkit.policy import DEFAULT_EPOCHS, Plan, parse_blocks, resolve_plan, steps_per_epoch

from .conftest import CONF_DIR

AUTO = OmegaConf.to_container(OmegaConf.load(f"{CONF_DIR}/finetune/table.yaml"))


def counts(per_class: int, classes: int = 10) -> dict:
    return {
        "train_size": per_class * classes,
        "min_per_class": per_class,
        "median_per_class": per_class,
        "num_classes": classes,
    }


@pytest.mark.parametrize(
    ("per_class", "regime", "blocks", "epochs"),
    [
        (1, "partial", 4, 150),  # 10 images: 1 step/epoch at batch 64 -> 150 epochs
        (10, "partial", 4, 75),  # 100 images: 2 steps per epoch
        (30, "partial", 4, 30),
        (31, "partial", 4, 30),
        (100, "partial", 4, 10),
        (300, "partial", 4, 4),
        (301, "partial", 6, 8),
        (800, "partial", 6, 3),
        (5000, "partial", 6, 1),
    ],
)
def test_rule_table(per_class, regime, blocks, epochs):
    plan = resolve_plan(AUTO, counts(per_class), total_blocks=17, batch_size=64)
    assert (plan.regime, plan.trainable_blocks, plan.epochs) == (regime, blocks, epochs)
    assert plan.rule is not None and plan.rule["regime"] == regime
    assert f"{per_class * 10:,} training images" in plan.reason


def test_first_matching_row_wins_and_catch_all_is_required():
    rules = [
        {"max_per_class": 5, "regime": "linear_probe"},
        {"max_train_size": 1000, "regime": "lp_ft"},
        {"regime": "full"},
    ]
    assert resolve_plan({"regime": "auto", "rules": rules}, counts(5), 10).regime == "linear_probe"
    assert resolve_plan({"regime": "auto", "rules": rules}, counts(50), 10).regime == "lp_ft"
    assert resolve_plan({"regime": "auto", "rules": rules}, counts(500), 10).regime == "full"
    with pytest.raises(ValueError, match="end the table with a row without bounds"):
        resolve_plan({"regime": "auto", "rules": rules[:1]}, counts(50), 10)


def test_gradual_and_lp_ft_schedules():
    g = resolve_plan(
        {"regime": "gradual", "trainable_blocks": 0, "every_n_epochs": 2, "blocks_per_step": 3,
         "final_blocks": 7},
        counts(10), 10,
    )  # fmt: skip
    assert g.schedule == ((2, 3), (4, 6), (6, 7))
    assert [g.trainable_at(e) for e in range(8)] == [0, 0, 3, 3, 6, 6, 7, 7]
    assert g.max_trainable == 7
    lp = resolve_plan({"regime": "lp_ft", "lp_epochs": 2, "ft_lr_scale": 0.1}, counts(10), 10)
    assert [lp.trainable_at(e) for e in range(4)] == [0, 0, 10, 10]
    assert [lp.lr_scale_at(e) for e in range(4)] == [1.0, 1.0, 0.1, 0.1]


@pytest.mark.parametrize(
    ("value", "expected"), [(0, 0), (3, 3), ("all", 17), ("ALL", 17), (0.25, 4), (17, 17)]
)
def test_parse_blocks(value, expected):
    assert parse_blocks(value, 17) == expected


@pytest.mark.parametrize("value", [-1, 18, "half", 1.5, True])
def test_parse_blocks_rejects_with_the_valid_forms(value):
    with pytest.raises(ValueError, match=r"integer 0..17.*fraction.*'all'"):
        parse_blocks(value, 17)


def test_unknown_regime_and_bn_mode_list_the_choices():
    with pytest.raises(ValueError, match=r"finetune.regime='deep'.*linear_probe"):
        resolve_plan({"regime": "deep"}, counts(10), 10)
    with pytest.raises(ValueError, match=r"bn_mode='x'.*frozen"):
        resolve_plan({"regime": "full", "bn_mode": "x"}, counts(10), 10)


def test_plan_dict_roundtrip():
    p = resolve_plan({"regime": "lp_ft"}, counts(10), 10)
    assert Plan(**{**p.as_dict(), "schedule": tuple(map(tuple, p.as_dict()["schedule"]))}) == p


def test_lp_ft_share_of_the_budget_uses_the_resolved_budget():
    """lp_epochs=0.6 with no step budget and no max_epochs: 60 % of the default 5 epochs,
    not 1 epoch (the budget used to be resolved after the switch epoch)."""
    lp = resolve_plan({"regime": "lp_ft", "lp_epochs": 0.6}, counts(10), 10)
    assert lp.epochs == DEFAULT_EPOCHS and lp.budget["from"] == "default"
    assert lp.schedule[0][0] == 3
    lp = resolve_plan({"regime": "lp_ft", "lp_epochs": 0.6}, counts(10), 10, max_epochs=20)
    assert lp.schedule[0][0] == 12


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_step_budget_counts_steps_at_the_global_batch(world):
    """150 steps mean 150 optimizer steps on any number of devices: with W devices each
    step takes W x batch images, so the epochs grow as each rank's shard shrinks."""
    plan = resolve_plan({"regime": "full", "steps": 150}, counts(100), 10, batch_size=64,
                        world_size=world)  # fmt: skip
    b = plan.budget
    assert (b["devices"], b["global_batch"], b["batch_per_device"]) == (world, 64 * world, 64)
    assert b["steps_per_epoch"] == steps_per_epoch(1000, 64, world)
    assert b["steps"] >= 150 and b["steps"] - b["steps_per_epoch"] < 150  # the fewest epochs
    assert plan.epochs == b["epochs"] and b["from"] == "finetune.steps"


@pytest.mark.parametrize(
    ("size", "batch", "world", "expected"),
    [(1000, 64, 1, 16), (1000, 64, 2, 8), (130, 64, 2, 1), (129, 64, 1, 2), (65, 64, 1, 1)],
)
def test_steps_per_epoch_follows_the_shard_and_drop_last(size, batch, world, expected):
    assert steps_per_epoch(size, batch, world) == expected


@pytest.mark.parametrize(("regime", "per_class", "steps"), [
    ("full", 10, 150), ("linear_probe", 10, 150), ("lp_ft", 100, 150), ("partial", 800, 375),
])  # fmt: skip
def test_every_fixed_regime_takes_its_budget_from_the_data_size(regime, per_class, steps):
    """Not 5 epochs whatever the size (10 optimizer steps at 10 images per class)."""
    cfg = {"regime": regime, "trainable_blocks": 4, "lp_epochs": 0.3}
    plan = resolve_plan(cfg, counts(per_class), 17, budget_rules=AUTO["rules"])
    assert plan.budget["steps"] >= steps > plan.budget["steps"] - plan.budget["steps_per_epoch"]
    assert "data size" in plan.budget["from"]
    user = resolve_plan({**cfg, "steps": 40}, counts(per_class), 17, budget_rules=AUTO["rules"])
    assert user.budget["from"] == "finetune.steps" and user.budget["steps"] < steps
    epochs = resolve_plan(cfg, counts(per_class), 17, max_epochs=2, budget_rules=AUTO["rules"])
    assert epochs.budget["epochs"] == 2 and epochs.budget["from"] == "trainer.max_epochs"
    assert resolve_plan(cfg, counts(per_class), 17).budget["epochs"] == DEFAULT_EPOCHS


def test_the_shipped_table_is_the_budget_of_fixed_regimes(make_cfg):
    from transferkit.finetune import budget_rules

    assert budget_rules(make_cfg("finetune=full")) == AUTO["rules"]
    assert budget_rules(make_cfg("finetune=auto")) == AUTO["rules"]


@pytest.mark.parametrize("regime", ["lp_ft", "gradual"])
def test_a_large_data_set_leaves_epoch_schedules_room_to_fine_tune(regime):
    """24,000 images: 375 steps are one epoch, which would leave LP-FT no fine-tuning phase
    and gradual no unfreezing; they keep the 5 epochs they had."""
    cfg = {"regime": regime, "trainable_blocks": 0, "lp_epochs": 0.2, "blocks_per_step": 4,
           "every_n_epochs": 1, "final_blocks": "all"}  # fmt: skip
    plan = resolve_plan(cfg, counts(2400), 17, budget_rules=AUTO["rules"])
    assert plan.budget["epochs"] == DEFAULT_EPOCHS
    assert plan.schedule and plan.schedule[0][0] < plan.budget["epochs"]  # fine-tuning happens
    full = resolve_plan({"regime": "full"}, counts(2400), 17, budget_rules=AUTO["rules"])
    assert full.budget["epochs"] == 1  # a regime without a schedule takes the table's steps
