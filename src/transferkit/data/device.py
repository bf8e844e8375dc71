"""Batches straight from tensors in device memory: no DataLoader, no workers, no per-image
Python (``data.device_batches``).

A GPU trains a small model at 64 px on tens of thousands of images a second; a DataLoader
that assembles each batch image by image in Python, then copies it to the device, cannot
keep up. When the decoded data set (``data.decode_once``: ``uint8``, resized once) fits in
device memory, it is moved there once, and each batch is one index into it, scaled and
normalised on the device. ``augment=light`` (random resized crop and horizontal flip) runs
there too, as one affine resampling of the whole batch. The frozen-prefix cache's features
are served the same way.

The order is :class:`~transferkit.data.order.EpochSampler`'s, so shuffling per (seed,
epoch), the DDP shards, ``data.balance=sampler`` and a resumed epoch's skip are exactly
those of the DataLoader path; Lightning calls ``set_epoch`` on :attr:`TensorBatches.sampler`
as it does on a DataLoader's. Crops and flips are drawn per (seed, epoch, batch), so a
resumed run draws what it would have drawn.

Large data sets, and augmentations with no device version (AutoAugment, Cutout, colour
jitter, random erasing), keep the worker-based DataLoader.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import SequentialSampler

from transferkit.data.order import sample_seed
from transferkit.errors import ConfigError

#: ``augment`` keys the device path implements, and the values of the others it accepts
#: (those that mean "off").
DEVICE_AUGMENT_KEYS = ("scale", "ratio", "hflip")
OFF_VALUES: dict[str, tuple[Any, ...] | None] = {
    "no_aug": (False,),
    "color_jitter": (None, 0, 0.0),
    "auto_augment": (None,),
    "re_prob": (None, 0, 0.0),
    "cutout": (None,),
    "vflip": (None, 0, 0.0),
    "mixup": None,
}  # fmt: skip  (mixup: a batch transform the LightningModule applies, any value)


class DeviceAugment:
    """Random resized crop and horizontal flip of a batch of images on its device.

    Like torchvision's ``RandomResizedCrop(scale, ratio)`` + ``RandomHorizontalFlip(hflip)``
    but from the already resized image (it was decoded at the training resolution once),
    resampled bilinearly in one ``grid_sample`` call for the whole batch.

    Args:
        scale: range of the crop's area, as a fraction of the image.
        ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        hflip: probability of a horizontal flip.
    """

    def __init__(
        self,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
    ) -> None:
        lo, hi = float(scale[0]), float(scale[1])
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"augment.scale={list(scale)}: give 0 < min <= max <= 1.")
        if not 0.0 < float(ratio[0]) <= float(ratio[1]):
            raise ConfigError(f"augment.ratio={list(ratio)}: give 0 < min <= max.")
        if not 0.0 <= hflip <= 1.0:
            raise ConfigError(f"augment.hflip={hflip}: give a probability in [0, 1].")
        self.scale = (lo, hi)
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.hflip = float(hflip)

    def params(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``(n, 2, 3)`` affine matrices mapping output to input coordinates in [-1, 1]."""
        u = torch.rand(n, 5, generator=generator)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0]
        ratio = torch.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * u[:, 1])
        w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop side over image side
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (1.0 - w) * (2.0 * u[:, 2] - 1.0)  # the crop stays inside the image
        cy = (1.0 - h) * (2.0 * u[:, 3] - 1.0)
        flip = torch.where(u[:, 4] < self.hflip, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        return theta

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        theta = self.params(len(x), generator).to(x.device, x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def device_augment(augment: Mapping[str, Any]) -> tuple[DeviceAugment | None, str | None]:
    """The device version of an ``augment`` config: ``(None, None)`` for none,
    ``(DeviceAugment, None)`` for crops and flips, ``(None, why)`` when it has none."""
    if augment.get("no_aug"):
        return None, None
    for key, value in augment.items():
        if key in DEVICE_AUGMENT_KEYS:
            continue
        off = OFF_VALUES.get(key, ())
        if off is not None and value not in off:
            return None, f"augment.{key}={value!r} has no device version"
    return DeviceAugment(
        scale=augment.get("scale") or (0.08, 1.0),
        ratio=augment.get("ratio") or (3 / 4, 4 / 3),
        hflip=float(augment.get("hflip", 0.5) or 0.0),
    ), None


class TensorBatches:
    """``(x, y)`` batches indexed out of tensors, on whatever device they are on.

    Args:
        inputs: ``uint8`` images ``(N, C, H, W)`` (scaled to [0, 1] and normalised per
            batch), or features (returned as float32).
        labels: ``(N,)`` classes or ``(N, K)`` 0/1 rows, on the same device.
        batch_size: images per batch.
        sampler: indices of one pass (epoch-tagged: taken modulo ``N``), e.g. an
            ``EpochSampler``; ``None``: ``0..N-1`` in order. Lightning reads it (and
            ``batch_sampler``) as it reads a DataLoader's: ``set_epoch``, shuffled or not.
        drop_last: leave out a last, incomplete batch.
        mean, std: per-channel normalisation of ``uint8`` inputs.
        augment: a :class:`DeviceAugment` for training batches.
        seed: base seed of the augmentation's draws.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        sampler: Any = None,
        drop_last: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: DeviceAugment | None = None,
        seed: int = 0,
    ) -> None:
        if len(inputs) != len(labels):
            raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
        self.inputs, self.labels = inputs, labels
        self.sampler = SequentialSampler(range(len(inputs))) if sampler is None else sampler
        self.batch_sampler = None
        self.batch_size, self.drop_last = batch_size, drop_last
        self.augment, self.seed = augment, seed
        self.scaled = inputs.dtype == torch.uint8
        if self.scaled:
            if mean is None or std is None:
                raise ValueError("uint8 images need mean and std")
            shape = (1, -1, 1, 1)
            self.mean = torch.as_tensor(mean, dtype=torch.float32, device=inputs.device).view(shape)
            self.std = torch.as_tensor(std, dtype=torch.float32, device=inputs.device).view(shape)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.inputs)
        epoch = int(getattr(self.sampler, "epoch", 0))
        # Each rank draws its own crops: batch b of rank r of R is draw b * R + r.
        ranks, rank = (
            int(getattr(self.sampler, "num_replicas", 1)),
            int(getattr(self.sampler, "rank", 0)),
        )
        # A resumed epoch skips the batches it trained on: the draws continue from there.
        first = int(getattr(self.sampler, "skip", 0)) // self.batch_size
        order = (
            torch.as_tensor(
                list(self.sampler) if self.sampler is not None else range(n), dtype=torch.long
            )
            % n
        )
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        device = self.inputs.device
        for b, start in enumerate(range(0, stop, self.batch_size)):
            idx = order[start : start + self.batch_size].to(device, non_blocking=True)
            x = self.inputs.index_select(0, idx)
            x = (x.float().div_(255.0) - self.mean) / self.std if self.scaled else x.float()
            if self.augment is not None:
                draw = (first + b) * ranks + rank
                g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, draw))
                x = self.augment(x, g)
            yield x, self.labels.index_select(0, idx)


def fits_on_device(nbytes: int, device: torch.device, budget_gb: float) -> bool:
    """Whether ``nbytes`` fit the budget and (on CUDA) a quarter of the GPU's memory. The
    total, not what is free now, so that every rank of a DDP run decides alike."""
    if nbytes > budget_gb * 2**30:
        return False
    if device.type == "cuda":
        return nbytes <= torch.cuda.get_device_properties(device).total_memory / 4
    return True


def decide(
    setting: str, on_gpu: bool, decodable: bool, fits: bool, augment_why: str | None
) -> tuple[bool, str]:
    """Whether to batch from device memory (``data.device_batches``), and why.

    Raises:
        ConfigError: ``true`` where it cannot work, naming what stands in the way.
    """
    if setting not in ("auto", "true", "false"):
        raise ConfigError(f"data.device_batches={setting!r}; choose auto, true or false.")
    if setting == "false":
        return False, "data.device_batches=false"
    blocker = augment_why or (
        None if decodable else "the images are not decoded once (data.decode_once=false)"
    )
    if setting == "true":
        if blocker:
            raise ConfigError(
                f"data.device_batches=true, but {blocker}; use augment=none or augment=light, "
                "data.decode_once=auto, or data.device_batches=auto."
            )
        return True, "data.device_batches=true"
    if not on_gpu:
        return False, "on CPU the model, not the data, limits training"
    if blocker:
        return False, blocker
    if not fits:
        return False, "the decoded images do not fit data.device_budget_gb or the GPU memory"
    return True, "the decoded images fit in GPU memory"
