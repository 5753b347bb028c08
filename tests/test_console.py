"""What `granular-po train` prints when its output goes to a pipe or a log file (issue 13, items 4 and 5).

Item 5: one line per logging step with numbers as numbers, no carriage-return bars or cursor escapes,
nothing repeated on resume; the full metrics stay in `metrics.jsonl`. Item 4: a start-up block saying where
things go and what was loaded, a closing block with the checkpoint and the next command. The real
command runs in a subprocess with stdout and stderr to pipes, as `granular-po train ... > log 2>&1` would.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import tiny_llama, tiny_tokenizer, toy_preference_pairs

from granular_po.training.console import ConsoleCallback, metric_line, number

NUMBER = r"-?\d+(?:\.\d+)?(?:e[+-]\d+)?"
STEP_LINE = re.compile(rf"^step\s+(\d+)/4\s+loss ({NUMBER})\s+nll/token {NUMBER}\s+grad norm ({NUMBER})\s+lr ({NUMBER})\s+({NUMBER}) ex/s$")
EVAL_LINE = re.compile(rf"^eval\s+(\d+)/4\s+loss ({NUMBER})\s+nll/token {NUMBER}$")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("console")
    tokenizer = tiny_tokenizer("byte_level")
    tiny_llama(len(tokenizer), hidden_size=32).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    (root / "train.json").write_text(json.dumps(toy_preference_pairs(16, filler_cycle=1)))
    (root / "eval.json").write_text(json.dumps(toy_preference_pairs(4, filler_cycle=1)))
    return root


def overrides(root: Path, exp: str, *extra: str) -> list[str]:
    return [f"model.name_or_path={root / 'tiny'}", "datasets=[ours]", f"custom_train_path={root / 'train.json'}",
            f"custom_eval_path={root / 'eval.json'}", f"local_dirs=[{root / 'runs'}]", f"exp_name={exp}",
            "prompt_format=raw", "optimizer=AdamW", "lr=1e-3", "warmup_steps=0", "max_length=64",
            "max_prompt_length=24", "batch_size=4", "eval_batch_size=4", "eval_every=8",
            "minimum_log_interval_secs=0", *extra]


def train(args: list[str]) -> subprocess.CompletedProcess:
    """`granular-po train ARGS` in a subprocess, stdout and stderr to pipes (not a terminal)."""
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "granular_po.apps.cli", "train", *args], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def sft(workspace):
    """One SFT run of 4 steps (eval every 2) on a tiny model; returns (completed process, run directory)."""
    result = train(overrides(workspace, "sft", "loss=sft", "n_epochs=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result, workspace / "runs" / "sft"


def test_console_is_plain_lines_with_numbers(sft):
    result, _ = sft
    for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        assert "\x1b[" not in text, f"cursor escape in {name}"
        assert "\r" not in text, f"carriage-return progress bar in {name}"
    out = result.stdout
    assert "{'" not in out and "': '" not in out  # no dicts of stringified numbers
    assert "eval_loss" not in out and "examples_per_second" not in out
    lines = out.splitlines()
    steps = [STEP_LINE.match(line) for line in lines if line.startswith("step ")]
    assert all(steps), [line for line in lines if line.startswith("step ")]
    assert [int(m.group(1)) for m in steps] == [1, 2, 3, 4]  # one line per logging step
    assert all(float(m.group(5)) > 0 for m in steps)  # examples per second: never a bogus 0
    evals = [EVAL_LINE.match(line) for line in lines if line.startswith("eval ")]
    assert all(evals) and [int(m.group(1)) for m in evals] == [0, 2, 4]


def test_console_numbers_are_the_metrics_file_numbers(sft):
    result, run_dir = sft
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = {r["step"]: r for r in records if "loss/train" in r}
    for match in map(STEP_LINE.match, result.stdout.splitlines()):
        if match:
            row = train_rows[int(match.group(1))]
            assert float(match.group(2)) == pytest.approx(row["loss/train"], rel=1e-3)
            assert float(match.group(3)) == pytest.approx(row["grad_norm"], rel=1e-3)
    # the full metrics stay in the file, the Trainer's own keys included
    assert all("eval_loss" in r and "loss/eval" in r for r in records if "eval_runtime" in r)
    closing = [r for r in records if "train_runtime" in r]
    assert len(closing) == 1 and "examples_per_second" not in closing[0]  # was a bogus 0


@pytest.mark.slow
def test_resume_prints_no_missing_keys_warning(workspace, sft):
    """Resuming (a second epoch from step-4) ties the lm_head again instead of warning at every restart."""
    result = train(overrides(workspace, "sft", "loss=sft", "n_epochs=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    both = result.stdout + result.stderr
    assert "resuming from step-4" in both
    assert "missing keys" not in both
    assert [int(m.group(1)) for m in map(STEP_LINE.match, result.stdout.replace("/8", "/4").splitlines()) if m] \
        == [5, 6, 7, 8]


def test_number_and_line_format():
    assert number(0.69314718) == "0.6931" and number(1.0) == "1" and number(5e-06) == "5e-06"
    assert number(3) == "3" and number(float("nan")) == "nan" and number(-130.92) == "-130.9"
    logs = {"loss/train": 0.5, "rewards_train/accuracies": 0.75, "kl_train/margin": 0.01, "epoch": 1.0}
    assert metric_line(logs, "train") == "loss 0.5  reward acc 0.75  kl margin 0.01"


def test_console_throttles_train_lines_but_not_the_last_or_evals():
    class State:
        is_world_process_zero, max_steps, global_step = True, 10, 0

    out: list[str] = []

    class Sink:
        def write(self, text):
            out.append(text)

        def flush(self):
            pass

    callback, state = ConsoleCallback(minimum_interval=3600, bars=False, out=Sink()), State()
    for step in range(1, 11):
        state.global_step = step
        callback.on_log(None, state, None, logs={"loss/train": 1.0 / step, "loss": 1.0 / step})
    callback.on_log(None, state, None, logs={"loss/eval": 0.5, "eval_loss": 0.5})
    lines = [line for line in "".join(out).splitlines() if line]
    assert [line.split()[1] for line in lines] == ["1/10", "10/10", "10/10"]
    assert lines[-1].startswith("eval") and callback.last_train["step"] == 10


# ---------------------------------------------------------------- item 4: start and end blocks


def block_rows(out: str, title_prefix: str) -> dict[str, str]:
    """The `label  value` rows of the block whose title starts with `title_prefix` (continuations joined)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title_prefix))
    rows: dict[str, str] = {}
    label = None
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        key, _, value = line.strip().partition("  ")
        if line.startswith("   ") and label is not None and line[2] == " ":  # a continuation line
            rows[label] += "\n" + line.strip()
        else:
            label = key
            rows[label] = value.strip()
    return rows


