"""`granular-po compare --quick` end to end on a tiny random model (the machinery, not the science):
the {DPO, TDPO2} x {granular, response-level} x lr x seed grid from one SFT model, the validation
choice of learning rate, test scoring of the chosen runs only, intervals, paired differences, plots,
reuse; and the statistics on known numbers."""

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from tiny import tiny_llama, tiny_tokenizer

from granular_po.apps import compare
from granular_po.apps.compare import CompareSettings, Run, grid_runs, pick
from granular_po.apps.compare.metrics import forced_item, forced_margins
from granular_po.apps.compare.statistics import (
    bootstrap_paired,
    mean_ci,
    paired_questions,
    paired_seeds,
    t975,
)
from granular_po.training.config import compose_config

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
        loss, granular = run.arm.split("_g")
        assert config["loss"]["name"] == loss and config["granular"]["enabled"] is (granular == "1")
        assert config["optimizer"] == run.optimizer and config["seed"] == run.seed
        assert math.isclose(config["lr"], run.multiplier * 5e-6)
        assert Path(config["model"]["archive"]).resolve() == sft
        assert config["custom_eval_path"].endswith("val.json")  # the trainer never sees the test split
        if loss == "tdpo":
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
    table = text.split("## Test accuracy")[1].split("## Arms vs")[0]
    assert table.count(" [") >= 2  # a mean [low, high] per cell (two seeds each)
    paired = text.split("## Arms vs their reference, paired")[1].split("## Validation")[0]
    assert "| TDPO2, granular - TDPO2, response-level, AdamW | 2 |" in paired
    assert "| x1 | x100 |" in text  # the validation sweep's columns
    for name in ("test_accuracy.png", "val_sweep.png"):
        assert (grid / name).read_bytes()[:8] == PNG_SIGNATURE
        assert f"]({name})" in text
    summary = json.loads((grid / "compare.json").read_text())
    assert summary["settings"]["task"] == "styled" and len(summary["cells"]) == 2


