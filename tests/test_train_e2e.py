"""End to end on a tiny random model: the research code's two commands in sequence.

Stage 1 (SFT, granular=false) then stage 2 (TDPO and DPO, granular=true) from its output through
`model.archive`, exactly as a user of the research code types them, apart from model and paths.
"""

import json
import os
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path
from unittest.mock import MagicMock

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM

from granular_po.apps.cli import train_main

WORDS = ["apple", "river", "stone", "cloud", "green", "music", "paper", "light", "sugar", "window", "tiger", "honey"]


def toy_pairs(n: int, offset: int) -> list[dict]:
    """A learnable preference: the correct response ends in 'yes', the incorrect one in 'no'."""
    pairs = []
    for i in range(n):
        word = WORDS[(i + offset) % len(WORDS)]
        prompt = f"Is {word} number {i + offset} good?"
        correct = f"About {word}: the answer is yes."
        incorrect = f"About {word}: the answer is no."
        start = incorrect.index("no.")
        pairs.append({"prompt": prompt, "correct_response": correct, "incorrect_response": incorrect,
                      "masked_region": [start, start + 2, -1]})
    return pairs


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    tokenizer = tiny_tokenizer("byte_level")
    model = tiny_llama(len(tokenizer), hidden_size=64)
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    (root / "train.json").write_text(json.dumps(toy_pairs(32, 0)))
    (root / "eval.json").write_text(json.dumps(toy_pairs(16, 100)))
    return root


def common(root: Path, exp: str) -> list[str]:
    return [
        f"model.name_or_path={root / 'tiny'}", "model.block_name=LlamaDecoderLayer", "datasets=[ours]",
        f"custom_train_path={root / 'train.json'}", f"custom_eval_path={root / 'eval.json'}",
        f"exp_name={exp}", f"local_dirs=[{root / 'runs'}]", "prompt_format=raw", "optimizer=AdamW",
        "warmup_steps=0", "max_length=64", "max_prompt_length=32",
    ]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_run(workspace):
    argv = common(workspace, "sft") + [
        "loss=sft", "granular=false", "gradient_accumulation_steps=2", "eval_every=32", "batch_size=4",
        "eval_batch_size=4", "n_epochs=2", "trainer=BasicTrainer", "sample_during_eval=false",
        "model.fsdp_policy_mp=bfloat16", "lr=3e-3",
    ]
    assert train_main(argv) == 0
    return workspace / "runs" / "sft"


