"""One forward of each prompt for both of its responses (`share_prompt`).

A preference batch holds every prompt twice, once before the chosen and once before the rejected
response. Here the prompts run once, their keys and values are cached, and the chosen and rejected
responses run on top of that cache: the body of the transformer sees prompt + 2 responses tokens
instead of 2 x (prompt + response), with the same outputs (attention to the prompt reads the
cached keys; gradients flow back through them into the single prompt forward). The final hidden
states are then laid out as the padded batch would have produced them, so the token statistics and
losses downstream are unchanged.

`tail_logps` does the same for scoring without gradients (`granular-po compare`): the token log-probs
of two continuations of one shared prefix (a prompt and its two responses, or a prompt + prefix and a
right and a wrong result), the prefix read once and the lm_head run only where a continuation's token
is predicted.

Needs a model whose cache holds the whole prompt (no sliding window shorter than the batch) and a
forward without gradient checkpointing (which drops the cache); `check_prompt_sharing` runs both
ways at start-up and refuses a model whose outputs differ.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from granular_po.forward.exactness import materialised, require_same_outputs
from granular_po.forward.hidden import (
    capture_backbone_output,
    forward_hidden,
    supports_hidden_path,
    unwrap_model,
)


@dataclass(frozen=True)
class PromptSplit:
    """A preference batch as (B) prompts and (2B) responses, responses interleaved c0, r0, c1, r1, ...

    Shape: prompt_ids, prompt_mask (B, P); response_ids, response_mask (2B, R); position_ids (2B, R);
    source_index, target_index (M,): token `source_index[i]` of the flattened
    [prompt hidden (B * P) ; response hidden (2B * R)] goes to token `target_index[i]` of the flattened
    padded batch (2B * T). `padded_shape` is (2B, T).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    position_ids: torch.Tensor
    source_index: torch.Tensor
    target_index: torch.Tensor
    padded_shape: tuple[int, int]

    def assemble(self, prompt_hidden: torch.Tensor, response_hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states in the padded batch's layout, zeros at padding (differentiable).

        Shape: prompt_hidden (B, P, H), response_hidden (2B, R, H) -> (2B, T, H).
        """
        h = prompt_hidden.shape[-1]
        flat = torch.cat([prompt_hidden.reshape(-1, h), response_hidden.reshape(-1, h)])
        rows, t = self.padded_shape
        out = flat.new_zeros(rows * t, h).index_copy(0, self.target_index, flat.index_select(0, self.source_index))
        return out.reshape(rows, t, h)


def split_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                  pad_token_id: int = 0, lengths: list[int] | None = None,
                  prompt_lengths: list[int] | None = None) -> PromptSplit:
    """Split the collator's rows ([0:B] prompt + chosen, [B:2B] prompt + rejected, right-padded).

    `lengths` / `prompt_lengths` (real and prompt tokens per row, as the collator lists them in
    `batch["host"]`): the layout is then built on the host and nothing is read back from the device
    (the collator builds both rows of a pair from one prompt, so the equal-prompt check is not needed).
    Without them they are read from the masks, and a chosen row whose prompt is not its rejected row's
    raises ValueError.
    Shape: input_ids, attention_mask, response_mask (2B, T) -> PromptSplit.
    """
    rows, t = input_ids.shape
    if rows % 2:
        raise ValueError(f"share_prompt needs chosen + rejected rows, got {rows} rows")
    n = rows // 2
    device = input_ids.device
    if lengths is None or prompt_lengths is None:
        real = attention_mask.sum(-1)  # (2B,)
        in_prompt = torch.arange(t, device=device) < (real - response_mask.sum(-1))[:, None]  # (2B, T)
        same = bool(((input_ids[:n] == input_ids[n:]) | ~in_prompt[:n]).all() & (in_prompt[:n] == in_prompt[n:]).all())
        if not same:
            raise ValueError("share_prompt: a chosen row and its rejected row do not start with the same prompt")
        lengths, prompt_lengths = torch.stack([real, in_prompt.sum(-1)]).tolist()
    layout = _host_layout(lengths, prompt_lengths, t)
    layout = {k: v.to(device, non_blocking=True) for k, v in layout.items()}  # host to device: no wait
    p_max = layout["prompt_mask"].shape[1]
    prompt_ids = input_ids[:n, :p_max]
    cols = layout["response_cols"]
    response_ids = torch.where(layout["response_mask"] > 0, input_ids[layout["order"]].gather(1, cols),
                               torch.full_like(cols, pad_token_id))
    return PromptSplit(
        prompt_ids=prompt_ids,
        prompt_mask=layout["prompt_mask"],
        response_ids=response_ids,
        response_mask=layout["response_mask"],
        position_ids=layout["position_ids"],
        source_index=layout["source_index"],
        target_index=layout["target_index"],
        padded_shape=(rows, t),
    )


def _host_layout(lengths: list[int], prompt_lengths: list[int], t: int) -> dict[str, torch.Tensor]:
    """Every index `split_prompts` needs, built on the CPU from the rows' lengths (2B rows of width T)."""
    rows = len(lengths)
    n = rows // 2
    response_lengths = [total - p for total, p in zip(lengths, prompt_lengths)]
    p_max, r_max = max(max(prompt_lengths), 1), max(max(response_lengths), 1)
    prompt_len = torch.tensor(prompt_lengths, dtype=torch.long)  # (2B,)
    response_len = torch.tensor(response_lengths, dtype=torch.long)
    prompt_mask = (torch.arange(p_max) < prompt_len[:n, None]).long()  # (B, P)
    # interleaved response order, as the cache's batch_repeat_interleave(2) lays out the prompts
    order = torch.stack([torch.arange(n), torch.arange(n) + n], 1).reshape(-1)
    k = torch.arange(r_max)
    response_mask = (k < response_len[order, None]).long()  # (2B, R)
    cols = (prompt_len[order, None] + k).clamp(max=t - 1)
    position_ids = prompt_len[order, None] + k  # positions continue after each row's own prompt

    # where every real token of the padded batch comes from: row by row, prompt tokens then response tokens
    prompt_rows = torch.repeat_interleave(torch.arange(rows), prompt_len)
    prompt_cols = torch.cat([torch.arange(p) for p in prompt_lengths])
    prompt_source = (prompt_rows % n) * p_max + prompt_cols
    resp_rows = torch.repeat_interleave(torch.arange(rows), response_len)
    resp_k = torch.cat([torch.arange(r) for r in response_lengths])
    j = 2 * (resp_rows % n) + (resp_rows >= n).long()  # the row's index in the interleaved responses
    response_source = n * p_max + j * r_max + resp_k
    return {
        "prompt_mask": prompt_mask, "order": order, "response_mask": response_mask, "response_cols": cols,
        "position_ids": position_ids, "source_index": torch.cat([prompt_source, response_source]),
        "target_index": torch.cat([prompt_rows * t + prompt_cols, resp_rows * t + prompt_len[resp_rows] + resp_k]),
    }


def _cache_argument(model: nn.Module) -> str:
    """The forward's name for the key/value cache: `cache` (transformers >= 5.x) or `past_key_values`."""
    params = inspect.signature(unwrap_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward_hidden_shared(model: nn.Module, split: PromptSplit) -> torch.Tensor:
    """Final hidden states of the padded batch from one prompt forward and one response forward.

    Both calls go through `model` itself (DDP / PEFT wrappers included). Shape: -> (2B, T, H).
    """
    cache_arg = _cache_argument(model)
    prompt_hidden, out = capture_backbone_output(
        model, input_ids=split.prompt_ids, attention_mask=split.prompt_mask, use_cache=True, logits_to_keep=1
    )
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None:
        raise RuntimeError("share_prompt: the model returned no key/value cache (gradient checkpointing on?)")
    cache.batch_repeat_interleave(2)
    full_mask = torch.cat([split.prompt_mask.repeat_interleave(2, dim=0), split.response_mask], dim=1)
    response_hidden, _ = capture_backbone_output(
        model, input_ids=split.response_ids, attention_mask=full_mask, position_ids=split.position_ids,
        use_cache=True, logits_to_keep=1, **{cache_arg: cache},
    )  # fmt: skip
    return split.assemble(prompt_hidden, response_hidden)


def sliding_window_conflict(model: nn.Module, max_length: int | None) -> str | None:
    """Why a sliding-window model cannot share prompts for rows of up to `max_length` tokens, or None.

    A cache of a sliding-window layer keeps only the last window of the prompt, and the start-up check
    runs sequences far shorter than any real window: refuse whenever a window is shorter than the rows.
    """
    config = getattr(unwrap_model(model), "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "use_sliding_window", True) is not False and (
        any("sliding" in str(t) for t in layer_types) if layer_types else window is not None
    )
    if not sliding or window is None:
        return None
    if max_length is not None and window >= max_length:
        return None
    return f"sliding-window attention (window {window}) shorter than the rows (max_length {max_length})"


def check_prompt_sharing(model: nn.Module, what: str = "model") -> None:
    """Refuse (ValueError) a model whose shared-prompt hidden states differ from the padded forward's.

    Two pairs with prompts of different lengths and responses of different lengths, in eval mode.
    """
    if not materialised(model):
        return  # weights not on this process (sharded loading): nothing to run
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", None) or 100)
    gen = torch.Generator().manual_seed(0)
    prompts, responses = (5, 3), ((4, 6), (2, 5))  # (chosen, rejected) response lengths per pair
    rows = [(p, r[0]) for p, r in zip(prompts, responses)] + [(p, r[1]) for p, r in zip(prompts, responses)]
    t = max(p + r for p, r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    response_mask = torch.zeros_like(ids)
    prompt_tokens = [torch.randint(1, max(2, min(vocab, 1000)), (p,), generator=gen) for p in prompts]
    for i, (p, r) in enumerate(rows):
        ids[i, :p] = prompt_tokens[i % len(prompts)]
        ids[i, p : p + r] = torch.randint(1, max(2, min(vocab, 1000)), (r,), generator=gen)
        mask[i, : p + r] = 1
        response_mask[i, p : p + r] = 1
    device = next(model.parameters()).device
    ids, mask, response_mask = (x.to(device) for x in (ids, mask, response_mask))

    def run_two_ways():
        expected, _ = forward_hidden(model, ids, mask)
        got = forward_hidden_shared(model, split_prompts(ids, mask, response_mask))
        real = mask.bool()
        return expected[real], got[real]

    require_same_outputs(model, run_two_ways, key="share_prompt", what=what,
                         route="responses on a cached prompt", cannot=(TypeError, RuntimeError, AttributeError))


def shared_prefix_conflict(model: nn.Module, longest: int | None = None) -> str | None:
    """Why `tail_logps` cannot give `model`'s own padded-forward log-probs on rows of up to `longest`
    tokens (logits that are not the lm_head's output, a short sliding window, a cache that differs), or None."""
    if not supports_hidden_path(model):
        return "its logits are not its lm_head's output"
    if conflict := sliding_window_conflict(model, longest):
        return conflict
    try:
        check_prompt_sharing(model)
    except ValueError as exc:
        return str(exc)
    return None


@torch.no_grad()
def tail_logps(model: nn.Module, rows: list[tuple[list[int], list[int], list[int]]], batch_size: int = 8,
               head_chunk: int = 1024) -> list[tuple[list[float], list[float]]]:
    """log p of each token of two continuations of one shared prefix, the prefix read once.

    `rows`: (shared ids, tail a ids, tail b ids). Per row, the log-probs of tail a's tokens given the
    shared ids and the tail tokens before it, and the same for tail b: what a right-padded forward of
    shared + a and one of shared + b give (`apps.compare.metrics.response_logps`), from one forward of
    the shared ids (cached keys and values, `forward_hidden_shared`) and one of both tails on top of it.
    The lm_head runs only where a tail token is predicted, `head_chunk` positions at a time. A caller
    checks the model once with `shared_prefix_conflict`. Eval mode (restored after).
    """
    device = next(model.parameters()).device
    head = unwrap_model(model).get_output_embeddings()
    out: list[tuple[list[float], list[float]]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            if empty := [start + i for i, (shared, _, _) in enumerate(batch) if not shared]:
                raise ValueError(f"tail_logps: row {empty[0]} has no shared token to predict its tails from")
            seqs = [s + a for s, a, _ in batch] + [s + b for s, _, b in batch]  # [0:n] a rows, [n:2n] b rows
            prompt_lengths = [len(s) for s, _, _ in batch] * 2
            lengths = [len(x) for x in seqs]
            ids = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
            mask, response_mask = torch.zeros_like(ids), torch.zeros_like(ids)
            for i, (seq, p) in enumerate(zip(seqs, prompt_lengths)):
                ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[i, :len(seq)] = 1
                response_mask[i, p:len(seq)] = 1
            split = split_prompts(ids.to(device), mask.to(device), response_mask.to(device),
                                  lengths=lengths, prompt_lengths=prompt_lengths)
            hidden = forward_hidden_shared(model, split)  # (2n, T, H), the padded forward's layout
            # token j of a row is predicted at position j - 1
            where = [(i, j - 1, seq[j]) for i, (seq, p) in enumerate(zip(seqs, prompt_lengths)) for j in range(p, len(seq))]
            row, pos, target = torch.tensor(where, dtype=torch.long, device=device).reshape(-1, 3).T  # (M,) each
            logps = torch.cat([torch.zeros(0, device=device)] + [
                torch.log_softmax(head(hidden[row[c:c + head_chunk], pos[c:c + head_chunk]]).float(), dim=-1)
                .gather(-1, target[c:c + head_chunk, None])[:, 0] for c in range(0, len(where), head_chunk)
            ]).tolist()  # (M,)
            per_row, k = [], 0
            for seq, p in zip(seqs, prompt_lengths):
                per_row.append(logps[k:k + len(seq) - p])
                k += len(seq) - p
            n = len(batch)
            out.extend(zip(per_row[:n], per_row[n:]))
    finally:
        model.train(was_training)
    return out
