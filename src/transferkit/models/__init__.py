"""Models: backbone creation, heads, freezing and the LightningModule."""

from transferkit.models.classifier import ImageClassifier

__all__ = ["ImageClassifier"]
