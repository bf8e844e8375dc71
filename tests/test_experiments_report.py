"""`make experiments ARGS=--quick` end to end on a tiny model: the report, every plot, every
table, and the reuse of finished runs."""

import re

import pytest

from transferkit.experiments import EXPERIMENTS, main, plan_runs

TINY = ["model.backbone=test_efficientnet", "model.weights=none", "data.image_size=32",
        "trainer.accelerator=cpu", "trainer.devices=1"]  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # about 100 s on 2 cores: `make test-all` runs it
def test_quick_experiments_write_the_whole_report(tmp_path, capsys):
    out = tmp_path / "experiments"
    assert main(["--quick", "--out", str(out), "--", *TINY]) == 0
    report = (out / "report.md").read_text()
    for i, exp in enumerate(EXPERIMENTS.values(), 1):
        assert f"## {i}. {exp.title}" in report
        rows = (out / "tables" / f"{exp.name}.csv").read_text().splitlines()
        assert len(rows) >= 2, exp.name  # a header and at least one run
    figures = re.findall(r"!\[[^\]]*\]\((figures/[^)]+)\)", report)
    assert len(figures) == len(EXPERIMENTS) + 1  # one per section, two for the optimisers
    for rel in figures:
        data = (out / rel).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000, rel
    assert "Runs left out" not in report and "could not be written" not in report
    assert "**Quick variant**" in report

    # Running one experiment again reuses its finished runs and keeps the other sections.
    summaries = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("summary.json")}
    assert len(summaries) == sum(len(plan_runs(e, True, TINY)) for e in EXPERIMENTS.values())
    capsys.readouterr()
    assert main(["--quick", "--out", str(out), "--only", "second_order", "--", *TINY]) == 0
    assert capsys.readouterr().out.count("reused") == len(
        plan_runs(EXPERIMENTS["second_order"], True, TINY)
    )
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("summary.json")} == summaries
    assert (out / "report.md").read_text().count("\n## ") == len(EXPERIMENTS)


def test_overrides_after_the_separator_replace_a_swept_key():
    runs = plan_runs(EXPERIMENTS["pretraining"], False, ["model.weights=none"])
    assert [p for p, _ in runs] == [
        {"data.limit_per_class": "100"}, {"data.limit_per_class": "800"},
    ]  # fmt: skip
    assert all(o[-1] == "model.weights=none" for _, o in runs)
