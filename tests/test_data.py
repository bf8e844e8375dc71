import numpy as np
import pytest
import torch
from PIL import Image

from transferkit.data import AnimalMNISTDataModule, ImageFolderDataModule
from transferkit.data.animal_mnist import CLASSES, load_animal_mnist
from transferkit.data.image_folder import scan_image_folder
from transferkit.data.samples import (
    interleave_classes,
    limit_per_class,
    strata,
    stratified_split,
)
from transferkit.data.transforms import Cutout

from .conftest import write_images


def test_stratified_split_is_balanced_disjoint_and_seeded():
    labels = np.repeat(np.arange(4), 50)
    a = stratified_split(labels, [0.1, 0.2], seed=1, class_names=list("abcd"))
    b = stratified_split(labels, [0.1, 0.2], seed=1, class_names=list("abcd"))
    c = stratified_split(labels, [0.1, 0.2], seed=2, class_names=list("abcd"))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])
    train, val, test = a
    assert len(set(train) | set(val) | set(test)) == 200
    assert np.bincount(labels[val]).tolist() == [5] * 4
    assert np.bincount(labels[test]).tolist() == [10] * 4


def test_split_with_too_few_images_names_the_class():
    labels = np.array([0] * 20 + [1] * 2)
    with pytest.raises(ValueError, match=r"class 'rare' has 2 image\(s\).*val_fraction"):
        stratified_split(labels, [0.1, 0.1], seed=0, class_names=["common", "rare"])


def test_multilabel_strata_pool_small_groups_so_any_label_set_splits():
    names = ["a", "b", "c", "d", "(pooled rare label sets)"]
    # class 2 is on 60 images but the rarest class of only 2 of them (class 3, on 58, is
    # rarer on the rest): grouped alone, those 2 cannot give a validation and a test image
    labels = np.zeros((200, 4), np.int64)
    labels[:100, 0] = labels[100:, 1] = labels[140:, 2] = labels[140:198, 3] = 1
    groups = strata(labels)
    alone = np.where(np.arange(200) >= 198, 2, groups)  # the rarest class, not pooled
    with pytest.raises(ValueError, match=r"class 'c' has 2 image"):
        stratified_split(alone, [0.1, 0.1], seed=0, class_names=names)
    assert (groups[198:] == 0).all()  # the pool of 2 was merged into the largest group
    assert sorted(set(groups.tolist())) == [0, 1, 3]
    val = stratified_split(groups, [0.1, 0.1], seed=0, class_names=names)[1]
    assert labels[val].sum(0).min() > 0  # every class in the validation split
    # two groups of 6 (classes 2 and 3 alone) pool into one group of 12, which splits
    labels = np.zeros((212, 4), np.int64)
    labels[:100, 0] = labels[100:200, 1] = labels[200:206, 2] = labels[206:, 3] = 1
    groups = strata(labels)
    assert (groups[200:] == 4).all() and np.bincount(groups).tolist() == [100, 100, 0, 0, 12]
    stratified_split(groups, [0.1, 0.1], seed=0, class_names=names)


def test_limit_per_class():
    labels = np.repeat(np.arange(3), [5, 20, 30])
    idx = limit_per_class(labels, 10, seed=0)
    assert np.bincount(labels[idx]).tolist() == [5, 10, 10]


def test_interleave_classes_keeps_every_prefix_stratified():
    labels = np.array([0] * 5 + [1] * 5 + [2] * 10)  # grouped by class, as sources give them
    order = interleave_classes(labels)
    assert sorted(order.tolist()) == list(range(len(labels)))  # a permutation
    for k in range(1, len(labels) + 1):
        counts = np.bincount(labels[order[:k]], minlength=3)
        expected = np.array([5, 5, 10]) * k / len(labels)
        assert np.all(np.abs(counts - expected) <= 1), (k, counts)
    within = [i for i in order if labels[i] == 2]
    assert within == sorted(within)  # the order inside a class is kept
    # a rare class is not pushed back behind a large one
    skewed = np.array([0] * 100 + list(range(1, 21)))
    assert set(skewed[interleave_classes(skewed)[:21]]) == set(range(21))


def test_limited_validation_batches_see_every_class():
    """trainer.limit_val_batches=2 (debug=fast) validated on class 0 alone before."""
    dm = AnimalMNISTDataModule(limit_per_class=10, seed=3, batch_size=32)
    dm.setup()
    dm.set_preprocessing({"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"})
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        _, y = next(iter(loader))
        assert torch.bincount(y, minlength=10).min() >= 3  # 32 images, 10 classes
    # the same images (and labels) as the seeded stratified split, only in another order
    images, labels = load_animal_mnist()
    for name, idx in zip(("val", "test"), stratified_split(labels, [0.1, 0.1], 3, CLASSES)[1:],
                         strict=True):  # fmt: skip
        split = dm.splits[name]
        assert split.images is not None
        got = sorted((int(y), x.tobytes()) for x, y in zip(split.images, split.labels, strict=True))
        want = sorted((int(labels[i]), images[i].tobytes()) for i in idx)
        assert got == want, name


