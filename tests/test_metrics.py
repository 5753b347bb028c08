"""Every metric the research code logged, by its name, definition and sign, pinned by value.

The research code (the TDPO repository's granular fork, `trainers.py` `get_batch_metrics` and `train`)
logs per pair, then averages over the step's batch or the eval set:
  rewards_{split}/chosen, /rejected   TDPO: beta * (log-ratio + sequential KL); DPO: beta * log-ratio
  rewards_{split}/accuracies          chosen reward > rejected reward
  rewards_{split}/margins             chosen - rejected reward
  kl_{split}/chosen, /rejected        sequential KL(reference || policy) of each response (DPO too)
  kl_{split}/margin                   chosen - rejected KL
  logps_{split}/chosen, /rejected     the policy's (weighted) log-prob
  loss/{split}                        the per-pair loss
and per training step: grad_norm (before clipping), examples_per_second (the step's examples over
the step's own time), counters/examples, counters/updates.

The expected values are computed here from the models' full logits in float64, with the formulas
written out, not through the package's statistics or losses.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import mixed_preference_pairs, tiny_llama, tiny_tokenizer, toy_preference_pairs
from transformers import AutoModelForCausalLM, TrainingArguments

from granular_po.apps.cli import train_main
from granular_po.data.collate import PreferenceCollator, SFTCollator
from granular_po.data.encode import EncodeOptions, encode_record
from granular_po.data.masks import GranularOptions
from granular_po.data.records import parse_record
from granular_po.losses import LossType
from granular_po.training import callbacks
from granular_po.training.objectives import LossSettings, per_token_nll
from granular_po.training.sampler import examples_after, step_layout
from granular_po.training.trainer import GranularTrainer

BETA, ALPHA = 0.5, 0.3


def per_sequence(model, batch) -> dict[str, torch.Tensor]:
    """Weighted log-probs and the per-position log-softmax of every row, from the full logits (float64)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    log_probs = logits[:, :-1].log_softmax(-1)  # (N, T-1, V): position t predicts token t + 1
    weights = batch["loss_weights"][:, 1:].double()
    token = log_probs.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return {"log_probs": log_probs, "weights": weights, "logps": (token * weights).sum(-1)}


def expected_metrics(policy, reference, batch, loss: str, split: str) -> dict[str, torch.Tensor]:
    """The research code's per-pair metrics, written out. Rows [0:n] chosen, [n:2n] rejected."""
    pol = per_sequence(policy, batch)
    n = batch["input_ids"].shape[0] // 2
    if loss == "sft":
        return {f"logps_{split}/chosen": pol["logps"], f"loss/{split}": -pol["logps"]}
    ref = per_sequence(reference, batch)
    ratio = pol["logps"] - ref["logps"]
    # KL(ref || policy) = sum_v p_ref (log p_ref - log p_policy), summed over weighted positions
    kl = ((ref["log_probs"].exp() * (ref["log_probs"] - pol["log_probs"])).sum(-1) * pol["weights"]).sum(-1)
    if loss == "tdpo":  # TDPO2
        logit = (ratio[:n] - ratio[n:]) - ALPHA * (kl[n:] - kl[:n])
        chosen, rejected = BETA * (ratio[:n] + kl[:n]), BETA * (ratio[n:] + kl[n:])
    else:
        logit = ratio[:n] - ratio[n:]
        chosen, rejected = BETA * ratio[:n], BETA * ratio[n:]
    return {
        f"rewards_{split}/chosen": chosen, f"rewards_{split}/rejected": rejected,
        f"rewards_{split}/accuracies": (chosen > rejected).double(), f"rewards_{split}/margins": chosen - rejected,
        f"kl_{split}/chosen": kl[:n], f"kl_{split}/rejected": kl[n:], f"kl_{split}/margin": kl[:n] - kl[n:],
        f"logps_{split}/chosen": pol["logps"][:n], f"logps_{split}/rejected": pol["logps"][n:],
        f"loss/{split}": -F.logsigmoid(BETA * logit),
    }


# ---------------------------------------------------------------- one batch, each loss


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("byte_level")


PAIRS = mixed_preference_pairs()