def test_start_block_says_where_things_go(sft, workspace):
    result, run_dir = sft
    rows = block_rows(result.stdout, "granular-po train: sft (SFT, response-level)")
    assert rows["run directory"].startswith(f"{run_dir} (config.yaml, metrics.jsonl, step-N/ checkpoints, LATEST)")
    assert rows["policy"] == str(workspace / "tiny")
    assert rows["reference"] == "none (SFT trains without one)"
    # the lines `granular-po inspect` prints for the same file
    assert f"{workspace / 'train.json'}: read 16 records, kept 16, 16 regions" in rows["train data"]
    assert re.search(r"response tokens carrying weight: (\d+)/\1 = 100\.0%", rows["train data"])
    assert rows["eval data"] == f"{workspace / 'eval.json'}: read 4 records, kept 4, 4 regions"
    assert rows["forward"] == "padded rows, chunked lm_head on weighted positions"
    assert re.fullmatch(r"about [\d.]+ MiB per step \(parameters .*, activations .*, logits .*\)", rows["memory"])
    assert rows["schedule"] == "4 steps of 4 examples, AdamW lr 0.001, warmup 0 steps"
    # printed before the first step
    assert result.stdout.index("granular-po train: sft") < result.stdout.index("step  1/4")


def test_end_block_names_checkpoint_and_next_command(sft, workspace):
    result, run_dir = sft
    rows = block_rows(result.stdout, "done: step 4")
    assert rows["checkpoint"] == f"{run_dir / 'LATEST'} -> step-4"
    assert (run_dir / "LATEST").resolve().name == "step-4"
    assert rows["all metrics"] == str(run_dir / "metrics.jsonl")
    assert re.fullmatch(rf"step 4: loss {NUMBER}  nll/token {NUMBER}  grad norm {NUMBER}  lr 0.001", rows["final train"])
    assert re.fullmatch(rf"step 4: loss {NUMBER}  nll/token {NUMBER}", rows["final eval"])
    command = shlex.split(rows["next"])
    assert command[:2] == ["granular-po", "train"]
    for item in ("loss=tdpo", "loss.if_tdpo2=true", "granular=true", "exp_name=sft_tdpo",
                 f"model.archive={run_dir / 'LATEST'}", f"custom_train_path={workspace / 'train.json'}"):
        assert item in command, item
    assert "loss=sft" not in command and "exp_name=sft" not in command