def test_report_has_every_synthetic_metric_and_the_sft_margin_is_right(grid, workspace):
    """The quick styled grid reports each metric per arm and seed with paired t and bootstrap intervals;
    the SFT model's mean forced margin is checked against a plain forward of each test question."""
    import torch

    from granular_po.apps.eval import format_prompt, read_pairs
    from granular_po.models import load_model, load_tokenizer

    text = (grid / "compare.md").read_text()
    table = text.split("## Test metrics per arm")[1].split("## Paired differences on every metric")[0]
    for name in ("greedy accuracy", "forced margin (nats)", "forced-margin accuracy", "keeps the worked step",
                 "preference accuracy", "highlighted log-ratio (rejected)"):
        assert f" {name} |" in table
    paired = text.split("## Paired differences on every metric")[1].split("## Validation")[0]
    assert "| TDPO2, granular - TDPO2, response-level, AdamW | forced margin (nats) | 2 |" in paired
    assert "| confound | 0.75 |" in text and "| losses | tdpo |" in text  # what shaped the synthetic grid
    summary = json.loads((grid / "compare.json").read_text())["metrics"]
    assert {p["metric"] for p in summary["paired"]} >= {"forced_margin", "worked_step", "preference_accuracy"}
    for by_seed in summary["per_seed"].values():
        assert set(by_seed) == {"0", "1"} and all("forced_accuracy" in m for m in by_seed.values())
    sft = grid / "runs" / "sft" / "LATEST"
    tokenizer, model = load_tokenizer(str(sft)), load_model(str(sft))
    margins = []
    for pair in read_pairs(grid / "data" / "test.json"):
        right = str(eval(pair["prompt"][len("What is "):-1]))  # noqa: S307 - "7 * 13"
        wrong = re.findall(r"\d+", pair["incorrect_response"])[-1]
        cut = re.search(rf"(?<!\d){right}(?!\d)", pair["correct_response"])
        head = format_prompt(tokenizer, pair["prompt"]) + pair["correct_response"][:cut.start()]
        end = pair["correct_response"][cut.end():cut.end() + 1]
        sides = []
        for result in (right, wrong):
            ids = tokenizer(head + result + end, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1], -1).gather(-1, ids[1:, None])[:, 0]
            sides.append((ids[1:].tolist(), lp.tolist()))
        k = next(i for i, (x, y) in enumerate(zip(sides[0][0], sides[1][0])) if x != y)
        margins.append(sum(sides[0][1][k:]) - sum(sides[1][1][k:]))
    assert summary["sft"]["forced_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)
    assert summary["sft"]["preference_accuracy"] == 0.0  # the SFT model is its own reference: every margin 0


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
    assert "Status: complete" in text and "| DPO, granular - DPO, response-level, SGD |" in text
    assert "| TDPO2, granular - TDPO2, response-level, SGD |" in text


def test_pick_prefers_validation_accuracy_then_the_lower_rate():
    a, b, c = (Run("dpo_g1", "AdamW", m, 0) for m in (1, 3, 10))
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

    from granular_po.apps.compare.plots import plot_bars

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
        cells = [(f"{loss}_g{int(granular)}", "AdamW") for loss in ("dpo", "tdpo")]
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
    arms = {a.name: a for a in compare.default_arms()}
    assert set(summary) == {compare.cell_label(arms, *c) for c in best.values()}
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


# ---------------------------------------------------------------- arms


def test_builtin_arms_give_the_overrides_grids_were_stamped_with(tmp_path):
    """A built-in arm's run gets the same override list, in the same order, as before arms existed, so a
    grid stopped then resumes (its stamps compare lists)."""
    data = {"train": tmp_path / "train.json", "val": tmp_path / "val.json"}
    s = CompareSettings()
    arm = {a.name: a for a in compare.default_arms()}["tdpo_g1"]
    got = compare.run_overrides(Run("tdpo_g1", "AdamW", 3, 1), arm, "m", data, tmp_path, tmp_path / "sft", s)
    common = compare.common_overrides("m", data, tmp_path, s)
    assert got == [*common, f"model.archive={tmp_path / 'sft'}", "loss=tdpo", "granular=true", "optimizer=AdamW",
                   "lr=1.5e-05", "seed=1", "exp_name=tdpo_g1_AdamW_x3_s1", "loss.beta=0.1", "loss.if_tdpo2=true",
                   "loss.alpha=0.5", "do_first_eval=false", "batch_size=4", "n_examples=64", "eval_every=64",
                   "save_every=64"]


def test_an_arm_overrides_the_base_config_in_place_and_adds_its_keys(tmp_path):
    arm = compare.parse_arm("anchored: loss=tdpo granular=true loss.alpha=0.3 'granular.outside_weight=0.1'")
    assert (arm.name, arm.loss, arm.granular) == ("anchored", "tdpo", True)
    data = {"train": tmp_path / "train.json", "val": tmp_path / "val.json"}
    got = compare.run_overrides(Run("anchored", "AdamW", 2, 0), arm, "m", data, tmp_path, tmp_path / "sft",
                                CompareSettings())
    assert "loss.alpha=0.3" in got and "loss.alpha=0.5" not in got and "loss.if_tdpo2=true" in got
    assert got.index("granular=true") == got.index("loss=tdpo") + 1  # replaced in place
    assert got[-1] == "granular.outside_weight=0.1" and "exp_name=anchored_AdamW_x2_s0" in got
    config = compose_config(got)  # the settings' own composition accepts it
    assert config.loss.alpha == 0.3 and config.granular.outside_weight == 0.1 and config.granular.enabled


def test_arms_file_keeps_its_order_and_reads_lists_or_strings(tmp_path):
    path = tmp_path / "arms.yaml"
    path.write_text("response: [loss=tdpo, granular=false]\ngranular: loss=tdpo granular=true\n")
    arms = compare.read_arms(str(path))
    assert [(a.name, a.overrides) for a in arms] == [("response", ("loss=tdpo", "granular=false")),
                                                    ("granular", ("loss=tdpo", "granular=true"))]
    assert compare.paired_arms(arms) == [("granular", "response")]  # each arm against the first
    assert compare.paired_arms(compare.default_arms()) == [("dpo_g1", "dpo_g0"), ("tdpo_g1", "tdpo_g0")]


@pytest.mark.parametrize("spec, message", [
    ("typo: loss=tdpo granular.outside_wieght=0.1", "arm typo: unknown key 'granular.outside_wieght'"),
    ("fast: loss=tdpo lr=1e-5", "lr is set by compare"),
    ("noloss: granular=true", "give loss=dpo or loss=tdpo"),
    ("bad name: loss=dpo", "arm name"),
    ("neg: loss=dpo loss.beta=-1", "arm neg: loss.beta=-1.0: must be > 0"),
])
def test_a_bad_arm_fails_before_any_training(workspace, spec, message):
    out = workspace / "out-bad-arm"
    with pytest.raises(SystemExit, match=message):
        compare.main(["--quick", "--model", str(workspace / "base"), "--out", str(out), "--adamw", "1", "--sgd", "",
                      "--arm", "ok: loss=dpo granular=true", "--arm", spec])
    assert not (out / "runs").exists()


# ---------------------------------------------------------------- test metrics


def test_forced_item_is_the_correct_responses_prefix_and_both_results():
    pair = {"prompt": "What is 7 * 13?", "correct_response": "Sure! 7 * 13 = 91. The answer is 91.",
            "incorrect_response": "It is 81.", "masked_regions": [[6, 7, -1]]}
    assert forced_item(pair) == {"prompt": "What is 7 * 13?", "prefix": "Sure! 7 * 13 = ", "right": "91",
                                 "wrong": "81", "end": "."}


def test_forced_margin_against_a_plain_forward_of_each_text(workspace):
    """forced_margins (batched, via the training encoding) = log p(text + right) - log p(text + wrong) from a
    forward of each full string on its own, summed from the first token where the two differ."""
    import torch

    from granular_po.apps.eval import format_prompt
    from granular_po.models import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(str(workspace / "base")), load_model(str(workspace / "base"))
    items = [{"prompt": "What is 7 * 13?", "prefix": "7 * 13 = ", "right": "91", "wrong": "81", "end": "."},
             {"prompt": "What is 12 + 30?", "prefix": "Let's work it out. 12 + 30 = ", "right": "42", "wrong": "142",
              "end": ""}]
    got = forced_margins(model, tokenizer, items, batch_size=2)

    def logp(text: str) -> list[float]:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        return ids[0, 1:].tolist(), out.gather(-1, ids[0, 1:, None])[:, 0].tolist()

    for item, margin in zip(items, got):
        head = format_prompt(tokenizer, item["prompt"]) + item["prefix"]
        (ids_r, lp_r), (ids_w, lp_w) = logp(head + item["right"] + item["end"]), logp(head + item["wrong"] + item["end"])
        k = next(i for i, (x, y) in enumerate(zip(ids_r, ids_w)) if x != y)
        assert margin == pytest.approx(sum(lp_r[k:]) - sum(lp_w[k:]), abs=1e-4)


def test_bootstrap_over_seeds_and_items_on_known_numbers():
    constant = bootstrap_paired({0: [1.0, 2.0, None], 1: [3.0, 4.0, 5.0]}, {0: [0.5, 1.5, 9.0], 1: [2.5, 3.5, 4.5]})
    assert constant["mean"] == pytest.approx(0.5) and constant["low"] == pytest.approx(0.5)
    assert constant["high"] == pytest.approx(0.5)  # every difference is 0.5: no spread to resample
    a = {s: [float((s + i) % 3) for i in range(30)] for s in range(4)}
    b = {s: [0.0] * 30 for s in range(4)}
    first, again = bootstrap_paired(a, b), bootstrap_paired(a, b)
    assert first == again and first["mean"] == pytest.approx(1.0) and first["low"] < 1.0 < first["high"]
    assert bootstrap_paired({0: [1.0]}, {1: [1.0]})["mean"] is None  # no seed in common


# ---------------------------------------------------------------- your own data


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_compare_on_your_own_data_reports_every_metric(workspace):
    """--train/--val/--test (JSON and JSONL), two arms, a fixed rate, --rouge: every metric per arm and seed,
    and the reported sequence margin of one run equals a plain forward of each full text."""
    from rouge_score import rouge_scorer  # noqa: F401 - the declared dependency is importable

    from granular_po.data.synthetic import split_questions, write_json

    train, val, test = split_questions(16, 4, 4, task="styled", seed=1)
    for pair in val + test[:2]:  # an answer on every validation record and half the test ones
        pair["answer"] = str(eval(pair["prompt"][len("What is "):-1]))  # noqa: S307 - "7 * 13"
    files = workspace / "mine"
    files.mkdir()
    paths = [write_json(files / "train.json", train), _write_jsonl(files / "val.jsonl", val),
             _write_jsonl(files / "test.jsonl", test)]
    out = workspace / "out-data"
    assert compare.main(["--quick", "--model", str(workspace / "base"), "--out", str(out),
                         "--train", str(paths[0]), "--val", str(paths[1]), "--test", str(paths[2]),
                         "--arm", "response: loss=dpo granular=false", "--arm", "granular: loss=dpo granular=true",
                         "--adamw", "1", "--sgd", "", "--rouge", "--keep-weights"]) == 0
    text = (out / "compare.md").read_text()
    assert "Task: your data:" in text and "Status: complete" in text
    table = text.split("## Test metrics per arm")[1].split("## Paired differences on every metric")[0]
    for name in ("greedy accuracy", "preference accuracy", "highlighted log-ratio (rejected)", "ROUGE-L"):
        assert f" {name} |" in table
    assert "forced margin" not in table  # synthetic tasks only
    paired = text.split("## Paired differences on every metric")[1]
    assert "| granular - response, AdamW | ROUGE-L | 2 |" in paired
    run = json.loads((out / "runs" / "granular_AdamW_x1_s1" / "compare_result.json").read_text())["test"]
    assert run["n"] == 2 and len(run["items"]["rouge_l"]) == 4 and run["items"]["accuracy"][2:] == [None, None]
    margins = plain_margins(workspace / "base", out / "runs" / "granular_AdamW_x1_s1" / "LATEST",
                            out / "runs" / "sft" / "LATEST", test)
    assert run["metrics"]["sequence_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)
    assert run["metrics"]["preference_accuracy"] == sum(m > 0 for m in margins) / len(margins)


def plain_margins(tokenizer_dir: Path, policy_dir: Path, ref_dir: Path, pairs: list[dict]) -> list[float]:
    """Independent of compare's batching and encoding: per pair, [log pi - log ref](correct) - [log pi -
    log ref](incorrect), each the sum over every response token and the end token, one forward per text."""
    import torch

    from granular_po.apps.eval import format_prompt
    from granular_po.data.encode import end_of_turn_id
    from granular_po.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    policy, ref = load_model(str(policy_dir)), load_model(str(ref_dir))

    def response_logp(model, prompt: str, response: str) -> float:
        head = format_prompt(tokenizer, prompt)
        enc = tokenizer(head + response, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor(enc["input_ids"] + [end_of_turn_id(tokenizer)])
        first = next(i for i, (s, _) in enumerate(enc["offset_mapping"]) if s >= len(head))
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1], -1).gather(-1, ids[1:, None])[:, 0]
        return lp[first - 1:].sum().item()

    return [sum(sign * (response_logp(policy, p["prompt"], p[side]) - response_logp(ref, p["prompt"], p[side]))
                for sign, side in ((1, "correct_response"), (-1, "incorrect_response"))) for p in pairs]


def test_own_data_without_answers_chooses_the_rate_on_validation_preference_accuracy(workspace):
    """No record carries an answer, two rates: each seed's rate is the one whose validation pairs have the
    higher preference accuracy (margin > 0 against the SFT model; ties: the lower rate), each equal to a plain
    forward of each text; the report names the metric; the test pairs play no part in the choice.

    x1e-7 (lr 5e-13) leaves every float32 weight where SFT put it, so its margins are exactly 0 and its
    accuracy 0: the choice must then be the higher rate, against the tie rule's lower one."""
    from granular_po.data.synthetic import split_questions, write_json

    train, val, test = split_questions(16, 8, 4, task="styled", seed=2)
    files = workspace / "no-answers"
    files.mkdir()
    paths = {k: write_json(files / f"{k}.json", v) for k, v in (("train", train), ("val", val), ("test", test))}
    out = workspace / "out-pref"
    common = ["--quick", "--model", str(workspace / "base"), "--out", str(out), "--train", str(paths["train"]),
              "--val", str(paths["val"]), "--test", str(paths["test"]), "--arm", "dpo: loss=dpo granular=false",
              "--adamw", "1e-7,1", "--sgd", ""]
    assert compare.main([*common, "--keep-weights"]) == 0
    accuracy: dict[float, list[float]] = {1e-7: [], 1: []}  # rate -> per seed, computed here
    for seed in range(2):
        for m in accuracy:
            run = Run("dpo", "AdamW", m, seed)
            margins = plain_margins(workspace / "base", out / "runs" / run.name / "LATEST",
                                    out / "runs" / "sft" / "LATEST", val)
            accuracy[m].append(sum(x > 0 for x in margins) / len(margins))
            result = _result(out, run)
            assert (result["val_metric"], result["val_n"]) == ("preference", 8)  # the 8 validation pairs, not test's 4
            assert result["val_accuracy"] == pytest.approx(accuracy[m][-1])
        assert accuracy[1e-7][-1] == 0 < accuracy[1][-1]
        assert _result(out, Run("dpo", "AdamW", 1, seed))["test"] is not None  # chosen: scored on test
        assert _result(out, Run("dpo", "AdamW", 1e-7, seed))["test"] is None
    text = (out / "compare.md").read_text()
    assert "8 validation pairs (the learning rate of each seed and cell is chosen on their held-out preference " \
           "accuracy" in text
    assert "| validation preference accuracy | lr chosen (x 5e-6), per seed |" in text
    sweep = text.split("## Validation preference accuracy by learning rate")[1].split("\n## ")[0]
    assert f"| dpo, AdamW | {sum(accuracy[1e-7]) / 2:.3f} (2) | {sum(accuracy[1]) / 2:.3f} (2) |" in sweep
    summary = json.loads((out / "compare.json").read_text())
    assert summary["settings"]["choose_on"] == "preference"
    assert [summary["cells"]["dpo, AdamW"][str(seed)]["run"]["multiplier"] for seed in (0, 1)] == [1, 1]
    # no test record carries an answer: the report leads with the pair metrics, not an empty accuracy table
    assert "| SFT (the start of every run) | - |" in text and "| dpo, AdamW | 0 |" not in text
    assert "## Test accuracy" not in text and "test questions" not in text and "question sets" not in text
    assert "4 test pairs" in text
    assert "Task accuracy needs an `answer` field on the test records; none of the 4 test pairs carries one" in text
    assert text.index("## Test metrics per arm") < text.index("## Validation preference accuracy by learning rate")
    table = text.split("## Test metrics per arm")[1].split("## Paired differences on every metric")[0]
    assert " preference accuracy |" in table and " highlighted log-ratio (rejected) |" in table
    assert "greedy accuracy" not in table
    # one rate (the x1 runs reused): nothing chosen, and the report says so in terms of pairs; a second arm:
    # paired on the pair metrics, no task-accuracy pairing (5167d26 crashed there on None - None)
    assert compare.main([*common[:-4], "--arm", "granular: loss=dpo granular=true", "--adamw", "1", "--sgd", "",
                         "--sft", str(out / "runs" / "sft")]) == 0
    fixed = (out / "compare.md").read_text()
    paired = fixed.split("## Paired differences on every metric")[1]
    assert "| granular - dpo, AdamW | preference accuracy | 2 |" in paired
    assert "## Arms vs their reference, paired" not in fixed
    assert json.loads((out / "compare.json").read_text())["paired"] == []
    # the settings table names what shaped these runs: not the synthetic task's sizes, nor `losses` (arms given)
    assert "| task | data |" in fixed
    for unused in ("confound", "highlight", "n_train", "n_val", "n_test", "losses"):
        assert f"| {unused} |" not in fixed
    assert "nothing is chosen, so the validation pairs were not scored" in fixed
    assert "8 validation pairs (one learning rate per cell: nothing is chosen on them)" in fixed
    assert "validation questions" not in fixed and "test questions" not in fixed
    # asked to choose on answers that are not there: refused, naming the way out
    with pytest.raises(SystemExit, match="--choose-on preference"):
        compare.main([*common, "--sft", str(out / "runs" / "sft"), "--choose-on", "accuracy"])
    # runs scored on preference are not mixed with runs scored on accuracy in one --out
    write_json(paths["val"], [p | {"answer": "1"} for p in val])
    with pytest.raises(SystemExit, match="scored on validation by preference"):
        compare.main([*common, "--sft", str(out / "runs" / "sft")])


def test_data_split_is_seeded_and_bad_data_fails_before_training(workspace, tmp_path):
    from granular_po.data.synthetic import split_questions

    records = split_questions(20, 1, 1, task="styled")[0]
    path = _write_jsonl(tmp_path / "all.jsonl", records)
    args = compare.build_parser().parse_args(["--data", str(path), "--split", "0.6,0.2,0.2", "--split-seed", "3"])
    paths = compare.file_data(tmp_path / "out", args)
    parts = {k: json.loads(p.read_text()) for k, p in paths.items()}
    assert [len(parts[k]) for k in ("train", "val", "test")] == [12, 4, 4]
    assert sorted(json.dumps(r) for part in parts.values() for r in part) == sorted(json.dumps(r) for r in records)
    assert compare.file_data(tmp_path / "again", args) and \
        json.loads((tmp_path / "again" / "data" / "test.json").read_text()) == parts["test"]
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "correct_response": "a"}])
    with pytest.raises(SystemExit, match="bad.jsonl"):
        compare.main(["--quick", "--model", str(workspace / "base"), "--out", str(tmp_path / "o"),
                      "--train", str(bad), "--val", str(path), "--test", str(path)])
    assert not (tmp_path / "o" / "runs").exists()


