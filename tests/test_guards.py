"""Numerical guards, with faults injected for real into a tiny training run (`train_main`, in-process).

- A non-finite loss: one embedding row of the saved model is NaN, and one record's prompt holds that
  token. The run stops with `NonFiniteError` naming the step and the batch's record indices (the
  checkpoints before it stay intact); with `skip_nonfinite=true` the step is skipped (no parameter
  moves), counted in `nonfinite_skipped`, and training goes on.
- A non-finite gradient norm with a finite loss: a hook on the embedding output turns its gradient
  into inf for batches holding the poison token. Same two behaviours.
- A batch whose token weights are all zero is reported by record index, and its loss stays finite.
- Resource limits (`granular_po.training.resources.preflight`): too little memory for the batch (CPU) or too
  little disk for a checkpoint stops the run before its first step, with the figures and what to
  change (psutil / shutil figures monkeypatched); real figures let a tiny run through.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer

from granular_po import models
from granular_po.apps.cli import train_main
from granular_po.data import encode
from granular_po.training import resources
from granular_po.training.config import compose_config, validate
from granular_po.training.trainer import GranularTrainer

POISON = "Q"  # a byte token that only the poison record's text holds (special tokens in text are split)
POISON_RECORD = 5
N_RECORDS = 8
WORDS = ["apple", "river", "stone", "cloud", "green", "music", "paper", "light", "sugar", "window"]


def records(poison_at: int | None = POISON_RECORD, zero_weight_at: tuple[int, ...] = ()) -> list[dict]:
    out = []
    for i in range(N_RECORDS):
        word = WORDS[i % len(WORDS)]
        prompt = f"Is the zebra {POISON} good?" if i == poison_at else f"Is the {word} {i} good?"
        incorrect = f"The {word}: no."
        start = incorrect.index("no")
        region = [start, start, -1] if i in zero_weight_at else [start, start + 2, -1]  # zero-length: no token
        out.append({"prompt": prompt, "correct_response": f"The {word}: yes.", "incorrect_response": incorrect,
                    "masked_region": region})
    return out


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A clean tiny model and a copy whose POISON embedding row is NaN (untied: the lm_head is clean)."""
    root = tmp_path_factory.mktemp("guards")
    tokenizer = tiny_tokenizer("byte_level")
    model = tiny_llama(len(tokenizer), hidden_size=32, tie_word_embeddings=False)
    model.save_pretrained(root / "clean")
    tokenizer.save_pretrained(root / "clean")
    poison_id = tokenizer.convert_tokens_to_ids(POISON)
    assert poison_id in tokenizer(records()[POISON_RECORD]["prompt"])["input_ids"]
    with torch.no_grad():
        model.get_input_embeddings().weight[poison_id] = float("nan")
    model.save_pretrained(root / "nan_embedding")
    tokenizer.save_pretrained(root / "nan_embedding")
    return root


def argv(root: Path, tmp: Path, model: str, data: list[dict], extra: list[str]) -> list[str]:
    (tmp / "train.json").write_text(json.dumps(data))
    return [
        f"model.name_or_path={root / model}", "datasets=[ours]", f"custom_train_path={tmp / 'train.json'}",
        "exp_name=run", f"local_dirs=[{tmp / 'runs'}]", "prompt_format=raw", "optimizer=AdamW", "lr=1e-2",
        "warmup_steps=0", "max_length=48", "max_prompt_length=24", "do_first_eval=false", "batch_size=2",
        "save_every=2", "n_epochs=1", *extra,
    ]


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    return [r for r in map(json.loads, lines) if "loss" in r or "loss/train" in r]


