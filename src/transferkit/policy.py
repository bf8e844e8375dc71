"""Fine-tuning plans: how much of the backbone trains, when, and at which learning rates.

``resolve_plan`` is a pure function of the ``finetune`` config, the training-set counts and
the backbone's number of blocks. For ``regime: auto`` it walks the YAML rule table of
``conf/finetune/table.yaml`` and takes the first row that matches (``finetune=table``;
``finetune=auto`` then measures the depth: ``transferkit.autodepth``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from transferkit.data.balance import AUTO_RATIO  # the ratio the plan's reason calls imbalance
from transferkit.data.order import shard_size
from transferkit.errors import ConfigError

REGIMES = ("linear_probe", "partial", "full", "gradual", "lp_ft")
BN_MODES = ("frozen", "adapt", "train")


@dataclass(frozen=True)
class Plan:
    """What trains when.

    Attributes:
        regime: one of ``REGIMES``.
        total_blocks: blocks of the backbone (timm ``group_matcher`` groups).
        trainable_blocks: blocks (counted from the top) that train from the start.
        schedule: ``(epoch, blocks)`` steps: from ``epoch`` on, the last ``blocks`` train.
        trigger: ``epochs`` (take the schedule's steps at their epochs) or ``plateau`` (take
            the next step when the monitored validation metric has not improved for
            ``patience`` validations; the schedule's epochs are then ignored).
        patience: validations without improvement before a ``plateau`` step.
        bn_mode: BatchNorm of frozen blocks: ``frozen`` (statistics and affine fixed),
            ``adapt`` (statistics update) or ``train`` (statistics and affine train).
        trainable_bn_stats: whether BatchNorm of trainable blocks updates its statistics
            (``lp_ft`` keeps them fixed so the probed head keeps seeing the same features).
        layer_decay: LR of block ``i`` from the top is ``lr · layer_decay ** (i + 1)``.
        ft_lr_scale: every LR is multiplied by this from the first schedule step on.
        epochs: the epoch budget.
        budget: how it was reached: ``epochs``, ``steps``, ``steps_per_epoch``,
            ``batch_per_device``, ``devices``, ``global_batch`` and ``from`` (the setting
            that decided it).
        rule: the row of the rule table that chose this plan (``auto`` only).
        measured: ``finetune=auto``'s race: the depth it chose, each candidate's score and
            cost, and the time it took (:class:`transferkit.autodepth.Decision`).
        counts: training-set counts the decision used.
        reason: one line for the log.
    """

    regime: str
    total_blocks: int
    trainable_blocks: int
    schedule: tuple[tuple[int, int], ...] = ()
    trigger: str = "epochs"
    patience: int = 1
    bn_mode: str = "frozen"
    trainable_bn_stats: bool = True
    layer_decay: float = 1.0
    ft_lr_scale: float = 1.0
    epochs: int | None = None
    budget: dict[str, Any] = field(default_factory=dict)
    rule: dict[str, Any] | None = None
    measured: dict[str, Any] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    reason: str = ""

    def trainable_at(self, epoch: int) -> int:
        """Blocks trainable during ``epoch`` (0-based), for ``trigger == "epochs"``."""
        k = self.trainable_blocks
        for start, blocks in self.schedule:
            if epoch >= start:
                k = blocks
        return k

    def lr_scale_at(self, epoch: int) -> float:
        """LR multiplier during ``epoch`` (``ft_lr_scale`` after the first schedule step)."""
        if self.schedule and epoch >= self.schedule[0][0]:
            return self.ft_lr_scale
        return 1.0

    def trainable_at_stage(self, stage: int) -> int:
        """Blocks trainable after ``stage`` schedule steps (``trigger == "plateau"``)."""
        return self.schedule[stage - 1][1] if stage > 0 else self.trainable_blocks

    @property
    def max_trainable(self) -> int:
        """The most blocks that ever train: they all get optimizer groups from the start."""
        return max([self.trainable_blocks, *(b for _, b in self.schedule)])

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schedule"] = [list(s) for s in self.schedule]
        return d


def parse_blocks(value: Any, total: int, key: str = "finetune.trainable_blocks") -> int:
    """``all`` → total; an int in [0, total]; a float in (0, 1) → that share of blocks.

    Raises:
        ValueError: anything else, naming the valid forms.
    """
    if isinstance(value, str) and value.lower() == "all":
        return total
    if isinstance(value, float) and 0.0 < value < 1.0:
        return max(1, round(value * total))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and float(value).is_integer() and 0 <= value <= total:
        return int(value)
    raise ConfigError(
        f"{key}={value!r} is not valid for a backbone with {total} blocks: give an integer "
        f"0..{total} (0 = linear probe), a fraction in (0, 1), or 'all'."
    )


#: Epochs of a regime with neither a step budget nor ``trainer.max_epochs``.
DEFAULT_EPOCHS = 5
#: Regimes whose schedule counts epochs (the probe's share, the unfreezing steps).
EPOCH_SCHEDULED = ("lp_ft", "gradual")


def steps_per_epoch(
    train_size: int, batch_size: int, world_size: int = 1, accumulate: int = 1
) -> int:
    """Optimizer steps in one epoch: each of ``world_size`` ranks takes its shard (padded to
    equal size) in batches of ``batch_size``, a last batch of one image dropped, and steps
    every ``accumulate`` batches (and at the epoch's end)."""
    shard = shard_size(train_size, world_size)
    batches = max(1, shard // batch_size + (shard % batch_size > 1))
    return math.ceil(batches / max(1, accumulate))


def epochs_for_steps(
    steps: int, train_size: int, batch_size: int, world_size: int = 1, accumulate: int = 1
) -> int:
    """Epochs that give at least ``steps`` optimizer steps."""
    per_epoch = steps_per_epoch(train_size, batch_size, world_size, accumulate)
    return max(1, math.ceil(steps / per_epoch))


def match_rule(rules: list[Mapping[str, Any]], counts: Mapping[str, int]) -> Mapping[str, Any]:
    """The first row whose bounds hold: ``max_per_class`` (median images per class),
    ``max_min_per_class`` (images of the smallest class, for imbalanced data) and
    ``max_train_size``; a row without bounds matches everything.

    Raises:
        ValueError: no row matches (the table needs a catch-all last row).
    """
    for row in rules:
        if "max_per_class" in row and counts["median_per_class"] > row["max_per_class"]:
            continue
        if "max_min_per_class" in row and counts["min_per_class"] > row["max_min_per_class"]:
            continue
        if "max_train_size" in row and counts["train_size"] > row["max_train_size"]:
            continue
        return row
    raise ConfigError(
        f"no row of finetune.rules matches {dict(counts)}; end the table with a row without bounds."
    )


def resolve_plan(
    cfg: Mapping[str, Any],
    counts: Mapping[str, int],
    total_blocks: int,
    batch_size: int = 64,
    max_epochs: int | None = None,
    world_size: int = 1,
    accumulate: int = 1,
    budget_rules: list[Mapping[str, Any]] | None = None,
) -> Plan:
    """Turn the ``finetune`` config into a :class:`Plan`, its epoch budget resolved.

    The budget is ``max_epochs`` when the user set one, else the ``steps`` of the config (or
    of the matching rule), else the ``steps`` of the row of ``budget_rules`` (``finetune=
    auto``'s table) the data's size matches, turned into epochs at the global batch, else
    ``DEFAULT_EPOCHS``.
    Everything that depends on it (``lp_epochs`` as a share of the budget) uses that value.

    Args:
        cfg: the ``finetune`` config node (``regime`` and its options).
        counts: ``train_size``, ``min_per_class``, ``median_per_class`` of the training split.
        total_blocks: blocks of the backbone.
        batch_size: images per step and device.
        max_epochs: the trainer's epoch budget when the user set one (it wins over ``steps``).
        world_size: devices training together: a step takes ``batch_size * world_size``
            images, so a step budget needs fewer epochs than on one device.
        accumulate: batches per optimizer step (``trainer.accumulate_grad_batches``).
        budget_rules: the table whose step budget a fixed regime takes from the data size.

    Raises:
        ValueError: unknown regime or BatchNorm mode, or an invalid block count.
    """
    regime = cfg.get("regime", "partial")
    rule: dict[str, Any] | None = None
    settings: dict[str, Any] = dict(cfg)
    if regime == "auto":
        rule = dict(match_rule(list(cfg["rules"]), counts))
        settings = {**settings, **{k: v for k, v in rule.items() if not k.startswith("max_")}}
        if cfg.get("steps") is not None:  # a budget set by the user wins over the table's
            settings["steps"] = cfg["steps"]
        regime = settings["regime"]
    if regime not in REGIMES:
        raise ConfigError(
            f"finetune.regime={regime!r} is unknown; choose one of {[*REGIMES, 'auto']} "
            "(e.g. finetune=partial)."
        )
    bn_mode = settings.get("bn_mode", "frozen")
    if bn_mode not in BN_MODES:
        raise ConfigError(f"finetune.bn_mode={bn_mode!r} is unknown; choose one of {BN_MODES}.")
    total = total_blocks
    per_epoch = steps_per_epoch(counts["train_size"], batch_size, world_size, accumulate)
    steps = settings.get("steps")
    source = "finetune.steps" if cfg.get("steps") else "rule table"
    if not steps and budget_rules and max_epochs is None:  # a fixed regime: by the data size
        steps = match_rule(budget_rules, counts).get("steps")
        source = f"data size ({counts['median_per_class']} images per class: the table's row)"
    if max_epochs is not None:
        epochs, source = int(max_epochs), "trainer.max_epochs"
    elif steps:
        epochs = epochs_for_steps(
            int(steps), counts["train_size"], batch_size, world_size, accumulate
        )
        if source.startswith("data size") and regime in EPOCH_SCHEDULED:
            # Their schedules count epochs: a large data set's one or two epochs would leave
            # no room for the fine-tuning phase, so never fewer than they had before.
            epochs = max(epochs, DEFAULT_EPOCHS)
    else:
        epochs, source = DEFAULT_EPOCHS, "default"
    budget = {
        "epochs": epochs,
        "steps": epochs * per_epoch,
        "steps_per_epoch": per_epoch,
        "batch_per_device": batch_size,
        "devices": world_size,
        "global_batch": batch_size * world_size * accumulate,
        "accumulate": accumulate,
        "from": source,
    }
    schedule: tuple[tuple[int, int], ...] = ()
    ft_lr_scale = 1.0
    trainable_bn_stats = bool(settings.get("trainable_bn_stats", True))
    if regime == "linear_probe":
        start = 0
    elif regime == "full":
        start = total
    elif regime == "partial":
        start = parse_blocks(settings.get("trainable_blocks", "all"), total)
    elif regime == "gradual":
        start = parse_blocks(settings.get("trainable_blocks", 0), total)
        final = parse_blocks(settings.get("final_blocks", "all"), total, "finetune.final_blocks")
        every = int(settings.get("every_n_epochs", 1))
        step = int(settings.get("blocks_per_step", 1))
        if every < 1 or step < 1:
            raise ConfigError("finetune.every_n_epochs and finetune.blocks_per_step must be >= 1.")
        k, epoch, steps = start, 0, []
        while k < final:
            epoch += every
            k = min(final, k + step)
            steps.append((epoch, k))
        schedule = tuple(steps)
    else:  # lp_ft
        start = 0
        lp = float(settings.get("lp_epochs", 1))
        # a fraction in (0, 1) is a share of the epoch budget
        lp_epochs = max(1, round(lp * epochs)) if lp < 1 else max(1, int(lp))
        schedule = ((lp_epochs, parse_blocks(settings.get("final_blocks", "all"), total)),)
        ft_lr_scale = float(settings.get("ft_lr_scale", 0.1))
    trigger = settings.get("trigger", "epochs")
    if trigger not in ("epochs", "plateau"):
        raise ConfigError(f"finetune.trigger={trigger!r}; choose 'epochs' or 'plateau'.")
    plan = Plan(
        regime=regime,
        total_blocks=total,
        trainable_blocks=start,
        schedule=schedule,
        trigger=trigger,
        patience=int(settings.get("patience", 1)),
        bn_mode=bn_mode,
        trainable_bn_stats=trainable_bn_stats,
        layer_decay=float(settings.get("layer_decay", 1.0)),
        ft_lr_scale=ft_lr_scale,
        epochs=epochs,
        budget=budget,
        rule=rule,
        counts=dict(counts),
    )
    return _with_reason(plan, settings.get("why"))


def with_depth(plan: Plan, blocks: int, measured: dict[str, Any], why: str) -> Plan:
    """``plan`` with ``blocks`` trainable from the start (``finetune=auto``'s measured
    choice): a linear probe at 0, a full fine-tune at all blocks, else partial."""
    regime = ("linear_probe" if blocks == 0 else
              "full" if blocks == plan.total_blocks else "partial")  # fmt: skip
    changed = Plan(**{**plan.__dict__, "regime": regime, "trainable_blocks": blocks,
                      "schedule": (), "measured": measured})  # fmt: skip
    return _with_reason(changed, why)


def _with_reason(plan: Plan, why: str | None) -> Plan:
    c = plan.counts
    what = {
        "linear_probe": "linear probe: backbone frozen, head trains",
        "full": f"full: all {plan.total_blocks} blocks trainable",
        "partial": f"partial: last {plan.trainable_blocks} of {plan.total_blocks} blocks trainable",
        "gradual": f"gradual: {plan.trainable_blocks} → {plan.max_trainable} of "
        f"{plan.total_blocks} blocks, unfreezing at epochs {[e for e, _ in plan.schedule]}",
        "lp_ft": f"lp_ft: linear probe, then {plan.max_trainable} of {plan.total_blocks} blocks "
        f"from epoch {plan.schedule[0][0] if plan.schedule else 0} at "
        f"{plan.ft_lr_scale}× LR",
    }[plan.regime]
    counts = ""
    if c:
        smallest = f"min {c['min_per_class']:,}"
        if c.get("max_per_class", 0) > AUTO_RATIO * max(1, c["min_per_class"]):
            ratio = c["max_per_class"] / max(1, c["min_per_class"])
            smallest = f"smallest class {c['min_per_class']:,}, {ratio:.0f}:1 imbalance"
        counts = (
            f"{c['train_size']:,} training images, {c['median_per_class']:,} per class "
            f"({smallest}) → "
        )
    because = f", because {why}" if why else (" (rule table)" if plan.rule else " (configured)")
    reason = f"{counts}{what}{because}"
    return Plan(**{**plan.__dict__, "reason": reason})
