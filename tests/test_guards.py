"""Numerical guards, with faults injected for real into a tiny training run (`train_main`, in-process).

- A non-finite loss: one embedding row of the saved model is NaN, and one record's prompt holds that
  token. The run stops with `NonFiniteError` naming the step and the batch's record indices (the
  checkpoints before it stay intact); with `skip_nonfinite=true` the step is skipped (no parameter
  moves), counted in `nonfinite_skipped`, and training goes on.
- A non-finite gradient norm with a finite loss: a hook on the embedding output turns its gradient
  into inf for batches holding the poison token. Same two behaviours.
- A batch whose token weights are all zero is reported by record index, and its loss stays finite.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from granular_po import models
from granular_po.cli import train_main
from granular_po.testing import tiny_llama, tiny_tokenizer
from granular_po.trainer import NonFiniteError

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
    """Wraps `models.load_policy_and_reference`: keeps the policy, snapshots its parameters at every
    training forward, and (with `inf_grad`) makes the embedding gradient inf for poison batches."""

    def __init__(self, monkeypatch, poison_id: int, inf_grad: bool):
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.poisoned_forwards: list[int] = []
        self.policy = None
        original = models.load_policy_and_reference

        def load(*args, **kwargs):
            policy, reference = original(*args, **kwargs)
            self.policy = policy
            embed = policy.get_input_embeddings()

            def hook(_module, inputs, output):
                if not torch.is_grad_enabled():
                    return None
                self.snapshots.append({k: v.detach().clone() for k, v in policy.named_parameters()})
                if bool((inputs[0] == poison_id).any()):
                    self.poisoned_forwards.append(len(self.snapshots) - 1)
                    if inf_grad:  # finite forward, infinite backward
                        output.register_hook(lambda grad: torch.full_like(grad, float("inf")))
                return None

            embed.register_forward_hook(hook)
            return policy, reference

        monkeypatch.setattr(models, "load_policy_and_reference", load)

    def changed(self, forward: int) -> bool:
        """Did the optimizer step after training forward `forward` move any parameter?"""
        before = self.snapshots[forward]
        if forward + 1 < len(self.snapshots):
            after = self.snapshots[forward + 1]
        else:  # the last step: compare with the parameters the run ended with
            after = {k: v.detach() for k, v in self.policy.named_parameters()}
        return any(not torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)  # NaN row


def _assert_stops(error: NonFiniteError, what: str, run_dir: Path) -> int:
    message = str(error)
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


def test_nonfinite_loss_stops_naming_step_and_records(tiny_dirs, tmp_path):
    with pytest.raises(NonFiniteError) as info:
        train_main(argv(tiny_dirs, tmp_path, "nan_embedding", records(), ["loss=sft"]))
    _assert_stops(info.value, "loss", tmp_path / "runs" / "run")


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


def test_nonfinite_grad_norm_stops_naming_step_and_records(tiny_dirs, tmp_path, monkeypatch):
    poison_id = tiny_tokenizer("byte_level").convert_tokens_to_ids(POISON)
    ParameterTrace(monkeypatch, poison_id, inf_grad=True)
    # accumulation 2: the step's records come from two micro-batches and all must be named
    extra = ["loss=dpo", "loss.beta=0.5", "granular=true", "batch_size=2", "gradient_accumulation_steps=2"]
    with pytest.raises(NonFiniteError) as info:
        train_main(argv(tiny_dirs, tmp_path, "clean", records(), extra))
    _assert_stops(info.value, "gradient norm", tmp_path / "runs" / "run")


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
def test_all_zero_weight_batch_is_reported_not_divided_by_zero(tiny_dirs, tmp_path, caplog, capsys, average):
    data = records(poison_at=None, zero_weight_at=(1, 4))
    extra = ["loss=dpo", "loss.beta=0.5", "granular=true", "granular.include_eos=false", "batch_size=1",
             "save_every=4", f"loss.average_log_prob={str(average).lower()}"]
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
