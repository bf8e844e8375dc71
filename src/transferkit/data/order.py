"""The order and the randomness of training data, as a function of (seed, epoch, index) alone.

A run stopped anywhere, even in the middle of an epoch, resumes exactly when what it trains
on next does not depend on the state of a generator at the moment it stopped:

- :class:`EpochSampler` shuffles with a generator seeded by ``seed + epoch`` (a
  ``DistributedSampler``, so each DDP rank takes its shard and Lightning keeps it as it is)
  and tags every index with its epoch (``index + epoch * N``). A resumed epoch skips the
  batches that were already trained on.
- :func:`sample_seed` and :func:`seeded` give each (epoch, index) its own random stream for
  augmentation, in the main process and in loader workers alike, so neither the number of
  workers nor their generators change what an image becomes.

Dropout and mixup draw from the global generators in the training step; ``RNGState``
(``checkpoint_io``) saves those in every checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler, get_worker_info

from transferkit.errors import DataError
from transferkit.preemption import STOP_SIGNALS


def untag(index: int, size: int) -> tuple[int, int]:
    """``(epoch, i)`` of an epoch-tagged index of a data set of ``size`` items."""
    return divmod(int(index), size)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one image in one epoch, well mixed (NumPy's ``SeedSequence``)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2)
    return int(state[0]) << 31 ^ int(state[1])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's CPU generator, NumPy's and Python's seeded by ``seed``, and
    give them back their state afterwards (CUDA generators are left alone).

    In a DataLoader worker the state is not given back: every item seeds it anew, and
    saving NumPy's state would cost 70 µs an image. In the main process it is, so the
    training step's dropout and mixup draws do not depend on the data.
    """
    if get_worker_info() is not None:
        torch.default_generator.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        yield
        return
    torch_state = torch.default_generator.get_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.default_generator.set_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


def worker_ignores_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: SLURM signals every process of a job step, loader
    workers included; a worker killed by SIGTERM would fail the main process's next batch
    before it can stop cleanly. Workers ignore it and end with the main process."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def own_generator(seed: int = 0) -> torch.Generator:
    """A generator for a DataLoader. Without one, every iterator a DataLoader creates draws
    its workers' base seed from the global generator, so building a loader (the feature
    cache, a validation pass, a resumed epoch) would shift the dropout and mixup draws."""
    return torch.Generator().manual_seed(seed)


class EpochSampler(DistributedSampler):
    """Shuffled, epoch-tagged indices of this rank's shard; ``skip`` drops the first indices
    of the next pass only (the batches a resumed epoch already trained on).

    Args:
        dataset: the training data set (only its length is used).
        num_replicas: processes training together (1 without DDP).
        rank: this process's global rank.
        seed: base seed; epoch ``e`` is shuffled with ``seed + e``, on every rank alike.
        epoch: the epoch of the next pass (Lightning calls ``set_epoch`` too).
        skip: indices of this rank's shard to leave out of the next pass.
        weights: per-image draw weights (``data.balance=sampler``): each epoch then draws
            as many images as the data set has, with replacement, in proportion to them,
            the same draw on every rank, and each rank takes its own disjoint share.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int,
        rank: int,
        seed: int,
        epoch: int = 0,
        skip: int = 0,
        weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            dataset,  # type: ignore[arg-type]
            num_replicas=num_replicas,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=False,
        )
        self.epoch = epoch
        self.skip = skip
        self.weights = weights

    def __iter__(self) -> Iterator[int]:
        size = len(self.dataset)  # type: ignore[arg-type]
        start, self.skip = self.skip, 0
        if self.weights is None:
            indices = list(super().__iter__())
        else:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            drawn = torch.multinomial(self.weights, self.total_size, True, generator=g)
            indices = drawn[self.rank : self.total_size : self.num_replicas].tolist()
        return iter([i + self.epoch * size for i in indices[start:]])


def shard_size(size: int, world_size: int) -> int:
    """Images per rank and epoch: ``DistributedSampler`` pads the split to a multiple."""
    return math.ceil(size / max(1, world_size))


def check_shard(size: int, world_size: int) -> None:
    """Refuse a training split that leaves a rank fewer than two images per epoch.

    Raises:
        DataError: with the fix (fewer devices, or more images).
    """
    if shard_size(size, world_size) < 2:
        raise DataError(
            f"{size} training image(s) on {world_size} devices leave each device fewer than "
            "2 per epoch, too few to train on (BatchNorm needs 2). Use fewer devices "
            "(trainer.devices) or more images."
        )


def drop_last(size: int, batch_size: int, world_size: int) -> bool:
    """Drop a rank's last batch only when it would hold one image (BatchNorm cannot train
    on it); decided on the rank's shard, not the whole split."""
    return shard_size(size, world_size) % batch_size == 1


def next_epoch(trainer: Any) -> int:
    """The epoch the next training pass belongs to, as Lightning will tell the sampler
    (``set_epoch``). ``trainer.current_epoch`` still says 0 when a run resumed from the end
    of an epoch builds its loader, and loader workers draw their first indices at once."""
    loop = getattr(trainer, "fit_loop", None)
    return int(loop.epoch_progress.current.processed) if loop is not None else 0


def resume_skip(trainer: Any, batch_size: int, batches: int) -> int:
    """Indices of this rank's shard that a run resumed mid-epoch has already trained on
    (0 when it resumes at an epoch's end: the next epoch starts afresh)."""
    loop = getattr(trainer, "fit_loop", None)
    if loop is None or not loop.restarting:
        return 0
    done = int(loop.epoch_loop.batch_progress.current.completed)
    return done * batch_size if done < batches else 0
