"""Animal-MNIST, read from the files that the ``animal-mnist`` PyPI package ships.

The package's own loader imports tensorflow, so we read its gzip'd pickles directly, and
unpickle with an allow-list of numpy's array classes only (pickle runs code on load).
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import DataError, NotFoundError

CLASSES = [
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
]  # fmt: skip

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def data_dir() -> Path:
    """The folder of the installed package's data files.

    Raises:
        FileNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(
            "The Animal-MNIST data package is not installed. Run `make install`, or "
            "`pip install --no-deps animal-mnist==0.4`, or use your own images with "
            "`data=image_folder data.root=/path/to/images`."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"


def _load(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        arr = _NumpyOnlyUnpickler(f).load()
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path} does not hold a numpy array")
    return arr


def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """All 10,000 images (``uint8``, ``(N, 28, 28)``) and their labels (``int64``)."""
    folder = data_dir()
    images = _load(folder / "animal_data_version_3.gz").astype(np.uint8)
    labels = _load(folder / "animal_label_version_3.gz").astype(np.int64)
    return images, labels
