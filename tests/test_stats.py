"""Token statistics: the chunked path against the naive one, zero-weight positions, hidden-state route.

The naive path in float64 is the reference; the chunked path must match it in values and in
gradients (hidden states, head weight and bias) in fp32 to 1e-5 and in bf16 to bf16 tolerance.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from tiny import tiny_llama
from torch import nn

from granular_po.forward.hidden import forward_hidden, hidden_path_matches, supports_hidden_path
from granular_po.losses import dpo_loss, sequential_kl, tdpo_loss
from granular_po.stats import compute_token_stats, compute_token_stats_from_logits

N, T, H, V = 4, 9, 16, 37  # V differs from every other size, so a (rows, V) tensor is recognisable
FIELDS = ("policy_logps", "reference_logps", "logratio", "position_kl", "weight_sum")


def make_problem(bias: bool = True, seed: int = 0):
    """Random hidden states and heads, and weights with zeros, fractions and an all-zero row."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, T, H, generator=g) * 2
    ref_hidden = torch.randn(N, T, H, generator=g) * 2
    head, ref_head = nn.Linear(H, V, bias=bias), nn.Linear(H, V, bias=bias)
    for module in (head, ref_head):
        for p in module.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
    ids = torch.randint(0, V, (N, T), generator=g)
    weights = torch.rand(N, T, generator=g) * (torch.rand(N, T, generator=g) > 0.4)
    weights[0, 3:] = 1.0  # a plain 0/1 span
    weights[2] = 0.0  # a row with nothing to learn from
    weights[:, 0] = 0.7  # position 0 has no predictor: this weight must be ignored
    return hidden, ref_hidden, head, ref_head, ids, weights


def run(problem, dtype, impl, chunk_size=1024, need_kl=True, average=False, ref="model", fused=True):
    """Stats and gradients of a fixed random combination of them w.r.t. hidden, head weight, bias."""
    hidden, ref_hidden, head, ref_head, ids, weights = problem
    hidden = hidden.to(dtype).requires_grad_(True)
    head, ref_head = copy.deepcopy(head).to(dtype), copy.deepcopy(ref_head).to(dtype)
    stats = compute_token_stats(
        hidden, head, ref_hidden.to(dtype) if ref == "model" else None, ref_head if ref == "model" else None,
        ids, weights, need_kl, average, reference_free=ref == "uniform", impl=impl, chunk_size=chunk_size,
        fused=fused,
    )  # fmt: skip
    coef = torch.linspace(-1.0, 2.0, N, dtype=torch.float64)
    objective = (stats.policy_logps * coef).sum()
    if stats.logratio is not None:
        objective = objective + (stats.logratio * coef.flip(0)).sum()
    if stats.position_kl is not None:
        objective = objective + (stats.position_kl * 0.3).sum()
    params = [hidden, *head.parameters()]
    grads = torch.autograd.grad(objective, params)
    return stats, grads


def assert_same(a, b, atol, rtol=0.0):
    stats_a, grads_a = a
    stats_b, grads_b = b
    for name in FIELDS:
        va, vb = getattr(stats_a, name), getattr(stats_b, name)
        assert (va is None) == (vb is None), name
        if va is not None:
            torch.testing.assert_close(va.double(), vb.double(), atol=atol, rtol=rtol, msg=name)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga.double(), gb.double(), atol=atol, rtol=rtol)


# (need_kl, average, reference); the KL needs a reference
CASES = [
    c
    for c in itertools.product([False, True], [False, True], ["model", "uniform", "none"])
    if c[::2] != (True, "none")
]


@pytest.mark.parametrize("need_kl,average,ref", CASES)
@pytest.mark.parametrize("chunk_size", [1, 3, 10_000])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "checkpointed"])
def test_chunked_matches_naive_fp32(need_kl, average, ref, chunk_size, fused):
    problem = make_problem(bias=chunk_size != 3)
    truth = run(problem, torch.float64, "naive", need_kl=need_kl, average=average, ref=ref)
    naive32 = run(problem, torch.float32, "naive", need_kl=need_kl, average=average, ref=ref)
    kw = {"need_kl": need_kl, "average": average, "ref": ref, "fused": fused}
    chunked32 = run(problem, torch.float32, "chunked", chunk_size, **kw)
    assert chunked32[0].policy_logps.dtype == torch.float32
    assert_same(chunked32, truth, atol=1e-5)
    assert_same(naive32, truth, atol=1e-5)
    chunked64 = run(problem, torch.float64, "chunked", chunk_size, **kw)
    assert_same(chunked64, truth, atol=1e-10)


