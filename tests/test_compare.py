"""`granular-po compare --quick` end to end on a tiny random model (the machinery, not the science):
the {DPO, TDPO2} x {granular, response-level} x lr x seed grid from one SFT model, the validation
choice of learning rate, test scoring of the chosen runs only, intervals, paired differences, plots,
reuse; and the statistics on known numbers."""

import json
import math
from pathlib import Path

import pytest
import yaml
from tiny import tiny_llama, tiny_tokenizer

from granular_po.apps import compare
from granular_po.apps.compare import CompareSettings, Run, grid_runs, pick
from granular_po.apps.compare_report import mean_ci, paired_questions, paired_seeds, t975

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    tokenizer = tiny_tokenizer("byte_level", chat=True)
    tiny_llama(len(tokenizer), hidden_size=32).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return root


def quick_args(root: Path, *extra: str) -> list[str]:
    # TDPO2 and AdamW at two rates (so the validation choice is exercised), two seeds; DPO and SGD below
    return ["--quick", "--task", "styled", "--model", str(root / "base"), "--out", str(root / "out"),
            "--losses", "tdpo", "--adamw", "1,100", "--sgd", "", *extra]


@pytest.fixture(scope="module")
def grid(workspace):
    assert compare.main(quick_args(workspace)) == 0
    return workspace / "out"


def _result(out: Path, run: Run) -> dict:
    return json.loads((out / "runs" / run.name / "compare_result.json").read_text())


def test_every_run_trained_from_the_shared_sft_model_with_its_settings(grid):
    s = compare.settings_from_args(compare.build_parser().parse_args(quick_args(grid.parent)))
    runs = grid_runs(s)
    assert len(runs) == 2 * 2 * 2  # granularity x AdamW (1, 100) x seeds
    sft = (grid / "runs" / "sft" / "LATEST").resolve()
    for run in runs:
        config = yaml.safe_load((grid / "runs" / run.name / "config.yaml").read_text())
        assert config["loss"]["name"] == run.loss and config["granular"]["enabled"] is run.granular
        assert config["optimizer"] == run.optimizer and config["seed"] == run.seed
        assert math.isclose(config["lr"], run.multiplier * 5e-6)
        assert Path(config["model"]["archive"]).resolve() == sft
        assert config["custom_eval_path"].endswith("val.json")  # the trainer never sees the test split
        if run.loss == "tdpo":
            assert config["loss"]["if_tdpo2"] is True
    assert len((grid / "commands.txt").read_text().splitlines()) == len(runs)


def test_only_the_validation_choice_is_scored_on_test(grid):
    s = compare.settings_from_args(compare.build_parser().parse_args(quick_args(grid.parent)))
    runs = grid_runs(s)
    tested = {r for r in runs if _result(grid, r)["test"] is not None}
    groups = {}
    for r in runs:
        groups.setdefault((r.seed, r.cell), []).append(r)
    assert len(tested) == len(groups) == 2 * 2  # one per seed x granularity
    for group in groups.values():
        (chosen,) = [r for r in group if r in tested]
        assert chosen == pick([(r, _result(grid, r)) for r in group])
        assert _result(grid, chosen)["test"]["n"] == 4
    assert len(list((grid / "eval" / "test").glob("*.json"))) == len(tested)
    # weights are kept for nothing (every choice is scored), metrics and results stay
    assert not list((grid / "runs").glob("*_s*/step-*"))
    assert all((grid / "runs" / r.name / "metrics.jsonl").is_file() for r in runs)


def test_report_has_intervals_pairs_and_plots(grid):
    text = (grid / "compare.md").read_text()
    assert "Status: complete" in text
    for cell in ("TDPO2, granular, AdamW", "TDPO2, response-level, AdamW", "SFT (the start of every run)"):
        assert f"| {cell} |" in text
    table = text.split("## Test accuracy")[1].split("## Granular")[0]
    assert table.count(" [") >= 2  # a mean [low, high] per cell (two seeds each)
    paired = text.split("## Granular vs response-level, paired")[1].split("## Validation")[0]
    assert "| TDPO2, AdamW | 2 |" in paired
    assert "| x1 | x100 |" in text  # the validation sweep's columns
    for name in ("test_accuracy.png", "val_sweep.png"):
        assert (grid / name).read_bytes()[:8] == PNG_SIGNATURE
        assert f"]({name})" in text
    summary = json.loads((grid / "compare.json").read_text())
    assert summary["settings"]["task"] == "styled" and len(summary["cells"]) == 2


