"""Data: sources, splits and the DataModule."""

from transferkit.data.datamodule import (
    AnimalMNISTDataModule,
    ImageDataModule,
    ImageFolderDataModule,
)
from transferkit.data.hf import HFDataModule
from transferkit.data.manifest import CSVDataModule

__all__ = [
    "AnimalMNISTDataModule",
    "CSVDataModule",
    "HFDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
]
