"""``make transfer-bench``: the regret arithmetic, and the plumbing on a tiny grid (the bench
itself is far too long for the test suite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_images
from transferkit import transfer_bench as tb


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