@pytest.fixture(scope="module")
def pair_batch(tok):
    """Four pairs whose highlights weigh the two sides differently (regions on one side, both, ...)."""
    gran, enc = GranularOptions(enabled=True), EncodeOptions(max_length=96, max_prompt_length=32, prompt_format="raw")
    return [encode_record(parse_record(r, "toy", i), tok, enc, gran) for i, r in enumerate(PAIRS)]


def make_trainer(tmp_path, policy, reference, **settings) -> GranularTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True)
    return GranularTrainer(model=policy, ref_model=reference, args=args, loss_settings=LossSettings(**settings))


@pytest.mark.parametrize("loss", ["sft", "dpo", "tdpo"])
def test_each_metric_has_the_research_codes_value(tmp_path, tok, pair_batch, loss):
    """Policy and reference differ (two random models), so no metric is trivially 0."""
    policy, reference = tiny_llama(len(tok), seed=0), tiny_llama(len(tok), seed=1)
    if loss == "sft":
        batch = SFTCollator(tok.pad_token_id)(pair_batch)
        trainer = make_trainer(tmp_path, policy, None, loss=LossType.SFT)
    else:
        batch = PreferenceCollator(tok.pad_token_id)(pair_batch)
        trainer = make_trainer(tmp_path, policy, reference, loss=LossType(loss), beta=BETA, alpha=ALPHA,
                               if_tdpo2=True)
    with torch.no_grad():
        mean_loss, metrics = trainer.loss_and_metrics(policy, batch, "eval")
    expected = expected_metrics(policy, reference, batch, loss, "eval")
    assert set(expected) <= set(metrics)
    ours = {"weighted_token_share_eval"}  # the highlighted share; for SFT the per-token NLL's two parts
    assert set(metrics) - set(expected) == ours | ({"nll_eval/_sum", "nll_eval/_weight"} if loss == "sft" else set())
    if loss == "sft":  # summed NLL over summed weight: what TRL's SFT loss reports
        weights = batch["loss_weights"][:, 1:].double()
        expected_nll = -expected["logps_eval/chosen"].sum() / weights.sum()
        means = {key: value.double().mean().item() for key, value in metrics.items()}
        assert per_token_nll(means, "eval")["nll_per_token/eval"] == pytest.approx(expected_nll.item(), rel=1e-5)
    for key, value in expected.items():
        torch.testing.assert_close(metrics[key].double(), value, rtol=1e-4, atol=1e-5, msg=key)
    torch.testing.assert_close(mean_loss.double(), expected["loss/eval"].mean(), rtol=1e-4, atol=1e-6)
    if loss != "sft":  # the sign: the chosen side's KL minus the rejected side's, as in the research code
        assert (expected["kl_eval/margin"].abs() > 1e-4).all()
        # right and wrong pairs both present: the comparison's direction is pinned too
        assert 0 < expected["rewards_eval/accuracies"].sum() < len(PAIRS)


def test_dpo_logs_no_kl_when_the_reference_log_probs_were_precomputed(tmp_path, tok, pair_batch):
    """With `precompute_ref_log_probs` no reference runs during training: there is no KL to log."""
    policy = tiny_llama(len(tok), seed=0)
    batch = PreferenceCollator(tok.pad_token_id)(pair_batch)
    batch["ref_logps"] = torch.zeros(2 * len(PAIRS))
    trainer = make_trainer(tmp_path, policy, None, loss=LossType.DPO, beta=BETA)
    with torch.no_grad():
        _, metrics = trainer.loss_and_metrics(policy, batch, "train")
    assert not any(k.startswith("kl_") for k in metrics)
    torch.testing.assert_close(metrics["rewards_train/chosen"], BETA * metrics["logps_train/chosen"])


def test_examples_after_counts_the_last_partial_batch():
    """6 records, batches of 4: steps take 4, 2 | 4, 2 examples."""
    assert [examples_after(s, 6, 4) for s in range(5)] == [0, 4, 6, 10, 12]
    assert [examples_after(s, 8, 4) for s in range(4)] == [0, 4, 8, 12]


@pytest.mark.parametrize("n", [1, 3, 6, 7, 8, 13, 14, 16, 17, 23])
@pytest.mark.parametrize(("per_device", "accumulation", "world"), [(4, 1, 1), (2, 2, 1), (2, 2, 2), (3, 1, 2),
                                                                   (1, 2, 3), (2, 1, 4)])
