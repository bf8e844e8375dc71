"""Frozen-prefix feature caching.

Frozen blocks (with frozen BatchNorm) give the same output for the same input, so when the
training transform is deterministic their work need not be redone every epoch: compute the
frozen prefix once per image, then train the rest of the network on the cached outputs.

The outputs are also kept on the image DataModule (``prefix_features``), keyed by split and a
fingerprint of the prefix (its modules, parameters and buffers, and the device, memory format
and float32 settings they run with: :meth:`Split.fingerprint`): a later run on the same
DataModule with the same frozen prefix takes them instead of computing them again. That is
``finetune=auto``: a candidate's next round and the winner's final run reuse its features,
and a shallower candidate, whose frozen prefix starts with a deeper one's, runs only its
further modules on the deeper one's features (the race runs the deepest first).
What is kept stays within ``finetune.cache_memory_gb`` (the oldest go first).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from timm.layers import DropBlock2d, DropPath
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import ResNet
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from transferkit import preemption
from transferkit.data.datamodule import training_loader, training_sampler
from transferkit.data.device import TensorBatches, fits_on_device
from transferkit.data.order import own_generator
from transferkit.errors import ConfigError
from transferkit.policy import Plan

log = logging.getLogger(__name__)

HEAD_MODULES = {"global_pool", "fc", "classifier", "head", "head_drop", "fc_norm"}
#: Families whose ``forward_features`` is a plain chain of their children.
SEQUENTIAL_FAMILIES = (EfficientNet, ResNet)


def flat_modules(backbone: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The feature extractor as an ordered chain of modules, ``nn.Sequential`` expanded;
    ``None`` for families whose forward is not such a chain."""
    if not isinstance(backbone, SEQUENTIAL_FAMILIES):
        return None
    out: list[tuple[str, nn.Module]] = []

    def expand(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, nn.Sequential):
                expand(f"{full}.", child)
            else:
                out.append((full, child))

    for name, child in backbone.named_children():
        if name in HEAD_MODULES:
            continue
        if isinstance(child, nn.Sequential):
            expand(f"{name}.", child)
        else:
            out.append((name, child))
    return out


