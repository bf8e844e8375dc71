"""``data=hf``: a Hugging Face ``datasets`` data set.

``data.path`` is a folder written by ``save_to_disk``, a folder of parquet files or of images
in class folders (``datasets``' imagefolder), a builder name with ``data_files`` or
``data_dir`` (``parquet``, ``imagefolder``), or a name on the Hub (with a network). The image
and label columns are settings; the data set's own splits are used (``validation`` is the
validation split), and the usual stratified split makes the ones it lacks. Images stay
encoded in the data set and are decoded on access, with the same checks as image files.

``datasets`` is an optional extra: ``pip install 'transferkit[hf]'``.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from transferkit.data.datamodule import ImageDataModule
from transferkit.data.files import Skipped, check_on_bad_image, check_split_classes, check_splits
from transferkit.data.files import readable as readable_indices
from transferkit.data.samples import Samples, read_rgb
from transferkit.errors import ConfigError, DataError, MissingPackageError, NotFoundError

log = logging.getLogger(__name__)

#: The data set's split names each of ours is looked up under, in order.
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid", "dev"),
               "test": ("test",)}  # fmt: skip


class HFRecords:
    """The encoded images of one column of a data set (``Image(decode=False)``: dicts with
    ``bytes`` and/or ``path``), at ``indices``."""

    def __init__(self, dataset: Any, column: str, indices: np.ndarray, name: str) -> None:
        self.dataset, self.column, self.indices, self.name = dataset, column, indices, name

    def __len__(self) -> int:
        return len(self.indices)

    def take(self, index: np.ndarray) -> HFRecords:
        return HFRecords(self.dataset, self.column, self.indices[index], self.name)

    def open(self, i: int) -> tuple[IO[bytes] | Path, str]:
        row = int(self.indices[i])
        value = self.dataset[row][self.column]
        name = f"{self.name}[{row}]"
        if isinstance(value, Mapping) and value.get("bytes"):
            return io.BytesIO(value["bytes"]), name
        if isinstance(value, Mapping) and value.get("path"):
            return Path(value["path"]), f"{name} ({value['path']})"
        raise ConfigError(
            f"{name}: column {self.column!r} holds {type(value).__name__}, not an image. "
            "Set data.image_column to the image column."
        )


def _checker(records: HFRecords) -> Callable[[int], None]:
    def check(i: int) -> None:
        read_rgb(*records.open(i))

    return check


def _datasets() -> Any:
    try:
        import datasets
    except ModuleNotFoundError as e:
        raise MissingPackageError(
            "data=hf needs the datasets package, which is not installed. Install it with "
            "pip install 'transferkit[hf]' (or pip install datasets), or use data=csv or "
            "data=image_folder."
        ) from e
    return datasets


def load_hf(path: str, **options: Any) -> dict[str, Any]:
    """The data set's splits (``save_to_disk`` folder, local files, or the Hub).

    Raises:
        NotFoundError: nothing at ``path``, or the Hub cannot be reached.
    """
    datasets = _datasets()
    local = Path(path).expanduser()
    try:
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            loaded = datasets.load_from_disk(str(local))
        else:
            loaded = datasets.load_dataset(path, **{k: v for k, v in options.items() if v})
    except (FileNotFoundError, ConnectionError, OSError) as e:
        hub = "" if local.exists() else (
            " As a Hub name it needs the network (HF_HUB_OFFLINE is "
            f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}); offline, point data.path at a "
            "save_to_disk folder or local files."
        )  # fmt: skip
        raise NotFoundError(f"data.path={path!r}: cannot load it ({e}).{hub}") from e
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


class HFDataModule(ImageDataModule):
    """A Hugging Face data set (see the module docstring).

    Args:
        path: ``save_to_disk`` folder, local data folder, builder name or Hub name.
        name: the data set's configuration name, if it has several.
        data_dir: with a builder name (``imagefolder``), the folder of the data.
        data_files: with a builder name (``parquet``), the files (a path, list or mapping of
            split names to paths).
        image_column: the column of images.
        label_column: the column of labels (``ClassLabel`` names are kept; other values
            become class names); a sequence of labels per image makes it multi-label.
        on_bad_image: ``skip`` images that do not decode (counted) or ``fail``.
        **kwargs: see :class:`ImageDataModule`.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        data_dir: str | None = None,
        data_files: Any = None,
        image_column: str = "image",
        label_column: str = "label",
        on_bad_image: str = "skip",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_on_bad_image(on_bad_image)
        self.path, self.image_column, self.label_column = str(path), image_column, label_column
        if isinstance(data_files, (DictConfig, ListConfig)):  # datasets wants plain containers
            data_files = OmegaConf.to_container(data_files, resolve=True)
        self.load_options = {"name": name, "data_dir": data_dir, "data_files": data_files}
        self.on_bad_image = on_bad_image

    def load_source(self) -> tuple[list[str], dict[str, Samples]]:
        datasets = _datasets()
        found = load_hf(self.path, **self.load_options)
        source = f"data.path={self.path!r}"
        ours = {s: next((found[n] for n in names if n in found), None)
                for s, names in SPLIT_NAMES.items()}  # fmt: skip
        if ours["train"] is None:
            raise ConfigError(f"{source} has the splits {sorted(found)} but no 'train'.")
        parts = {s: ds for s, ds in ours.items() if ds is not None}
        for s, ds in parts.items():
            for key, column in (("image_column", self.image_column),
                                ("label_column", self.label_column)):  # fmt: skip
                if column not in ds.column_names:
                    raise ConfigError(
                        f"data.{key}={column!r} is not a column of {source} ({s}); it has "
                        f"{ds.column_names}."
                    )
        feature = parts["train"].features[self.label_column]
        inner = getattr(feature, "feature", None)  # a sequence of labels: multi-label
        multilabel = inner is not None
        names: Any = inner if multilabel else feature
        named = isinstance(names, datasets.ClassLabel)

        def label_set(value: Any) -> list[str]:
            values = value if multilabel else [value]
            return [names.names[v] if named else str(v) for v in values]

        for s in list(parts):  # a split whose labels are -1 (unlabelled, as on many Hubs)
            values = parts[s][self.label_column]
            flat = [x for v in values for x in (v if multilabel else [v])]
            missing = sum(1 for x in flat if isinstance(x, int) and x < 0)
            if missing and (s == "train" or missing < len(flat)):
                raise DataError(
                    f"{source}: {missing} label(s) of its {s} split are -1 (no label). Give "
                    "every image a label, or leave the split out."
                )
            if missing:
                log.warning("%s: its %s split is unlabelled (-1): left out, taken from train "
                            "instead", source, s)  # fmt: skip
                del parts[s]
        labels = {s: [label_set(v) for v in ds[self.label_column]] for s, ds in parts.items()}
        found_classes = {s: {c for v in sets for c in v} for s, sets in labels.items()}
        classes = list(names.names) if named else check_split_classes(source, found_classes, "")
        index = {c: i for i, c in enumerate(classes)}

        def target(chosen: list[str]) -> Any:
            if not multilabel:
                return index[chosen[0]]
            row = np.zeros(len(classes), dtype=np.int64)
            row[[index[c] for c in chosen]] = 1
            return row

        skipped = Skipped()
        splits = {}
        for s, ds in parts.items():
            encoded = ds.cast_column(self.image_column, datasets.Image(decode=False))
            records = HFRecords(encoded, self.image_column, np.arange(len(ds)), f"{source} {s}")
            kept = np.asarray(
                readable_indices(range(len(records)), _checker(records), self.on_bad_image,
                                 skipped),
                dtype=np.int64,
            )  # fmt: skip
            y = np.asarray([target(labels[s][i]) for i in kept], dtype=np.int64)
            if multilabel and not len(kept):
                y = y.reshape(0, len(classes))
            splits[s] = Samples(labels=y, records=records.take(kept))
        skipped.log(self.path)
        check_splits(source, classes, splits, lambda s: (
            f"{source}: its {s} split has no readable image. Fix it, or leave the split out "
            f"(data.{s}_fraction then takes it from train)."
        ))  # fmt: skip
        return classes, splits
