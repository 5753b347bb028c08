"""Equivalent settings give the same numbers (TRL's invariant suite, torchtune's habit).

- accumulation: batch_size=8 with 1 accumulation step vs 8 accumulation steps of 1 record;
- token statistics: `logprobs.impl=chunked` (hidden states, weighted positions only) vs `naive`;
- padding-free: packed real tokens (`padding_free=true`) vs padded batches;
- shared prompt: one prompt forward for chosen and rejected (`share_prompt`, on by default) vs plain rows;
- padding: a record's loss does not depend on how much right padding its batch carries;
- concatenation: one forward over chosen + rejected rows equals separate forwards of each half.

The first four train for real through `train_main` (SGD, 3 steps) and compare the per-step
`loss/train` of metrics.jsonl and the final weights; the last two call the trainer's own methods.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_llama, tiny_tokenizer, tiny_workspace, toy_preference_pairs
from transformers import TrainingArguments

from granular_po.apps.cli import train_main
from granular_po.data.collate import PreferenceCollator
from granular_po.data.encode import EncodeOptions, encode_record
from granular_po.data.masks import GranularOptions
from granular_po.data.schema import PreferenceRecord, Region, RegionFlag
from granular_po.losses import LossType, tdpo_loss
from granular_po.training.objectives import LossSettings
from granular_po.training.trainer import GranularTrainer

N_RECORDS = 24  # 3 steps of 8


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("equivalence"), toy_preference_pairs(N_RECORDS, filler_cycle=4))


def train(root: Path, exp: str, *extra: str) -> tuple[dict[int, dict], dict[str, torch.Tensor]]:
    """One TDPO run with granular weights; returns ({step: train log}, final weights)."""
    argv = [
        f"model.name_or_path={root / 'tiny'}", "datasets=[ours]", f"custom_train_path={root / 'train.json'}",
        f"exp_name={exp}", f"local_dirs=[{root / 'runs'}]", "prompt_format=raw", "max_length=64",
        "max_prompt_length=32", "loss=tdpo", "loss.beta=0.5", "granular=true", "batch_size=8", "n_epochs=1",
        "optimizer=SGD", "lr=0.5", "warmup_steps=0", "do_first_eval=false", "resume=false", *extra,
    ]
    assert train_main(argv) == 0
    run_dir = root / "runs" / exp
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logs = {r["step"]: r for r in rows if "loss/train" in r}
    return logs, load_file(str(run_dir / "LATEST" / "model.safetensors"))


@pytest.fixture(scope="module")
def baseline(workspace):
    """batch 8 x accumulation 1, chunked token statistics."""
    return train(workspace, "base", "gradient_accumulation_steps=1", "logprobs.impl=chunked")


def assert_same_run(run, other, initial):
    logs, weights = run
    other_logs, other_weights = other
    assert sorted(logs) == sorted(other_logs) == [1, 2, 3]
    for step in logs:
        assert other_logs[step]["loss/train"] == pytest.approx(logs[step]["loss/train"], rel=1e-5), step
        assert other_logs[step]["grad_norm"] == pytest.approx(logs[step]["grad_norm"], rel=1e-4), step
    assert logs[3]["loss/train"] < logs[1]["loss/train"] - 1e-2  # it trained
    moved = max((weights[k] - initial[k]).abs().max().item() for k in weights)
    assert moved > 1e-2, "weights barely moved: the tolerance below would not discriminate"
    for key in weights:
        torch.testing.assert_close(other_weights[key], weights[key], rtol=1e-5, atol=1e-5, msg=key)


def test_accumulation_8x1_equals_1x8(workspace, baseline):
    accumulated = train(workspace, "accum", "gradient_accumulation_steps=8")  # 8 micro-batches of 1 record
    assert_same_run(baseline, accumulated, load_file(str(workspace / "tiny" / "model.safetensors")))


def test_chunked_and_naive_logprobs_train_alike(workspace, baseline):
    naive = train(workspace, "naive", "gradient_accumulation_steps=1", "logprobs.impl=naive")
    assert_same_run(baseline, naive, load_file(str(workspace / "tiny" / "model.safetensors")))


def test_shared_prompt_forward_trains_alike(workspace, baseline):
    """share_prompt=true (an error if it cannot be on) trains as the plain rows do, and as the default."""
    initial = load_file(str(workspace / "tiny" / "model.safetensors"))
    plain = train(workspace, "plain-rows", "gradient_accumulation_steps=1", "share_prompt=false")
    shared = train(workspace, "shared-prompt", "gradient_accumulation_steps=1", "share_prompt=true")
    assert_same_run(plain, shared, initial)
    assert_same_run(baseline, shared, initial)


def test_padding_free_trains_alike(workspace, baseline):
    """Packed real tokens (padding_free=true) train as the padded batches do, step by step."""
    packed = train(workspace, "packed", "gradient_accumulation_steps=1", "padding_free=true", "share_prompt=false")
    assert_same_run(baseline, packed, load_file(str(workspace / "tiny" / "model.safetensors")))


# ---------------------------------------------------------------- the trainer's own methods


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer("byte_level")


def records() -> list[PreferenceRecord]:
    texts = [
        ("What is 7 * 8?", "The answer is 56.", "The answer is 54."),
        ("Hello world!", "Hello there, a tiny corpus.", "Hello there, a lazy corpus."),
        ("The capital of France is", " Paris. The capital of Spain is Madrid.",
         " Paris. The capital of Spain is Paris. The quick brown fox jumps over the lazy dog, twice over."),
    ]
    out = []
    for i, (prompt, chosen, rejected) in enumerate(texts):
        start = next(k for k, (a, b) in enumerate(zip(chosen, rejected)) if a != b)
        region = Region(start, min(start + 5, len(rejected)), RegionFlag.INCORRECT)
        out.append(PreferenceRecord(prompt, chosen, rejected, (region,), index=i))
    return out


def features(tokenizer) -> list[dict]:
    enc = EncodeOptions(max_length=128, max_prompt_length=32, prompt_format="raw")
    # fractional weights outside the region and on the response without one (which weighs 0 by default)
    gran = GranularOptions(enabled=True, outside_weight=0.25, unannotated_weight=0.25)
    return [encode_record(r, tokenizer, enc, gran) for r in records()]


@pytest.fixture(scope="module")
def make_trainer(tokenizer, tmp_path_factory):
    policy = tiny_llama(len(tokenizer), hidden_size=32, seed=0)
    reference = tiny_llama(len(tokenizer), hidden_size=32, seed=1)  # differs: log-ratios and KL not 0
    out = tmp_path_factory.mktemp("trainer")

    def make(impl: str) -> GranularTrainer:
        args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", disable_tqdm=True)
        return GranularTrainer(
            model=policy, ref_model=reference, args=args,
            loss_settings=LossSettings(loss=LossType.TDPO, beta=0.5, logprobs_impl=impl),
            data_collator=PreferenceCollator(pad_token_id=tokenizer.pad_token_id),
        )

    return make


def per_record(trainer, batch):
    with torch.no_grad():
        _, metrics = trainer.loss_and_metrics(trainer.model, batch, "eval")
    return {k: v for k, v in metrics.items() if k.startswith(("loss/", "rewards_", "kl_", "logps_"))}


@pytest.mark.parametrize("impl", ["chunked", "naive"])
def test_padding_does_not_change_a_records_loss(tokenizer, make_trainer, impl):
    """Records 0 and 1 alone, then beside the long record 2, then padded to a multiple of 64."""
    trainer = make_trainer(impl)
    feats = features(tokenizer)
    short = PreferenceCollator(tokenizer.pad_token_id)(feats[:2])
    with_long = PreferenceCollator(tokenizer.pad_token_id)(feats)
    padded = PreferenceCollator(tokenizer.pad_token_id, pad_to_multiple_of=64)(feats[:2])
    assert with_long["input_ids"].shape[1] > short["input_ids"].shape[1] + 20
    assert padded["input_ids"].shape[1] == 64

    for batch in (short, with_long, padded):  # right padding: padded positions weigh 0 and are masked
        mask = batch["attention_mask"]
        lengths = mask.sum(-1)
        positions = torch.arange(mask.shape[1])
        assert torch.equal(mask, (positions < lengths[:, None]).long())
        assert (batch["loss_weights"][mask == 0] == 0).all()
        assert (batch["input_ids"][mask == 0] == tokenizer.pad_token_id).all()

    reference = per_record(trainer, short)
    assert reference["loss/eval"].abs().min() > 0
    assert (reference["kl_eval/chosen"] > 0).all()
    for batch in (with_long, padded):
        got = per_record(trainer, batch)
        for key, value in reference.items():
            torch.testing.assert_close(got[key][:2], value, rtol=1e-5, atol=1e-5, msg=key)


def _half(batch: dict, rows: slice) -> dict:
    """Rows of a batch, trimmed of the columns that are padding in every kept row (without the collator's
    host-side facts, which describe the whole batch)."""
    width = int(batch["attention_mask"][rows].sum(-1).max())
    return {k: v[rows, :width] if v.dim() == 2 else v for k, v in batch.items()
            if k not in ("host", "weighted_positions", "response_positions")}


@pytest.mark.parametrize("impl", ["chunked", "naive"])
def test_concatenated_forward_equals_separate_forwards(tokenizer, make_trainer, impl):
    """Chosen and rejected rows in one forward of 2B rows vs a forward of each B rows, values and grads."""
    trainer = make_trainer(impl)
    model = trainer.model
    batch = PreferenceCollator(tokenizer.pad_token_id)(features(tokenizer))
    n = batch["index"].shape[0]

    model.zero_grad()
    loss_joint, _ = trainer.loss_and_metrics(model, batch, "train")
    loss_joint.backward()
    grads_joint = {k: p.grad.clone() for k, p in model.named_parameters()}
    joint = trainer.token_stats(model, batch, need_reference=True)

    model.zero_grad()
    chosen = trainer.token_stats(model, _half(batch, slice(0, n)), need_reference=True)
    rejected = trainer.token_stats(model, _half(batch, slice(n, 2 * n)), need_reference=True)
    assert _half(batch, slice(0, n))["input_ids"].shape[1] < batch["input_ids"].shape[1]  # really re-padded
    for field in ("policy_logps", "logratio", "position_kl", "weight_sum"):
        separate = torch.cat([getattr(chosen, field), getattr(rejected, field)])
        torch.testing.assert_close(separate, getattr(joint, field), rtol=1e-5, atol=1e-5, msg=field)

    losses, _, _ = tdpo_loss(chosen.logratio, rejected.logratio, chosen.position_kl, rejected.position_kl,
                             beta=0.5)
    loss_separate = losses.mean()
    torch.testing.assert_close(loss_separate, loss_joint, rtol=1e-6, atol=1e-6)
    loss_separate.backward()
    for key, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads_joint[key], rtol=1e-4, atol=1e-6, msg=key)
    model.zero_grad()


# ---------------------------------------------------------------- a last partial batch

N_PARTIAL = 14  # one step of 8, then a last step of 6 (micro-batches of 4 and 2 under accumulation 2)


@pytest.fixture(scope="module")
def partial_workspace(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("partial"), toy_preference_pairs(N_PARTIAL, filler_cycle=4))


def test_last_partial_batch_weighs_each_pair_alike_under_accumulation(partial_workspace):
    """14 records, batch 8: the last step has 6 pairs. With accumulation 2 its micro-batches hold 4 and 2
    pairs; each pair must still weigh 1/6 of the step (not 1/8 and 1/4), so the final weights equal the
    accumulation-1 run's, and `counters/examples` counts the 14 records trained."""
    root = partial_workspace
    one = train(root, "partial-1", "gradient_accumulation_steps=1")
    two = train(root, "partial-2", "gradient_accumulation_steps=2")
    initial = load_file(str(root / "tiny" / "model.safetensors"))
    (logs, weights), (logs_two, weights_two) = one, two
    assert sorted(logs) == sorted(logs_two) == [1, 2]
    for step in logs:
        assert logs_two[step]["loss/train"] == pytest.approx(logs[step]["loss/train"], rel=1e-5), step
        assert logs_two[step]["loss"] == pytest.approx(logs[step]["loss"], rel=1e-5), step
    assert [logs[s]["counters/examples"] for s in (1, 2)] == [8, 14]
    assert [logs_two[s]["counters/examples"] for s in (1, 2)] == [8, 14]
    moved = max((weights[k] - initial[k]).abs().max().item() for k in weights)
    assert moved > 1e-2, "weights barely moved: the tolerance below would not discriminate"
    for key in weights:
        torch.testing.assert_close(weights_two[key], weights[key], rtol=0, atol=2e-6, msg=key)