def test_sft_writes_outputs(sft_run):
    assert (sft_run / "config.yaml").is_file()
    latest = sft_run / "LATEST"
    assert latest.is_symlink() and latest.resolve().name == "step-16"  # 32 pairs x 2 epochs / 4
    assert (latest / "model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(latest)  # a plain HF directory
    metrics = read_metrics(sft_run)
    train = [m for m in metrics if "loss/train" in m]
    assert len(train) == 16
    assert train[-1]["loss/train"] < train[0]["loss/train"]
    assert any("loss/eval" in m for m in metrics)
    assert all(key in train[0] for key in ("logps_train/chosen", "grad_norm", "examples_per_second"))


@pytest.mark.parametrize("loss", ["tdpo", "dpo"])
def test_preference_stage_from_sft_archive(workspace, sft_run, loss):
    if loss == "tdpo":  # TDPO2, with policy and reference samples at each evaluation
        extra = ["loss.alpha=0.5", "loss.if_tdpo2=true", "sample_during_eval=true", "n_eval_model_samples=2"]
    else:  # DPO with the reference's log-probs computed once, before training
        extra = ["precompute_ref_log_probs=true", f"cache_dir={workspace / 'cache'}"]
    argv = common(workspace, f"{loss}_run") + [
        f"loss={loss}", "loss.beta=0.5", *extra, "granular=true", f"model.archive={sft_run / 'LATEST'}",
        "batch_size=8", "eval_batch_size=16", "n_epochs=4", "eval_every=32", "lr=3e-3",
    ]
    assert train_main(argv) == 0
    run_dir = workspace / "runs" / f"{loss}_run"
    metrics = read_metrics(run_dir)
    evals = [m for m in metrics if "rewards_eval/accuracies" in m]
    assert len(evals) >= 2
    # the first eval, before any step, starts from the SFT weights in policy and reference alike
    assert evals[0]["rewards_eval/margins"] == pytest.approx(0.0, abs=1e-5)
    assert evals[-1]["rewards_eval/accuracies"] > 0.9
    train = [m for m in metrics if "rewards_train/chosen" in m]
    for key in ("rewards_train/rejected", "rewards_train/accuracies", "rewards_train/margins",
                "logps_train/chosen", "logps_train/rejected", "loss/train", "grad_norm"):
        assert key in train[0], key
    if loss == "tdpo":
        assert all(k in train[0] for k in ("kl_train/chosen", "kl_train/rejected", "kl_train/margin"))
        samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 2 * len(evals)
        assert all({"step", "index", "prompt", "policy", "reference"} <= set(s) for s in samples)
    else:
        assert list((workspace / "cache").glob("ref_logps-*.safetensors"))
    final = AutoModelForCausalLM.from_pretrained(run_dir / "LATEST")
    sft = AutoModelForCausalLM.from_pretrained(sft_run / "LATEST")
    changed = any(not torch.equal(a, b) for a, b in zip(final.parameters(), sft.parameters()))
    assert changed


def test_resumed_run_continues_from_saved_step(workspace, sft_run):
    """Run 2 epochs with checkpoints, then ask for 3: the second invocation resumes, not restarts."""
    base = common(workspace, "resume") + ["loss=sft", "batch_size=4", "eval_every=16", "do_first_eval=false", "lr=1e-3"]
    assert train_main(base + ["n_epochs=1"]) == 0
    run_dir = workspace / "runs" / "resume"
    assert (run_dir / "LATEST").resolve().name == "step-8"
    assert train_main(base + ["n_epochs=2"]) == 0
    steps = [m["step"] for m in read_metrics(run_dir) if "loss/train" in m]
    assert steps == list(range(1, 17))  # 1..8 once, then 9..16: nothing repeated, nothing lost
    assert (run_dir / "LATEST").resolve().name == "step-16"
    assert train_main(base + ["n_epochs=2"]) == 0  # the same command on a finished run trains nothing
    assert (run_dir / "LATEST").resolve().name == "step-16" and not (run_dir / "step-17").exists()
    assert [m["step"] for m in read_metrics(run_dir) if "loss/train" in m] == list(range(1, 17))


def test_lora_dpo_keeps_one_copy_and_saves_adapter_and_merged(workspace, sft_run):
    """With LoRA the reference is the base with adapters off: no second model; output = adapter (+ merged)."""
    argv = common(workspace, "lora_dpo") + [
        "loss=dpo", "loss.beta=0.5", "granular=true", f"model.archive={sft_run / 'LATEST'}", "lora.enabled=true",
        "lora.r=4", "lora.alpha=8", "lora.merge_on_save=true", "batch_size=8", "n_epochs=2", "eval_every=64",
        "lr=1e-2",
    ]
    assert train_main(argv) == 0
    run_dir = workspace / "runs" / "lora_dpo"
    latest = run_dir / "LATEST"
    assert (latest / "adapter_config.json").is_file() and (latest / "adapter_model.safetensors").is_file()
    assert not (latest / "model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    sft = AutoModelForCausalLM.from_pretrained(sft_run / "LATEST")
    assert any(not torch.equal(a, b) for a, b in zip(merged.parameters(), sft.parameters()))
    evals = [m for m in read_metrics(run_dir) if "rewards_eval/margins" in m]
    assert evals[0]["rewards_eval/margins"] == pytest.approx(0.0, abs=1e-5)  # adapters start at zero
    assert evals[-1]["rewards_eval/margins"] > 0


# The research README's two commands, character for character (granular fork of the TDPO repository).
RESEARCH_SFT = (
    "python -u train.py model=llama8b-fine-tuned datasets=[ours] loss=sft granular=false "
    "custom_train_path=/content/granular_annotation_dataset.json "
    "custom_eval_path=/content/granular_annotation_evaluation_dataset.json  exp_name=experiment_name "
    "gradient_accumulation_steps=2 eval_every=2000 batch_size=16 eval_batch_size=8 n_epochs=10 "
    "trainer=BasicTrainer sample_during_eval=false model.fsdp_policy_mp=bfloat16"
)
RESEARCH_PREFERENCE = (
    "python -u train.py model=llama8b-fine-tuned datasets=[ours] loss=dpo/tdpo loss.alpha=0.5 loss.beta=0.1 "
    "exp_name=experiment_name gradient_accumulation_steps=2 batch_size=4 eval_batch_size=2 trainer=BasicTrainer "
    "sample_during_eval=false model.fsdp_policy_mp=bfloat16 eval_every=1000 "
    "model.archive=/path/to/trained/model/in/step1/policy.pt"
)


def research_argv(command: str, root: Path, replace: dict[str, str], add: list[str]) -> list[str]:
    """The command's overrides with the model and paths replaced (nothing else changed)."""
    argv = [replace.get(word, word) for word in command.split()[3:]]
    return argv + [f"model.name_or_path={root / 'tiny'}", f"local_dirs=[{root / 'runs'}]", *add]


@pytest.mark.parametrize("loss", ["dpo", "tdpo"])
def test_research_readme_commands_verbatim(workspace, loss, caplog):
    """Issue 11.1: `loss=dpo loss.alpha=0.5 loss.beta=0.1` (the research README's stage 3) runs; alpha, a
    TDPO key its dpo.yaml had, gets a one-line notice under DPO. The research run directory had a
    timestamp, ours does not: each stage gets its own exp_name (the same name is refused, see resume)."""
    (workspace / "small.json").write_text(json.dumps(toy_pairs(8, 0)))  # few steps: this checks the keys
    paths = {
        "custom_train_path=/content/granular_annotation_dataset.json": f"custom_train_path={workspace / 'small.json'}",
        "custom_eval_path=/content/granular_annotation_evaluation_dataset.json":
            f"custom_eval_path={workspace / 'small.json'}",
    }
    sft = research_argv(RESEARCH_SFT, workspace, {**paths, "exp_name=experiment_name": "exp_name=readme_sft"}, [])
    sft_dir = workspace / "runs" / "readme_sft"
    if not (sft_dir / "LATEST").exists():  # shared by both parameters
        assert train_main(sft) == 0
    assert (sft_dir / "LATEST").resolve().name == "step-10"  # 8 pairs in one batch of 16, 10 epochs
    preference = research_argv(RESEARCH_PREFERENCE, workspace, {
        "loss=dpo/tdpo": f"loss={loss}", "exp_name=experiment_name": f"exp_name=readme_{loss}",
        "model.archive=/path/to/trained/model/in/step1/policy.pt": f"model.archive={sft_dir / 'LATEST'}",
    }, [f"custom_train_path={workspace / 'small.json'}", f"custom_eval_path={workspace / 'small.json'}"])
    caplog.clear()
    assert train_main(preference) == 0
    run_dir = workspace / "runs" / f"readme_{loss}"
    assert (run_dir / "LATEST").resolve().name == "step-2"  # 8 pairs / 4, one epoch
    stored = (run_dir / "config.yaml").read_text()
    assert f"name: {loss}" in stored and "alpha: 0.5" in stored and "beta: 0.1" in stored
    notices = [r.getMessage() for r in caplog.records if "loss.alpha" in r.getMessage()]
    assert notices == (["notice: loss.alpha=0.5 has no effect for loss=dpo (the TDPO KL weight); ignored"]
                       if loss == "dpo" else [])


def test_a_run_name_used_again_with_another_loss_is_refused_then_started_over(workspace, capsys):
    """Issue 11.10 end to end: SFT `exp_name=reuse`, then DPO under the same name is refused with nothing
    touched; `resume=false` starts that run over (the SFT checkpoints and metrics go)."""
    (workspace / "reuse.json").write_text(json.dumps(toy_pairs(8, 0)))
    argv = common(workspace, "reuse") + [f"custom_train_path={workspace / 'reuse.json'}", "custom_eval_path=null",
                                         "batch_size=4", "loss=sft", "lr=1e-3"]
    assert train_main(argv) == 0
    run_dir = workspace / "runs" / "reuse"
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    capsys.readouterr()
    dpo = argv + ["loss=dpo", "lr=1e-4", "n_epochs=3"]
    assert train_main(dpo) == 2
    err = capsys.readouterr().err
    assert "loss.name: 'sft' -> 'dpo'" in err and "lr: 0.001 -> 0.0001" in err and "n_epochs" not in err
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
    assert train_main(dpo + ["resume=false"]) == 0
    assert "name: dpo" in (run_dir / "config.yaml").read_text()
    assert "resume=false: starting" in capsys.readouterr().out
    records = read_metrics(run_dir)
    assert [m["step"] for m in records if "loss/train" in m] == [1, 2, 3, 4, 5, 6]  # DPO only, from 1
    assert all("rewards_train/chosen" in m for m in records if "loss/train" in m)
    assert [p.name for p in run_dir.glob("step-*")] == ["step-6"]  # the SFT step-2 is gone


def fake_wandb(monkeypatch) -> tuple[MagicMock, list[dict]]:
    """A stand-in `wandb` module (no network, no account) that records each `wandb.init`, with the
    environment wandb itself reads (WANDB_PROJECT, WANDB_ENTITY) at that moment."""
    wandb = MagicMock(name="wandb", __spec__=ModuleSpec("wandb", None))
    wandb.run = None
    inits = []

    def init(**kwargs):
        inits.append({**kwargs, "env": {k: os.environ.get(k) for k in ("WANDB_PROJECT", "WANDB_ENTITY")}})
        wandb.run = MagicMock(name="run")
        return wandb.run

    wandb.init.side_effect = init
    config_util = MagicMock(ConfigError=type("ConfigError", (Exception,), {}))
    for name, module in {"wandb": wandb, "wandb.sdk": MagicMock(), "wandb.sdk.lib": MagicMock(),
                         "wandb.sdk.lib.config_util": config_util}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return wandb, inits


def test_wandb_project_and_entity_reach_wandb(workspace, monkeypatch):
    """Issue 11.11: `wandb.project` / `wandb.entity` were read nowhere; now the run's WandbCallback
    starts wandb in that project and entity, and the environment is restored afterwards."""
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv("WANDB_ENTITY", "someone-else")
    _, inits = fake_wandb(monkeypatch)
    (workspace / "wandb.json").write_text(json.dumps(toy_pairs(4, 0)))
    argv = common(workspace, "wandb") + [f"custom_train_path={workspace / 'wandb.json'}", "custom_eval_path=null",
                                         "loss=sft", "batch_size=4", "debug=true", "wandb.enabled=true",
                                         "wandb.project=my-project", "wandb.entity=my-team"]
    assert train_main(argv) == 0
    assert len(inits) == 1
    assert inits[0]["project"] == "my-project"
    assert inits[0]["env"] == {"WANDB_PROJECT": "my-project", "WANDB_ENTITY": "my-team"}
    assert "WANDB_PROJECT" not in os.environ and os.environ["WANDB_ENTITY"] == "someone-else"


def test_train_names_pairs_whose_region_reaches_no_token(workspace, tmp_path, capsys):
    """Issue 11.8: `train` refuses (on_invalid=error) or skips and names (skip) a pair whose region marks
    no token, instead of training it on its end token alone. Issue 13.9: a pair with identical responses
    is skipped and named in both modes."""
    pairs = toy_pairs(5, 0)
    pairs[2]["masked_region"] = [5, 5, -1]  # zero length
    pairs[4]["incorrect_response"] = pairs[4]["correct_response"]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(pairs))
    argv = [*common(workspace, "no_token"), f"custom_train_path={data}", "custom_eval_path=null", "loss=dpo",
            "granular=true", "batch_size=2", "n_examples=2", "debug=true", "do_first_eval=false", "share_prompt=false"]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert f"{data}, record 2, field 'masked_region': region [5, 5) of the incorrect response is empty" in err
    assert train_main([*argv, "on_invalid=skip"]) == 0
    err = capsys.readouterr().err
    assert ("read 5 records, kept 3, 3 regions; skipped 2 (identical_responses=1: record 4; "
            "region_reaches_no_token=1: record 2)") in err


def test_a_failed_start_leaves_no_run_directory_and_debug_leaves_nothing(workspace, capsys):
    """Issue 13.2: the run directory (and config.yaml) used to be written before data and models were
    loaded, and local_dirs created while checking the config."""
    bad = workspace / "bad.json"
    bad.write_text(json.dumps([{"prompt": "p", "correct_response": "a"}]))  # no incorrect_response
    root = workspace / "nothing_here"
    argv = common(workspace, "failed") + [f"custom_train_path={bad}", "custom_eval_path=null", "loss=sft",
                                          f"local_dirs=[{root / 'runs'}]"]
    assert train_main(argv) == 2
    assert "incorrect_response" in capsys.readouterr().err
    assert not root.exists()
    (workspace / "debug.json").write_text(json.dumps(toy_pairs(4, 0)))
    argv = common(workspace, "debug") + [f"custom_train_path={workspace / 'debug.json'}", "custom_eval_path=null",
                                         "loss=sft", "batch_size=4", "debug=true", f"local_dirs=[{root / 'runs'}]"]
    assert train_main(argv) == 0
    assert not root.exists()


README_SMALL_DATA_SFT = (
    "python -u train.py loss=sft granular=false custom_train_path=train.json custom_eval_path=eval.json "
    "exp_name=sft optimizer=AdamW lr=3e-5 warmup_steps=4 batch_size=8 n_examples=192 "
    "max_length=128 max_prompt_length=96"
)


def test_warmup_longer_than_the_run_is_warned_and_the_small_data_variant_is_not(workspace, caplog):
    """Issue 13.3: the research defaults (SGD, lr 5e-6, 150 warmup steps) on a small file train at a
    fraction of lr and nothing moves, silently. The command line warns, naming the numbers and keys."""
    from test_cli_config import cli

    (workspace / "small8.json").write_text(json.dumps(toy_pairs(8, 0)))
    done = cli(f"model.name_or_path={workspace / 'tiny'}", f"custom_train_path={workspace / 'small8.json'}",
               "prompt_format=raw", "max_length=64", "max_prompt_length=32", "debug=true", "do_first_eval=false",
               script=True, cwd=workspace, timeout=600)
    assert done.returncode == 0, done.stderr
    warning = ("warning: warmup_steps=150 is as long as the run or longer: 2 optimizer steps (8 examples x "
               "n_epochs=1 / batch_size=4), so the learning rate only reaches 6.62e-08 of lr=5e-06 at the last "
               "step. Lower warmup_steps (e.g. warmup_steps=0), or train longer (n_epochs, n_examples)")
    assert warning in done.stderr
    # the README's small-data command (model and paths replaced) trains past its warmup: no warning
    argv = [word for word in README_SMALL_DATA_SFT.split()[3:] if not word.startswith(("custom_", "exp_name"))]
    argv += [f"model.name_or_path={workspace / 'tiny'}", f"custom_train_path={workspace / 'small8.json'}",
             "custom_eval_path=null", "debug=true", "prompt_format=raw"]
    caplog.clear()
    assert train_main(argv) == 0
    assert not [r for r in caplog.records if "warmup_steps" in r.getMessage()]
