"""Property tests (hypothesis) of the pure parts: the split, the per-class limit, the class
interleaving, the policy and its budget, parse_blocks, and the training order."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from transferkit.data.datamodule import training_loader
from transferkit.data.order import EpochSampler
from transferkit.data.samples import interleave_classes, limit_per_class, stratified_split
from transferkit.errors import ConfigError, DataError
from transferkit.policy import epochs_for_steps, parse_blocks, resolve_plan, steps_per_epoch

from .conftest import CONF_DIR

FAST = settings(max_examples=60, deadline=None)
class_sizes = st.lists(st.integers(1, 60), min_size=2, max_size=8)
fraction = st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.25, 0.3, 1 / 3])


def _labels(sizes: list[int], seed: int) -> np.ndarray:
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(seed).permutation(labels)  # classes interleaved, as in files


@FAST
@given(sizes=class_sizes, val=fraction, test=fraction, seed=st.integers(0, 2**31 - 1))
def test_split_is_stratified_disjoint_complete_and_deterministic(sizes, val, test, seed):
    labels = _labels(sizes, seed)
    names = [f"c{i}" for i in range(len(sizes))]
    wanted = [[max(1, round(n * f)) if f > 0 else 0 for f in (val, test)] for n in sizes]
    if any(sum(w) >= n for w, n in zip(wanted, sizes, strict=True)):
        with pytest.raises(DataError, match=r"class 'c\d+' has \d+ image\(s\)"):
            stratified_split(labels, [val, test], seed, names)
        return
    parts = stratified_split(labels, [val, test], seed, names)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(labels)))  # disjoint and complete
    for part, f_sizes in zip(parts[1:], zip(*wanted, strict=True), strict=True):
        counts = np.bincount(labels[part], minlength=len(sizes))
        assert counts.tolist() == list(f_sizes)  # every class, in proportion
    assert np.all(np.bincount(labels[parts[0]], minlength=len(sizes)) >= 1)
    again = stratified_split(labels, [val, test], seed, names)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@FAST
@given(sizes=class_sizes, n=st.integers(1, 70), seed=st.integers(0, 1000))
def test_limit_per_class_keeps_at_most_n_of_each_class(sizes, n, seed):
    labels = _labels(sizes, seed)
    keep = limit_per_class(labels, n, seed)
    assert len(set(keep.tolist())) == len(keep) and np.all(np.diff(keep) > 0)
    counts = np.bincount(labels[keep], minlength=len(sizes))
    assert counts.tolist() == [min(n, s) for s in sizes]
    assert np.array_equal(keep, limit_per_class(labels, n, seed))


@FAST
@given(sizes=class_sizes, seed=st.integers(0, 1000))
def test_interleaving_is_a_permutation_that_shows_every_class_first(sizes, seed):
    labels = _labels(sizes, seed)
    order = interleave_classes(labels)
    assert sorted(order.tolist()) == list(range(len(labels)))
    assert set(labels[order[: len(sizes)]].tolist()) == set(range(len(sizes)))


AUTO = OmegaConf.to_container(OmegaConf.load(f"{CONF_DIR}/finetune/table.yaml"), resolve=True)


def _counts(per_class: int, classes: int) -> dict[str, int]:
    return {"train_size": per_class * classes, "min_per_class": per_class,
            "median_per_class": per_class, "num_classes": classes}  # fmt: skip


@FAST
@given(
    per_class=st.integers(1, 5000),
    classes=st.integers(2, 500),
    total=st.integers(1, 60),
    batch=st.integers(1, 512),
    world=st.integers(1, 16),
)
def test_any_counts_give_a_valid_plan(per_class, classes, total, batch, world):
    plan = resolve_plan(AUTO, _counts(per_class, classes), total, batch, world_size=world)
    assert 0 <= plan.trainable_blocks <= plan.max_trainable <= total
    b = plan.budget
    assert plan.epochs == b["epochs"] >= 1 and b["global_batch"] == batch * world
    assert b["steps"] >= plan.rule["steps"] > b["steps"] - b["steps_per_epoch"]  # type: ignore[index]
    assert plan.reason and plan.rule is not None


@FAST
@given(
    sizes=st.lists(st.integers(1, 3000), min_size=2, max_size=6),
    classes=st.integers(2, 100),
    total=st.integers(1, 60),
)
def test_depth_never_shrinks_as_the_data_grows(sizes, classes, total):
    depths = [resolve_plan(AUTO, _counts(n, classes), total).max_trainable for n in sorted(sizes)]
    assert depths == sorted(depths)


@FAST
@given(total=st.integers(1, 100), data=st.data())
def test_parse_blocks(total, data):
    k = data.draw(st.integers(0, total))
    assert parse_blocks(k, total) == k
    assert parse_blocks(data.draw(st.sampled_from(["all", "ALL", "All"])), total) == total
    a, b = sorted(data.draw(st.lists(st.floats(0.001, 0.999), min_size=2, max_size=2)))
    assert 1 <= parse_blocks(a, total) <= parse_blocks(b, total) <= total
    bad = data.draw(st.one_of(
        st.integers(max_value=-1), st.integers(min_value=total + 1), st.booleans(),
        st.floats(1.0001, 1e6).filter(lambda x: not x.is_integer()),
        st.text(min_size=1).filter(lambda s: s.lower() != "all"),
    ))  # fmt: skip
    with pytest.raises(ConfigError) as e:
        parse_blocks(bad, total)
    assert f"trainable_blocks={bad!r}" in str(e.value) and f"0..{total}" in str(e.value)


@FAST
@given(steps=st.integers(1, 10_000), size=st.integers(1, 100_000), batch=st.integers(1, 1024),
       world=st.integers(1, 64))  # fmt: skip
def test_a_step_budget_is_met_with_the_fewest_epochs(steps, size, batch, world):
    per_epoch = steps_per_epoch(size, batch, world)
    epochs = epochs_for_steps(steps, size, batch, world)
    assert epochs * per_epoch >= steps > (epochs - 1) * per_epoch


@FAST
@given(size=st.integers(1, 300), world=st.integers(1, 8), seed=st.integers(0, 10**6),
       epoch=st.integers(0, 50), batch=st.integers(1, 64))  # fmt: skip
def test_training_order_is_a_function_of_seed_and_epoch(size, world, seed, epoch, batch):
    data = list(range(size))
    shards = [list(EpochSampler(data, world, r, seed, epoch)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank takes as many steps
    assert {i % size for s in shards for i in s} == set(data)  # the epoch covers the data
    assert all(i // size == epoch for s in shards for i in s)  # indices carry their epoch
    assert shards == [list(EpochSampler(data, world, r, seed, epoch)) for r in range(world)]
    # a resumed epoch continues exactly where the stopped one was
    done = min(len(shards[0]), 3 * batch)
    resumed = EpochSampler(data, world, 0, seed, epoch, skip=done)
    assert list(resumed) == shards[0][done:]
    assert list(resumed) == shards[0]  # the skip is for one pass only


@FAST
@given(size=st.integers(2, 300), world=st.integers(1, 8), batch=st.integers(2, 64),
       accumulate=st.integers(1, 4))  # fmt: skip
def test_the_training_loaders_of_all_ranks(size, world, batch, accumulate):
    """Each rank's loader (as Lightning would use it under DDP) has no batch of one image,
    as many batches as every other rank, and the policy counts its optimizer steps right."""

    class Trainer:  # what training_loader reads of a trainer
        world_size, global_rank, fit_loop = world, 0, None

    if size <= world:  # a rank would get one image: refused
        with pytest.raises(DataError, match="fewer devices"):
            training_loader(list(range(size)), batch, Trainer(), 0)
        return

    lengths = set()
    for rank in range(world):
        Trainer.global_rank = rank
        batches = [len(b) for b in training_loader(list(range(size)), batch, Trainer(), 0)]
        assert 1 not in batches
        lengths.add(len(batches))
    assert len(lengths) == 1
    assert steps_per_epoch(size, batch, world, accumulate) == math.ceil(lengths.pop() / accumulate)
