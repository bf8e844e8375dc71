"""trainer.precision=auto: the choice logic on injected timings, the real probe on CPU
tensors, and what a run records."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from tests.conftest import tiny_overrides
from transferkit import precision as P
from transferkit.errors import ConfigError
from transferkit.finetune import finetune
from transferkit.models import ImageClassifier


def _never(setting: P.Setting) -> float:
    raise AssertionError(f"timed {setting} though nothing was to be measured")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in (P.ENV, "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    yield
    os.environ.pop(P.ENV, None)  # set by resolve() itself, not through monkeypatch


def test_the_fastest_setting_is_chosen() -> None:
    timings = {("32-true", False): 9000.0, ("32-true", True): 7000.0,
               ("bf16-mixed", False): 5000.0, ("bf16-mixed", True): 12000.0}  # fmt: skip
    assert P.choose(timings) == ("bf16-mixed", True)


def test_a_near_tie_goes_to_the_simpler_setting_and_stays_within_five_percent() -> None:
    timings = {("32-true", False): 9900.0, ("bf16-mixed", True): 10000.0}
    assert P.choose(timings) == ("32-true", False)  # 1 % slower: fp32 is simpler and exact
    assert P.choose({("32-true", False): 9000.0, ("bf16-mixed", True): 10000.0}) == (
        "bf16-mixed", True,
    )  # fmt: skip
    with pytest.raises(ValueError):
        P.choose({})


def test_candidates_cover_both_precisions_and_layouts_unless_the_layout_is_given() -> None:
    assert P.candidates(bf16=True) == [
        ("32-true", False), ("32-true", True), ("bf16-mixed", False), ("bf16-mixed", True),
    ]  # fmt: skip
    assert P.candidates(bf16=False, channels_last=True) == [("32-true", True), ("16-mixed", True)]


def test_an_explicit_precision_always_wins() -> None:
    choice = P.resolve("bf16-mixed", "auto", cuda=True, timer=_never)
    assert (choice.precision, choice.channels_last) == ("bf16-mixed", False)
    choice = P.resolve("32-true", True, cuda=True, timer=_never)
    assert (choice.precision, choice.channels_last) == ("32-true", True)
    assert "set by trainer.precision" in choice.reason


def test_without_cuda_auto_is_fp32_without_timing() -> None:
    choice = P.resolve("auto", "auto", cuda=False, timer=_never)
    assert (choice.precision, choice.channels_last) == ("32-true", False)
    assert "no CUDA" in choice.reason


def test_auto_times_every_candidate_and_records_the_figures() -> None:
    speed = {("32-true", False): 8000.0, ("32-true", True): 6000.0,
             ("bf16-mixed", False): 4000.0, ("bf16-mixed", True): 3000.0}  # fmt: skip
    timed: list[P.Setting] = []

    def timer(s: P.Setting) -> float:
        timed.append(s)
        return speed[s]

    choice = P.resolve("auto", "auto", cuda=True, timer=timer)
    assert sorted(timed) == sorted(speed)
    assert (choice.precision, choice.channels_last) == ("32-true", False)
    assert choice.images_per_second == {P.label(s): v for s, v in speed.items()}
    assert "8,000 img/s" in choice.reason
    record = choice.as_dict()
    assert record["probe_images_per_second"]["bf16-mixed + channels_last"] == 3000.0


def test_a_given_layout_is_kept_while_the_precision_is_timed() -> None:
    timed: list[P.Setting] = []

    def timer(s: P.Setting) -> float:
        timed.append(s)
        return 1.0 + (s[0] == "bf16-mixed")

    choice = P.resolve("auto", True, cuda=True, timer=timer)
    assert timed == [("32-true", True), ("bf16-mixed", True)]
    assert (choice.precision, choice.channels_last) == ("bf16-mixed", True)


def test_ddp_ranks_take_rank_zeros_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    choice = P.resolve("auto", "auto", cuda=True, world_size=2,
                       timer=lambda s: 2.0 if s == ("bf16-mixed", True) else 1.0)  # fmt: skip
    assert P.parse_env(os.environ[P.ENV]) == ("bf16-mixed", True) == (
        choice.precision, choice.channels_last,
    )  # fmt: skip
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning started: it does not time
    child = P.resolve("auto", "auto", cuda=True, world_size=2, timer=_never)
    assert (child.precision, child.channels_last) == ("bf16-mixed", True)
    monkeypatch.setenv("LOCAL_RANK", "0")  # rank 0 of a later run measures afresh
    again = P.resolve("auto", "auto", cuda=True, world_size=2, timer=lambda s: 1.0)
    assert (again.precision, again.channels_last) == ("32-true", False)


def test_runs_that_cannot_share_a_timing_do_not_time() -> None:
    why = "processes started by an outside launcher (torchrun, srun)"
    choice = P.resolve("auto", "auto", cuda=True, world_size=4, timer=_never, external=why)
    assert choice.precision == "32-true" and choice.reason.startswith(why)
    assert "trainer.precision" in choice.reason


def test_a_bad_inherited_choice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(P.ENV, "fast,1")
    with pytest.raises(ConfigError, match="'fast,1'"):
        P.resolve("auto", "auto", cuda=True, world_size=2, timer=_never)


def test_the_probe_times_a_copy_and_leaves_the_model_alone() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(4))
    model(torch.zeros(2, 3, 16, 16))
    model[0].requires_grad_(False)  # a frozen block stays frozen in the copy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for setting in (("32-true", False), ("32-true", True)):
        ips = P.time_steps(model, setting, 4, 16, torch.device("cpu"), steps=2, warmup=1)
        assert ips > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model[0].weight.requires_grad


def test_channels_last_auto_is_saved_as_a_bool_and_switchable() -> None:
    model = ImageClassifier("test_efficientnet", 3, weights="none", channels_last="auto")
    assert model.hparams["channels_last"] is False
    model.set_channels_last(True)
    assert model.hparams["channels_last"] is True
    conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ConfigError, match="'yes'"):
        ImageClassifier("test_efficientnet", 3, weights="none", channels_last="yes")


def test_a_run_records_its_precision(image_folder, tmp_path, make_cfg) -> None:
    cfg = make_cfg(*tiny_overrides(image_folder, tmp_path / "run", "trainer.precision=auto",
                                   "trainer.max_epochs=1", "report=false"))  # fmt: skip
    summary, objects = finetune(cfg)
    assert summary["precision"]["precision"] == "32-true"
    assert "no CUDA" in summary["precision"]["reason"]
    assert objects["trainer"].precision == "32-true"


def test_a_measured_choice_reaches_the_trainer_and_the_model(
    image_folder, tmp_path, make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the probe decides (injected here: this machine has no GPU to time) is what the
    run trains with: the trainer is rebuilt at that precision, the model switched to NHWC."""
    chosen = P.Choice("bf16-mixed", True, "fastest of 4 measured", {"bf16-mixed": 2.0})
    monkeypatch.setattr(P, "resolve", lambda *a, **k: chosen)
    cfg = make_cfg(*tiny_overrides(image_folder, tmp_path / "run", "trainer.precision=auto",
                                   "trainer.max_epochs=1", "report=false"))  # fmt: skip
    summary, objects = finetune(cfg)
    assert objects["trainer"].precision == "bf16-mixed"
    assert objects["model"].hparams["channels_last"] is True
    assert summary["precision"]["precision"] == "bf16-mixed"
    assert summary["test_acc"] is not None


