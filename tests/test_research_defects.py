"""One test per defect of the research code (ARCHITECTURE.md, "Known defects"), showing it is gone.

Unit-level where the defect lives in one function; end to end where it lived in the loop: one
shared training run (`recorded_run`) records the record indices of every batch it trains on by
wrapping `GranularTrainer.compute_loss`, and a second, interrupted-then-resumed run must repeat it
step for step.
"""

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from tiny import tiny_llama, tiny_tokenizer
from transformers import TrainingArguments

from granular_po import models
from granular_po.apps.cli import train_main
from granular_po.data.collate import PreferenceCollator, SFTCollator
from granular_po.data.encode import EncodeOptions, build_dataset, encode_record
from granular_po.data.masks import GranularOptions
from granular_po.data.records import load_records
from granular_po.data.schema import DataError, PreferenceRecord, Region, RegionFlag
from granular_po.losses import LossType, sequential_kl
from granular_po.settings import ModelSettings
from granular_po.stats import compute_token_stats
from granular_po.training.config import compose_config, validate
from granular_po.training.objectives import LossSettings
from granular_po.training.recipe import build_training_arguments
from granular_po.training.sampler import SeededLengthGroupedSampler
from granular_po.training.trainer import GranularTrainer

HOSTILE = Path(__file__).parent / "data" / "hostile"
GRAN = GranularOptions(enabled=True)
RAW = EncodeOptions(max_length=128, max_prompt_length=32, prompt_format="raw")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("byte_level")


def marked_text(tok, ids, weights) -> str:
    """The text of the weighted tokens, end token left out."""
    return tok.decode([i for i, w in zip(ids[:-1], weights[:-1]) if w > 0])


def contains_run(seq: list[int], run: list[int]) -> bool:
    return any(seq[k : k + len(run)] == run for k in range(len(seq) - len(run) + 1))


# ---------------------------------------------------------------- 1. regions mapped by offsets


def test_1_regions_map_by_offsets_not_by_retokenising_the_span(tok):
    """The span 'answer' (no leading space) of the SECOND sentence. Tokenised alone it is a, ns, wer;
    in context the space is part of the first token (Ġa): the research code's search for the span's
    ids found nothing and fell back to the EOS token alone. We mark the tokens overlapping the span."""
    chosen = "The answer is 56. The answer is 56."
    start = chosen.rindex("answer")
    record = PreferenceRecord("Q?", chosen, "The answer is 54.",
                              (Region(start, start + len("answer"), RegionFlag.CORRECT),))
    out = encode_record(record, tok, RAW, GRAN, with_offsets=True)
    span_alone = tok(chosen[start : start + 6], add_special_tokens=False)["input_ids"]
    assert not contains_run(out["chosen_ids"], span_alone)  # the case the research code got wrong
    weights, offsets = out["chosen_weights"], out["chosen_offsets"]
    marked = [k for k, w in enumerate(weights[:-1]) if w > 0]
    assert marked == [k for k, (s, e) in enumerate(offsets[:-1]) if s < start + 6 and start < e]
    assert all(offsets[k][0] >= chosen.index(".") for k in marked)  # the second occurrence, not the first
    assert marked_text(tok, out["chosen_ids"], weights).strip() == "answer"
    assert weights[-1] == 1.0  # the end token as well (include_eos), but not it alone


def test_1_repeated_phrase_marks_the_given_occurrence(tok):
    """'56' tokenises the same alone and in context: the research code marked its first occurrence."""
    chosen = "The answer is 56. The answer is 56."
    start = chosen.rindex("56")
    record = PreferenceRecord("Q?", chosen, "no", (Region(start, start + 2, RegionFlag.CORRECT),))
    out = encode_record(record, tok, RAW, GRAN, with_offsets=True)
    marked = [k for k, w in enumerate(out["chosen_weights"][:-1]) if w > 0]
    assert [out["chosen_offsets"][k] for k in marked] == [(start, start + 2)]


# ---------------------------------------------------------------- 2. no dict keyed by prompt


def test_2_pairs_sharing_a_prompt_stay_distinct_with_their_own_masks(tok):
    records, report = load_records(HOSTILE / "duplicate_prompts.jsonl")
    assert len(records) == 2 and report.n_kept == 2
    assert records[0].prompt == records[1].prompt
    dataset = build_dataset(records, tok, RAW, GRAN)
    assert len(dataset) == 2
    rows = [dataset[0], dataset[1]]
    assert [r["index"] for r in rows] == [0, 1]
    # each pair trains on its own responses, masked by its own region: "6" of the first, "7" of the second
    assert tok.decode(rows[0]["rejected_ids"][:-1]) == "The answer is 6."
    assert tok.decode(rows[1]["rejected_ids"][:-1]) == "It is 7."
    assert marked_text(tok, rows[0]["rejected_ids"], rows[0]["rejected_weights"]).strip() == "6"
    assert marked_text(tok, rows[1]["rejected_ids"], rows[1]["rejected_weights"]).strip() == "7"