class _Head(nn.Module):
    """The backbone's ``forward_head`` (global pooling; its classifier is an Identity, as the
    model's own head is separate) as the last step of a whole-backbone prefix, so that the
    prefix is the chain of blocks the partial prefixes start with."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        for name, child in backbone.named_children():
            if name in HEAD_MODULES:  # also registered here: fingerprinted, set to eval
                self.add_module(name, child)
        self._backbone = [backbone]  # a list: not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # its dropout (drop_rate) follows the backbone's training flag; a backbone with a
        # drop_rate is never cached whole (cache_decision)
        return self._backbone[0].forward_head(x)  # type: ignore[operator]


class Split(nn.Module):
    """``backbone(x) == suffix(prefix(x))`` in eval mode; ``cut`` modules in the prefix
    (``None``: the whole backbone, its blocks then its ``forward_head`` where the family is
    a chain of blocks).

    Holds references to the backbone's own modules (not copies), so training the suffix
    trains the backbone.
    """

    def __init__(self, backbone: nn.Module, cut: int | None) -> None:
        super().__init__()
        self.whole_backbone = cut is None
        chain = flat_modules(backbone)
        modules = chain or []
        # lists, not registered submodules: the backbone owns the parameters
        self._prefix: list[nn.Module]
        if cut is not None:
            self._prefix = [m for _, m in modules[:cut]]
            self._names = [n for n, _ in modules[:cut]]
        elif chain is not None:
            self._prefix = [m for _, m in chain] + [_Head(backbone)]
            self._names = [n for n, _ in chain] + [""]  # the head's children: their own names
        else:
            self._prefix = [backbone]
            self._names = [""]
        self._rest = [m for _, m in modules[cut:]] if cut is not None else []
        self._backbone = [backbone]

    def fingerprints(self) -> list[str]:
        """A digest of what each initial part of the prefix computes, ``[k - 1]`` of its
        first ``k`` modules: each module's structure, parameters and buffers, and how they
        are computed with (device, memory format, float32 matmul and TF32 settings, which
        pick other kernels): same fingerprint, same outputs for the same inputs in eval
        mode. A prefix that starts with another's modules starts with its digests, so the
        features kept for the shorter one can be taken further
        (:class:`CachedFeatureDataModule`)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{torch.get_float32_matmul_precision()}:{torch.backends.cudnn.allow_tf32}:"
                 f"{torch.backends.cuda.matmul.allow_tf32}".encode())  # fmt: skip
        out = []
        for i, m in enumerate(self._prefix):
            h.update(f"{i}:{m!r}".encode())
            for name, t in itertools.chain(m.named_parameters(), m.named_buffers()):
                nhwc = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:{t.device}:{nhwc}".encode())
                flat = t.detach().cpu().contiguous().reshape(-1)
                h.update(flat.view(torch.uint8).numpy().tobytes())
            out.append(h.copy().hexdigest())
        return out

    def fingerprint(self) -> str:
        """The digest of the whole prefix (:meth:`fingerprints`)."""
        return self.fingerprints()[-1]

    def prefix(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The prefix's output; ``start``: ``x`` is the output of its first ``start``
        modules."""
        for m in self._prefix[start:]:
            x = m(x)
        return x

    def suffix(self, x: torch.Tensor) -> torch.Tensor:
        if self.whole_backbone:
            return x
        for m in self._rest:
            x = m(x)
        return self._backbone[0].forward_head(x)  # type: ignore[operator]


def find_cut(backbone: nn.Module, trainable: set[str]) -> int | None:
    """Number of leading modules with no trainable parameter (``None``: unsupported family).

    Raises:
        ValueError: nothing is frozen at the front.
    """
    modules = flat_modules(backbone)
    if modules is None:
        return None
    for i, (name, m) in enumerate(modules):
        if any(f"{name}.{p}" in trainable for p, _ in m.named_parameters()):
            return i
    return len(modules)


def random_modules(modules: list[nn.Module], names: list[str] | None = None) -> list[str]:
    """Modules among ``modules`` (and inside them) that are random in training: dropout of
    any kind with ``p > 0``, stochastic depth and DropBlock with ``drop_prob > 0``; named
    within the backbone where ``names`` gives each of ``modules``' name there."""
    found = []
    for i, top in enumerate(modules):
        base = names[i] if names else ""
        for sub, m in top.named_modules():
            name = ".".join(part for part in (base, sub) if part)
            if isinstance(m, nn.modules.dropout._DropoutNd):
                rate = m.p
            elif isinstance(m, (DropPath, DropBlock2d)):
                rate = m.drop_prob
            else:
                continue
            if rate:
                found.append(f"{name or type(top).__name__} ({type(m).__name__} {rate:g})")
    return found


def cache_decision(
    mode: str | bool,
    plan: Plan,
    backbone: nn.Module,
    trainable: set[str],
    augment: Mapping[str, Any],
    mixup: bool,
) -> tuple[Split | None, str]:
    """Whether and where to cache, with the reason for the log.

    Raises:
        ValueError: an unknown ``mode``.
    """
    mode = {True: "true", False: "false"}[mode] if isinstance(mode, bool) else str(mode)
    if mode not in ("auto", "true", "false"):
        raise ConfigError(f"finetune.cache_features={mode!r}; choose auto, true or false.")
    if mode == "false":
        return None, "off (finetune.cache_features=false)"
    why_not = None
    if plan.schedule:
        why_not = f"the {plan.regime} schedule unfreezes blocks during training"
    elif plan.bn_mode != "frozen":
        why_not = f"finetune.bn_mode={plan.bn_mode} changes frozen BatchNorm statistics"
    elif not augment.get("no_aug"):
        why_not = ("the training transform is random (augmentation on); use augment=none to "
                   "cache")  # fmt: skip
    elif mixup:
        why_not = "mixup mixes input images"
    split = None
    if why_not is None:
        if plan.trainable_blocks == 0 and not any(p.requires_grad for p in backbone.parameters()):
            split = Split(backbone, None)
        else:
            cut = find_cut(backbone, trainable)
            if cut is None:
                why_not = (f"{type(backbone).__name__} is not a chain of blocks transferkit "
                           "can split (supported: EfficientNet, ResNet families)")  # fmt: skip
            elif cut == 0:
                why_not = "nothing is frozen at the input end"
            else:
                split = Split(backbone, cut)
    if split is not None:  # what is cached must not be random in training
        random = random_modules(split._prefix, split._names)
        # EfficientNet and ResNet apply their drop_rate functionally, in forward_head
        drop_rate = float(getattr(backbone, "drop_rate", 0.0) or 0.0)
        if split.whole_backbone and drop_rate > 0:
            random.append(f"forward_head (dropout {drop_rate:g})")
        if random:
            split, why_not = None, f"the cached part is random in training: {', '.join(random)}"
    if split is None:
        reason = f"off: {why_not}"
        if mode == "true":
            log.warning("feature caching requested but %s", reason)
        return None, reason
    where = "the whole backbone" if split.whole_backbone else f"{len(split._prefix)} modules"
    return split, f"on: frozen prefix ({where}) computed once per image"


CPU_CACHE_BATCH = 64


@torch.no_grad()
def compute_features(
    split: Split,
    dataset: Dataset,
    batch_size: int,
    budget_bytes: float,
    disk_dir: Path,
    name: str,
    start: int = 0,
) -> tuple[torch.Tensor | np.ndarray, torch.Tensor]:
    """Prefix outputs and labels of a whole dataset, in batches of ``batch_size`` (at most
    ``CPU_CACHE_BATCH`` on a CPU); ``start``: the dataset holds the outputs of the prefix's
    first ``start`` modules.

    float32 when it fits ``budget_bytes``, else float16, else a float16 memory-mapped file
    under ``disk_dir``.
    """
    device = next((p.device for m in split._prefix for p in m.parameters()), torch.device("cpu"))
    if device.type == "cpu":  # large batches run slower on CPUs (1024: 2x the time of 64)
        batch_size = min(batch_size, CPU_CACHE_BATCH)
    loader = DataLoader(dataset, batch_size=batch_size, generator=own_generator())
    x0, y0 = next(iter(loader))
    probe = split.prefix(x0[:1].to(device), start)
    n = len(dataset)  # type: ignore[arg-type]
    shape = (n, *probe.shape[1:])
    need = float(np.prod(shape)) * 4
    dtype: Any = torch.float32
    store: torch.Tensor | np.ndarray
    if need <= budget_bytes:
        store = torch.empty(shape, dtype=torch.float32)
    elif need / 2 <= budget_bytes:
        dtype = torch.float16
        store = torch.empty(shape, dtype=torch.float16)
    else:
        disk_dir.mkdir(parents=True, exist_ok=True)
        rank = int(os.environ.get("LOCAL_RANK", 0)) + 1000 * int(os.environ.get("NODE_RANK", 0))
        file = disk_dir / f"{name}.rank{rank}.npy"  # one file per process: ranks never share one
        store = np.lib.format.open_memmap(file, mode="w+", dtype=np.float16, shape=shape)
    y0 = torch.as_tensor(y0)
    labels = torch.empty((n, *y0.shape[1:]), dtype=y0.dtype)  # classes, or 0/1 rows
    i = 0
    try:
        log.info("caching %s: %d x %s = %.1f MB as %s", name, n, tuple(shape[1:]), need / 2**20,
                 "float16 on disk" if isinstance(store, np.ndarray) else str(dtype))  # fmt: skip
        for x, y in tqdm(loader, desc=f"caching {name} features", leave=False):
            preemption.check()  # a stop request ends caching within one batch
            f = split.prefix(x.to(device), start).cpu()
            if isinstance(store, np.ndarray):
                store[i : i + len(x)] = f.numpy().astype(np.float16)
            else:
                store[i : i + len(x)] = f.to(store.dtype)
            labels[i : i + len(x)] = y
            i += len(x)
    except BaseException:
        if isinstance(store, np.memmap):  # no half-written cache file is left behind
            del store
            file.unlink(missing_ok=True)
        raise
    return store, labels


def keep(
    store: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]],
    key: tuple[str, str],
    features: torch.Tensor | np.ndarray,
    labels: torch.Tensor,
    budget_bytes: float,
) -> bool:
    """Keep ``features`` in ``store`` for a later run, dropping the oldest entries to stay
    within ``budget_bytes``; features on disk (a memory map) are not kept. Whether kept."""
    if not isinstance(features, torch.Tensor):
        return False
    size = features.numel() * features.element_size()
    if size > budget_bytes:
        return False
    store.pop(key, None)

    def held() -> int:
        return sum(f.numel() * f.element_size() for f, _ in store.values())

    while store and size + held() > budget_bytes:
        store.pop(next(iter(store)))
    store[key] = (features, labels)
    return True


