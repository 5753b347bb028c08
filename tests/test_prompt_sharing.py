"""One prompt forward for chosen and rejected (`share_prompt`): the same numbers as the padded rows.

Layout (the split and its reassembly) checked on token ids; the numbers through real tiny models:
token statistics with the KL, values and gradients, within 1e-5 in fp32 against the padded forward;
a model whose cache cannot hold the whole prompt (a sliding window) is refused at start-up.
"""

import pytest
import torch
from tiny import tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

from granular_po.forward.hidden import forward_hidden
from granular_po.forward.prompt_sharing import check_prompt_sharing, forward_hidden_shared, split_prompts
from granular_po.stats import compute_token_stats

PROMPTS = [5, 2, 7]  # prompt lengths of 3 pairs
CHOSEN = [4, 9, 1]
REJECTED = [6, 3, 2]


def pair_batch(vocab=61, seed=0):
    """Collator layout: rows [0:B] prompt + chosen, [B:2B] prompt + rejected, right-padded."""
    gen = torch.Generator().manual_seed(seed)
    rows = [(p, c) for p, c in zip(PROMPTS, CHOSEN)] + [(p, r) for p, r in zip(PROMPTS, REJECTED)]
    t = max(p + r for p, r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask, response_mask, weights = torch.zeros_like(ids), torch.zeros_like(ids), torch.zeros(len(rows), t)
    prompts = [torch.randint(1, vocab, (p,), generator=gen) for p in PROMPTS]
    for i, (p, r) in enumerate(rows):
        ids[i, :p] = prompts[i % len(PROMPTS)]
        ids[i, p : p + r] = torch.randint(1, vocab, (r,), generator=gen)
        mask[i, : p + r] = 1
        response_mask[i, p : p + r] = 1
        weights[i, p : p + r] = torch.rand(r, generator=gen) + 0.5
    return ids, mask, response_mask, weights


def test_split_reassembles_every_token_where_it_was():
    ids, mask, response_mask, _ = pair_batch()
    split = split_prompts(ids, mask, response_mask)
    assert split.prompt_ids.shape == (3, 7) and split.response_ids.shape == (6, 9)
    # responses interleaved c0, r0, c1, r1, ...; positions continue after each row's own prompt
    assert split.response_mask.sum(-1).tolist() == [4, 6, 9, 3, 1, 2]
    assert split.position_ids[2, :3].tolist() == [2, 3, 4]
    back = split.assemble(split.prompt_ids.unsqueeze(-1).float(), split.response_ids.unsqueeze(-1).float())
    assert torch.equal(back.squeeze(-1).long(), ids * mask)


def test_rows_with_different_prompts_are_refused():
    ids, mask, response_mask, _ = pair_batch()
    ids[4, 0] = (ids[1, 0] + 1) % 60 + 1  # rejected row of pair 1 starts differently
    with pytest.raises(ValueError, match="do not start with the same prompt"):
        split_prompts(ids, mask, response_mask)


@pytest.mark.parametrize("tie", [True, False], ids=["tied-head", "separate-head"])
def test_shared_prompt_statistics_and_gradients_equal_padded(tie):
    ids, mask, response_mask, weights = pair_batch()
    policy = tiny_llama(61, seed=1, tie_word_embeddings=tie)
    ref = tiny_llama(61, seed=2, tie_word_embeddings=tie)
    results, grads = [], []
    for shared in (False, True):
        policy.zero_grad()
        if shared:
            split = split_prompts(ids, mask, response_mask)
            hidden = forward_hidden_shared(policy, split)
            with torch.no_grad():
                ref_hidden = forward_hidden_shared(ref, split)
        else:
            hidden, _ = forward_hidden(policy, ids, mask)
            with torch.no_grad():
                ref_hidden, _ = forward_hidden(ref, ids, mask)
        stats = compute_token_stats(hidden, policy.get_output_embeddings(), ref_hidden, ref.get_output_embeddings(),
                                    ids, weights, need_kl=True, chunk_size=4)
        loss = (stats.logratio * torch.tensor([1.0, -2, 3, -1, 0.5, 2])).sum() + stats.position_kl.sum()
        loss.backward()
        results.append(stats)
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters()})
    for field in ("policy_logps", "reference_logps", "logratio", "position_kl"):
        torch.testing.assert_close(getattr(results[1], field), getattr(results[0], field), atol=1e-5, rtol=1e-5)
    for name in grads[0]:
        assert grads[0][name].abs().max() > 0, name  # every parameter takes part, so the check below bites
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-5, msg=name)


def test_check_accepts_llama_and_gpt2_and_refuses_a_sliding_window():
    check_prompt_sharing(tiny_llama(61, seed=3), "policy")
    check_prompt_sharing(GPT2LMHeadModel(GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4)), "policy")
    windowed = MistralForCausalLM(MistralConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2,
                                                intermediate_size=64, sliding_window=4))
    with pytest.raises(ValueError, match=r"share_prompt=true: the reference model \(MistralForCausalLM\).*differ"):
        check_prompt_sharing(windowed, "reference")


def test_sliding_windows_shorter_than_the_rows_are_refused():
    from granular_po.forward.prompt_sharing import sliding_window_conflict

    def mistral(window):
        return MistralForCausalLM(MistralConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2,
                                                intermediate_size=64, sliding_window=window))

    assert sliding_window_conflict(tiny_llama(61), 4096) is None  # no window at all
    assert sliding_window_conflict(mistral(4096), 1024) is None  # the window covers every row
    assert "window 512" in sliding_window_conflict(mistral(512), 1024)
    assert sliding_window_conflict(mistral(512), None) is not None  # unknown row length: refuse


def test_lora_policy_and_its_adapters_off_reference_share_prompts():
    """Through peft: the cache argument reaches the base model, with adapters on and off."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(61, seed=5), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    check_prompt_sharing(model, "policy")
    with model.disable_adapter():
        check_prompt_sharing(model, "reference")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_an_empty_prompt_beside_a_real_one_gives_the_padded_numbers(attention):
    """A pair whose prompt has no tokens (the loader allows empty prompts) leaves a fully masked row in
    the prompt forward; its responses must still come out finite and equal to the padded forward."""
    model = tiny_llama(61, seed=6, attn_implementation=attention).eval()
    rows = [(0, 4), (3, 2), (0, 5), (3, 3)]  # (prompt, response) lengths: pairs (0, 4 | 5), (3, 2 | 3)
    t = max(p + r for p, r in rows)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, 60, (3,), generator=gen)
    ids, mask, response_mask = (torch.zeros(4, t, dtype=torch.long) for _ in range(3))
    for i, (p, r) in enumerate(rows):
        ids[i, :p] = prompt[:p]
        ids[i, p : p + r] = torch.randint(1, 60, (r,), generator=gen)
        mask[i, : p + r] = 1
        response_mask[i, p : p + r] = 1
    with torch.no_grad():
        padded, _ = forward_hidden(model, ids, mask)
        shared = forward_hidden_shared(model, split_prompts(ids, mask, response_mask))
    real = mask.bool()
    assert torch.isfinite(shared[real]).all()
    torch.testing.assert_close(shared[real], padded[real], atol=1e-5, rtol=1e-5)