def test_step_layout_marks_exactly_the_rows_accelerate_repeats(n, per_device, accumulation, world):
    """Accelerate's own sharding (`BatchSamplerShard`, even_batches as Trainer sets it) of an epoch of `n`
    records: per process, the rows `step_layout` keeps are every record once, and the rest are repeats."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    group = per_device * accumulation * world
    steps = -(-n // group)
    trained: list[int] = []
    for process in range(world):
        shard = list(BatchSamplerShard(BatchSampler(range(n), per_device, drop_last=False), num_processes=world,
                                       process_index=process, even_batches=True))
        assert len(shard) == math.ceil(math.ceil(n / per_device) / world)  # the same count on every process
        for step in range(steps):
            micro = shard[step * accumulation:(step + 1) * accumulation]
            pairs, ranges = step_layout(step, n, per_device, accumulation, world, process, len(micro))
            assert pairs == min(group, n - step * group)
            for batch, positions in zip(micro, ranges):
                assert batch[:len(positions)] == list(positions)  # the order's positions are the batch's rows
                trained += batch[:len(positions)]
    assert sorted(trained) == list(range(n))  # each record once: no repeat kept, nothing lost


# ---------------------------------------------------------------- a real run, step by step


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, tok):
    """TDPO2 from a tiny model, 6 pairs in batches of 4 (steps of 4 and 2 pairs), SGD, a checkpoint and
    an evaluation after every step; every batch the trainer sees is recorded with its step."""
    root = tmp_path_factory.mktemp("metrics")
    tiny_llama(len(tok), hidden_size=32).save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    pairs = mixed_preference_pairs() + toy_preference_pairs(4)
    (root / "train.json").write_text(json.dumps(pairs[:6]))
    (root / "eval.json").write_text(json.dumps(pairs[6:]))
    seen: list[dict] = []
    original = GranularTrainer.loss_and_metrics

    def recording(self, model, batch, split):
        seen.append({"split": split, "step": self.state.global_step,
                     "batch": {k: batch[k].detach().clone() for k in ("input_ids", "attention_mask", "loss_weights")}})
        return original(self, model, batch, split)

    clock = iter(0.25 * k for k in range(10_000))
    argv = [
        f"model.name_or_path={root / 'tiny'}", "datasets=[ours]", f"custom_train_path={root / 'train.json'}",
        f"custom_eval_path={root / 'eval.json'}", "exp_name=run", f"local_dirs=[{root / 'runs'}]",
        "prompt_format=raw", "max_length=64", "max_prompt_length=32", "loss=tdpo", f"loss.beta={BETA}",
        f"loss.alpha={ALPHA}", "loss.if_tdpo2=true", "granular=true", "batch_size=4", "eval_batch_size=4",
        "optimizer=SGD", "lr=0.5", "warmup_steps=0", "eval_every=4", "do_first_eval=false", "max_grad_norm=1e6",
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GranularTrainer, "loss_and_metrics", recording)
        patch.setattr(callbacks, "_now", lambda: next(clock))  # every optimizer step takes 0.25 s
        assert train_main(argv) == 0
    logs = [json.loads(line) for line in (root / "runs" / "run" / "metrics.jsonl").read_text().splitlines()]
    return root, seen, logs


def _log_of(logs, step: int, split: str) -> dict:
    key = "loss/train" if split == "train" else "loss/eval"
    (row,) = [r for r in logs if r["step"] == step and key in r]
    return row


def _policy_at(root, step: int):
    """The policy's weights before step `step + 1` (the initial model, or the checkpoint after `step`)."""
    path = root / "tiny" if step == 0 else root / "runs" / "run" / f"step-{step}"
    return AutoModelForCausalLM.from_pretrained(path).float()


def test_logged_step_and_eval_metrics_are_the_means_of_the_research_definitions(logged_run):
    root, seen, logs = logged_run
    reference = _policy_at(root, 0)
    for record in seen:
        split = record["split"]
        step = record["step"] + (1 if split == "train" else 0)  # a training batch is logged under its step
        policy = _policy_at(root, record["step"])
        expected = expected_metrics(policy, reference, record["batch"], "tdpo", split)
        logged = _log_of(logs, step, split)
        for key, values in expected.items():
            assert logged[key] == pytest.approx(values.mean().item(), rel=1e-4, abs=1e-5), (key, step)
    # step 2 starts from trained weights: the sides' KLs differ, the margin carries its sign
    assert _log_of(logs, 2, "train")["kl_train/margin"] != pytest.approx(0.0, abs=1e-6)