def test_rerun_reuses_every_run_and_a_larger_grid_adds_to_it(grid, workspace, capsys):
    stamps = {p: p.stat().st_mtime_ns for p in (grid / "runs").glob("*/compare_result.json")}
    capsys.readouterr()
    assert compare.main(quick_args(workspace)) == 0
    assert ": training" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # DPO and SGD added: only their runs train, at one rate (no validation scoring: nothing to choose)
    assert compare.main([*quick_args(workspace, "--losses", "dpo,tdpo", "--adamw", "", "--sgd", "100",
                                     "--seeds", "1")]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": training") == 4 and "dpo_g1_SGD_x100_s0: training" in printed
    assert "(validation)" not in printed
    for name in ("dpo_g1_SGD_x100_s0", "tdpo_g0_SGD_x100_s0"):
        config = yaml.safe_load((grid / "runs" / name / "config.yaml").read_text())
        assert config["optimizer"] == "SGD" and math.isclose(config["lr"], 5e-4)
    text = (grid / "compare.md").read_text()
    assert "Status: complete" in text and "| DPO, SGD |" in text and "| TDPO2, SGD |" in text


def test_pick_prefers_validation_accuracy_then_the_lower_rate():
    a, b, c = (Run("dpo", True, "AdamW", m, 0) for m in (1, 3, 10))
    assert pick([(c, {"val_accuracy": None})]) == c  # one rate: no choice to make
    assert pick([(a, {"val_accuracy": 0.4}), (b, {"val_accuracy": 0.6}), (c, {"val_accuracy": 0.5})]) == b
    assert pick([(c, {"val_accuracy": 0.6}), (b, {"val_accuracy": 0.6}), (a, {"val_accuracy": 0.5})]) == b


def test_intervals_on_known_numbers():
    known = {1: 12.706, 2: 4.303, 5: 2.571, 6: 2.447, 7: 2.365, 11: 2.201, 30: 2.042, 31: 2.040, 40: 2.021,
             60: 2.000, 120: 1.980, 1000: 1.962}  # t_{0.975, df}, e.g. NIST/SEMATECH's table
    assert {df: round(t975(df), 3) for df in known} == known
    assert 1.95996 < t975(10**6) < t975(1000) < t975(120)
    mean, low, high = mean_ci([0.4, 0.5, 0.6])
    assert math.isclose(mean, 0.5) and math.isclose(high - mean, 4.303 * 0.1 / math.sqrt(3))
    assert mean_ci([0.7]) == (0.7, None, None) and mean_ci([]) == (None, None, None)
    diff = paired_seeds({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.4, 1: 0.6})  # seed 2 has no partner
    assert diff["seeds"] == [0, 1] and [round(d, 6) for d in diff["diffs"]] == [0.1, 0.0]
    rows = lambda bits: [{"prompt": f"q{i}", "correct": bool(b)} for i, b in enumerate(bits)]  # noqa: E731
    q = paired_questions({0: rows([1, 1, 0, 0]), 1: rows([1, 0, 0, 1])}, {0: rows([1, 0, 0, 0]), 1: rows([0, 0, 0, 1])})
    assert (q["a_only"], q["b_only"], q["n"]) == (2, 0, 4) and math.isclose(q["mean"], (0.5 + 0.5) / 4)
    with pytest.raises(ValueError, match="different questions"):
        paired_questions({0: rows([1])}, {0: [{"prompt": "other", "correct": True}]})


def test_default_grid_is_the_issue_grid():
    s = CompareSettings()
    assert (s.adamw, s.sgd, s.seeds, s.losses) == ((1, 3, 10, 30), (1, 100), 3, ("dpo", "tdpo"))
    assert s.n_test >= 200 and s.base_lr == 5e-6
    assert len(grid_runs(s)) == 2 * 2 * 6 * 3


