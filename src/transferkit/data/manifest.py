"""``data=csv``: images listed in a CSV or TSV manifest.

One row per image: a path column (relative to the manifest's folder, or absolute) and a
label column, optionally a split column (``train``/``val``/``test``). Kaggle-style
manifests that give an id instead of a path take a template: ``path_template:
train/{id}.jpg`` formats each row's columns into a path. Without a split column the usual
stratified split is made. Every file goes through the same checks as an image folder.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.data.datamodule import ImageDataModule
from transferkit.data.files import (
    Skipped,
    check_on_bad_image,
    check_split_classes,
    check_splits,
    read_files,
)
from transferkit.data.samples import Samples
from transferkit.errors import ConfigError, DataError, NotFoundError

#: Values of the split column, and the split each one means.
SPLIT_VALUES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                "test": "test"}  # fmt: skip


def _delimiter(path: Path, text: str, delimiter: str | None) -> str:
    if delimiter:
        return delimiter
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    try:
        return csv.Sniffer().sniff(text[:4096], delimiters=",\t;").delimiter
    except csv.Error:
        return ","


def read_rows(path: Path, delimiter: str | None = None) -> list[dict[str, str]]:
    """The manifest's rows as dicts of its header's columns.

    Raises:
        NotFoundError: no such file.
        DataError: no header or no rows, or rows with more or fewer fields than the header.
    """
    if not path.is_file():
        raise NotFoundError(
            f"data.manifest={str(path)!r} does not exist. Point it at a CSV or TSV file with "
            "a header row (e.g. path,label)."
        )
    text = path.read_text(encoding="utf-8-sig")  # a BOM from spreadsheet exports is dropped
    reader = csv.DictReader(text.splitlines(), delimiter=_delimiter(path, text, delimiter))
    rows = list(reader)
    if not reader.fieldnames or not rows:
        raise DataError(f"data.manifest={str(path)!r} has no header row or no rows.")
    ragged = [i + 2 for i, r in enumerate(rows) if None in r]  # DictReader's extra fields
    if ragged:
        raise DataError(
            f"data.manifest={str(path)!r}: line(s) {ragged[:5]} have more fields than the "
            f"header {reader.fieldnames}. Quote values that contain the delimiter."
        )
    short = [i + 2 for i, r in enumerate(rows) if None in r.values()]  # missing fields
    if short:
        raise DataError(
            f"data.manifest={str(path)!r}: line(s) {short[:5]} have fewer fields than the "
            f"header {reader.fieldnames}. Give every row a value for each column (empty "
            "values still need their delimiter)."
        )
    return rows


def read_manifest(
    manifest: str | Path,
    path_column: str = "path",
    label_column: str = "label",
    split_column: str | None = None,
    path_template: str | None = None,
    delimiter: str | None = None,
    on_bad_image: str = "skip",
    label_separator: str | None = None,
) -> tuple[list[str], dict[str, Samples]]:
    """Class names and the splits a manifest gives (``train``, and ``val``/``test`` when it
    has a split column that uses them).

    Raises:
        NotFoundError: no manifest, or no readable image in it.
        ConfigError: a column the settings name is not in the header, or a template that
            names one that is not.
        DataError: an empty class (single-label), an unknown split value, classes that
            differ between the splits, or a bad image with ``on_bad_image=fail``.
    """
    check_on_bad_image(on_bad_image)
    path = Path(manifest).expanduser()
    rows = read_rows(path, delimiter)
    source = f"data.manifest={str(path)!r}"
    header = list(rows[0])
    wanted = {"data.label_column": label_column}
    if path_template is None:
        wanted["data.path_column"] = path_column
    if split_column:
        wanted["data.split_column"] = split_column
    for key, column in wanted.items():
        if column not in header:
            raise ConfigError(f"{key}={column!r} is not a column of {source}; it has {header}.")
    files, labels, splits_of = [], [], []
    for line, row in enumerate(rows, start=2):
        files.append(path.parent / _file_of(row, path_column, path_template, source, line))
        labels.append(row[label_column].strip())
        if not labels[-1] and label_separator is None:  # multi-label: no class is a label
            raise DataError(
                f"{source} line {line}: the {label_column!r} column is empty. Give the "
                "image's class, or drop the row."
            )
        split = row[split_column].strip().lower() if split_column else "train"
        if split not in SPLIT_VALUES:
            raise DataError(
                f"{source} line {line}: {split_column}={split!r}; use one of "
                f"{sorted(SPLIT_VALUES)}."
            )
        splits_of.append(SPLIT_VALUES[split])
    sets = [_label_set(v, label_separator) for v in labels]
    found: dict[str, set[str]] = {}
    for split, names in zip(splits_of, sets, strict=True):
        found.setdefault(split, set()).update(names)
    if "train" not in found:
        raise DataError(f"{source}: no row has {split_column}=train; add training rows.")
    classes = check_split_classes(source, found, " rows")
    index = {c: i for i, c in enumerate(classes)}

    def target(names: list[str]) -> Any:
        if label_separator is None:
            return index[names[0]]
        row = np.zeros(len(classes), dtype=np.int64)  # multi-label: 0/1 per class
        row[[index[n] for n in names]] = 1
        return row

    skipped = Skipped()
    splits: dict[str, Samples] = {
        split: read_files(
            [(f, target(names)) for f, names, s in zip(files, sets, splits_of, strict=True)
             if s == split],
            on_bad_image,
            skipped,
        )
        for split in ("train", "val", "test")
        if split in found
    }  # fmt: skip
    skipped.log(path)
    check_splits(source, classes, splits, lambda s: (
        f"{source}: none of the {s} rows has a readable image. Fix those files, or drop the "
        f"{s} rows (data.{s}_fraction then takes the {s} split from train)."
    ))  # fmt: skip
    return classes, splits


def _label_set(value: str, separator: str | None) -> list[str]:
    """The class of a row, or (``separator`` set: multi-label) its classes."""
    if separator is None:
        return [value]
    return sorted({v.strip() for v in value.split(separator) if v.strip()})


def _file_of(row: dict[str, str], column: str, template: str | None, source: str, line: int) -> str:
    if template is None:
        value = row[column].strip()
        if not value:
            raise DataError(f"{source} line {line}: the {column!r} column is empty.")
        return value
    try:
        return template.format(**{k: v.strip() for k, v in row.items()})
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"data.path_template={template!r} cannot be filled from {source} line {line} "
            f"({type(e).__name__}: {e}); it can use the columns {list(row)}, e.g. "
            "'images/{id}.jpg'."
        ) from e


class CSVDataModule(ImageDataModule):
    """Images listed in a CSV/TSV manifest (see the module docstring).

    Args:
        manifest: the CSV or TSV file.
        path_column: column with each image's path (relative to the manifest's folder).
        label_column: column with each image's class.
        split_column: optional column with ``train``/``val``/``test``.
        path_template: instead of ``path_column``, a template filled from the row's
            columns (``train/{id}.jpg``).
        delimiter: ``,``, ``\\t``, ``;``; None: ``.tsv`` files tab, others detected.
        on_bad_image: ``skip`` unreadable or missing files (counted in the log) or ``fail``.
        label_separator: multi-label (``task=multilabel``): the label column lists the
            image's classes, separated by this (``" "``, ``"|"``, ``";"``).
        **kwargs: see :class:`ImageDataModule`.
    """

    def __init__(
        self,
        manifest: str | Path,
        path_column: str = "path",
        label_column: str = "label",
        split_column: str | None = None,
        path_template: str | None = None,
        delimiter: str | None = None,
        on_bad_image: str = "skip",
        label_separator: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.manifest = manifest
        self.options = dict(path_column=path_column, label_column=label_column,
                            split_column=split_column, path_template=path_template,
                            delimiter=delimiter, on_bad_image=on_bad_image,
                            label_separator=label_separator)  # fmt: skip

    def load_source(self) -> tuple[list[str], dict[str, Samples]]:
        return read_manifest(self.manifest, **self.options)  # type: ignore[arg-type]
