"""Padding-free forwards (`padding_free=true`): packed real tokens give the padded batch's numbers.

The layout (first-fit-decreasing rows, restarting positions, the scatter back) is checked directly;
the numbers through real tiny Llama models: token statistics with the KL (values and gradients)
equal the padded forward's within 1e-5 in fp32, for both the hidden-state and the logits path, with
rows no longer than the batch and with one row (flash attention's layout). A model that lets packed
sequences see each other is refused at start-up.
"""

import pytest
import torch
from tiny import tiny_llama

from granular_po.forward.hidden import hidden_states_and_head
from granular_po.forward.packing import check_packing, pack_batch, packs_in_one_row
from granular_po.stats import compute_token_stats

LENGTHS = [9, 4, 7, 3, 9, 2]  # (N = 6, T = 9)


def padded_batch(lengths=LENGTHS, vocab=61, seed=0):
    """Right-padded ids, mask and weights (the first third of each row is the unweighted prompt)."""
    gen = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), t), generator=gen)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    weights = torch.zeros(len(lengths), t)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
        weights[i, max(1, n // 3) : n] = torch.rand(n - max(1, n // 3), generator=gen) + 0.5
    return ids, mask, weights


def test_layout_packs_first_fit_decreasing_and_scatters_back():
    ids, mask, _ = padded_batch()
    packed = pack_batch(ids, mask, pad_token_id=0)
    # capacity T = 9: [9], [9], [7, 2], [4, 3]
    assert packed.input_ids.shape == (4, 9)
    assert packed.position_ids[2].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1]
    assert packed.position_ids[3].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]  # 4 + 3, then a 2-token tail
    assert int(packed.padded_index.numel()) == sum(LENGTHS)
    back = packed.unpack(packed.input_ids.unsqueeze(-1)).squeeze(-1)
    assert torch.equal(back, ids * mask)  # every real token where it was, zeros at padding
    one = pack_batch(ids, mask, pad_token_id=0, one_row=True)
    assert one.input_ids.shape == (1, sum(LENGTHS))
    assert torch.equal(one.unpack(one.input_ids.unsqueeze(-1)).squeeze(-1), ids * mask)


def test_nothing_to_pack_and_left_padding_is_refused():
    ids, mask, _ = padded_batch([5, 5, 5])
    assert pack_batch(ids, mask, 0) is None  # no padding: the padded forward is already padding-free
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        pack_batch(torch.ones(2, 3, dtype=torch.long), mask, 0)


def _stats(model, ref, ids, mask, weights, use_hidden_path, packed):
    hidden, head, logits = hidden_states_and_head(model, ids, mask, use_hidden_path, packed)
    with torch.no_grad():
        ref_hidden, ref_head, ref_logits = hidden_states_and_head(ref, ids, mask, use_hidden_path, packed)
    return compute_token_stats(hidden, head, ref_hidden, ref_head, ids, weights, need_kl=True,
                               policy_logits=logits, ref_logits=ref_logits, chunk_size=5)


@pytest.mark.parametrize("use_hidden_path", [True, False], ids=["hidden", "logits"])
@pytest.mark.parametrize("one_row", [False, True], ids=["rows", "one-row"])
def test_packed_statistics_and_gradients_equal_padded(use_hidden_path, one_row):
    ids, mask, weights = padded_batch()
    policy, ref = tiny_llama(61, seed=1), tiny_llama(61, seed=2)
    grads = []
    results = []
    for packed in (None, pack_batch(ids, mask, 0, one_row=one_row)):
        policy.zero_grad()
        stats = _stats(policy, ref, ids, mask, weights, use_hidden_path, packed)
        loss = (stats.logratio * torch.tensor([1.0, -2, 3, -1, 0.5, 2])).sum() + stats.position_kl.sum()
        loss.backward()
        results.append(stats)
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters()})
    padded, packed = results
    for field in ("policy_logps", "reference_logps", "logratio", "position_kl", "weight_sum"):
        torch.testing.assert_close(getattr(packed, field), getattr(padded, field), atol=1e-5, rtol=1e-5)
    assert padded.position_kl.abs().min() > 1e-4  # the KL is not trivially zero
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-5, msg=name)


def test_packed_sequences_do_not_see_each_other():
    """Changing one sequence leaves the statistics of the sequence packed beside it unchanged."""
    ids, mask, weights = padded_batch()
    model = tiny_llama(61, seed=3)
    packed = pack_batch(ids, mask, 0)
    before = _stats(model, model, ids, mask, weights, True, packed).policy_logps.detach()
    other = ids.clone()
    other[3, :3] = (other[3, :3] + 7) % 60 + 1  # row 3 shares its packed row with row 1
    after = _stats(model, model, other, mask, weights, True, pack_batch(other, mask, 0)).policy_logps.detach()
    assert not torch.allclose(after[3], before[3])
    torch.testing.assert_close(after[[0, 1, 2, 4, 5]], before[[0, 1, 2, 4, 5]], atol=1e-6, rtol=1e-6)


def test_check_packing_accepts_llama_and_gpt2_and_refuses_opt():
    """OPT derives its positions from the attention mask, so packed sequences get the wrong ones."""
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    model = tiny_llama(61, seed=4)
    check_packing(model, "policy")  # sdpa: block-causal mask from the restarting positions
    assert not packs_in_one_row(model)
    check_packing(GPT2LMHeadModel(GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4)), "policy")
    opt = OPTForCausalLM(OPTConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   ffn_dim=64, word_embed_proj_dim=32))
    with pytest.raises(ValueError, match=r"padding_free=true: the reference model \(OPTForCausalLM.*differ"):
        check_packing(opt, "reference")
    assert opt.training  # the check restores the mode it found


def test_layout_is_chosen_by_estimated_cost():
    from granular_po.forward.packing import attention_cost, choose_bins

    lengths = [200, 60, 150, 90, 40, 180]  # T = 200
    one_row = choose_bins(lengths, one_row=False, attention_cost=0.0)  # attention free: fewest tokens wins
    assert len(one_row) == 1
    rows = choose_bins(lengths, one_row=False, attention_cost=None)  # rows of at most T, first-fit decreasing
    assert [sum(lengths[i] for i in r) for r in rows] == [200, 180, 150 + 40, 90 + 60]
    assert choose_bins([200, 199, 198], one_row=False, attention_cost=5e-4) is None  # nothing worth packing
    cost = attention_cost(tiny_llama(61, hidden_size=32, layers=2))
    # a layer: q, o 32x32 and k, v 32x16 (GQA), MLP 3 x 32x64, two norms: 9280 parameters; the final
    # norm (32) is shared out over the 2 layers; embeddings and the (tied) head are not counted
    per_layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32 + 32 / 2
    assert cost == pytest.approx(1.5 * 4 * 32 / (2 * per_layer), rel=1e-6)