# ---------------------------------------------------------------- 3. SFT: no in-place rewrite, projection


def test_3_sft_projects_rejected_regions_and_never_rewrites_the_record(tok):
    """The -1 region '54' of 'I think the answer is 54. Good.' (chars 22-24) is carried onto the chosen
    '56' through a character alignment; applied raw to the chosen text it would mark its final '.'."""
    chosen, rejected = "the answer is 56. Good.", "I think the answer is 54. Good."
    start = rejected.index("54")
    assert chosen[start : start + 2] == "."
    region = Region(start, start + 2, RegionFlag.INCORRECT)
    record = PreferenceRecord("Q?", chosen, rejected, (region,))
    first = encode_record(record, tok, RAW, GRAN)
    assert marked_text(tok, first["chosen_ids"], first["sft_weights"]).strip() == "56"
    assert record.regions == (region,)  # the record is untouched (frozen): the flag is still -1
    for _epoch in range(3):  # the mask of every later epoch is the first one's
        assert encode_record(record, tok, RAW, GRAN) == first
    batch = SFTCollator(tok.pad_token_id)([first, first])
    assert torch.equal(batch["loss_weights"][0], batch["loss_weights"][1])
    assert batch["loss_weights"][0].sum() == sum(first["sft_weights"])


# ---------------------------------------------------------------- 4. DPO loads the archive into the reference


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("models")
    tiny_llama(len(tok), seed=0).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    stage1 = tiny_llama(len(tok), seed=7)
    stage1.save_pretrained(root / "stage1")
    torch.save({"step_idx": 12, "state": stage1.state_dict(), "metrics": {}}, root / "policy.pt")
    return root


@pytest.mark.parametrize("archive", ["stage1", "policy.pt"])
def test_4_dpo_reference_loads_the_stage1_archive(model_dirs, archive):
    cfg = compose_config(["loss=dpo", f"model.name_or_path={model_dirs / 'base'}",
                          f"model.archive={model_dirs / archive}"])
    loss = LossType(cfg.loss.name)
    assert loss.needs_reference
    policy, reference = models.load_policy_and_reference(cfg.model, loss_needs_reference=loss.needs_reference,
                                                         device="cpu")
    stage1 = load_file(str(model_dirs / "stage1" / "model.safetensors"))
    base = load_file(str(model_dirs / "base" / "model.safetensors"))
    for name, value in stage1.items():
        assert torch.equal(reference.state_dict()[name], value), name
        assert torch.equal(policy.state_dict()[name], value), name
    assert any(not torch.equal(base[k], stage1[k]) for k in stage1)  # the archive is not the base
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())


# ---------------------------------------------------------------- 5. KL from log_softmax


def test_5_kl_is_finite_when_a_reference_probability_underflows():
    ref_logits = torch.tensor([[0.0, -200.0, 5.0, -1e4]])  # exp(-1e4) underflows to exactly 0
    policy_logits = torch.tensor([[1.0, -3.0, 0.0, -1e4]], requires_grad=True)
    research = (ref_logits.softmax(-1) * (ref_logits.softmax(-1).log() - policy_logits.softmax(-1).log())).sum(-1)
    assert torch.isnan(research).all()  # what `softmax().log()` gave: 0 * -inf
    kl = sequential_kl(ref_logits.log_softmax(-1), policy_logits.log_softmax(-1))
    # the underflowing term counts 0 (0 * log 0 = 0): the sum over the other three, in float64
    ref64, pol64 = ref_logits.double().log_softmax(-1)[0, :3], policy_logits.detach().double().log_softmax(-1)[0, :3]
    expected = (ref64.exp() * (ref64 - pol64)).sum()
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(kl.double()[0], expected, rtol=1e-6, atol=1e-6)
    kl.sum().backward()
    assert torch.isfinite(policy_logits.grad).all()

    # through the token statistics as the trainer calls them (both implementations)
    vocab = 4
    ids = torch.tensor([[0, 2, 1, 3]])
    weights = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    hidden = torch.randn(1, 4, vocab, requires_grad=True)
    ref_hidden = torch.tensor([[[0.0, -1e4, 5.0, -1e4]] * 4])
    for impl in ("chunked", "naive"):
        stats = compute_token_stats(hidden, torch.nn.Identity(), ref_hidden, torch.nn.Identity(), ids, weights,
                                    need_kl=True, impl=impl)
        assert torch.isfinite(stats.position_kl).all(), impl
        (stats.position_kl.sum() + stats.logratio.sum()).backward()
        assert torch.isfinite(hidden.grad).all(), impl
        hidden.grad = None


