"""transferkit: fine-tune pretrained timm image models with Lightning and Hydra."""

__version__ = "0.1.0"
