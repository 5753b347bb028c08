"""`granular-po demo` end to end on a tiny random model (training through the train entry point, in
subprocesses), then re-run: finished runs and accuracies are reused. The real default-model demo is
marked slow."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import tiny_llama, tiny_tokenizer

from granular_po.apps import demo, stages
from granular_po.apps.eval import task_accuracy
from granular_po.models import load_model, load_tokenizer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_ARGS = ["--quick", "--n-train", "12", "--n-eval", "4", "--sft-steps", "2", "--tdpo-steps", "2",
             "--sft-batch-size", "4", "--tdpo-batch-size", "4", "--n-evals", "1", "--max-new-tokens", "4",
             "--max-length", "64", "--max-prompt-length", "32"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_model")
    tokenizer = tiny_tokenizer("byte_level", chat=True)  # chat template: the path SmolLM2 takes
    tiny_llama(len(tokenizer), hidden_size=32).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def demo_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    assert demo.main(["--out", str(out), "--model", str(tiny_model), *TINY_ARGS]) == 0
    return out


def test_demo_writes_data_runs_and_report(demo_run, tiny_model):
    out = demo_run
    train = json.loads((out / "data" / "train.json").read_text())
    evals = json.loads((out / "data" / "eval.json").read_text())
    assert len(train) == 12 and len(evals) == 4
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in evals}
    for run in ("demo_sft", "demo_tdpo"):
        assert (out / "runs" / run / "LATEST").resolve().name == "step-2"
        assert (out / "runs" / run / "metrics.jsonl").is_file()
    tdpo_config = (out / "runs" / "demo_tdpo" / "config.yaml").read_text()
    assert "if_tdpo2: true" in tdpo_config and "optimizer: AdamW" in tdpo_config
    for name in ("loss.png", "reward_accuracy.png", "margins.png", "kl.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name

    report = (out / "report.md").read_text()
    for label in ("| base |", "| SFT |", "| final (SFT + TDPO2) |"):
        assert label in report
    assert "runs/demo_sft/step-2" in report and "runs/demo_tdpo/step-2" in report
    for piece in ("python -u -m granular_po.apps.cli train", "loss=sft", "granular=false", "loss=tdpo",
                  "loss.if_tdpo2=true", "granular=true", "model.archive=", "optimizer=AdamW", "n_examples=8"):
        assert piece in report, piece
    for metric in ("rewards_eval/accuracies", "rewards_eval/margins", "kl_eval/margin"):
        assert f"| {metric} |" in report
    for image in ("loss.png", "reward_accuracy.png", "margins.png"):
        assert f"]({image})" in report
    assert "12 training pairs" in report and "4 held-out questions" in report
    cached = json.loads((out / "eval" / "2.json").read_text())
    assert cached["n"] == 4 and cached["model"].endswith("demo_tdpo/LATEST")
    # the cached figure is the final model's: greedy generation again gives the same rows and accuracy
    tokenizer, final = load_tokenizer(str(tiny_model)), load_model(cached["model"])
    questions = [tuple(q) for q in cached["key"]["questions"]]
    accuracy, rows = task_accuracy(final, tokenizer, questions, max_new_tokens=cached["key"]["max_new_tokens"],
                                   progress=False)
    assert [r["completion"] for r in rows] == [r["completion"] for r in cached["rows"]]
    assert cached["accuracy"] == accuracy == cached["correct"] / 4
    assert f"{cached['correct']}/4" in report


def test_demo_runs_on_a_local_model_dir_and_names_it(demo_run, tiny_model):
    """`demo --model DIR`: the stages train from the directory, the report names it (issue 13, item 9)."""
    report = (demo_run / "report.md").read_text()
    assert f"Model `{tiny_model}`" in report and "model ready (a local directory)" in report
    assert f"model.name_or_path={tiny_model}" in report  # the commands shown train from the directory
    assert f"name_or_path: {tiny_model}" in (demo_run / "runs" / "demo_sft" / "config.yaml").read_text()


def demo_cli(*args: str) -> subprocess.CompletedProcess:
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "granular_po.apps.cli", "demo", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_demo_help_offers_a_local_model_dir():
    done = demo_cli("--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "--model DIR" in text and "a local Hugging Face model directory" in text
    assert "(default: smollm2-135m)" in text


def test_demo_refuses_a_model_that_is_no_model_dir_before_any_work(tmp_path):
    not_model = tmp_path / "not_model"
    not_model.mkdir()
    for model, why in ((tmp_path / "missing", "no such directory"),
                       (not_model, "not a Hugging Face model directory (no config.json in it)")):
        done = demo_cli("--model", str(model), "--out", str(tmp_path / "report"))
        assert done.returncode == 2
        assert done.stderr.strip() == f"error: --model {model}: {why}" + (
            " (give smollm2-135m, the embedded default, or a local Hugging Face model directory)"
            if why == "no such directory" else "")
        assert not (tmp_path / "report").exists()  # nothing written, no stage started


def test_rerun_reuses_finished_runs_and_cached_accuracies(demo_run, tiny_model, capsys):
    out = demo_run
    step_dir = out / "runs" / "demo_tdpo" / "step-2"
    before = step_dir.stat().st_mtime_ns, (out / "runs" / "demo_tdpo" / "metrics.jsonl").read_text()
    assert demo.main(["--out", str(out), "--model", str(tiny_model), *TINY_ARGS]) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing") == 2 and printed.count("(cached in") == 3
    assert "| final (SFT + TDPO2) |" in printed  # the accuracy table, printed at the end
    assert (step_dir.stat().st_mtime_ns, (out / "runs" / "demo_tdpo" / "metrics.jsonl").read_text()) == before


def test_other_settings_on_a_finished_run_are_refused(demo_run, tiny_model):
    args = ["--out", str(demo_run), "--model", str(tiny_model), *TINY_ARGS, "--sft-lr", "0.5"]
    with pytest.raises(SystemExit, match="--fresh"):
        demo.main(args)


def test_settings_and_overrides():
    quick = demo.settings_from_args(demo.build_parser().parse_args(["--quick", "--tdpo-lr", "0.001"]))
    assert quick.sft_steps == demo.QUICK["sft_steps"] and quick.tdpo_lr == 0.001
    full = demo.settings_from_args(demo.build_parser().parse_args(["--no-mark-correct"]))
    assert full.sft_steps == demo.DemoSettings().sft_steps and full.mark_correct is False
    assert demo.schedule_overrides(10, 4, 3, 2e-5) == ["batch_size=4", "n_examples=40", "eval_every=16",
                                                       "save_every=40", "lr=2e-05"]
    assert stages.hydra_value("/tmp/a-b_c/x.json") == "/tmp/a-b_c/x.json"
    assert stages.hydra_value("/tmp/with space,comma") == "'/tmp/with space,comma'"
    assert demo.model_overrides("smollm2-135m") == ["model=smollm2-135m"]


def test_hydra_quoted_path_composes(tmp_path):
    from granular_po.training.config import compose_config

    odd = tmp_path / "a dir, with [odd] chars" / "train.json"
    cfg = compose_config([f"custom_train_path={stages.hydra_value(odd)}"])
    assert cfg.custom_train_path == str(odd)


@pytest.mark.slow
def test_real_default_model_quick_demo(tmp_path):
    """The embedded SmolLM2-135M through the whole demo, in its --quick sizes (minutes on a CPU)."""
    out = tmp_path / "report"
    assert demo.main(["--out", str(out), "--quick"]) == 0
    report = (out / "report.md").read_text()
    assert "Model `smollm2-135m`" in report and "| final (SFT + TDPO2) |" in report
    base = json.loads((out / "eval" / "0.json").read_text())
    assert base["n"] == demo.QUICK["n_eval"] and any(r["completion"].strip() for r in base["rows"])


def test_finished_means_a_complete_checkpoint_at_or_past_the_final_step(tmp_path):
    """The train command itself, re-run on a run at its final step, trains one step more: the demo checks."""
    from granular_po.training import checkpoints

    def complete(step):
        path = tmp_path / f"step-{step}"
        path.mkdir()
        (path / checkpoints.COMPLETE_MARKER).write_text(f"{step}\n")
        (path / "trainer_state.json").write_text("{}")

    assert not stages.finished(tmp_path, 4)
    complete(2)
    (tmp_path / "step-4").mkdir()  # no COMPLETE marker: a save cut short
    assert not stages.finished(tmp_path, 4)
    complete(5)
    assert stages.finished(tmp_path, 4)
