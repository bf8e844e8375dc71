"""A quiet, honest console: the plan, progress, the summary and real warnings.

Four messages from our dependencies are noise for a transferkit user, and each is filtered
by its exact message and the module that emits it, never by silencing a whole category:

- Lightning's advert for its logging service ("💡 Tip: ... litlogger"), an INFO record of
  ``lightning.pytorch.utilities.rank_zero``;
- torch's deprecation of ``LeafSpec``, which Lightning's own ``utilities/_pytree.py``
  instantiates (nothing a user can change);
- "Found N module(s) in eval mode at the start of training" from Lightning's fit loop: the
  BatchNorm layers of frozen blocks are in eval mode on purpose, and the model says so once
  in its own words (``ImageClassifier.on_fit_start``);
- Lightning's note that the model's own callbacks (``FinetuneSchedule``, ``RNGState``)
  "override existing callbacks" when ``test()`` attaches them again after ``fit()``.
"""

from __future__ import annotations

import logging
import warnings

LIGHTNING_TIP = "💡 Tip:"
#: Said when test() attaches the model's own callbacks again after fit() did.
OUR_CALLBACKS_REATTACHED = (
    "The following callbacks returned in `LightningModule.configure_callbacks` will override "
    "existing callbacks passed to Trainer: FinetuneSchedule, RNGState"
)


class DropMessages(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_third_party() -> None:
    """Install the filters (the console scripts call it; calling it again is a no-op:
    ``warnings`` keeps one copy of a filter, and the log filter is added once)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, DropMessages) for f in logger.filters):
        logger.addFilter(DropMessages(LIGHTNING_TIP, OUR_CALLBACKS_REATTACHED))
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    warnings.filterwarnings(
        "ignore",
        message=r"Found \d+ module\(s\) in eval mode at the start of training",
        module=r"lightning\.pytorch\.loops\.fit_loop",
    )
