"""Classification heads. Each takes ``(in_features, num_classes)`` first, so a Hydra config
with ``_partial_: true`` selects one and a user's own head is one ``_target_`` away."""

from __future__ import annotations

from torch import nn

from transferkit.models.norms import make_norm1d


class LinearHead(nn.Sequential):
    """Dropout → Linear. Dropout is inverted: scaled by 1/(1−p) in training, identity in eval."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__(nn.Dropout(dropout), nn.Linear(in_features, num_classes))


class MLPHead(nn.Sequential):
    """Linear → Norm → ReLU → Dropout → Linear.

    Args:
        norm: ``batchnorm`` (default), ``batchrenorm``, ``layernorm``, ``groupnorm``,
            ``instancenorm`` or ``none``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 512,
        dropout: float = 0.2,
        norm: str = "batchnorm",
    ) -> None:
        super().__init__(
            nn.Linear(in_features, hidden),
            make_norm1d(norm, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