def errors(result, truth):
    """Max abs error of every stat and gradient against the truth, with the truth's scale."""
    out = []
    for name in FIELDS:
        if getattr(truth[0], name) is not None:
            out.append((getattr(result[0], name), getattr(truth[0], name)))
    out += list(zip(result[1], truth[1]))
    return [((a.double() - b).abs().max().item(), max(b.abs().max().item(), 1.0)) for a, b in out]


@pytest.mark.parametrize("need_kl,average", [(False, False), (True, True), (True, False)])
@pytest.mark.parametrize("chunk_size", [1, 3, 10_000])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "checkpointed"])
def test_chunked_matches_naive_bf16(need_kl, average, chunk_size, fused):
    """In bf16 both paths are as close to the float64 truth as bf16 allows, and chunked no worse.

    The paths cannot agree bit for bit: matmuls of different shapes round differently, and the head
    weight's gradient is accumulated across chunks in the parameter's dtype (one rounding a chunk).
    """
    problem = make_problem()
    truth = run(problem, torch.float64, "naive", need_kl=need_kl, average=average)
    naive = run(problem, torch.bfloat16, "naive", need_kl=need_kl, average=average)
    chunked = run(problem, torch.bfloat16, "chunked", chunk_size, need_kl=need_kl, average=average, fused=fused)
    assert chunked[0].policy_logps.dtype == torch.float32  # log-probs are taken in fp32
    for (err, scale), (naive_err, _) in zip(errors(chunked, truth), errors(naive, truth)):
        assert err <= 2e-2 * scale
        assert err <= 2 * naive_err + 4e-3 * scale


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_target_at_t_is_predicted_from_position_t_minus_1(impl):
    """Logits at t-1 put +50 on ids[t]: each weighted target has log p = -log(1 + (V-1) e^-50) ~ 0.

    Read one position off (from t or t+1) and every target would score about -50 instead.
    """
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(0))
    logits = torch.zeros(2, 6, V)
    logits[:, :-1].scatter_(-1, ids[:, 1:, None], 50.0)
    stats = compute_token_stats_from_logits(logits, None, ids, torch.ones(2, 6), impl=impl)
    torch.testing.assert_close(stats.policy_logps, torch.zeros(2), atol=1e-12, rtol=0)
    torch.testing.assert_close(stats.weight_sum, torch.full((2,), 5.0))  # position 0 has no predictor


def test_stats_closed_form_uniform_policy():
    """A zero head gives a uniform policy: log p = -ln V per token, so with weights (.5, 1, 0) after
    position 0: policy_logps = -1.5 ln V; reference-free: logratio = policy_logps (a reference
    log-ratio of 0), KL against the uniform distribution 0; mean = -ln V."""
    head = nn.Linear(H, V, bias=False)
    nn.init.zeros_(head.weight)
    hidden, ids = torch.randn(1, 4, H), torch.randint(0, V, (1, 4))
    weights = torch.tensor([[0.9, 0.5, 1.0, 0.0]])
    for impl in ("naive", "chunked"):
        stats = compute_token_stats(
            hidden, head, None, None, ids, weights, True, reference_free=True, impl=impl
        )
        torch.testing.assert_close(stats.policy_logps, torch.tensor([-1.5 * math.log(V)]))
        torch.testing.assert_close(stats.logratio, stats.policy_logps)
        torch.testing.assert_close(stats.reference_logps, torch.zeros(1))
        torch.testing.assert_close(stats.position_kl, torch.zeros(1), atol=1e-6, rtol=0)
        torch.testing.assert_close(stats.weight_sum, torch.tensor([1.5]))
        mean = compute_token_stats(
            hidden, head, None, None, ids, weights, average=True, reference_free=True, impl=impl
        )
        torch.testing.assert_close(mean.policy_logps, torch.tensor([-math.log(V)]))


