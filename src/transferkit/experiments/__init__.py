"""``make experiments``: the lecture's claims, measured on the embedded data, in one report.

One module per claim (``pretraining``, ``depth``, ``overfitting``, ``optimizers``,
``second_order``, ``head_norms``) holds its ``EXPERIMENT`` and writes its section of the
report; ``driver`` plans, runs and reuses the runs and holds the command line (``python -m
transferkit.experiments --help``); ``report`` writes ``report.md``; ``common`` holds what they
share.
"""

from transferkit.experiments.common import Experiment, Run, run_name
from transferkit.experiments.driver import (
    earlier_result,
    earlier_runs,
    expand,
    fingerprint,
    main,
    plan_runs,
    run_experiment,
    run_one,
)
from transferkit.experiments.report import EXPERIMENTS, write_report

__all__ = [
    "EXPERIMENTS",
    "Experiment",
    "Run",
    "earlier_result",
    "earlier_runs",
    "expand",
    "fingerprint",
    "main",
    "plan_runs",
    "run_experiment",
    "run_name",
    "run_one",
    "write_report",
]
