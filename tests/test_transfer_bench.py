"""``make transfer-bench``: the regret arithmetic, and the plumbing on a tiny grid (the bench
itself is far too long for the test suite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_images
from transferkit import transfer_bench as tb
from transferkit.errors import ConfigError


def test_regret_is_points_below_the_best_fixed_depth_of_the_cell_over_the_seeds():
    recs = []
    accs = {"depth=0": [0.80, 0.82], "depth=all": [0.90, 0.86], "auto": [0.88, 0.87],
            "table": [0.81, 0.81]}  # fmt: skip
    secs = {"depth=0": 10.0, "depth=all": 40.0, "auto": 60.0, "table": 12.0}
    for method, values in accs.items():
        for seed, acc in enumerate(values, 1):
            recs.append({"cell": "c", "method": method, "seed": seed, "test_acc": acc,
                         "seconds": secs[method], "blocks": 3})  # fmt: skip
    recs.append({"cell": "c", "method": "fastai", "seed": 1, "error": "boom", "seconds": 1.0})
    s = tb.summarize(recs, [*list(accs), "fastai"])
    cell = s["cells"]["c"]
    assert cell["best_fixed"] == "depth=all" and cell["best_acc"] == pytest.approx(0.88)
    assert cell["methods"]["auto"]["regret"] == pytest.approx(0.5)
    assert cell["methods"]["table"]["regret"] == pytest.approx(7.0)
    assert cell["methods"]["auto"]["time_over_best"] == pytest.approx(1.5)
    assert "fastai" not in s["methods"]  # a failed run is no result
    assert s["methods"]["auto"]["worst_regret"] == pytest.approx(0.5)
    assert "by_model" not in s  # one backbone: the grid's summary says it all


def test_the_summary_holds_for_each_backbone_on_its_own():
    recs = [{"cell": f"glyphs/10/{model}", "method": method, "seed": 1, "test_acc": acc,
             "seconds": 10.0, "blocks": 1}
            for model, accs in (("a@64", {"depth=0": 0.9, "auto": 0.9}),
                                ("b@64", {"depth=0": 0.8, "auto": 0.7}))
            for method, acc in accs.items()]  # fmt: skip
    s = tb.summarize(recs, ["depth=0", "auto"])
    assert s["methods"]["auto"]["mean_regret"] == pytest.approx(5.0)
    assert s["by_model"]["a@64"]["auto"]["worst_regret"] == pytest.approx(0.0)
    assert s["by_model"]["b@64"]["auto"]["worst_regret"] == pytest.approx(10.0)
    assert s["by_model"]["b@64"]["auto"]["cells"] == 1
    assert "by_size" not in s  # one size


def test_the_summary_holds_for_each_data_size_on_its_own():
    accs = {"10": {"depth=0": 0.7, "auto": 0.68}, "100": {"depth=0": 0.9, "auto": 0.9},
            "500": {"depth=0": 0.95, "auto": 0.94}}  # fmt: skip
    recs = [{"cell": f"{data}/{size}/a@64", "method": method, "seed": 1, "test_acc": acc,
             "seconds": 10.0, "blocks": 1}
            for data in ("glyphs", "textures") for size, by in accs.items()
            for method, acc in by.items()]  # fmt: skip
    s = tb.summarize(recs, ["depth=0", "auto"])
    assert list(s["by_size"]) == ["10", "100", "500"]  # by number, not as text
    assert s["by_size"]["10"]["auto"]["mean_regret"] == pytest.approx(2.0)
    assert s["by_size"]["500"]["auto"]["worst_regret"] == pytest.approx(1.0)
    assert s["by_size"]["100"]["auto"]["cells"] == 2
    assert s["methods"]["auto"]["mean_regret"] == pytest.approx(1.0)
    assert "by_model" not in s


def test_the_fastai_recipe_is_one_frozen_epoch_then_discriminative_lrs(make_cfg):
    from transferkit.policy import resolve_plan

    overrides = tb.method_overrides("fastai", 17)
    cfg = make_cfg(*overrides)
    assert cfg.scheduler.scheduler._target_.endswith("one_cycle")
    assert cfg.optimizer.lr == tb.FASTAI_LR
    counts = {"train_size": 1000, "min_per_class": 100, "median_per_class": 100}
    plan = resolve_plan(cfg.finetune, counts, 17, 64, max_epochs=10)
    assert plan.schedule == ((1, 17),) and plan.bn_mode == "train"
    assert plan.layer_decay**17 == pytest.approx(0.01, rel=1e-3)  # the lowest block: lr/100


def test_a_tiny_grid_runs_reports_and_resumes(tmp_path: Path, capsys, recwarn):
    dev = tmp_path / "dev"
    for split, n in (("train", 12), ("val", 6), ("test", 6)):
        write_images(dev / "textures" / split, ["a", "b", "c"], per_class=n, seed=len(split))
    out, report = tmp_path / "bench", tmp_path / "docs" / "tb.md"
    argv = ["--data", "textures", "--sizes", "4", "--models", "test_efficientnet@32",
            "--seeds", "1", "--methods", "depth=0", "depth=all", "table", "--out", str(out),
            "--report", str(report), "--dev-root", str(dev), "--",
            "model.weights=none", "trainer.accelerator=cpu", "data.batch_size=8",
            "finetune.steps=4"]  # fmt: skip
    assert tb.main(argv) == 0
    noise = ("LeafSpec", "module(s) in eval mode")  # dropped, as the CLI drops them
    assert not [w for w in recwarn if any(n in str(w.message) for n in noise)]
    text = report.read_text()
    assert "textures/4/test_efficientnet@32" in text and "mean regret" in text
    assert (report.parent / "figures" / "tb.png").is_file()
    assert (report.parent / "tables" / "tb.csv").read_text().count("\n") == 4  # header + 3 runs
    first = json.loads((out / "transfer-bench.json").read_text())
    assert {r["method"] for r in first["records"]} == {"depth=0", "depth=all", "table"}
    assert all(r["test_acc"] is not None for r in first["records"])
    capsys.readouterr()
    assert tb.main(argv) == 0  # finished runs are reused, not trained again
    assert capsys.readouterr().out.count("reused") == 3
    # a grid so far: the finished runs reported, the others left out, nothing trained
    at = argv.index("table") + 1
    so_far = [*argv[:at], "depth=1/2", "--finished-only", *argv[at:]]
    assert tb.main(so_far) == 0
    printed = capsys.readouterr().out
    assert printed.count("reused") == 3 and printed.count("no finished run") == 1
    assert (report.parent / "tables" / "tb.csv").read_text().count("\n") == 4
    assert "1 of the grid's 4 runs are not made yet" in report.read_text()
    assert not (out / "runs" / "textures_4_test_efficientnet@32" / "depth=1_2-seed1").exists()
    # the race replayed, from the run folders and from the report's table: this grid lacks
    # two of the raced depths, and says so (nothing is trained)
    table_csv = report.parent / "tables" / "tb.csv"
    assert table_csv.read_text().splitlines()[0].endswith(",val_curve")
    assert {r["method"] for r in tb.read_table(table_csv)} == {"depth=0", "depth=all", "table"}
    grid, user = argv[: argv.index("--methods")], argv[argv.index("--") :]
    folders = [*grid, "--out", str(out), "--dev-root", str(dev), "--replay", "0.125,0.5", *user]
    for source in (folders, ["--replay-table", str(table_csv), "--replay", "0.125,0.5"]):
        assert tb.main(source) == 0
        printed = capsys.readouterr().out
        assert "nothing to replay" in printed
        assert ("not replayed: textures/4/test_efficientnet@32 seed 1: no validation curve of "
                "depth=1/4, depth=1/2") in printed  # fmt: skip
    assert tb.main(["--replay", "half"]) == 2
    assert "--replay 'half'" in capsys.readouterr().err


def test_a_missing_dev_set_names_the_command_that_builds_it(tmp_path: Path, capsys):
    assert tb.main(["--data", "glyphs", "--dev-root", str(tmp_path)]) == 2
    assert "make data-dev" in capsys.readouterr().err


def test_reporting_finished_runs_and_rerunning_them_are_refused_together(capsys):
    """--finished-only reports earlier runs and --rerun ignores them: no run is made or
    lost, and the message says to give one of the two."""
    assert tb.main(["--quick", "--finished-only", "--rerun"]) == 2
    assert "give one" in capsys.readouterr().err


def test_an_old_or_broken_dev_set_is_not_benched(tmp_path: Path, capsys):
    """A textures folder of the first layout (val next to train, test at the edge) would
    give a bench whose validation does not predict its test: refused, as is a malformed
    dataset.json, each in one line."""
    old = tmp_path / "textures"
    (old / "train").mkdir(parents=True)
    (old / "crops.csv").write_text("split,class,file,source,left,top,right,bottom\n")
    assert tb.main(["--data", "textures", "--dev-root", str(tmp_path)]) == 2
    assert "older layout" in capsys.readouterr().err
    (old / "dataset.json").write_text("[]")
    assert tb.main(["--data", "textures", "--dev-root", str(tmp_path)]) == 2
    assert "not a data set description" in capsys.readouterr().err


def _fixed(cell: str, method: str, blocks: int, curve: list[tuple[int, float]], test: float,
           stopped_at: int | None = None, per_step: float = 0.1) -> dict:  # fmt: skip
    steps = stopped_at or 40
    return {"cell": cell, "method": method, "seed": 1, "test_acc": test, "blocks": blocks,
            "budget_steps": 40, "steps_per_epoch": 5, "steps": steps, "val_size": 1000,
            "stopped": stopped_at is not None, "fit_seconds": per_step * steps,
            "seconds": per_step * steps + 5,
            "val_curve": [[s, a] for s, a in curve if s <= steps]}  # fmt: skip


def _late_bloomer(cell: str = "glyphs/10/a@64") -> list[dict]:
    """A quarter of the blocks leads at half the budget and early stopping ends it at step
    25; half of them is behind then and overtakes it later."""
    steps = range(5, 41, 5)
    return [
        _fixed(cell, "depth=0", 0, [(s, 0.50) for s in steps], 0.50),
        _fixed(cell, "depth=1/4", 2, [(5, 0.6), (10, 0.70), (15, 0.75), (20, 0.80), (25, 0.79)],
               0.79, stopped_at=25, per_step=0.2),
        _fixed(cell, "depth=1/2", 4, [(5, 0.5), (10, 0.65), (15, 0.70), (20, 0.75), (25, 0.80),
                                      (30, 0.90), (35, 0.91), (40, 0.92)], 0.91, per_step=0.3),
        {"cell": cell, "method": "auto", "seed": 1, "test_acc": 0.79, "blocks": 2,
         "seconds": 20.0},
    ]  # fmt: skip


def test_the_race_replayed_from_the_fixed_runs_chooses_as_auto_does():
    """Half the budget: the race sees the quarter ahead (0.80 against 0.75 at step 20, more
    than the noise of 1,000 images) and takes it, as the real auto run did, 12 points below
    half the blocks. Rounds to the end see half the blocks overtake, at the cost of training
    both to the end. The fit seconds are what the race trains: each candidate up to where
    it left the race, the winner to its end."""
    half = tb.replay(_late_bloomer(), [0.125, 0.5])
    cell = half["cells"]["glyphs/10/a@64"]
    assert cell["blocks"] == [2] and cell["actual"] == [2]
    assert cell["best_fixed"] == "depth=1/2"
    assert cell["regret"] == pytest.approx(12.0)
    # depth 0 trains 10 steps (round 0), half 20 (round 1), the quarter to its stop at 25
    assert cell["fit_over_best"] == pytest.approx((0.1 * 10 + 0.3 * 20 + 0.2 * 25) / 12.0)
    whole = tb.replay(_late_bloomer(), [0.125, 1.0])
    cell = whole["cells"]["glyphs/10/a@64"]
    assert cell["blocks"] == [4] and cell["regret"] == pytest.approx(0.0)
    assert cell["fit_over_best"] == pytest.approx((0.1 * 10 + 0.2 * 25 + 0.3 * 40) / 12.0)
    assert whole["worst_regret"] == pytest.approx(0.0) and whole["skipped"] == []


def test_the_replay_keeps_close_candidates_as_the_race_would(tmp_path: Path, capsys):
    """After the first round (10 steps) half the blocks is 1.5 points behind, within the
    noise of 1,000 images, and depth 0 is second: halving drops half the blocks before it
    overtakes; ``keep_close`` keeps it, and rounds to the end then see it win. From the
    command line too."""
    recs = _late_bloomer()
    for r in recs:
        if r["method"] == "depth=0":
            r["val_curve"] = [[s, 0.69] for s, _ in r["val_curve"]]
        if r["method"] == "depth=1/2":
            r["val_curve"] = [[s, 0.685 if s == 10 else a] for s, a in r["val_curve"]]
    assert tb.replay(recs, [0.125, 1.0])["cells"]["glyphs/10/a@64"]["blocks"] == [2]
    from transferkit.experiments.common import save_csv

    kept = tb.replay(recs, [0.125, 1.0], keep_close=True)["cells"]["glyphs/10/a@64"]
    assert kept["blocks"] == [4] and kept["regret"] == pytest.approx(0.0)
    assert tb.main(["--replay-keep-close"]) == 2  # without --replay: no grid is trained
    assert "--replay-keep-close go with --replay" in capsys.readouterr().err
    table = tmp_path / "t.csv"
    save_csv(table, tb.CSV_COLUMNS, [[tb._csv_value(r.get(k)) for k in tb.CSV_COLUMNS]
                                     for r in recs])  # fmt: skip
    assert tb.main(["--replay-table", str(table), "--replay", "0.125,1",
                    "--replay-keep-close"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "keep_close=true" in out and "glyphs/10/a@64: blocks [4]" in out


def test_a_cell_the_race_cannot_be_replayed_on_is_named_with_the_reason():
    recs = [r for r in _late_bloomer("a/10/x@64") if r["method"] != "depth=1/2"]
    recs += _late_bloomer("b/10/x@64")
    for r in recs:  # b's runs validate inside their epochs (steps 3, 8, ...)
        if r["cell"] == "b/10/x@64" and "val_curve" in r:
            r["val_curve"] = [[s - 2, a] for s, a in r["val_curve"]]
    out = tb.replay(recs, [0.125, 0.5])
    assert out["cells"] == {}
    assert any("a/10/x@64 seed 1" in s and "depth=1/2" in s for s in out["skipped"])
    assert any("b/10/x@64 seed 1" in s and "whole epochs" in s for s in out["skipped"])


def test_the_report_table_keeps_what_the_replay_needs(tmp_path: Path):
    """The table of runs (docs/tables/<report>.csv) holds each run's validation curve, so
    the race is replayed from a committed table as from the run folders."""
    from transferkit.experiments.common import save_csv

    recs = _late_bloomer()
    path = tmp_path / "t.csv"
    save_csv(path, tb.CSV_COLUMNS, [[tb._csv_value(r.get(k)) for k in tb.CSV_COLUMNS]
                                    for r in recs])  # fmt: skip
    back = tb.read_table(path)
    assert [r["val_curve"] for r in back[:3]] == [r["val_curve"] for r in recs[:3]]
    assert back[1]["stopped"] is True and back[2]["stopped"] is False
    assert tb.replay(back, [0.125, 1.0]) == tb.replay(recs, [0.125, 1.0])
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="not a transfer-bench table"):
        tb.read_table(tmp_path / "bad.csv")


def test_the_replay_compares_with_the_fixed_depths_of_the_seeds_it_replayed():
    """Seed 2 lacks its quarter run: the regret is over seed 1 only, against the fixed
    depths' seed 1, not their mean over both seeds."""
    recs = _late_bloomer()
    for r in _late_bloomer():
        if r["method"] in ("depth=0", "depth=1/2"):
            recs.append({**r, "seed": 2, "test_acc": r["test_acc"] - 0.2})
    out = tb.replay(recs, [0.125, 0.5])
    cell = out["cells"]["glyphs/10/a@64"]
    assert cell["seeds"] == 1 and cell["regret"] == pytest.approx(12.0)
    assert out["skipped"] == ["glyphs/10/a@64 seed 2: no validation curve of depth=1/4"]