@pytest.mark.slow  # torch.compile on the CPU: `make test-slow` (CI) runs it
def test_compile_counts_its_graphs_and_each_unfreeze_adds_them(image_folder, tmp_path,
                                                               make_cfg) -> None:  # fmt: skip
    """The eager backend traces as inductor would (no C compiler needed): a gradual plan
    builds more graphs than a fixed one, and no more than its bound."""
    graphs = {}
    for regime in ("finetune=partial", "finetune=gradual"):
        extra = ("model.compile=true", "model.compile_backend=eager", "trainer.max_epochs=3",
                 "finetune.cache_features=false", "report=false")  # fmt: skip
        cfg = make_cfg(*tiny_overrides(image_folder, tmp_path / regime[9:], regime, *extra))
        summary, _ = finetune(cfg)
        record = summary["compile"]
        assert record["mode"] is True and 2 <= record["graphs"] <= record["bound"]
        graphs[regime] = record["graphs"]
    assert graphs["finetune=gradual"] > graphs["finetune=partial"]
    cfg = make_cfg(*tiny_overrides(image_folder, tmp_path / "again", "finetune=partial", *extra))
    again, _ = finetune(cfg)  # a second run in the process counts only its own graphs
    assert again["compile"]["graphs"] == graphs["finetune=partial"]


def test_an_unknown_compile_mode_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'fastest'.*reduce-overhead"):
        ImageClassifier("test_efficientnet", 3, weights="none", compile="fastest")


def test_a_setting_that_runs_out_of_memory_scores_zero() -> None:
    def timer(s: P.Setting) -> float:
        if s[0] == "32-true":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return 100.0

    choice = P.resolve("auto", "auto", cuda=True, timer=timer)
    assert choice.precision == "bf16-mixed"
    assert choice.images_per_second["32-true"] == 0.0


def test_bf16_support_is_asked_only_to_probe() -> None:
    def ask() -> bool:
        raise AssertionError("asking initialises CUDA before DDP forks")

    P.resolve("auto", "auto", cuda=False, bf16=ask, timer=_never)
    P.resolve("auto", "auto", cuda=True, world_size=2, bf16=ask, timer=_never, external="x")
    timed: list[P.Setting] = []
    P.resolve("auto", "auto", cuda=True, bf16=lambda: False, timer=lambda s: timed.append(s) or 1.0)
    assert ("16-mixed", True) in timed and not any(s[0] == "bf16-mixed" for s in timed)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"devices": 1}, None),
        ({"devices": 2, "strategy": "ddp"}, None),  # rank 0 times; its children inherit
        ({"devices": 2, "strategy": "ddp_fork"}, "forked"),
        ({"devices": 2, "strategy": "ddp", "num_nodes": 2}, "2 nodes"),
    ],
)
def test_which_runs_cannot_share_one_timing(kwargs, why) -> None:
    import lightning as L

    from transferkit.finetune import _shared_timing_impossible

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, **kwargs)
    found = _shared_timing_impossible(trainer)
    assert (found is None) if why is None else (why in found)


def test_torchrun_processes_do_not_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning as L

    from transferkit.finetune import _shared_timing_impossible

    for key, value in {"TORCHELASTIC_RUN_ID": "1", "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
                       "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert "outside launcher" in _shared_timing_impossible(trainer)