class ParameterTrace:
    """Wraps `models.load_policy_and_reference` and `GranularTrainer.compute_loss`: keeps the policy,
    snapshots its parameters at every training micro-batch (however many forwards it takes: with
    share_prompt a prompt forward and a response forward), and (with `inf_grad`) makes the embedding
    gradient inf for poison batches."""

    def __init__(self, monkeypatch, poison_id: int, inf_grad: bool):
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.poisoned_forwards: list[int] = []
        self.policy = None
        original = models.load_policy_and_reference
        original_loss = GranularTrainer.compute_loss

        def load(*args, **kwargs):
            policy, reference = original(*args, **kwargs)
            self.policy = policy
            embed = policy.get_input_embeddings()

            def hook(_module, inputs, output):
                if inf_grad and torch.is_grad_enabled() and bool((inputs[0] == poison_id).any()):
                    output.register_hook(lambda grad: torch.full_like(grad, float("inf")))  # finite forward
                return None

            embed.register_forward_hook(hook)
            return policy, reference

        def compute_loss(trainer, model, inputs, *args, **kwargs):
            self.snapshots.append({k: v.detach().clone() for k, v in self.policy.named_parameters()})
            if bool((inputs["input_ids"] == poison_id).any()):
                self.poisoned_forwards.append(len(self.snapshots) - 1)
            return original_loss(trainer, model, inputs, *args, **kwargs)

        monkeypatch.setattr(models, "load_policy_and_reference", load)
        monkeypatch.setattr(GranularTrainer, "compute_loss", compute_loss)

    def changed(self, forward: int) -> bool:
        """Did the optimizer step after training forward `forward` move any parameter?"""
        before = self.snapshots[forward]
        if forward + 1 < len(self.snapshots):
            after = self.snapshots[forward + 1]
        else:  # the last step: compare with the parameters the run ended with
            after = {k: v.detach() for k, v in self.policy.named_parameters()}
        return any(not torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)  # NaN row


def _assert_stops(message: str, what: str, run_dir: Path) -> int:
    match = re.search(rf"non-finite {what} \((nan|inf|-inf)\) at step (\d+), records \[([\d, ]+)\]", message)
    assert match, message
    step, indices = int(match.group(2)), [int(i) for i in match.group(3).split(",")]
    assert POISON_RECORD in indices and len(indices) == 2, message  # batch_size=2: both records named
    assert "skip_nonfinite=true" in message
    logged = [r["step"] for r in train_records(run_dir)]
    assert logged == list(range(1, step)), "every step before the bad one trained and logged; none after"
    if step > 1:  # the checkpoints written before the fault are intact
        assert (run_dir / "LATEST").resolve().name == f"step-{step - 1}"
    return step