def test_own_data_accuracy_grades_each_record_against_its_own_answer(tmp_path):
    """A test record the loader always skips (identical responses) must not shift the answers: each greedy
    answer is graded against the `answer` of the record it answers (review: pairs vs records positions)."""
    import torch

    from granular_po.apps.compare.metrics import TestScorer

    # a model that says "5" whatever the prompt: every layer adds nothing, every embedding is the same
    # vector, and the head scores only the token "5"
    tokenizer = tiny_tokenizer("byte_level", chat=True)
    model = tiny_llama(len(tokenizer), hidden_size=32, layers=1, tie_word_embeddings=False)
    five = tokenizer.convert_tokens_to_ids("5")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0 if "embed" in name or "norm" in name else 0.0)
        model.lm_head.weight[five] = 1.0
    model.save_pretrained(tmp_path / "five")
    tokenizer.save_pretrained(tmp_path / "five")
    skipped = {"prompt": "Same?", "correct_response": "same", "incorrect_response": "same", "answer": "6"}
    answers = ["5", "6", "5", "6", " "]  # the last: an empty answer, which `eval` does not grade
    pairs = [skipped] + [{"prompt": f"Question {i}?", "correct_response": f"right {i}",
                          "incorrect_response": f"wrong {i}", "answer": a} for i, a in enumerate(answers)]
    test = _write_jsonl(tmp_path / "test.jsonl", pairs)
    scorer = TestScorer(test, tmp_path / "five", tmp_path / "ref.json", 128, 64, synthetic=False, rouge=False,
                        max_new_tokens=1, batch_size=2)
    assert len(scorer.records) == 5  # the identical pair is skipped by the loader
    items = scorer.score(tmp_path / "five")
    assert items["completions"] == ["5"] * 5
    assert items["accuracy"] == [1.0, 0.0, 1.0, 0.0, None]  # graded as `eval` grades: an empty answer is not
    assert len(items["preference_accuracy"]) == len(items["accuracy"])


