"""The LightningDataModule: sources, splits, per-class limits and timm transforms."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm.auto import tqdm

from transferkit import preemption
from transferkit.data.animal_mnist import CLASSES as ANIMAL_CLASSES
from transferkit.data.animal_mnist import load_animal_mnist
from transferkit.data.balance import (
    check_balance,
    class_weights,
    resolve_mode,
    sample_weights,
)
from transferkit.data.device import TensorBatches, decide, device_augment, fits_on_device
from transferkit.data.image_folder import scan_image_folder
from transferkit.data.order import (
    EpochSampler,
    check_shard,
    drop_last,
    next_epoch,
    own_generator,
    resume_skip,
    sample_seed,
    seeded,
    shard_size,
    untag,
    worker_ignores_stop_signals,
)
from transferkit.data.samples import (
    Samples,
    interleave_classes,
    label_of,
    limit_per_class,
    per_class_counts,
    strata,
    stratified_split,
)
from transferkit.data.transforms import build_transform
from transferkit.errors import ConfigError

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Samples plus a transform; yields ``(tensor, label)``.

    Args:
        samples: the images and labels.
        transform: PIL image → tensor.
        seed: for a random transform, the base seed of each image's own random stream
            (see ``transferkit.data.order``); indices are then epoch-tagged.
    """

    def __init__(
        self, samples: Samples, transform: Callable[[Any], torch.Tensor], seed: int | None = None
    ) -> None:
        self.samples, self.transform, self.seed = samples, transform, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        epoch, i = untag(index, len(self.samples))
        image = self.samples.load(i)
        if self.seed is None:
            return self.transform(image), label_of(self.samples.labels, i)
        with seeded(sample_seed(self.seed, epoch, i)):
            return self.transform(image), label_of(self.samples.labels, i)