def _stops_with_message(run_argv: list[str], capsys) -> str:
    """The CLI stops with exit status 1 and a one-line `error:` (a NonFiniteError), no traceback."""
    capsys.readouterr()
    assert train_main(run_argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.split("error: ", 1)[1]


def test_nonfinite_loss_stops_naming_step_and_records(tiny_dirs, tmp_path, capsys):
    message = _stops_with_message(argv(tiny_dirs, tmp_path, "nan_embedding", records(), ["loss=sft"]), capsys)
    _assert_stops(message, "loss", tmp_path / "runs" / "run")


def test_nonfinite_loss_skipped_and_counted(tiny_dirs, tmp_path, monkeypatch):
    poison_id = tiny_tokenizer("byte_level").convert_tokens_to_ids(POISON)
    trace = ParameterTrace(monkeypatch, poison_id, inf_grad=False)
    assert train_main(argv(tiny_dirs, tmp_path, "nan_embedding", records(), ["loss=sft", "skip_nonfinite=true"])) == 0
    logged = train_records(tmp_path / "runs" / "run")
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert logged[-1]["nonfinite_skipped"] == 1
    (bad,) = trace.poisoned_forwards
    assert "loss/train" not in logged[bad], "a skipped step contributes no loss metrics"
    assert not trace.changed(bad), "the skipped step moved parameters (optimizer momentum?)"
    assert all(trace.changed(i) for i in range(len(trace.snapshots)) if i != bad)


def test_nonfinite_grad_norm_stops_naming_step_and_records(tiny_dirs, tmp_path, monkeypatch, capsys):
    poison_id = tiny_tokenizer("byte_level").convert_tokens_to_ids(POISON)
    ParameterTrace(monkeypatch, poison_id, inf_grad=True)
    # accumulation 2: the step's records come from two micro-batches and all must be named
    extra = ["loss=dpo", "loss.beta=0.5", "granular=true", "batch_size=2", "gradient_accumulation_steps=2"]
    message = _stops_with_message(argv(tiny_dirs, tmp_path, "clean", records(), extra), capsys)
    _assert_stops(message, "gradient norm", tmp_path / "runs" / "run")


def test_nonfinite_grad_norm_skipped_and_counted(tiny_dirs, tmp_path, monkeypatch):
    poison_id = tiny_tokenizer("byte_level").convert_tokens_to_ids(POISON)
    trace = ParameterTrace(monkeypatch, poison_id, inf_grad=True)
    extra = ["loss=dpo", "loss.beta=0.5", "granular=true", "skip_nonfinite=true"]
    assert train_main(argv(tiny_dirs, tmp_path, "clean", records(), extra)) == 0
    logged = train_records(tmp_path / "runs" / "run")
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert logged[-1]["nonfinite_skipped"] == 1
    (bad,) = trace.poisoned_forwards
    assert not trace.changed(bad)
    assert all(trace.changed(i) for i in range(len(trace.snapshots)) if i != bad)
    assert all(torch.isfinite(p).all() for p in trace.snapshots[-1].values())


@pytest.mark.parametrize("average", [False, True])
def test_all_zero_weight_batch_is_reported_not_divided_by_zero(tiny_dirs, tmp_path, caplog, capsys, average,
                                                               monkeypatch):
    data = records(poison_at=None, zero_weight_at=(1, 4))
    extra = ["loss=dpo", "loss.beta=0.5", "granular=true", "granular.include_eos=false", "batch_size=1",
             "save_every=4", f"loss.average_log_prob={str(average).lower()}"]
    # such pairs (a zero-length region) are refused when the data is encoded (issue 11.8); the trainer's
    # guard stays for datasets made otherwise, so the data check is bypassed here to reach it
    monkeypatch.setattr(encode, "admit_reached", lambda records, *args, **kwargs: list(range(len(records))))
    with caplog.at_level(logging.WARNING, logger="granular_po"):
        assert train_main(argv(tiny_dirs, tmp_path, "clean", data, extra)) == 0
    warnings = [r.getMessage() for r in caplog.records if "no weighted token" in r.getMessage()]
    assert sorted(warnings) == ["batch with records [1] has no weighted token: nothing to learn from it",
                                "batch with records [4] has no weighted token: nothing to learn from it"]
    assert "2 batches had no weighted token" in capsys.readouterr().err
    logged = train_records(tmp_path / "runs" / "run")
    assert len(logged) == N_RECORDS
    assert all(torch.isfinite(torch.tensor(r["loss/train"])) for r in logged)
    assert "nonfinite_skipped" not in logged[-1]
    # a batch with nothing to learn: margin 0, loss log 2, no gradient
    zero_steps = [r for r in logged if r["grad_norm"] == 0.0]
    assert len(zero_steps) == 2
    assert all(r["loss/train"] == pytest.approx(0.6931, abs=1e-4) for r in zero_steps)


# ---------------------------------------------------------------- resource limits

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the memory check applies to CPU training")


@cpu_only
def test_too_little_memory_stops_before_training(tiny_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=64 * 1024))
    extra = ["loss=dpo", "loss.beta=0.5", "batch_size=4", "gradient_accumulation_steps=2"]
    assert train_main(argv(tiny_dirs, tmp_path, "clean", records(None), extra)) == 2
    err = capsys.readouterr().err
    match = re.search(r"error: not enough memory: one training step needs about ([\d.]+ MiB) \(.*\), "
                      r"[\d.]+ MiB more than this process holds now, but only ([\d.]+ MiB) is available", err)
    assert match, err
    assert float(match.group(1).split()[0]) > 1 and match.group(2) == "0.1 MiB"
    for hint in ("2 examples x 2 sequences x max_length=48", "batch_size=4", "max_length=48",
                 "gradient_accumulation_steps=2", "activation_checkpointing=true"):
        assert hint in err, hint
    assert not list((tmp_path / "runs" / "run").glob("step-*")) and not (tmp_path / "runs" / "run" / "metrics.jsonl").exists()