def test_uniform_reference_kl_is_sequential_kl_against_uniform():
    """sum_v (1/V)(-ln V - log p(v)) equals `sequential_kl` with a uniform reference."""
    hidden, _, head, _, ids, _ = make_problem()
    weights = torch.zeros(N, T)
    weights[1, 4] = 1.0
    stats = compute_token_stats(hidden, head, None, None, ids, weights, True, reference_free=True)
    policy_lp = head(hidden[1, 3]).log_softmax(-1)
    expected = sequential_kl(torch.full_like(policy_lp, -math.log(V)), policy_lp)
    torch.testing.assert_close(stats.position_kl[1], expected)
    torch.testing.assert_close(stats.reference_logps[1], torch.tensor(0.0))  # the response level: 0


class CountingHead(nn.Module):
    """A Linear head that records how many rows it projects per call."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head, self.rows = head, []

    def forward(self, x):
        self.rows.append(x.reshape(-1, x.shape[-1]).shape[0])
        return self.head(x)


def test_zero_weight_positions_never_reach_the_head():
    hidden, ref_hidden, head, ref_head, ids, weights = make_problem()
    counting, ref_counting = CountingHead(head), CountingHead(ref_head)
    with torch.no_grad():
        compute_token_stats(
            hidden, counting, ref_hidden, ref_counting, ids, weights, True, impl="chunked", chunk_size=4
        )
    n_weighted = int((weights[:, 1:] != 0).sum())
    assert sum(counting.rows) == n_weighted == sum(ref_counting.rows)
    assert max(counting.rows) <= 4
    counting.rows.clear()
    compute_token_stats(hidden, counting, None, None, ids, weights, impl="naive")
    assert counting.rows == [N * (T - 1)]


def test_chunked_keeps_no_vocab_sized_tensor_for_backward():
    """Fused or under checkpointing, no (rows, V) activation is saved for backward (the head's own
    parameters aside); the naive path saves several."""
    hidden, ref_hidden, head, ref_head, ids, weights = make_problem()
    hidden.requires_grad_(True)
    parameters = {p.data_ptr() for m in (head, ref_head) for p in m.parameters()}

    def saved_shapes(impl, fused=True):
        shapes = []

        def pack(x):
            if x.data_ptr() not in parameters:
                shapes.append(tuple(x.shape))
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            stats = compute_token_stats(
                hidden, head, ref_hidden, ref_head, ids, weights, True, impl=impl, chunk_size=3, fused=fused
            )
        (stats.logratio.sum() + stats.position_kl.sum()).backward()
        return shapes

    assert not [s for s in saved_shapes("chunked") if s and s[-1] == V]
    assert not [s for s in saved_shapes("chunked", fused=False) if s and s[-1] == V]
    assert [s for s in saved_shapes("naive") if s and s[-1] == V]


def granular_batch(seed=0):
    """A preference batch (rows 0..1 chosen, 2..3 rejected) with policy and reference logits."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, T, V, generator=g) * 3).requires_grad_(True)
    ref_logits = torch.randn(N, T, V, generator=g) * 3
    ids = torch.randint(0, V, (N, T), generator=g)
    weights = torch.zeros(N, T)
    weights[0, 3:6], weights[1, 5:] = 1.0, 0.5
    weights[2, 2:4], weights[3, 4:8] = 1.0, 0.25
    return logits, ref_logits, ids, weights