# ---------------------------------------------------------------- 6. reference_free read, TDPO1 default, default model


def _trainer(tmp_path, policy, reference, **settings) -> GranularTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True)
    return GranularTrainer(model=policy, ref_model=reference, args=args, loss_settings=LossSettings(**settings))


def test_6_reference_free_is_read_by_the_trainer(tmp_path, tok):
    feats = [encode_record(PreferenceRecord("Q?", f"The answer is {n}.", f"The answer is {n + 1}.", index=n),
                           tok, RAW, GRAN) for n in (5, 56)]
    batch = PreferenceCollator(tok.pad_token_id)(feats)
    policy, reference = tiny_llama(len(tok), seed=0), tiny_llama(len(tok), seed=1)
    with torch.no_grad():
        with_ref = _trainer(tmp_path, policy, reference, loss=LossType.DPO).loss_and_metrics(policy, batch, "eval")
        # reference-free needs no reference model at all: the reference is uniform over the vocabulary
        free = _trainer(tmp_path, policy, None, loss=LossType.DPO, reference_free=True)
        loss_free, metrics = free.loss_and_metrics(policy, batch, "eval")
        stats = free.token_stats(policy, batch, need_reference=False)
    assert not torch.isclose(loss_free, with_ref[0])
    # a reference that gives every response the same probability: the reference log-ratio is 0
    torch.testing.assert_close(stats.logratio, stats.policy_logps)
    torch.testing.assert_close(metrics["rewards_eval/chosen"], 0.1 * stats.logratio[:2])


def test_6_config_defaults_tdpo1_and_an_existing_default_model(tmp_path):
    tdpo = compose_config(["loss=tdpo"])
    assert tdpo.loss.if_tdpo2 is False  # kept as the research code had it; TDPO2 must be asked for
    assert compose_config(["loss=tdpo", "loss.if_tdpo2=true"]).loss.if_tdpo2 is True
    for loss in ("dpo", "tdpo"):  # the key exists where it is read
        assert compose_config([f"loss={loss}", "loss.reference_free=true"]).loss.reference_free is True
    cfg = compose_config([f"local_dirs=[{tmp_path}]"])
    assert cfg.model.name_or_path == models.DEFAULT_MODEL_NAME  # not `blank_model_fp32`
    assert validate(cfg).loss is LossType.SFT
    assert models.default_model_gguf().is_file()  # the embedded weights are installed
    # converted once from the installed GGUF when the cache is empty (~20 s), then its tokenizer read
    tokenizer = models.load_tokenizer(models.resolve_model_path(models.DEFAULT_MODEL_NAME))
    assert tokenizer.is_fast and tokenizer.eos_token == "<|im_end|>"


# ---------------------------------------------------------------- the shared runs (defects 6, 7, 9, 10)

WORDS = ["apple", "river", "stone", "cloud", "green", "music", "paper", "light", "sugar"]
FLAG0_INDEX, SHORT_INDEX = 4, 7


def run_records() -> list[dict]:
    """11 records: 9 ordinary, one with a 3-character correct response, one invalidated by flag 0."""
    out = []
    for i in range(11):
        word = WORDS[i % len(WORDS)]
        correct, incorrect = f"About {word}: the answer is yes.", f"About {word}: the answer is no."
        region = [incorrect.index("no."), incorrect.index("no.") + 2, -1]
        if i == SHORT_INDEX:
            correct, incorrect, region = "56.", "54.", [0, 2, -1]
        if i == FLAG0_INDEX:
            region = [0, 0, 0]
        out.append({"prompt": f"Is {word} number {i} good?", "correct_response": correct,
                    "incorrect_response": incorrect, "masked_region": region})
    return out


KEPT = [i for i in range(11) if i != FLAG0_INDEX]  # 10 records, batch 4: 4 + 4 + 2 per epoch


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("runs")
    tiny_llama(len(tok), hidden_size=32).save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    (root / "train.json").write_text(json.dumps(run_records()))
    return root