def test_rounds_that_are_no_race_are_refused_not_reported_as_no_runs(tmp_path: Path, capsys):
    from transferkit.experiments.common import save_csv

    with pytest.raises(ConfigError, match="must grow"):
        tb.replay(_late_bloomer(), [0.5, 0.125])
    table = tmp_path / "t.csv"
    save_csv(table, tb.CSV_COLUMNS, [[tb._csv_value(r.get(k)) for k in tb.CSV_COLUMNS]
                                     for r in _late_bloomer()])  # fmt: skip
    assert tb.main(["--replay-table", str(table), "--replay", "0.125,1.5"]) == 2
    assert "(0, 1]" in capsys.readouterr().err
    assert tb.main(["--replay-table", str(table), "--replay", "0.125,1"]) == 0
    assert "glyphs/10/a@64: blocks [4]" in capsys.readouterr().out
    assert tb.main(["--replay-table", str(table)]) == 2  # without --replay: no grid is trained
    assert "go with --replay" in capsys.readouterr().err
    table.write_text(table.read_text().replace("0.91", "zero point nine", 1))
    assert tb.main(["--replay-table", str(table), "--replay", "0.125,1"]) == 2
    assert "line 4" in capsys.readouterr().err


def test_a_round_ends_on_the_whole_runs_validation_nearest_its_share():
    """The race's rounds end where the fixed run validates (every 3 epochs of 5 steps), so
    going on, a candidate's score is the fixed run's at that step; no round is shorter than
    min_steps."""
    from transferkit.autodepth import snapper

    snap = snapper(3, 5, lambda steps: max(1, -(-steps // 5)), 10)
    assert [snap(s) for s in (19, 75, 112, 4)] == [15, 75, 120, 4]
    assert snapper(3, 5, lambda steps: max(1, -(-steps // 5)), 20)(19) == 30
    assert snapper(None, 5, lambda steps: 1, 10)(19) == 19  # validated only at its end
