"""`granular-po compare` on a tiny random model: the {DPO, TDPO2} x {granular, response-level} grid as
Hydra multiruns of the train entry point, per-cell learning rates, the table and plots, and reuse."""

import json
from pathlib import Path

import pytest
import yaml
from tiny import tiny_llama, tiny_tokenizer

from granular_po.apps import compare
from granular_po.apps.compare import CELLS, Cell, sweep_groups
from granular_po.data.synthetic import split_train_eval, write_json

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    tokenizer = tiny_tokenizer("byte_level", chat=True)
    tiny_llama(len(tokenizer), hidden_size=32).save_pretrained(root / "sft")  # stands in for an SFT output
    tokenizer.save_pretrained(root / "sft")
    train, evals = split_train_eval(8, 3, seed=1, mark_correct=True)
    write_json(root / "train.json", train)
    write_json(root / "eval.json", evals)
    return root


def compare_args(root: Path) -> list[str]:
    return ["--sft", str(root / "sft"), "--model", str(root / "sft"), "--train", str(root / "train.json"),
            "--eval", str(root / "eval.json"), "--out", str(root / "out"), "--steps", "2", "--batch-size", "2",
            "--checkpoints", "1", "--evals", "1", "--lr-granular", "0.001", "--lr-response", "0.0001", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def grid(workspace):
    assert compare.main(compare_args(workspace)) == 0
    return workspace / "out"


def test_every_cell_trained_with_its_settings(grid):
    for cell in CELLS:
        run = grid / "runs" / cell.exp_name
        assert (run / "LATEST").resolve().name == "step-2", cell
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["exp_name"] == cell.exp_name  # the multirun's interpolated name resolved per job
        assert config["loss"]["name"] == cell.loss
        assert config["granular"]["enabled"] is cell.granular
        assert config["lr"] == (0.001 if cell.granular else 0.0001)
        assert config["model"]["archive"].endswith("sft")
        assert config["n_examples"] == 4 and config["seed"] == 0
        if cell.loss == "tdpo":
            assert config["loss"]["if_tdpo2"] is True
    commands = (grid / "commands.txt").read_text().splitlines()
    assert len(commands) == 2 and all(" -m " in c and "loss=dpo,tdpo" in c for c in commands)


def test_table_and_plots(grid):
    text = (grid / "compare.md").read_text()
    for cell in CELLS:
        assert f"| {cell.label} |" in text
    header = next(line for line in text.splitlines() if line.startswith("| cell |"))
    for column in ("task accuracy, SFT", "task accuracy, final", "eval reward accuracy", "eval margin"):
        assert column in header
    for name in ("task_accuracy.png", "eval_reward_accuracy.png", "eval_margin.png"):
        assert (grid / name).read_bytes()[:8] == PNG_SIGNATURE
        assert f"]({name})" in text
    # task accuracy at step 0 (the SFT model, once) and at every saved checkpoint of every cell
    assert (grid / "eval" / "sft.json").is_file()
    for cell in CELLS:
        result = json.loads((grid / "eval" / cell.exp_name / "step-2.json").read_text())
        assert result["n"] == 3


def test_rerun_reuses_every_cell(grid, workspace, capsys):
    mtimes = {c: (grid / "runs" / c.exp_name / "step-2").stat().st_mtime_ns for c in CELLS}
    assert compare.main(compare_args(workspace)) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing") == 4 and "grid (" not in printed
    assert {c: (grid / "runs" / c.exp_name / "step-2").stat().st_mtime_ns for c in CELLS} == mtimes
    assert "loss=dpo,tdpo" in (grid / "compare.md").read_text()  # the commands that trained them are kept


def test_sweep_groups_never_retrain_a_finished_cell():
    full = list(CELLS)
    assert sweep_groups(full) == [full]
    assert sweep_groups([]) == []
    partial = [Cell("tdpo", True), Cell("dpo", False), Cell("tdpo", False)]
    assert sweep_groups(partial) == [[Cell("tdpo", True)], [Cell("dpo", False), Cell("tdpo", False)]]


def test_sft_argument_accepts_a_run_directory(tmp_path):
    run = tmp_path / "run"
    (run / "step-3").mkdir(parents=True)
    (run / "step-3" / "config.json").write_text("{}")
    (run / "LATEST").symlink_to("step-3")
    assert compare.sft_model_dir(str(run)) == (run / "step-3").resolve()
    with pytest.raises(SystemExit, match="neither"):
        compare.sft_model_dir(str(tmp_path))