def preference_loss(stats, kind):
    m, k = stats.logratio, stats.position_kl
    if kind == "dpo":
        return dpo_loss(m[:2], m[2:], 0.1)[0].mean()
    return tdpo_loss(m[:2], m[2:], k[:2], k[2:], 0.1, if_tdpo2=kind == "tdpo2")[0].mean()


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("kind", ["dpo", "tdpo1", "tdpo2"])
def test_zero_weight_positions_get_exactly_zero_gradient(impl, kind):
    """d loss / d logits[n, t-1] is exactly 0 wherever the target at t weighs 0 (and at t = T-1)."""
    logits, ref_logits, ids, weights = granular_batch()
    need_kl = kind != "dpo"
    stats = compute_token_stats_from_logits(
        logits, ref_logits, ids, weights, need_kl, impl=impl, chunk_size=2
    )
    (grad,) = torch.autograd.grad(preference_loss(stats, kind), logits)
    predicts_weighted = torch.zeros(N, T, dtype=torch.bool)
    predicts_weighted[:, :-1] = weights[:, 1:] != 0
    assert bool((grad[~predicts_weighted] == 0).all())
    assert bool((grad[predicts_weighted].abs().sum(-1) > 0).all())


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_logits_at_zero_weight_change_neither_loss_nor_gradient(impl):
    logits, ref_logits, ids, weights = granular_batch()
    predicts_weighted = torch.zeros(N, T, dtype=torch.bool)
    predicts_weighted[:, :-1] = weights[:, 1:] != 0
    noise = torch.randn(N, T, V) * 50
    changed = torch.where(predicts_weighted[..., None], logits.detach(), noise).requires_grad_(True)
    changed_ref = torch.where(predicts_weighted[..., None], ref_logits, -noise)
    results = []
    for pol, ref in ((logits, ref_logits), (changed, changed_ref)):
        stats = compute_token_stats_from_logits(pol, ref, ids, weights, True, impl=impl)
        loss = preference_loss(stats, "tdpo1")
        results.append((loss, torch.autograd.grad(loss, pol)[0]))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_chunked_ignores_nan_at_zero_weight():
    """Only weighted rows are read: garbage (NaN) logits elsewhere cannot leak in."""
    logits, ref_logits, ids, weights = granular_batch()
    predicts_weighted = torch.zeros(N, T, dtype=torch.bool)
    predicts_weighted[:, :-1] = weights[:, 1:] != 0
    poisoned = torch.where(predicts_weighted[..., None], logits.detach(), torch.nan).requires_grad_(True)
    stats = compute_token_stats_from_logits(poisoned, ref_logits, ids, weights, True, impl="chunked")
    clean = compute_token_stats_from_logits(logits, ref_logits, ids, weights, True, impl="chunked")
    torch.testing.assert_close(stats.logratio, clean.logratio)
    (grad,) = torch.autograd.grad(preference_loss(stats, "tdpo2"), poisoned)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("average", [False, True])
def test_all_zero_weights_give_zero_and_finite_gradients(impl, average):
    hidden, ref_hidden, head, ref_head, ids, _ = make_problem()
    hidden.requires_grad_(True)
    weights = torch.zeros(N, T)
    stats = compute_token_stats(hidden, head, ref_hidden, ref_head, ids, weights, True, average, impl=impl)
    for name in FIELDS:
        assert torch.equal(getattr(stats, name), torch.zeros(N)), name
    loss = preference_loss(stats, "tdpo1")
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(head.weight.grad, torch.zeros_like(head.weight))


