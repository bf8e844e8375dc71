"""The sweep collector: summary.json files → table, markdown with auto's gap, and a plot."""

import json

from transferkit.sweep import collect, markdown, write


def _summary(folder, per_class, blocks, acc, auto=False, regime="partial"):
    folder.mkdir(parents=True)
    plan = {"regime": regime, "rule": {"regime": regime} if auto else None,
            "median_per_class": per_class}  # fmt: skip
    summary = {"train_size": per_class * 10, "trainable_blocks": blocks, "total_blocks": 17,
               "epochs": 3, "test_acc": acc, "best_val_acc": acc, "fit_seconds": 10.0 + blocks,
               "train_images_per_second": 100.0, "plan": plan}  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))


def test_collect_and_markdown(tmp_path):
    _summary(tmp_path / "a", 10, 0, 0.70)
    _summary(tmp_path / "b", 10, 4, 0.80)
    _summary(tmp_path / "c", 10, 4, 0.80, auto=True)
    _summary(tmp_path / "d", 100, 17, 0.95, regime="full")
    _summary(tmp_path / "e", 100, 4, 0.93, auto=True)
    rows = collect(tmp_path)
    assert [(r["per_class"], r["trainable_blocks"], r["auto"]) for r in rows] == [
        (10, 0, False), (10, 4, False), (10, 4, True), (100, 17, False), (100, 4, True),
    ]  # fmt: skip
    md = markdown(rows)
    assert "**0.800**" in md and "+0.0 pts vs best" in md
    assert "auto → partial" in md and "-2.0 pts vs best" in md
    paths = write(tmp_path)
    assert [p.name for p in paths] == ["sweep.csv", "sweep.md", "sweep.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert paths[0].read_text().count("\n") == 6
