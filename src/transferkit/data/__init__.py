"""Data: sources, splits and the DataModule."""

from transferkit.data.datamodule import (
    AnimalMNISTDataModule,
    ImageDataModule,
    ImageFolderDataModule,
)

__all__ = ["AnimalMNISTDataModule", "ImageDataModule", "ImageFolderDataModule"]