def test_input_validation():
    hidden, ref_hidden, head, ref_head, ids, weights = make_problem()
    with pytest.raises(ValueError, match="reference"):
        compute_token_stats(hidden, head, None, None, ids, weights, need_kl=True)
    with pytest.raises(ValueError, match="shape"):
        compute_token_stats(hidden, head, None, None, ids[:, 1:], weights)
    with pytest.raises(ValueError, match="impl"):
        compute_token_stats(hidden, head, None, None, ids, weights, impl="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        compute_token_stats(hidden, head, None, None, ids, weights, chunk_size=0)


# ---- real (tiny) models ----


def llama_batch(vocab=61, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    weights = torch.zeros(4, 12)
    weights[:, 5:] = 1.0
    weights[1, 9:] = 0.0
    weights[3, 6:8] = 0.0  # a granular hole
    return ids, mask, weights


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_hidden_path_equals_logits_path(tied):
    policy, reference = tiny_llama(61, seed=1, tie_word_embeddings=tied), tiny_llama(61, seed=2)
    ids, mask, weights = llama_batch()
    assert supports_hidden_path(policy)
    with torch.no_grad():
        ref_hidden, ref_head = forward_hidden(reference, ids, mask)
        ref_logits = reference(input_ids=ids, attention_mask=mask).logits

    def loss_and_grads(stats):
        loss = preference_loss(stats, "tdpo1")
        grads = torch.autograd.grad(loss, [p for p in policy.parameters() if p.requires_grad])
        return loss, grads

    hidden, head = forward_hidden(policy, ids, mask)
    assert hidden.shape == (4, 12, 32) and head is policy.get_output_embeddings()
    fast = compute_token_stats(
        hidden, head, ref_hidden, ref_head, ids, weights, True, impl="chunked", chunk_size=5
    )
    logits = policy(input_ids=ids, attention_mask=mask).logits
    slow = compute_token_stats_from_logits(logits, ref_logits, ids, weights, True, impl="naive")
    for name in FIELDS:
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), atol=1e-5, rtol=1e-5)
    loss_fast, grads_fast = loss_and_grads(fast)
    loss_slow, grads_slow = loss_and_grads(slow)
    torch.testing.assert_close(loss_fast, loss_slow, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_peft_lora_model_through_hidden_path():
    peft = pytest.importorskip("peft")
    base = tiny_llama(61, seed=3)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # LoRA starts as a no-op; make it matter
            p.data.normal_(0, 0.5)
    ids, mask, weights = llama_batch()
    assert supports_hidden_path(model) and hidden_path_matches(model, ids, mask)
    hidden, head = forward_hidden(model, ids, mask)
    stats = compute_token_stats(hidden, head, None, None, ids, weights)
    logits = model(input_ids=ids, attention_mask=mask).logits
    slow = compute_token_stats_from_logits(logits, None, ids, weights)
    torch.testing.assert_close(stats.policy_logps, slow.policy_logps, atol=1e-5, rtol=1e-5)
    with model.disable_adapter(), torch.no_grad():
        off, _ = forward_hidden(model, ids, mask)
    assert not torch.allclose(off, hidden)  # the adapter is active in the hidden path
    stats.policy_logps.sum().backward()
    lora = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert lora and all(g is not None and bool(g.abs().sum() > 0) for g in lora)


def test_logit_transform_models_are_refused():
    softcapped = tiny_llama(61, final_logit_softcapping=30.0)
    assert not supports_hidden_path(softcapped)
    assert not supports_hidden_path(tiny_llama(61, logit_scale=0.5))
    assert supports_hidden_path(tiny_llama(61, logit_scale=1.0))


def test_runtime_check_catches_softcapping():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5,
    )  # fmt: skip
    model = Gemma2ForCausalLM(config)
    ids, mask, _ = llama_batch()
    assert not supports_hidden_path(model)
    assert not hidden_path_matches(model, ids, mask)


# ---- peer check: Hugging Face TRL's DPO on the same tiny models ----


