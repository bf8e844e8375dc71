"""``model.compile``: count the graphs ``torch.compile`` builds for the backbone, and bound
them.

A compiled backbone is traced again whenever something its graph depends on changes: each
unfreezing step (parameters that start to need gradients), training against validation
(``no_grad``) against testing (``inference_mode``), and the first batch of another size
(after which the batch dimension is traced as dynamic) make a new graph, and each costs
seconds to minutes of compile time. So the number is known in advance from the plan: three
per trainable set, plus four for batch sizes. :class:`CompileWatch` raises dynamo's
per-function ``recompile_limit`` to that bound if it is lower (so a planned unfreeze is
never left uncompiled), counts the graphs actually built, warns when the bound is reached
(dynamo then runs that function eagerly rather than compile without end), and reports the
count for ``summary.json``.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

#: Modes of ``torch.compile`` that ``model.compile`` takes (``true`` is ``default``).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def graphs_built() -> int:
    """Graphs dynamo has built in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def graph_bound(schedule_steps: int) -> int:
    """Graphs a run with ``schedule_steps`` unfreezing steps may need: training, validation
    and testing for each trainable set, and four for batch sizes."""
    return 3 * (schedule_steps + 1) + 4


class CompileWatch(L.Callback):
    """Counts the backbone's graphs from its model's first ``fit`` (or ``test``) on; see
    the module docstring. The model keeps one instance: Lightning asks it for its callbacks
    again at every ``fit`` and ``test``.

    Args:
        bound: the most graphs the plan should need (:func:`graph_bound`).
    """

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.start: int | None = None  # graphs before this model's first fit, test, ...
        self.graphs = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import torch._dynamo

        config: Any = torch._dynamo.config
        if config.recompile_limit < self.bound:
            config.recompile_limit = self.bound
        if self.start is None:  # a new run: earlier runs' graphs would eat into its limit
            torch._dynamo.reset()
            self.start = graphs_built()

    def _count(self) -> None:
        self.graphs = graphs_built() - (self.start or 0)
        if self.graphs >= self.bound:
            log.warning(
                "torch.compile built %d graphs of the backbone, the bound for this plan: "
                "further changes run it uncompiled. An unfreezing schedule with many steps "
                "recompiles at each; use fewer steps or model.compile=false.",
                self.graphs,
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._count()
        log.info("torch.compile: %d graph(s) of the backbone (bound %d)", self.graphs, self.bound)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._count()

    def as_dict(self) -> dict[str, int]:
        return {"graphs": self.graphs, "bound": self.bound}