def recorded_train(root: Path, exp: str, *extra: str) -> list[dict]:
    """train_main, recording every training batch: global step, record indices, the trainer's settings."""
    seen: list[dict] = []
    original = GranularTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        seen.append({"step": self.state.global_step + 1, "index": inputs["index"].tolist(),
                     "settings": self.loss_settings, "has_reference": self.ref_model is not None})
        return original(self, model, inputs, *args, **kwargs)

    argv = [
        f"model.name_or_path={root / 'tiny'}", "datasets=[ours]", f"custom_train_path={root / 'train.json'}",
        f"exp_name={exp}", f"local_dirs=[{root / 'runs'}]", "prompt_format=raw", "max_length=64",
        "max_prompt_length=32", "loss=dpo", "loss.beta=0.5", "loss.reference_free=true", "granular=true",
        "batch_size=4", "optimizer=AdamW", "lr=1e-2", "warmup_steps=3", "do_first_eval=false", "seed=5", *extra,
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GranularTrainer, "compute_loss", recording)
        assert train_main(argv) == 0
    return seen


def train_logs(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss/train" in r}  # a resumed run's later line wins


@pytest.fixture(scope="module")
def recorded_run(run_root):
    """2 epochs uninterrupted: DPO, reference-free, 10 valid records of 11, batch 4."""
    return recorded_train(run_root, "whole", "n_epochs=2")


def test_6_reference_free_reaches_the_training_run(recorded_run, run_root):
    assert all(b["settings"].reference_free and not b["has_reference"] for b in recorded_run)
    first = train_logs(run_root / "runs" / "whole")[1]
    # with a real reference equal to the policy, step 1's rewards would be exactly 0 (the rejected side:
    # the chosen responses have no region, so they weigh unannotated_weight=0 throughout)
    assert abs(first["rewards_train/rejected"]) > 1e-3


def test_7_seed_reaches_the_data_order(tmp_path):
    data = Dataset.from_dict({"index": list(range(10)), "length": [5, 9, 3, 7, 7, 2, 8, 1, 6, 4]})

    def order(seed: int) -> list[list[int]]:
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", seed=seed,
                                 per_device_train_batch_size=4, dataloader_drop_last=False,
                                 remove_unused_columns=False)
        trainer = GranularTrainer(model=tiny_llama(300, hidden_size=16, layers=1), args=args, train_dataset=data,
                                  data_collator=lambda rows: {"index": [r["index"] for r in rows]},
                                  loss_settings=LossSettings(loss=LossType.SFT))
        return [b["index"] for b in trainer.get_train_dataloader()]

    assert order(1) == order(1)
    assert order(1) != order(2)
    for seed in (1, 2):
        batches = order(seed)
        assert [len(b) for b in batches] == [4, 4, 2]  # the last partial batch is kept
        assert sorted(i for b in batches for i in b) == list(range(10))
    sampler = SeededLengthGroupedSampler([5, 9, 3, 7, 7, 2, 8, 1, 6, 4], group_size=4, seed=1)
    assert sampler.order(0) != sampler.order(1)  # a new order every epoch, from (seed, epoch)
    cfg = compose_config(["seed=11", f"local_dirs=[{tmp_path}]"])
    args = build_training_arguments(cfg, validate(cfg))
    assert args.seed == 11 and args.data_seed == 11 and args.dataloader_drop_last is False


def test_7_every_record_is_trained_once_per_epoch_short_ones_and_last_partial_batch_included(recorded_run, run_root):
    records, _ = load_records(run_root / "train.json")
    assert SHORT_INDEX in [r.index for r in records] and records[SHORT_INDEX - 1].chosen == "56."
    steps = sorted({b["step"] for b in recorded_run})
    assert steps == list(range(1, 7))  # ceil(10 / 4) = 3 steps an epoch, the research code made 2
    for epoch in range(2):
        seen = [i for b in recorded_run if 3 * epoch < b["step"] <= 3 * epoch + 3 for i in b["index"]]
        assert sorted(seen) == KEPT, epoch  # every kept record exactly once, the 3-character one included


# ---------------------------------------------------------------- 8. EOS kept on truncation; EOS text refused


def test_8_truncated_responses_keep_their_eos(tok):
    long = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)
    record = PreferenceRecord("Q?", long, long + " Again.", (Region(4, 9, RegionFlag.CORRECT),))
    enc = EncodeOptions(max_length=24, max_prompt_length=8, prompt_format="raw")
    out = encode_record(record, tok, enc, GRAN)
    for side in ("chosen", "rejected"):
        assert len(out["prompt_ids"]) + len(out[f"{side}_ids"]) <= 24
        assert out[f"{side}_ids"][-1] == tok.eos_token_id
        assert len(out[f"{side}_weights"]) == len(out[f"{side}_ids"])
    assert out["chosen_weights"][-1] == 1.0  # and it is trained on (include_eos)