def test_grad_norm_is_the_norm_of_the_steps_gradient_before_clipping(logged_run):
    root, seen, logs = logged_run
    reference = _policy_at(root, 0)
    for record in (r for r in seen if r["split"] == "train"):
        policy = _policy_at(root, record["step"]).train()
        batch, n = record["batch"], record["batch"]["input_ids"].shape[0] // 2
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        with torch.no_grad():
            ref_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        lp, ref_lp = logits[:, :-1].log_softmax(-1), ref_logits[:, :-1].log_softmax(-1)
        w, targets = batch["loss_weights"][:, 1:].double(), batch["input_ids"][:, 1:, None]
        ratio = ((lp.gather(-1, targets) - ref_lp.gather(-1, targets))[..., 0] * w).sum(-1)
        kl = ((ref_lp.exp() * (ref_lp - lp)).sum(-1) * w).sum(-1)
        logit = (ratio[:n] - ratio[n:]) - ALPHA * (kl[n:] - kl[:n].detach())  # TDPO2
        (-F.logsigmoid(BETA * logit)).mean().backward()
        norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in policy.parameters() if p.grad is not None))
        assert _log_of(logs, record["step"] + 1, "train")["grad_norm"] == pytest.approx(norm, rel=1e-4)


def test_examples_per_second_and_counters(logged_run):
    """Each optimizer step takes 0.25 s on the test's clock: 4 examples -> 16 per second, 2 -> 8."""
    _, _, logs = logged_run
    train = [_log_of(logs, step, "train") for step in (1, 2)]
    assert [r["examples_per_second"] for r in train] == [16.0, 8.0]
    assert [r["counters/updates"] for r in train] == [1, 2]
    assert [r["counters/examples"] for r in train] == [4, 6]


def test_weighted_token_share_eval_counts_every_row_of_a_partial_last_batch(tmp_path, tok):
    """8 eval pairs in batches of 3: the last batch holds 2 pairs (4 rows). The logged share is the mean,
    over all 16 rows of the encoded eval set, of (tokens with a weight) / (response tokens)."""
    tiny_llama(len(tok), hidden_size=32).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    eval_pairs = mixed_preference_pairs() + toy_preference_pairs(4, filler_cycle=3)
    (tmp_path / "train.json").write_text(json.dumps(toy_preference_pairs(4)))
    (tmp_path / "eval.json").write_text(json.dumps(eval_pairs))
    argv = [
        f"model.name_or_path={tmp_path / 'tiny'}", "datasets=[ours]", f"custom_train_path={tmp_path / 'train.json'}",
        f"custom_eval_path={tmp_path / 'eval.json'}", "exp_name=share", f"local_dirs=[{tmp_path / 'runs'}]",
        "prompt_format=raw", "max_length=64", "max_prompt_length=32", "loss=dpo", "granular=true",
        "batch_size=4", "eval_batch_size=3", "n_epochs=1", "optimizer=SGD", "lr=0.1", "warmup_steps=0",
        "do_first_eval=true",
    ]
    assert train_main(argv) == 0
    logs = [json.loads(line) for line in (tmp_path / "runs" / "share" / "metrics.jsonl").read_text().splitlines()]
    first_eval = next(r for r in logs if "loss/eval" in r)

    gran, enc = GranularOptions(enabled=True), EncodeOptions(max_length=64, max_prompt_length=32, prompt_format="raw")
    shares = []
    for i, raw in enumerate(eval_pairs):
        features = encode_record(parse_record(raw, "toy", i), tok, enc, gran)
        for side in ("chosen", "rejected"):
            weights = features[f"{side}_weights"]
            shares.append(sum(w > 0 for w in weights) / len(weights))
    assert len(shares) == 16 and len(set(shares)) > 2  # rows differ: a lost row would move the mean
    assert first_eval["weighted_token_share_eval"] == pytest.approx(sum(shares) / len(shares), rel=1e-6)