def trl_dpo_shell(policy, reference, beta):
    """The minimum of a TRL 1.16 `DPOTrainer` that its `_compute_loss` reads, without `__init__`.

    `__init__` needs datasets, a tokenizer and `TrainingArguments`; `_compute_loss` only reads the
    attributes set here. As `__init__` does, both models get TRL's fused LM head (their forward
    then returns per-token log-probs). The accelerator is a single-process stand-in: gathers are
    identities. Metrics land in `shell._metrics["train"]`.
    """
    import types
    from collections import defaultdict

    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(reference)
    shell = object.__new__(DPOTrainer)
    identity = lambda x: x  # noqa: E731
    shell.__dict__.update(
        model=policy, ref_model=reference, beta=beta, label_smoothing=0.0,
        accelerator=types.SimpleNamespace(
            device=torch.device("cpu"), gather=identity, gather_for_metrics=identity, unwrap_model=identity
        ),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        loss_types=["sigmoid"], loss_weights=[1.0], f_divergence_type="reverse_kl", ld_alpha=None,
        use_weighting=False, aux_loss_enabled=False, precompute_ref_logps=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    return shell


def dpo_pairs(vocab=61, pairs=3, length=12, seed=0):
    """[chosen; rejected] rows sharing a prompt of 4 tokens, right-padded, completion mask after it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2 * pairs, length), generator=g)
    ids[pairs:, :4] = ids[:pairs, :4]
    attention = torch.ones_like(ids)
    attention[1, 9:] = attention[pairs + 2, 7:] = 0
    completion = attention.clone()
    completion[:, :4] = 0
    return ids, attention, completion


def test_dpo_matches_trl_log_probs():
    """Per-sequence log-probs equal `sum(selective_log_softmax(logits[:, :-1], ids[:, 1:]) * mask[:, 1:])`."""
    from trl.trainer.utils import selective_log_softmax

    model = tiny_llama(61, seed=4)
    ids, attention, completion = dpo_pairs()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits
        hidden, head = forward_hidden(model, ids, attention)
    theirs = (selective_log_softmax(logits[:, :-1], ids[:, 1:]) * completion[:, 1:]).sum(-1)
    ours = compute_token_stats(hidden, head, None, None, ids, completion.float(), chunk_size=7)
    torch.testing.assert_close(ours.policy_logps, theirs, atol=1e-5, rtol=1e-6)


def test_dpo_matches_trl_loss_rewards_and_gradients():
    """All weights 1 on the completion: our DPO loss, rewards and parameter gradients equal TRL's."""
    beta = 0.1
    policy, reference = tiny_llama(61, seed=5), tiny_llama(61, seed=6)
    trl_policy, trl_reference = copy.deepcopy(policy), copy.deepcopy(reference)
    shell = trl_dpo_shell(trl_policy, trl_reference, beta)
    ids, attention, completion = dpo_pairs()
    pairs = ids.shape[0] // 2

    hidden, head = forward_hidden(policy, ids, attention)
    with torch.no_grad():
        ref_hidden, ref_head = forward_hidden(reference, ids, attention)
    stats = compute_token_stats(hidden, head, ref_hidden, ref_head, ids, completion.float(), chunk_size=5)
    losses, chosen_r, rejected_r = dpo_loss(stats.logratio[:pairs], stats.logratio[pairs:], beta)
    losses.mean().backward()

    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
    trl_loss = shell._compute_loss(trl_policy, inputs, return_outputs=False)
    trl_loss.backward()
    torch.testing.assert_close(losses.mean(), trl_loss, atol=1e-5, rtol=1e-5)
    metrics = shell._metrics["train"]
    torch.testing.assert_close(chosen_r.mean().item(), metrics["rewards/chosen"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rejected_r.mean().item(), metrics["rewards/rejected"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        stats.policy_logps[:pairs].mean().item(), metrics["logps/chosen"][0], atol=1e-5, rtol=1e-5
    )
    for (name, ours), theirs in zip(policy.named_parameters(), trl_policy.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-4, msg=name)

    # one pair at a time, so TRL's batch-mean metrics are per-pair values
    for i in range(pairs):
        rows = [i, pairs + i]
        shell._metrics["train"].clear()
        with torch.no_grad():
            loss_i = shell._compute_loss(
                trl_policy, {k: v[rows] for k, v in inputs.items()}, return_outputs=False
            )
        torch.testing.assert_close(losses[i].detach(), loss_i, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            chosen_r[i].item(), shell._metrics["train"]["rewards/chosen"][0], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            rejected_r[i].item(), shell._metrics["train"]["rewards/rejected"][0], atol=1e-5, rtol=1e-5
        )


def test_reference_sharing_the_policy_head_is_a_constant():
    """A LoRA policy's reference (adapter off) shares its lm_head: no gradient may flow through it."""
    hidden, ref_hidden, head, _, ids, weights = make_problem()
    frozen = copy.deepcopy(head).requires_grad_(False)
    results = []
    for impl, ref_head in (("chunked", head), ("naive", frozen)):
        head.zero_grad()
        stats = compute_token_stats(
            hidden, head, ref_hidden, ref_head, ids, weights, True, impl=impl, chunk_size=3
        )
        preference_loss(stats, "tdpo1").backward()
        results.append([p.grad.clone() for p in head.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_forward_hidden_through_ddp():
    """Through a (one-process, gloo) DDP wrapper: same hidden states, gradients reach the module."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already running")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    ddp = None
    try:
        model = tiny_llama(61, seed=7)
        ddp = nn.parallel.DistributedDataParallel(model)
        ids, mask, weights = llama_batch()
        assert supports_hidden_path(ddp)
        hidden, head = forward_hidden(ddp, ids, mask)
        assert head is model.get_output_embeddings()
        with torch.no_grad():
            plain, _ = forward_hidden(model, ids, mask)
        torch.testing.assert_close(hidden, plain)
        compute_token_stats(hidden, head, None, None, ids, weights).policy_logps.sum().backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        # the DDP reducer holds the process group: free it first, or destroying the group's last
        # reference later (at function exit) can hang joining gloo's worker threads
        del ddp
        import gc

        gc.collect()
        dist.destroy_process_group()


def test_fused_head_backward_recomputes_in_the_forwards_autocast_precision():
    """Mixed precision (fp32 weights, bf16 autocast): forward under autocast, backward outside it, as
    Trainer runs them. The fused backward must recompute the logits in bf16 as its forward did;
    recomputed in fp32 instead, softmax(z) no longer matches the saved bf16 log-normaliser.
    Measured (largest gradient error relative to the largest gradient, against the checkpointed path),
    over make_problem seeds 0-7: 0.0033-0.0069 as built (0.0056 here, seed 0), 0.0143-0.0204 with the
    backward recomputed in fp32 (0.0178 here). The tolerance 0.01 lies between the two."""
    hidden, ref_hidden, head, ref_head, ids, weights = make_problem(bias=False)

    def grads(fused):
        h = hidden.clone().requires_grad_(True)
        hd = copy.deepcopy(head)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stats = compute_token_stats(h, hd, ref_hidden, ref_head, ids, weights, True, chunk_size=3, fused=fused)
        objective = stats.logratio.sum() + 0.3 * stats.position_kl.sum()
        return torch.autograd.grad(objective, [h, hd.weight])

    fused, checkpointed = grads(True), grads(False)
    for a, b in zip(fused, checkpointed):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 1e-2 * scale


@pytest.mark.parametrize("route", ["hidden", "logits"])
@pytest.mark.parametrize("impl,fused", [("naive", True), ("chunked", True), ("chunked", False)])
def test_reference_made_under_inference_mode_works_on_every_path(route, impl, fused):
    """The trainer runs the reference under torch.inference_mode; its outputs feed the KL, whose
    backward must not need to save an inference tensor. Same numbers as a no_grad reference."""
    policy, reference = tiny_llama(61, seed=1), tiny_llama(61, seed=2)
    ids = torch.randint(1, 60, (4, 9), generator=torch.Generator().manual_seed(0))
    mask, weights = torch.ones_like(ids), torch.rand(4, 9, generator=torch.Generator().manual_seed(1))
    results = []
    for mode in (torch.no_grad, torch.inference_mode):
        policy.zero_grad()
        if route == "logits":
            with mode():
                ref_logits = reference(input_ids=ids, attention_mask=mask).logits
            stats = compute_token_stats(None, None, None, None, ids, weights, True, impl=impl, fused=fused,
                                        policy_logits=policy(input_ids=ids, attention_mask=mask).logits,
                                        ref_logits=ref_logits)
        else:
            hidden, head = forward_hidden(policy, ids, mask)
            with mode():
                ref_hidden, ref_head = forward_hidden(reference, ids, mask)
            stats = compute_token_stats(hidden, head, ref_hidden, ref_head, ids, weights, True, impl=impl,
                                        fused=fused)
        (stats.logratio.sum() + stats.position_kl.sum()).backward()
        results.append((stats.position_kl.detach(), policy.get_input_embeddings().weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_fused_kl_keeps_float32_sums_under_autocast():
    """Under bf16 autocast the fused head's KL sums V products in a row-wise `bmm`; autocast lowers bmm
    to bf16, which rounded every product (relative KL error about 3x naive's at V = 49152, found by
    bench/stats_check.py). The sum now runs in float32: as accurate as the naive path against float64."""
    gen = torch.Generator().manual_seed(0)
    n, t, h, v = 2, 9, 32, 8192
    hidden, ref_hidden = torch.randn(n, t, h, generator=gen), torch.randn(n, t, h, generator=gen)
    head, ref_head = torch.nn.Linear(h, v, bias=False), torch.nn.Linear(h, v, bias=False).requires_grad_(False)
    ids, weights = torch.randint(0, v, (n, t), generator=gen), torch.ones(n, t)

    def kl(impl, wide=False):
        args = (hidden.double(), copy.deepcopy(head).double(), ref_hidden.double(),
                copy.deepcopy(ref_head).double()) if wide else (
            hidden.bfloat16(), head, ref_hidden.bfloat16(), copy.deepcopy(ref_head).bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not wide):
            return compute_token_stats(*args, ids, weights, need_kl=True, impl=impl).position_kl.double()

    truth = kl("naive", wide=True)
    error = {impl: ((kl(impl) - truth).norm() / truth.norm()).item() for impl in ("naive", "chunked")}
    assert error["chunked"] <= 1.2 * error["naive"], error