def test_8_eos_text_in_data_is_a_clear_error(tok, run_root, capsys):
    with pytest.raises(DataError) as error:
        load_records(HOSTILE / "eos_in_text.json", eos_text=tok.eos_token)
    assert error.value.index == 0 and error.value.field_name == "correct_response"
    assert "record 0" in str(error.value) and "correct_response" in str(error.value)
    # the same through the training command: exit code 2 and a message, not an assert
    argv = [f"model.name_or_path={run_root / 'tiny'}", "datasets=[ours]",
            f"custom_train_path={HOSTILE / 'eos_in_text.json'}", f"local_dirs=[{run_root / 'runs'}]", "exp_name=eos"]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert "eos_in_text.json, record 0, field 'correct_response'" in err and "<|endoftext|>" in err


# ---------------------------------------------------------------- 9. resume, reference dtype, wandb


def test_9_resume_restores_optimizer_scheduler_and_data_position(recorded_run, run_root):
    """AdamW (moments) with warmup (the LR depends on the step): stop after 2 of 6 steps, mid-epoch,
    restart with the full command; the resumed run must repeat the uninterrupted one step for step."""
    first = recorded_train(run_root, "resumed", "n_epochs=2", "n_examples=8")  # max 2 steps
    run_dir = run_root / "runs" / "resumed"
    step2 = run_dir / "step-2"
    files = {p.name for p in step2.iterdir()}
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth", "model.safetensors"} <= files
    assert json.loads((step2 / "trainer_state.json").read_text())["global_step"] == 2
    assert torch.load(step2 / "optimizer.pt", weights_only=True)["state"]  # Adam moments are saved

    second = recorded_train(run_root, "resumed", "n_epochs=2")
    assert [b["step"] for b in first] == [1, 2] and [b["step"] for b in second] == [3, 4, 5, 6]
    assert [b["index"] for b in first + second] == [b["index"] for b in recorded_run]  # same data position
    whole, resumed = train_logs(run_root / "runs" / "whole"), train_logs(run_dir)
    assert sorted(resumed) == list(range(1, 7))
    for step in whole:
        assert resumed[step]["loss/train"] == pytest.approx(whole[step]["loss/train"], rel=1e-5), step
        assert resumed[step]["learning_rate"] == pytest.approx(whole[step]["learning_rate"]), step
    w_whole = load_file(str(run_root / "runs" / "whole" / "LATEST" / "model.safetensors"))
    w_resumed = load_file(str(run_dir / "LATEST" / "model.safetensors"))
    for key in w_whole:
        torch.testing.assert_close(w_resumed[key], w_whole[key], rtol=1e-5, atol=1e-6, msg=key)


def test_9_reference_dtype_follows_the_policy_and_wandb_is_off(model_dirs, tmp_path):
    cfg = ModelSettings(name_or_path=str(model_dirs / "base"), policy_dtype="bfloat16")
    policy, reference = models.load_policy_and_reference(cfg, loss_needs_reference=True, device="cpu")
    assert policy.dtype == reference.dtype == torch.bfloat16
    # a dtype the device cannot run (float16 on CPU) falls back, it does not fail
    assert models.runnable_dtype("float16", "cpu") == torch.float32
    defaults = compose_config([f"local_dirs=[{tmp_path}]"])
    assert defaults.wandb.enabled is False
    assert build_training_arguments(defaults, validate(defaults)).report_to in ([], "none", ["none"])


# ---------------------------------------------------------------- 10. flag 0 skipped and counted


def test_10_flag_zero_records_are_skipped_counted_and_never_trained(recorded_run, run_root):
    records, report = load_records(HOSTILE / "flag_zero.json", on_invalid="error")  # not an error
    assert [r.prompt for r in records] == ["kept"]
    assert report.skipped == {"invalidated": 1} and "invalidated=1" in report.summary()
    records, report = load_records(run_root / "train.json")
    assert report.n_read == 11 and report.n_kept == 10 and report.skipped == {"invalidated": 1}
    assert FLAG0_INDEX not in [r.index for r in records]
    trained = [i for b in recorded_run for i in b["index"]]
    assert FLAG0_INDEX not in trained and len(trained) == 2 * len(KEPT)  # no constant loss in any batch