class DecodedDataset(Dataset):
    """A split decoded, resized and cropped once into a ``uint8`` tensor; each item is only
    scaled and normalised, exactly as ``ToTensor`` + ``Normalize`` would.

    Only for deterministic transforms (evaluation, or training without augmentation).
    """

    def __init__(self, samples: Samples, transform: Any, desc: str = "decoding") -> None:
        steps = list(transform.transforms)
        if len(steps) < 2 or not isinstance(steps[-1], T.Normalize):
            raise TypeError(f"expected [..., ToTensor, Normalize], got {transform}")
        pre = T.Compose(steps[:-2])  # the PIL part: resize, crop
        norm = steps[-1]
        self.mean = torch.as_tensor(norm.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(norm.std, dtype=torch.float32).view(-1, 1, 1)
        first = np.asarray(pre(samples.load(0)))
        self.images = torch.empty(
            (len(samples), first.shape[2], *first.shape[:2]), dtype=torch.uint8
        )
        for i in tqdm(range(len(samples)), desc=desc, leave=False, mininterval=1.0):
            preemption.check()  # a stop request ends decoding within one image
            self.images[i] = torch.from_numpy(np.array(pre(samples.load(i)))).permute(2, 0, 1)
        self.labels = samples.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = index % len(self.labels)  # epoch-tagged by the training sampler
        x = self.images[i].float().div_(255.0)
        return (x - self.mean) / self.std, label_of(self.labels, i)


class ImageDataModule(L.LightningDataModule):
    """Common logic; subclasses implement :meth:`load_source`.

    Args:
        batch_size: images per device and step.
        num_workers: DataLoader worker processes; ``auto``: 0 on CPU (the cores run the
            model), up to 8 when training on a GPU.
        image_size: square input resolution fed to the backbone.
        val_fraction: share of each class held out for validation when the source has no
            validation split.
        test_fraction: likewise for the test split.
        limit_per_class: keep at most this many training images per class (None: all), or
            a list with one limit per class (to make a balanced set imbalanced, say).
        seed: seed of the split and of the subsample.
        augment: options for the training transform (see ``build_transform``).
        crop_pct: evaluation centre-crop fraction (1.0: resize only).
        decode_once: decode and resize each image once into memory when the transform is
            deterministic: ``auto`` (when it fits ``decode_budget_gb``), ``true`` or ``false``.
        decode_budget_gb: memory allowed for decoded images.
        balance: ``none``, ``weighted_loss``, ``sampler`` or ``auto`` (see
            ``transferkit.data.balance``).
        balance_weights: ``inverse``, ``sqrt`` or ``effective`` class weights.
        effective_beta: β of the effective number of samples.
        device_batches: serve batches from device memory without a DataLoader (see
            ``transferkit.data.device``): ``auto`` (on a GPU, when the decoded images fit),
            ``true`` or ``false``.
        device_budget_gb: device memory allowed for the decoded images.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int | str = "auto",
        image_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        limit_per_class: int | list[int] | None = None,
        seed: int = 42,
        augment: Mapping[str, Any] | None = None,
        crop_pct: float = 1.0,
        pin_memory: bool | str = "auto",
        decode_once: str | bool = "auto",
        decode_budget_gb: float = 2.0,
        balance: str = "none",
        balance_weights: str = "inverse",
        effective_beta: float = 0.999,
        device_batches: str | bool = "auto",
        device_budget_gb: float = 4.0,
    ) -> None:
        super().__init__()
        check_balance(balance, balance_weights, effective_beta)
        self.balance, self.balance_weights, self.effective_beta = (
            balance, balance_weights, effective_beta,
        )  # fmt: skip
        self.balance_mode = "none"  # `balance` made concrete by setup() (auto)
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= frac < 1.0:
                raise ConfigError(f"data.{name} must be in [0, 1), got {frac}.")
        if val_fraction + test_fraction >= 1.0:
            raise ConfigError(
                f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} "
                "leaves no training images; lower them."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"data.batch_size must be a whole number >= 1, got {batch_size!r}.")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ConfigError(
                f"data.image_size={image_size!r}: give the square input size in pixels, at "
                "least 8 (e.g. 224, or 64 for small images)."
            )
        if num_workers != "auto" and (not isinstance(num_workers, int) or num_workers < 0):
            raise ConfigError(f"data.num_workers={num_workers!r}: give auto or a number >= 0.")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.image_size = image_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.limit = limit_per_class
        self.seed = seed
        self.augment = dict(augment or {})
        self.crop_pct = crop_pct
        self.pin_memory = pin_memory
        self.decode_once = (
            {True: "true", False: "false"}[decode_once]
            if isinstance(decode_once, bool)
            else str(decode_once)
        )
        if self.decode_once not in ("auto", "true", "false"):
            raise ConfigError(f"data.decode_once={decode_once!r}; choose auto, true or false.")
        self.decode_budget = decode_budget_gb * 2**30
        self.device_batches = (
            {True: "true", False: "false"}[device_batches]
            if isinstance(device_batches, bool)
            else str(device_batches)
        )
        self.device_budget_gb = device_budget_gb
        self._device_choice: tuple[bool, str] | None = None
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._decoded: dict[tuple[str, bool], DecodedDataset] = {}
        #: Frozen-prefix outputs of the splits, kept for the next run on this DataModule
        #: (``finetune=auto``'s rounds and final run): see :mod:`transferkit.caching`.
        self.prefix_features: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.classes: list[str] = []
        self.splits: dict[str, Samples] = {}
        self.preprocessing: dict[str, Any] | None = None

    # -- sources -------------------------------------------------------------------------
    def load_source(self) -> tuple[list[str], dict[str, Samples]]:
        """Class names and the splits the source provides (at least ``train``)."""
        raise NotImplementedError

    # -- Lightning hooks -----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        classes, given = self.load_source()
        train = given["train"]
        fractions = [
            0.0 if "val" in given else self.val_fraction,
            0.0 if "test" in given else self.test_fraction,
        ]
        if any(fractions):
            names = [*classes, "(pooled rare label sets)"]  # multi-label: see strata()
            rest, val_idx, test_idx = stratified_split(strata(train.labels), fractions, self.seed,
                                                       names)  # fmt: skip
            splits = {"train": train.subset(rest)}
            if "val" not in given:
                splits["val"] = train.subset(val_idx)
            if "test" not in given:
                splits["test"] = train.subset(test_idx)
        else:
            splits = {"train": train}
        splits.update({k: v for k, v in given.items() if k != "train"})
        if self.limit is not None:
            if train.labels.ndim == 2:
                raise ConfigError(
                    "data.limit_per_class needs one class per image; with multi-label data "
                    "leave it null."
                )
            splits["train"] = splits["train"].subset(
                limit_per_class(splits["train"].labels, self.limit, self.seed, len(classes))
            )
        for name in ("val", "test"):  # classes take turns: any prefix of a split is stratified
            if len(splits.get(name, ())):
                splits[name] = splits[name].subset(interleave_classes(strata(splits[name].labels)))
        self.classes, self.splits = classes, splits
        if self.multilabel and self.balance not in ("none", "auto"):
            raise ConfigError(
                f"data.balance={self.balance} weighs one class per image; multi-label data "
                "takes data.balance=none (its loss weighs every class on its own)."
            )
        self.balance_mode = "none" if self.multilabel else resolve_mode(
            self.balance, self.per_class()
        )  # fmt: skip
        log.info(
            "data: %d classes; train %d, val %d, test %d images",
            len(classes),
            *(len(splits.get(s, ())) for s in ("train", "val", "test")),
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def multilabel(self) -> bool:
        """Images have sets of classes (``task=multilabel``): labels are 0/1 per class."""
        return self.splits["train"].labels.ndim == 2

    def per_class(self) -> np.ndarray:
        """Training images per class (multi-label: images that have it)."""
        return per_class_counts(self.splits["train"].labels, self.num_classes)

    def counts(self) -> dict[str, int]:
        """Training-set counts the fine-tuning policy uses."""
        per_class = self.per_class()
        return {
            "train_size": len(self.splits["train"]),
            "min_per_class": int(per_class.min()),
            "median_per_class": int(np.median(per_class)),
            "max_per_class": int(per_class.max()),
            "num_classes": self.num_classes,
        }

    def class_weights(self) -> np.ndarray | None:
        """Per-class weights when ``balance`` weighs classes (loss or sampler), else None."""
        if self.balance_mode == "none":
            return None
        return class_weights(self.per_class(), self.balance_weights, self.effective_beta)

    def train_sample_weights(self) -> torch.Tensor | None:
        """Draw weights of the training images for ``balance=sampler``, else None."""
        weights = self.class_weights()
        if self.balance_mode != "sampler" or weights is None:
            return None
        return sample_weights(self.splits["train"].labels, weights)

    def set_preprocessing(self, preprocessing: Mapping[str, Any]) -> None:
        """Take mean/std/interpolation from the model; resolution and crop from the data.
        The same preprocessing again keeps what was decoded (``finetune=auto``'s candidate
        runs share one DataModule)."""
        wanted = {**preprocessing, "image_size": self.image_size, "crop_pct": self.crop_pct}
        if wanted == self.preprocessing:
            return
        self._decoded.clear()
        self._on_device.clear()
        self.prefix_features.clear()
        self.preprocessing = wanted

    def image_dataset(self, split: str, train: bool) -> Dataset:
        """A split with the training (``train``) or evaluation transform; decoded once into
        memory when the transform is deterministic and ``decode_once`` allows it."""
        if split not in self.splits:
            self.setup()
        if self.preprocessing is None:
            raise RuntimeError("call set_preprocessing(model.preprocessing) before training")
        tf = build_transform(self.preprocessing, train=train, augment=self.augment)
        samples = self.splits[split]
        deterministic = not train or bool(self.augment.get("no_aug"))
        size = int(self.preprocessing["image_size"])
        fits = len(samples) * 3 * size * size <= self.decode_budget
        if deterministic and (self.decode_once == "true" or (self.decode_once == "auto" and fits)):
            key = (split, train)
            if key not in self._decoded:
                self._decoded[key] = DecodedDataset(samples, tf, desc=f"decoding {split} images")
            return self._decoded[key]
        return ImageDataset(samples, tf, seed=None if deterministic else self.seed)

    def _decodable(self, split: str) -> bool:
        size = int(self.image_size)
        fits = len(self.splits[split]) * 3 * size * size <= self.decode_budget
        return self.decode_once == "true" or (self.decode_once == "auto" and fits)

    def device(self) -> torch.device:
        """The device this process trains on (the CPU before a trainer is attached)."""
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def device_choice(self) -> tuple[bool, str]:
        """Whether batches come from device memory (``data.device_batches``), and why;
        decided once, when the first loader is built."""
        if self._device_choice is None:
            splits = [s for s in ("train", "val", "test") if len(self.splits.get(s, ()))]
            size = int(self.image_size)
            nbytes = sum(len(self.splits[s]) for s in splits) * 3 * size * size
            _, why = device_augment(self.augment)
            self._device_choice = decide(
                self.device_batches,
                self.device().type == "cuda",  # a trainer on a GPU (not evaluate's loops)
                all(self._decodable(s) for s in splits),
                fits_on_device(nbytes, self.device(), self.device_budget_gb),
                why,
            )
            use, why = self._device_choice
            log.info("batches from device memory: %s (%s)", "yes" if use else "no", why)
        return self._device_choice

    def device_batches_of(self, split: str, train: bool) -> TensorBatches:
        """A split as :class:`TensorBatches` on this process's device: decoded once with the
        evaluation transform; training batches shuffled, sharded and augmented there.
        Evaluation batches hold the whole split, in order, on every rank: under DDP each rank
        validates all of it (the same metrics, without the padding duplicates of a
        ``DistributedSampler``), and the report and the multi-label thresholds, which read
        these loaders on rank 0 alone, see the whole split."""
        decoded = self.image_dataset(split, train=False)
        if not isinstance(decoded, DecodedDataset):
            raise ConfigError(f"the {split} images are not decoded once: set data.decode_once=auto")
        device = self.device()
        if split not in self._on_device:
            labels = np.asarray(decoded.labels)
            y = torch.as_tensor(labels, dtype=torch.float32 if labels.ndim == 2 else torch.long)
            self._on_device[split] = (decoded.images.to(device), y.to(device))
        images, labels_t = self._on_device[split]
        trainer = getattr(self, "trainer", None)
        mean, std = decoded.mean.flatten().tolist(), decoded.std.flatten().tolist()
        if train:
            weights = self.train_sample_weights()
            sampler, drop = training_sampler(len(decoded), self.batch_size, trainer, self.seed,
                                             weights)  # fmt: skip
            augment, _ = device_augment(self.augment)
            return TensorBatches(images, labels_t, self.batch_size, sampler, drop, mean, std,
                                 augment, self.seed)  # fmt: skip
        return TensorBatches(images, labels_t, self.batch_size, None, False, mean, std)

    def _on_gpu(self) -> bool:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return isinstance(trainer.accelerator, CUDAAccelerator)
        return torch.cuda.is_available()

    def loader_settings(self) -> dict[str, Any]:
        """``num_workers`` and ``pin_memory`` with ``auto`` resolved for the accelerator."""
        workers, pin = self.num_workers, self.pin_memory
        if workers == "auto":
            workers = min(8, os.cpu_count() or 1) if self._on_gpu() else 0
        if pin == "auto":
            pin = self._on_gpu()
        return {"num_workers": int(workers), "pin_memory": bool(pin)}

    def _loader(self, split: str, train: bool) -> DataLoader | TensorBatches:
        if self.device_choice()[0]:
            return self.device_batches_of(split, train)
        settings = self.loader_settings()
        dataset = self.image_dataset(split, train)
        if train:
            trainer = getattr(self, "trainer", None)
            weights = self.train_sample_weights()
            return training_loader(
                dataset, self.batch_size, trainer, self.seed, weights, **settings
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            generator=own_generator(self.seed),
            persistent_workers=settings["num_workers"] > 0,
            worker_init_fn=worker_ignores_stop_signals,
            **settings,
        )

    def train_dataloader(self) -> DataLoader | TensorBatches:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | TensorBatches:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader | TensorBatches:
        return self._loader("test", train=False)


def training_loader(
    dataset: Dataset,
    batch_size: int,
    trainer: Any,
    seed: int,
    weights: torch.Tensor | None = None,
    **settings: Any,
) -> DataLoader:
    """The training DataLoader: shuffled by (seed, epoch) with :class:`EpochSampler`, this
    rank's shard under DDP, and the batches a run resumed mid-epoch already trained on
    skipped; a last batch of one image (per rank) is dropped."""
    sampler, drop = training_sampler(len(dataset), batch_size, trainer, seed, weights)  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop,
        generator=own_generator(seed),
        persistent_workers=settings.get("num_workers", 0) > 0,
        worker_init_fn=worker_ignores_stop_signals,
        **settings,
    )


def training_sampler(
    size: int, batch_size: int, trainer: Any, seed: int, weights: torch.Tensor | None = None
) -> tuple[EpochSampler, bool]:
    """The training order (:class:`EpochSampler`: this rank's shard, shuffled per epoch, a
    resumed epoch's batches skipped) and whether to drop the last batch of this rank."""
    world = int(getattr(trainer, "world_size", 1) or 1)
    rank = int(getattr(trainer, "global_rank", 0) or 0)
    check_shard(size, world)
    shard, drop = shard_size(size, world), drop_last(size, batch_size, world)
    batches = shard // batch_size + (shard % batch_size > 0) - drop
    sampler = EpochSampler(
        range(size),
        num_replicas=world,
        rank=rank,
        seed=seed,
        epoch=next_epoch(trainer),
        skip=resume_skip(trainer, batch_size, batches),
        weights=weights,
    )
    return sampler, drop


class AnimalMNISTDataModule(ImageDataModule):
    """The 10,000 Animal-MNIST silhouettes (10 classes) shipped by ``animal-mnist``."""

    def load_source(self) -> tuple[list[str], dict[str, Samples]]:
        images, labels = load_animal_mnist()
        return list(ANIMAL_CLASSES), {"train": Samples(labels=labels, images=images)}


class ImageFolderDataModule(ImageDataModule):
    """Your own images: ``root/<class>/...`` or ``root/{train,val,test}/<class>/...``.

    Args:
        root: the folder.
        on_bad_image: ``skip`` unreadable files (counted in the log) or ``fail``.
        **kwargs: see :class:`ImageDataModule`.
    """

    def __init__(self, root: str | Path, on_bad_image: str = "skip", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root, self.on_bad_image = Path(root), on_bad_image

    def load_source(self) -> tuple[list[str], dict[str, Samples]]:
        return scan_image_folder(self.root, self.on_bad_image)