def test_sft_argument_accepts_a_run_directory(tmp_path):
    run = tmp_path / "run"
    (run / "step-3").mkdir(parents=True)
    (run / "step-3" / "config.json").write_text("{}")
    (run / "LATEST").symlink_to("step-3")
    assert compare.sft_model_dir(str(run)) == (run / "step-3").resolve()
    with pytest.raises(SystemExit, match="neither"):
        compare.sft_model_dir(str(tmp_path))


def test_a_bar_without_an_interval_gets_no_error_bar(tmp_path, monkeypatch):
    """One seed has no interval: its bar must not carry a zero-width cap that reads as a tight interval."""
    from matplotlib.axes import Axes

    from granular_po.apps.compare_report import plot_bars

    drawn = []
    original = Axes.bar
    monkeypatch.setattr(Axes, "bar", lambda self, x, h, *a, **kw: drawn.append(kw["yerr"]) or original(self, x, h, *a, **kw))
    path = plot_bars({"DPO, AdamW": {"granular": (0.6, None, None), "response-level": (0.5, 0.4, 0.7)}},
                     tmp_path / "bars.png", title="t")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    (low_g, high_g), (low_r, high_r) = drawn
    assert math.isnan(low_g[0]) and math.isnan(high_g[0])
    assert (low_r[0], high_r[0]) == pytest.approx((0.1, 0.2))


def test_pairs_retrains_the_validation_best_cell_of_each_granularity(workspace, capsys):
    # two losses at one rate: validation is scored only because --pairs chooses the best cells on it
    args = [*quick_args(workspace, "--losses", "dpo,tdpo", "--adamw", "1", "--pairs", "8"),
            "--out", str(workspace / "out-pairs")]
    assert compare.main(args) == 0
    out = workspace / "out-pairs"
    s = compare.settings_from_args(compare.build_parser().parse_args(args))
    runs = grid_runs(s)
    best = {}
    for granular in (True, False):
        cells = [(loss, granular, "AdamW") for loss in ("dpo", "tdpo")]
        mean_val = {c: sum(_result(out, r)["val_accuracy"] for r in runs if r.cell == c) / s.seeds for c in cells}
        best[granular] = max(cells, key=lambda c: (mean_val[c], -cells.index(c)))
    for seed in range(s.seeds):
        for cell in best.values():
            run = Run(*cell, 1.0, seed, pairs=8)
            config = yaml.safe_load((out / "runs" / run.name / "config.yaml").read_text())
            assert config["n_examples"] == 8 and config["seed"] == seed and math.isclose(config["lr"], 5e-6)
            result = _result(out, run)
            assert result["test"]["n"] == 4 and result["val_accuracy"] is None
            assert not list((out / "runs" / run.name).glob("step-*"))  # scored, weights dropped
    assert len(list((out / "runs").glob("*_n*"))) == 2 * s.seeds  # the other cells were not retrained
    text = (out / "compare.md").read_text()
    section = text.split("## Sample efficiency")[1].split("## How it ran")[0]
    assert "| 4 pairs | 8 pairs |" in section
    assert "granular - response-level: over seeds / over questions" in section
    assert (out / "sample_efficiency.png").read_bytes()[:8] == PNG_SIGNATURE
    summary = json.loads((out / "compare.json").read_text())["sample_efficiency"]
    assert set(summary) == {compare.cell_label(*c) for c in best.values()}
    assert all(set(by_n) == {"4", "8"} and len(by_n["8"]) == s.seeds for by_n in summary.values())
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/compare_result.json")}
    capsys.readouterr()
    assert compare.main(args) == 0  # everything reused
    printed = capsys.readouterr().out
    assert ": training" not in printed and "[compare sample efficiency" not in printed
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.parametrize("pairs, message", [("3", "multiple of the batch size"), ("4", "the grid's own"),
                                            ("64", "at most --n-train")])
def test_pairs_that_cannot_be_trained_are_refused(workspace, pairs, message):
    with pytest.raises(SystemExit, match=message):
        compare.settings_from_args(compare.build_parser().parse_args(quick_args(workspace, "--pairs", pairs)))