def test_next_command_runs_stage_two_from_the_archive(sft, workspace, capsys):
    """The printed stage-2 command, run as printed: policy and reference both start from the SFT output."""
    from granular_po.apps.cli import train_main

    result, run_dir = sft
    command = shlex.split(block_rows(result.stdout, "done: step 4")["next"])
    assert train_main(command[2:]) == 0
    out = capsys.readouterr().out
    rows = block_rows(out, "granular-po train: sft_tdpo (TDPO2, granular)")
    assert rows["policy"] == f"{workspace / 'tiny'}, weights from model.archive={run_dir / 'LATEST'} (-> step-4)"
    assert rows["reference"] == "a frozen copy of model.archive (float32)"
    assert re.search(r"response tokens carrying weight: \d+/\d+ = \d+\.\d%", rows["train data"])
    end = block_rows(out, "done: step 4")
    tdpo_dir = workspace / "runs" / "sft_tdpo"
    assert end["checkpoint"] == f"{tdpo_dir / 'LATEST'} -> step-4"
    assert end["next"] == f"granular-po eval --model {tdpo_dir / 'LATEST'} --data {workspace / 'eval.json'}"
    assert "reward acc" in end["final eval"] and "kl margin" in end["final eval"]


def test_stage_two_overrides_replace_only_the_stage_keys():
    """SFT's rate is not carried into the preference stage (the README's small-data recipe: 5e-6; rates
    10x above it collapse AdamW runs), and a key typed twice appears once, with the value that took effect."""
    from granular_po.apps.demo import DemoSettings
    from granular_po.training.briefing import PREFERENCE_LR, stage_two_overrides

    given = ["loss=sft", "+granular=false", "granular.outside_weight=0.1", "exp_name=a", "lr=3e-5", "n_examples=48",
             "model.archive=old", "model.name_or_path=m", "losses_seen=1", "n_examples=56", "++model.name_or_path=n"]
    assert stage_two_overrides(given, Path("/r/LATEST"), "a") == [
        "granular.outside_weight=0.1", "losses_seen=1", "n_examples=56", "++model.name_or_path=n", "loss=tdpo",
        "loss.beta=0.1", "loss.alpha=0.5", "loss.if_tdpo2=true", "granular=true", "lr=5e-06", "exp_name=a_tdpo",
        "model.archive=/r/LATEST"]
    assert PREFERENCE_LR == DemoSettings().tdpo_lr == 5e-6


def test_forward_line_says_where_the_head_runs(workspace):
    """With the KL over every response token (`granular.kl_weights=all`) and the chosen response's NLL
    (`loss.nll_alpha`), the chunked lm_head runs on every response position, not only the margin's
    weighted ones: the start-up block says so and names the keys (issue 21)."""
    result = train(overrides(workspace, "klall", "loss=tdpo", "loss.if_tdpo2=true", "granular=true",
                             "granular.kl_weights=all", "loss.nll_alpha=1", "n_examples=4", "debug=true"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = block_rows(result.stdout, "granular-po train: klall (TDPO2, granular)")
    assert rows["forward"] == ("shared prompt, chunked lm_head on every response position "
                               "(granular.kl_weights=all, loss.nll_alpha=1)")


def test_forward_line_keeps_weighted_positions_where_the_options_do_not_apply():
    """The defaults, and `kl_weights=all` under DPO (whose KL is only logged, on the margin's weights), keep
    the head on the weighted positions; a run on full logits says so whatever the options."""
    from granular_po.forward.routes import ForwardRoute
    from granular_po.losses import LossType
    from granular_po.training.briefing import forward_line
    from granular_po.training.objectives import LossSettings

    chunked, full = ForwardRoute(use_hidden_path=True), ForwardRoute(use_hidden_path=False)
    tdpo = LossSettings(loss=LossType.TDPO, if_tdpo2=True)
    assert forward_line(chunked, tdpo) == "padded rows, chunked lm_head on weighted positions"
    assert forward_line(chunked, LossSettings(loss=LossType.DPO, kl_weights="all")).endswith("on weighted positions")
    assert forward_line(chunked, LossSettings(loss=LossType.DPO, nll_alpha=0.5)) == (
        "padded rows, chunked lm_head on every response position (loss.nll_alpha=0.5)")
    assert forward_line(full, LossSettings(loss=LossType.TDPO, kl_weights="all")) == "padded rows, full logits"