def used(
    store: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]], key: tuple[str, str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``store[key]``, moved last: the most recently used is the last that ``keep`` drops."""
    store[key] = entry = store.pop(key)
    return entry


class FeatureDataset(Dataset):
    def __init__(self, features: torch.Tensor | np.ndarray, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = index % len(self.labels)  # epoch-tagged by the training sampler
        f = self.features[i]
        f = torch.from_numpy(np.asarray(f)) if isinstance(f, np.ndarray) else f
        return f.float(), self.labels[i]


class CachedFeatureDataModule(L.LightningDataModule):
    """Serves cached prefix outputs of an image DataModule's splits, same batching."""

    def __init__(self, source: Any, split: Split, budget_gb: float, disk_dir: Path) -> None:
        super().__init__()
        self.source, self.split = source, split
        self.budget, self.disk_dir = budget_gb * 2**30, disk_dir
        self.datasets: dict[str, FeatureDataset] = {}
        self._device_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fingerprint: str | None = None
        self._fingerprints: list[str] = []

    @property
    def prefix_key(self) -> str | None:
        """The fingerprint its features are kept under (once the first split is built)."""
        return self._fingerprint

    def _build(self, name: str) -> None:
        """Run the prefix over split ``name`` once, on the device the model is on by then.
        Each split is computed when first asked for: a run that does not test never
        computes the test split's features (the prefix is frozen, so later is the same).
        Where an earlier run on the DataModule kept the float32 features of a prefix this
        one starts with (a deeper candidate of ``finetune=auto``), only the modules after
        it run, on those features: the same computation, not repeated."""
        if name in self.datasets or not len(self.source.splits.get(name, ())):
            return
        store = getattr(self.source, "prefix_features", None)
        if store is not None and self._fingerprint is None:  # the prefix is frozen: once
            self._fingerprints = self.split.fingerprints()
            self._fingerprint = self._fingerprints[-1]
        key = (name, self._fingerprint or "") if store is not None else None
        if store is not None and key is not None and key in store:
            log.info("%s features of this frozen prefix reused from an earlier run", name)
            self.datasets[name] = FeatureDataset(*used(store, key))
            return
        start, kept = 0, None
        if store is not None:  # the longest kept start of this prefix, exact (float32) only
            for k in range(len(self._fingerprints) - 1, 0, -1):
                found = (name, self._fingerprints[k - 1])
                kept = store.get(found)
                if kept is not None and kept[0].dtype == torch.float32:
                    start, kept = k, used(store, found)
                    break
                kept = None
        was_training = [m.training for m in self.split._prefix]
        for m in self.split._prefix:
            m.eval()
        try:
            if kept is not None:
                log.info("%s features: the frozen prefix goes on from the features kept for "
                         "its first %d modules", name, start)  # fmt: skip
                source: Dataset = FeatureDataset(*kept)
            else:
                source = self.source.image_dataset(name, train=name == "train")
            feats, labels = compute_features(
                self.split, source, self.source.batch_size, self.budget, self.disk_dir, name,
                start,
            )  # fmt: skip
            self.datasets[name] = FeatureDataset(feats, labels)
            if store is not None and key is not None:
                keep(store, key, feats, labels, self.budget)
        finally:
            for m, t in zip(self.split._prefix, was_training, strict=True):
                m.train(t)

    def _loader(self, name: str, train: bool) -> DataLoader | TensorBatches:
        # training and validation go together, training first (as Lightning's sanity check
        # asks for validation first, a stop while caching then leaves no file behind); the
        # test split only when a test asks for it
        for split in ("train", "val") if name in ("train", "val") else (name,):
            self._build(split)
        ds = self.datasets[name]
        batch = self.source.batch_size
        trainer = getattr(self, "trainer", None)
        if getattr(self.source, "trainer", None) is None:  # it decides where batches come from
            self.source.trainer = trainer
        weights = self.source.train_sample_weights() if train else None
        on_device = self._on_device(name, ds)
        if on_device is not None:  # the features live on the device; batches index them there
            feats, labels = on_device
            if train:
                sampler, drop = training_sampler(len(ds), batch, trainer, self.source.seed, weights)
                return TensorBatches(feats, labels, batch, sampler, drop)
            return TensorBatches(feats, labels, batch)  # the whole split (see device_batches_of)
        if train:
            return training_loader(ds, batch, trainer, self.source.seed, weights)
        return DataLoader(ds, batch_size=batch, generator=own_generator())

    def _on_device(self, name: str, ds: FeatureDataset) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The split's features and labels moved to the device once, when the source batches
        from device memory and they fit there too; else ``None``."""
        if name in self._device_cache:
            return self._device_cache[name]
        feats = ds.features
        if not self.source.device_choice()[0] or not isinstance(feats, torch.Tensor):
            return None
        device = self.source.device()
        nbytes = feats.numel() * feats.element_size()
        if not fits_on_device(nbytes, device, self.source.device_budget_gb):
            log.info("cached %s features (%.0f MB) stay in host memory", name, nbytes / 2**20)
            return None
        self._device_cache[name] = (feats.to(device), torch.as_tensor(ds.labels).to(device))
        return self._device_cache[name]

    def train_dataloader(self) -> DataLoader | TensorBatches:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader | TensorBatches:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader | TensorBatches:
        return self._loader("test", False)
