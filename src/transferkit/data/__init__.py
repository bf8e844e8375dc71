"""Data: sources, splits and the DataModule."""

from transferkit.data.datamodule import (
    AnimalMNISTDataModule,
    ImageDataModule,
    ImageFolderDataModule,
)
from transferkit.data.manifest import CSVDataModule

__all__ = ["AnimalMNISTDataModule", "CSVDataModule", "ImageDataModule", "ImageFolderDataModule"]
