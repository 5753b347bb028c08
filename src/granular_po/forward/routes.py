"""The forward route, chosen once at start-up: how a batch becomes hidden states (or logits).

Three exact routes give the same numbers (each checked on the actual models before it is used):
- shared prompt: each prompt runs once for both of its responses (a key/value cache), `share_prompt`;
- packed: only the real tokens, sequences packed with restarting positions, `padding_free`;
- padded rows: the plain batch.
Independently, `use_hidden_path` says whether the lm_head is applied by us (only where a weight is
non-zero) or the model's full logits are taken (soft-capped or scaled logits).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from granular_po.forward.hidden import hidden_states_and_head, supports_hidden_path, unwrap_model
from granular_po.forward.packing import attention_cost, check_packing, pack_batch, packs_in_one_row
from granular_po.forward.prompt_sharing import (
    check_prompt_sharing,
    forward_hidden_shared,
    sliding_window_conflict,
    split_prompts,
)

logger = logging.getLogger(__name__)

SHARE_PROMPT_MODES = ("auto", "true", "false")


@dataclass(frozen=True)
class ForwardRoute:
    """How every batch of a run goes through the models; built by `choose_route`, never re-decided."""

    use_hidden_path: bool
    share_prompt: bool = False
    padding_free: bool = False
    attention_cost: float | None = None  # packing's cost model for sdpa / eager (None: one row)
    pad_token_id: int = 0

    def describe(self, head_positions: str = "weighted positions") -> str:
        """One line for the start-up block: which route and which statistics path; `head_positions` says
        where the chunked lm_head runs (the loss's options decide: `briefing.forward_line`)."""
        body = "shared prompt" if self.share_prompt else ("packed (padding-free)" if self.padding_free
                                                            else "padded rows")
        head = f"chunked lm_head on {head_positions}" if self.use_hidden_path else "full logits"
        return f"{body}, {head}"

    def outputs(self, model: nn.Module, batch: dict, layouts: dict | None = None):
        """`(hidden (N, T, H), head, None)` or `(None, None, logits (N, T, V))` for the batch, padded layout.

        `layouts` carries the batch's prompt split / packing from the policy's call to the reference's,
        so neither is built twice.
        """
        layouts = {} if layouts is None else layouts
        host = host_facts(batch)
        if self.share_prompt and "response_mask" in batch:
            if "split" not in layouts:
                layouts["split"] = split_prompts(batch["input_ids"], batch["attention_mask"],
                                                 batch["response_mask"], self.pad_token_id,
                                                 lengths=host.get("lengths"), prompt_lengths=host.get("prompt_lengths"))
            hidden = forward_hidden_shared(model, layouts["split"])
            return hidden, unwrap_model(model).get_output_embeddings(), None
        packed = None
        if self.padding_free:
            one_row = packs_in_one_row(unwrap_model(model))
            if ("packed", one_row) not in layouts:
                layouts[("packed", one_row)] = pack_batch(batch["input_ids"], batch["attention_mask"],
                                                          self.pad_token_id, one_row=one_row,
                                                          attention_cost=self.attention_cost,
                                                          lengths=host.get("lengths"))
            packed = layouts[("packed", one_row)]
        return hidden_states_and_head(model, batch["input_ids"], batch["attention_mask"],
                                      self.use_hidden_path, packed)


def host_facts(batch: dict) -> dict:
    """The collator's host-side lists (`batch["host"]`: index, lengths, prompt_lengths) when they match
    the batch's shape, else {} (a batch built or sliced by hand: the layouts are read from its masks)."""
    host = batch.get("host")
    if not isinstance(host, dict):
        return {}
    rows, width = batch["input_ids"].shape[:2]
    lengths = host.get("lengths")
    if lengths is None or len(lengths) != rows or max(lengths, default=0) > width:
        return {}
    return host


def _why_not_share(models: dict[str, nn.Module], *, is_preference: bool, use_hidden_path: bool,
                   activation_checkpointing: bool, sharded: bool, padding_free: bool,
                   max_length: int | None) -> str | None:
    """Why prompt sharing cannot be exact here (None: it is, checked on the models)."""
    if not is_preference:
        return "SFT has no response pairs"
    if not use_hidden_path:
        return "it needs logprobs.impl=chunked on a model whose logits are its lm_head's output"
    if activation_checkpointing:
        return "activation checkpointing drops the key/value cache"
    if sharded:
        return "not verified with FSDP or DeepSpeed"
    if padding_free:
        return "padding_free=true packs the rows instead"
    policy = models["policy"]
    if conflict := sliding_window_conflict(policy, max_length):
        return conflict
    try:
        for name, model in models.items():
            check_prompt_sharing(model, what=name)
    except ValueError as exc:
        return str(exc)
    return None


def choose_route(policy: nn.Module, reference: nn.Module | None, *, is_preference: bool, logprobs_impl: str,
                 share_prompt: str | bool, padding_free: bool, max_length: int | None,
                 activation_checkpointing: bool, sharded: bool, pad_token_id: int) -> ForwardRoute:
    """Pick the route once, after checking each fast route on the actual models.

    `share_prompt`: auto (on where exact), true (insist: an error says why it cannot), false.
    `padding_free=true` refuses a model whose packed outputs differ from the padded ones.
    """
    mode = str(share_prompt).lower()
    if mode not in SHARE_PROMPT_MODES:
        raise ValueError(f"share_prompt={share_prompt!r}: expected auto, true or false")
    models = {"policy": policy} | ({"reference": reference} if reference is not None else {})
    use_hidden_path = logprobs_impl == "chunked" and supports_hidden_path(policy)
    cost = None
    if padding_free:  # refuse a model whose packed outputs differ, before any step
        for name, model in models.items():
            check_packing(model, what=name)
        cost = attention_cost(policy)
    share = False
    if mode != "false":
        why_not = _why_not_share(models, is_preference=is_preference, use_hidden_path=use_hidden_path,
                                 activation_checkpointing=activation_checkpointing, sharded=sharded,
                                 padding_free=padding_free, max_length=max_length)
        if why_not is not None and mode == "true":
            raise ValueError(f"share_prompt=true: {why_not}")
        if why_not is not None and is_preference:
            logger.info("share_prompt: off (%s)", why_not)
        share = why_not is None
    return ForwardRoute(use_hidden_path=use_hidden_path, share_prompt=share, padding_free=padding_free,
                        attention_cost=cost, pad_token_id=pad_token_id)
