"""What the driver, the report and the six sections share: the ``Experiment`` a claim is
described by, a run's name, and the helpers that turn runs into Markdown tables, CSV files and
PNG figures."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit.io import atomic_write_bytes

log = logging.getLogger("transferkit.experiments")
Run = dict[str, Any]  # {"params": {key: value}, "summary": {...}} or {"params", "error"}


@dataclass(frozen=True)
class Experiment:
    """One claim: its config, extra sweeps and quick variant, and how to report it.

    ``sweeps`` and ``quick`` are lists of grids, each ``{key: "v1,v2"}`` merged over the
    config's ``hydra.sweeper.params`` (``{}``: the config's own grid). A value without a
    comma is a plain override; ``None`` drops a key of the config's grid.
    """

    name: str
    title: str
    claim: str
    section: Callable[[list[Run], Path], tuple[str, list[str]]]
    sweeps: tuple[dict[str, str | None], ...] = ({},)
    quick: tuple[dict[str, str | None], ...] = ({},)
    prepare: Callable[[], None] | None = None  # run before its runs (e.g. build its data)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """A command line's own arguments, and the Hydra overrides after ``--``."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def run_name(params: dict[str, str]) -> str:
    """A folder name from the varying overrides (``experiment/remedy=l1`` → ``remedy=l1``)."""
    parts = [f"{k.rsplit('/', 1)[-1]}={v}" for k, v in sorted(params.items())]
    return ",".join(parts).replace("/", "_") or "default"


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def ok_runs(runs: list[Run]) -> list[Run]:
    """Runs that finished with a test and a validation accuracy (the sections need both)."""
    return [
        r
        for r in runs
        if "summary" in r
        and r["summary"].get("test_acc") is not None
        and r["summary"].get("best_val_acc") is not None
    ]


def by_param(runs: list[Run], key: str, default: str) -> dict[str, dict[str, Any]]:
    """The finished runs' summaries by the value of one swept key."""
    return {r["params"].get(key, default): r["summary"] for r in ok_runs(runs)}


def failures(runs: list[Run]) -> str:
    good = {id(r) for r in ok_runs(runs)}
    bad = [r for r in runs if id(r) not in good]
    if not bad:
        return ""
    lines = [
        f"- `{run_name(r['params'])}`: "
        + r.get("error", "no test or validation accuracy (test=false, or no such split)")
        for r in bad
    ]
    return "\n**Runs left out** of the table and plot:\n\n" + "\n".join(lines) + "\n"


def table(header: list[str], rows: Iterable[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def save_csv(path: Path, header: list[str], rows: Iterable[list[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def save_figure(fig: Any, path: Path, axes: Iterable[Any] = ()) -> None:
    """Grid on ``axes``, the legend on the first of them, then a PNG written atomically."""
    import matplotlib.pyplot as plt

    axes = list(axes)
    for ax in axes:
        ax.grid(alpha=0.3)
    if axes:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def publish(fig_dir: Path, name: str, header: list[str], rows: list[list[Any]], alt: str) -> str:
    """Write ``tables/<name>.csv``; return the Markdown table and the link to the figure."""
    save_csv(fig_dir.parent / "tables" / f"{name}.csv", header, rows)
    return table(header, rows) + f"\n![{alt}](figures/{name}.png)\n\n"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve(s: dict[str, Any], key: str, x: str = "epoch") -> tuple[list[float], list[float]]:
    rows = [r for r in s.get("history") or [] if key in r and x in r]
    return [r[x] for r in rows], [r[key] for r in rows]


def pts(a: float, b: float) -> str:
    return f"{(a - b) * 100:+.1f}"