def test_own_data_in_parquet_and_csv_is_read_as_train_reads_it(tmp_path):
    """Issue 23.2: compare's data step read JSON / JSONL only. --train / --val / --test / --data in any format
    train reads are validated by `load_data` (an error names the user's file), and a file that is not JSON is
    written once as <out>/data/<split>.json (its rows, `answer` kept) that every run and score reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from granular_po.apps.eval import read_pairs
    from granular_po.data.formats import load_data
    from granular_po.data.records import load_records

    rows = [{"prompt": f"What is {i} + 1?", "correct_response": f"It is {i + 1}.", "incorrect_response": f"It is {i}.",
             "masked_regions": [[6, 6 + len(str(i)), -1]] if i % 2 else None, "answer": str(i + 1) if i < 3 else None}
            for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    with open(tmp_path / "val.csv", "w", encoding="utf-8", newline="") as f:
        f.write("prompt,correct_response,incorrect_response,masked_regions,answer\n")
        f.write('What is 2 + 2?,It is 4.,It is 5.,"[[6, 7, -1]]",4\nWhat is 3 + 3?,It is 6.,It is 7.,,\n')
    test = _write_jsonl(tmp_path / "test.jsonl", rows[:2])
    args = compare.build_parser().parse_args(["--train", str(tmp_path / "train.parquet"), "--val",
                                              str(tmp_path / "val.csv"), "--test", str(test)])
    paths = compare.file_data(tmp_path / "out", args)
    assert paths == {"train": tmp_path / "out" / "data" / "train.json", "val": tmp_path / "out" / "data" / "val.json",
                     "test": test.resolve()}  # JSON as given; the others read once, written as JSON
    for name, original in (("train", "train.parquet"), ("val", "val.csv")):
        strip = [(r.prompt, r.chosen, r.rejected, r.regions) for r in load_data(tmp_path / original)[0]]
        assert [(r.prompt, r.chosen, r.rejected, r.regions) for r in load_records(paths[name])[0]] == strip
    assert [p.get("answer") for p in read_pairs(paths["train"])] == ["1", "2", "3"] + [None] * 7
    assert [p.get("answer") for p in read_pairs(paths["val"])] == ["4", None]  # an empty cell: no answer
    # --data in CSV, split here into JSON files holding every row once
    with open(tmp_path / "all.csv", "w", encoding="utf-8", newline="") as f:
        f.write("prompt,correct_response,incorrect_response\n")
        f.writelines(f"p{i},It is {i}.,It is {i + 1}.\n" for i in range(10))
    args = compare.build_parser().parse_args(["--data", str(tmp_path / "all.csv"), "--split", "0.6,0.2,0.2"])
    parts = {k: read_pairs(p) for k, p in compare.file_data(tmp_path / "split", args).items()}
    assert sorted(r["prompt"] for part in parts.values() for r in part) == sorted(f"p{i}" for i in range(10))
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([dict(rows[0], incorrect_response="")]), bad)
    args = compare.build_parser().parse_args(["--train", str(bad), "--val", str(test), "--test", str(test)])
    with pytest.raises(SystemExit, match=r"bad\.parquet, record 0.*incorrect_response"):
        compare.file_data(tmp_path / "o", args)
