"""Batches from device memory (data.device_batches), exercised on CPU tensors: the same
batches as the DataLoader path, the same shards and resumed order, crops and flips that do
what they say, and runs that end where the DataLoader path ends."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.conftest import tiny_overrides
from transferkit.data import ImageFolderDataModule
from transferkit.data.datamodule import training_sampler
from transferkit.data.device import DeviceAugment, TensorBatches, decide, device_augment
from transferkit.errors import ConfigError
from transferkit.finetune import finetune

PRE = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear"}
LIGHT = {"scale": [0.8, 1.0], "ratio": [0.75, 1.3333], "hflip": 0.5, "color_jitter": None,
         "auto_augment": None, "re_prob": 0.0, "cutout": None}  # fmt: skip


def _dm(root, device_batches: str, **kw) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(root, batch_size=5, image_size=16, val_fraction=0.25,
                               test_fraction=0.25, device_batches=device_batches, **kw)  # fmt: skip
    dm.setup()
    dm.set_preprocessing(PRE)
    return dm


def _all(batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in batches]


def test_device_batches_equal_the_dataloaders(image_folder) -> None:
    """Without augmentation, the same images in the same order, scaled alike."""
    loader_dm, device_dm = (
        _dm(image_folder, "false", augment={"no_aug": True}),
        _dm(image_folder, "true", augment={"no_aug": True}),
    )
    for split in ("train", "val", "test"):
        a = _all(getattr(loader_dm, f"{split}_dataloader")())
        tb = getattr(device_dm, f"{split}_dataloader")()
        assert isinstance(tb, TensorBatches)
        b = _all(tb)
        assert len(a) == len(b) == len(tb)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(ya, yb)
            torch.testing.assert_close(xa, xb, rtol=0, atol=1e-6)


def test_ddp_shards_are_disjoint_and_cover_the_split() -> None:
    x = torch.arange(23, dtype=torch.uint8).view(23, 1, 1, 1).expand(23, 3, 2, 2).contiguous()
    y = torch.arange(23)
    seen = []
    for rank in (0, 1):
        trainer = SimpleNamespace(world_size=2, global_rank=rank)
        sampler, drop = training_sampler(23, 4, trainer, seed=3)
        batches = TensorBatches(x, y, 4, sampler, drop, [0.0] * 3, [1 / 255] * 3)
        seen.append(torch.cat([b for _, b in batches]))
    assert len(seen[0]) == len(seen[1]) == 12  # 23 padded to 24, as DistributedSampler does
    assert set(seen[0].tolist()) | set(seen[1].tolist()) == set(range(23))


def test_a_resumed_epoch_continues_with_the_same_batches_and_draws() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (30, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.arange(30)
    aug = DeviceAugment(scale=(0.5, 1.0), hflip=0.5)

    def run(skip: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        sampler, drop = training_sampler(30, 4, None, seed=7)
        sampler.set_epoch(2)
        sampler.skip = skip
        return _all(TensorBatches(x, y, 4, sampler, drop, [0.5] * 3, [0.5] * 3, aug, seed=7))

    full, resumed = run(0), run(3 * 4)
    assert len(resumed) == len(full) - 3
    for (xa, ya), (xb, yb) in zip(full[3:], resumed, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    other_epoch = training_sampler(30, 4, None, seed=7)[0]
    other_epoch.set_epoch(3)
    assert not torch.equal(torch.tensor(list(other_epoch)) % 30, torch.tensor(list(run(0)[0][1])))


def test_flip_and_crop_do_what_they_say() -> None:
    x = torch.rand(6, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    same = DeviceAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)(x, g)
    torch.testing.assert_close(same, x, rtol=0, atol=1e-5)
    flipped = DeviceAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)(x, g)
    torch.testing.assert_close(flipped, x.flip(-1), rtol=0, atol=1e-5)
    ramp = torch.linspace(0, 1, 8).view(1, 1, 1, 8).expand(6, 3, 8, 8)
    crops = DeviceAugment(scale=(0.25, 0.3), ratio=(1.0, 1.0), hflip=0.0)(ramp, g)
    spans = crops[:, 0, 0, -1] - crops[:, 0, 0, 0]  # half the width: about half the ramp
    assert bool((spans < 0.75).all()) and bool((spans > 0.25).all())
    again = DeviceAugment(scale=(0.25, 0.3), ratio=(1.0, 1.0), hflip=0.0)(
        ramp, torch.Generator().manual_seed(1)
    )
    assert not torch.equal(crops, again)


def test_which_augmentations_run_on_the_device() -> None:
    assert device_augment({"no_aug": True}) == (None, None)
    aug, why = device_augment(LIGHT)
    assert isinstance(aug, DeviceAugment) and why is None and aug.scale == (0.8, 1.0)
    _, why = device_augment({**LIGHT, "auto_augment": "rand-m9-mstd0.5"})
    assert why == "augment.auto_augment='rand-m9-mstd0.5' has no device version"
    _, why = device_augment({**LIGHT, "mixup": {"mixup_alpha": 0.2}})
    assert why is None  # mixup is applied to the batch by the model, wherever it is


def test_the_decision() -> None:
    assert decide("auto", on_gpu=True, decodable=True, fits=True, augment_why=None)[0]
    assert not decide("auto", on_gpu=False, decodable=True, fits=True, augment_why=None)[0]
    use, why = decide("auto", on_gpu=True, decodable=True, fits=False, augment_why=None)
    assert not use and "do not fit" in why
    assert decide("true", on_gpu=False, decodable=True, fits=False, augment_why=None)[0]
    with pytest.raises(ConfigError, match="auto_augment"):
        decide("true", True, True, True, "augment.auto_augment='x' has no device version")
    with pytest.raises(ConfigError, match="decode_once=false"):
        decide("true", True, False, True, None)
    with pytest.raises(ConfigError, match="'maybe'"):
        decide("maybe", True, True, True, None)


@pytest.mark.parametrize("regime", ["finetune=full", "finetune=linear_probe"])
def test_a_run_from_device_memory_ends_where_the_dataloader_run_ends(
    image_folder, tmp_path, make_cfg, regime
) -> None:
    """Linear probe: the cached features are batched from device memory too."""
    results = {}
    for setting in ("false", "true"):
        cfg = make_cfg(*tiny_overrides(image_folder, tmp_path / setting, regime, "augment=none",
                                       f"data.device_batches={setting}", "report=false",
                                       "trainer.max_epochs=1"))  # fmt: skip
        summary, objects = finetune(cfg)
        results[setting] = summary
        loader = objects["fit_datamodule"].train_dataloader()
        assert isinstance(loader, TensorBatches) == (setting == "true")
    assert results["true"]["test_acc"] == pytest.approx(results["false"]["test_acc"], abs=1e-6)
    assert results["true"]["test_loss"] == pytest.approx(results["false"]["test_loss"], rel=1e-4)


def test_a_run_with_light_augmentation_on_the_device(image_folder, tmp_path, make_cfg) -> None:
    cfg = make_cfg(*tiny_overrides(image_folder, tmp_path / "run", "augment=light",
                                   "data.device_batches=true", "report=false"))  # fmt: skip
    summary, objects = finetune(cfg)
    loader = objects["fit_datamodule"].train_dataloader()
    assert isinstance(loader, TensorBatches) and loader.augment is not None
    assert summary["global_steps"] > 0 and summary["test_acc"] is not None


def test_device_batches_true_with_an_augmentation_it_lacks_is_refused(image_folder) -> None:
    dm = _dm(image_folder, "true", augment={**LIGHT, "auto_augment": "rand-m9"})
    with pytest.raises(ConfigError, match=r"augment\.auto_augment"):
        dm.train_dataloader()


def test_ranks_draw_their_own_crops() -> None:
    x = torch.full((16, 3, 8, 8), 7, dtype=torch.uint8)
    x[:, :, :, :4] = 200  # the same image everywhere: only the augmentation differs
    aug = DeviceAugment(scale=(0.3, 1.0), hflip=0.5)
    first = []
    for rank in (0, 1):
        sampler, drop = training_sampler(16, 4, SimpleNamespace(world_size=2, global_rank=rank), 3)
        batches = TensorBatches(x, torch.zeros(16, dtype=torch.long), 4, sampler, drop,
                                [0.0] * 3, [1.0] * 3, aug, seed=3)  # fmt: skip
        first.append(next(iter(batches))[0])
    assert not torch.equal(first[0], first[1])


def test_every_rank_evaluates_the_whole_split(image_folder) -> None:
    """Under DDP each rank validates all of it; the report, on rank 0 alone, sees it all."""
    dm = _dm(image_folder, "true", augment={"no_aug": True})
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1, strategy=cpu)
    for split in ("val", "test"):
        seen = torch.cat([y for _, y in getattr(dm, f"{split}_dataloader")()])
        assert len(seen) == len(dm.splits[split])
    train = torch.cat([y for _, y in dm.train_dataloader()])
    assert len(train) == (len(dm.splits["train"]) + 1) // 2  # training is sharded