def test_animal_mnist_reads_the_package_files():
    images, labels = load_animal_mnist()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * len(CLASSES)
    dm = AnimalMNISTDataModule(limit_per_class=10, seed=3)
    dm.setup()
    assert dm.counts() == {
        "train_size": 100,
        "min_per_class": 10,
        "median_per_class": 10,
        "max_per_class": 10,
        "num_classes": 10,
    }
    assert len(dm.splits["val"]) == 1000 and len(dm.splits["test"]) == 1000
    dm.set_preprocessing({"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"})
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 64, 64)
    assert (x[:, 0] == x[:, 1]).all(), "greyscale becomes 3 equal channels"


def test_image_folder_with_explicit_splits(tmp_path):
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        write_images(tmp_path / split, ["a", "b"], per_class=n)
    dm = ImageFolderDataModule(root=tmp_path)
    dm.setup()
    assert dm.classes == ["a", "b"]
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [12, 4, 6]


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.root=.*missing.*is not a directory"):
        scan_image_folder(tmp_path / "missing")


def test_one_class_is_a_clear_error(tmp_path):
    write_images(tmp_path, ["only"], per_class=4)
    with pytest.raises(ValueError, match="at least 2"):
        scan_image_folder(tmp_path)


def test_empty_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        scan_image_folder(tmp_path)


def test_odd_image_modes_are_converted_and_bad_files_skipped_or_fatal(tmp_path):
    write_images(tmp_path, ["a", "b"], per_class=3)
    Image.new("L", (10, 10), 128).save(tmp_path / "a" / "grey.png")
    Image.new("RGBA", (10, 10), (1, 2, 3, 4)).save(tmp_path / "a" / "rgba.png")
    Image.new("P", (10, 10)).save(tmp_path / "a" / "palette.png")
    Image.new("I;16", (10, 10), 40000).save(tmp_path / "b" / "deep.png")
    Image.new("CMYK", (10, 10), (0, 50, 100, 0)).save(tmp_path / "b" / "cmyk.jpg")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    good = tmp_path / "b" / "000.png"
    (tmp_path / "b" / "truncated.png").write_bytes(good.read_bytes()[:60])
    _, splits = scan_image_folder(tmp_path, on_bad_image="skip")
    train = splits["train"]
    assert len(train) == 6 + 5 and train.bad == [tmp_path / "b" / "truncated.png"]
    for i in range(len(train)):
        assert train.load(i).mode == "RGB"
    with pytest.raises(ValueError, match="on_bad_image=skip"):
        scan_image_folder(tmp_path, on_bad_image="fail")


def test_cutout_zeroes_the_expected_area():
    torch.manual_seed(0)
    img = torch.ones(3, 64, 64)
    out = Cutout(size=8, n_holes=1)(img)
    zeros = (out[0] == 0).sum().item()
    assert 0 < zeros <= 64  # 8x8 inside the image, less where it crosses the border
    # a hole centred well inside the image zeroes exactly size*size pixels on every channel
    torch.manual_seed(1)
    counts = [(Cutout(size=8)(img)[0] == 0).sum().item() for _ in range(50)]
    assert max(counts) == 64 and all(c <= 64 for c in counts)


def test_decode_once_gives_the_same_tensors_as_the_transform(tmp_path):
    from transferkit.data.datamodule import DecodedDataset, ImageDataset

    write_images(tmp_path, ["a", "b"], per_class=3, size=20)
    pre = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.4], "interpolation": "bicubic"}
    dm = ImageFolderDataModule(root=tmp_path, image_size=16, val_fraction=0.34,
                               test_fraction=0.34, augment={"no_aug": True})  # fmt: skip
    dm.setup()
    dm.set_preprocessing(pre)
    for train in (False, True):
        assert isinstance(dm.image_dataset("train", train=train), DecodedDataset)
    lazy = ImageFolderDataModule(root=tmp_path, image_size=16, val_fraction=0.34,
                                 test_fraction=0.34, decode_once=False)  # fmt: skip
    lazy.setup()
    lazy.set_preprocessing(pre)
    slow = lazy.image_dataset("val", train=False)
    fast = dm.image_dataset("val", train=False)
    assert isinstance(slow, ImageDataset) and isinstance(fast, DecodedDataset)
    for i in range(len(slow)):
        torch.testing.assert_close(fast[i][0], slow[i][0], rtol=0, atol=1e-6)
        assert fast[i][1] == slow[i][1]
    # a random training transform is never decoded once
    dm.augment = {"scale": [0.5, 1.0]}
    assert isinstance(dm.image_dataset("train", train=True), ImageDataset)