def test_too_little_disk_for_a_checkpoint_stops_before_training(tiny_dirs, tmp_path, monkeypatch, capsys):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=10 * 1024**2))
    assert train_main(argv(tiny_dirs, tmp_path, "clean", records(None), ["loss=sft"])) == 2
    err = capsys.readouterr().err
    assert re.search(rf"error: not enough disk space for a checkpoint in {re.escape(str(tmp_path / 'runs' / 'run'))}: "
                     r"one needs about [\d.]+ MiB .*, 10.0 MiB free", err), err
    assert "local_dirs" in err
    assert not list((tmp_path / "runs" / "run").glob("step-*"))


def _tiny_setup(tmp_path, overrides):
    cfg = compose_config([f"local_dirs=[{tmp_path}]", "model.name_or_path=unused", *overrides])
    model = tiny_llama(len(tiny_tokenizer("byte_level")), hidden_size=32)
    return cfg, model, validate(cfg)


def test_preflight_passes_with_real_figures_and_skips_disk_for_debug(tmp_path, monkeypatch):
    cfg, model, settings = _tiny_setup(tmp_path, ["loss=dpo", "loss.beta=0.1"])
    resources.preflight(cfg, model, model, settings)  # a tiny model fits anywhere
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=1, used=1, free=0))
    with pytest.raises(resources.ResourceError, match="disk space"):
        resources.check_disk(cfg, model, settings)
    cfg_debug, _, settings_debug = _tiny_setup(tmp_path, ["loss=dpo", "loss.beta=0.1", "debug=true"])
    resources.preflight(cfg_debug, model, model, settings_debug)  # debug saves nothing: no disk check


def test_memory_estimate_scales_with_batch_length_and_optimizer():
    """Activations grow with batch x length (x2 for pairs); AdamW keeps two states per parameter,
    SGD none; the checkpoint holds weights + optimizer state + margin."""
    model = tiny_llama(300, hidden_size=32)
    n_bytes = sum(p.numel() * 4 for p in model.parameters())

    def estimate(**kw):
        args = dict(per_device_batch=2, rows_per_example=2, max_length=64, optimizer="AdamW")
        return resources.estimate_memory(model, None, **{**args, **kw})

    base = estimate()
    assert base.parameters == base.gradients == n_bytes and base.optimizer == 2 * n_bytes
    assert estimate(optimizer="SGD").optimizer == 0
    assert estimate(per_device_batch=4).activations == 2 * base.activations
    assert estimate(rows_per_example=1).activations * 2 == base.activations
    assert estimate(max_length=128).activations == 2 * base.activations  # sdpa keeps no (T, T) scores
    model.config._attn_implementation = "eager"
    assert estimate(max_length=128).activations > 2 * estimate().activations  # eager does
    model.config._attn_implementation = "sdpa"
    assert estimate(activation_checkpointing=True).activations < base.activations
    assert resources.checkpoint_bytes(model, "AdamW") == 3 * n_bytes + resources.CHECKPOINT_MARGIN


def test_skipped_count_survives_a_resume(tiny_dirs, tmp_path, monkeypatch):
    """`nonfinite_skipped` is kept in the checkpoint (granular_state.json) and restored on resume."""
    poison_id = tiny_tokenizer("byte_level").convert_tokens_to_ids(POISON)
    run_dir = tmp_path / "runs" / "run"
    first = argv(tiny_dirs, tmp_path, "nan_embedding", records(), ["loss=sft", "skip_nonfinite=true"])
    assert train_main(first) == 0  # one epoch: 4 steps, the poisoned one skipped
    assert json.loads((run_dir / "step-4" / "granular_state.json").read_text())["nonfinite_skipped"] == 1
    trace = ParameterTrace(monkeypatch, poison_id, inf_grad=False)
    assert train_main(first + ["n_examples=10"]) == 0  # resumes from step-4 for one more step
    (resumed,) = [r for r in train_records(run_dir) if r["step"] == 5]
    assert resumed["nonfinite_skipped"] == 1 + len(trace.poisoned_forwards)
