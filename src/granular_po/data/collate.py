"""Encoded records -> padded batches: prompt + response per row, weights aligned with the targets.

`loss_weights[b, t]` is the weight of the token AT position t (as a target, predicted from position
t - 1); prompt and padding positions weigh 0. Rows are right-padded with `pad_token_id`.

Every batch also carries what the host already knows about it, so that training never has to ask the
device (each such question stalls a GPU's stream until all queued work is done):
- `host`: plain Python lists (they pass through device placement untouched): `index` (record indices),
  `lengths` and `prompt_lengths` (real tokens and prompt tokens of each row);
- `weighted_positions` (2, R) long: the (row, position) pairs of `loss_weights[:, 1:]` that are
  non-zero (the targets the statistics read), listed here instead of by a `nonzero` on the device;
- `response_positions` (2, R') long: the same for every response target, whatever its weight (the
  statistics read them all when a KL or NLL weighs every response token: `granular.kl_weights=all`,
  `loss.nll_alpha`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _pad_rows(
    rows: Sequence[tuple[Sequence[int], Sequence[int], Sequence[float]]],
    pad_token_id: int,
    pad_to_multiple_of: int | None,
) -> dict[str, Any]:
    """(prompt_ids, response_ids, response_weights) per row -> input_ids, attention_mask, loss_weights,
    response_mask (N, T), weighted_positions (2, R), response_positions (2, R') and the host-side lists."""
    lengths = [len(p) + len(r) for p, r, _ in rows]
    T = max(lengths, default=0)
    if pad_to_multiple_of and T % pad_to_multiple_of:
        T += pad_to_multiple_of - T % pad_to_multiple_of
    input_ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)  # (N, T)
    loss_weights = torch.zeros((len(rows), T), dtype=torch.float32)  # (N, T)
    response_mask = torch.zeros((len(rows), T), dtype=torch.long)  # (N, T): 1 on response tokens
    weighted: list[tuple[int, int]] = []  # (row, t - 1) of every target t >= 1 with a non-zero weight
    responses: list[tuple[int, int]] = []  # (row, t - 1) of every response target t >= 1
    for i, (prompt, response, weights) in enumerate(rows):
        if len(weights) != len(response):
            raise ValueError(f"row {i}: {len(response)} response tokens but {len(weights)} weights")
        n_p, n = len(prompt), lengths[i]
        input_ids[i, :n_p] = torch.as_tensor(list(prompt), dtype=torch.long)
        input_ids[i, n_p:n] = torch.as_tensor(list(response), dtype=torch.long)
        attention_mask[i, :n] = 1
        loss_weights[i, n_p:n] = torch.as_tensor(list(weights), dtype=torch.float32)
        response_mask[i, n_p:n] = 1
        weighted += [(i, n_p + j - 1) for j, w in enumerate(weights) if w != 0 and n_p + j >= 1]
        responses += [(i, n_p + j - 1) for j in range(len(weights)) if n_p + j >= 1]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_weights": loss_weights,
            "response_mask": response_mask,
            "weighted_positions": torch.tensor(weighted, dtype=torch.long).reshape(-1, 2).t().contiguous(),  # (2, R)
            "response_positions": torch.tensor(responses, dtype=torch.long).reshape(-1, 2).t().contiguous(),
            "host": {"lengths": lengths, "prompt_lengths": [len(p) for p, _, _ in rows]}}


class _Collator:
    """Holds the padding settings both collators share."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: give the tokenizer a pad token (or use its EOS id)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of


class PreferenceCollator(_Collator):
    """Pairs -> one batch of 2B rows: [0:B] prompt + chosen, [B:2B] prompt + rejected (same order).

    Shape: input_ids, attention_mask, response_mask (2B, T) long; loss_weights (2B, T) float32;
    index (B,) long; weighted_positions (2, R) long; ref_logps (2B,) float32 when the features carry
    precomputed reference log-probs; host (lists, see the module's docstring).
    """

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        rows = [(f["prompt_ids"], f["chosen_ids"], f["chosen_weights"]) for f in features]
        rows += [(f["prompt_ids"], f["rejected_ids"], f["rejected_weights"]) for f in features]
        batch = _pad_rows(rows, self.pad_token_id, self.pad_to_multiple_of)
        batch["host"]["index"] = [int(f["index"]) for f in features]
        batch["index"] = torch.tensor(batch["host"]["index"], dtype=torch.long)  # (B,)
        if features and "ref_chosen_logps" in features[0]:
            ref = [f["ref_chosen_logps"] for f in features] + [f["ref_rejected_logps"] for f in features]
            batch["ref_logps"] = torch.tensor(ref, dtype=torch.float32)  # (2B,)
        return batch


class SFTCollator(_Collator):
    """Chosen responses only, weighted by `sft_weights` (rejected-side regions projected onto chosen).

    Shape: input_ids, attention_mask (B, T) long; loss_weights (B, T) float32; index (B,) long;
    weighted_positions (2, R) long; host (lists, see the module's docstring).
    """

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        rows = [(f["prompt_ids"], f["chosen_ids"], f["sft_weights"]) for f in features]
        batch = _pad_rows(rows, self.pad_token_id, self.pad_to_multiple_of)
        batch["host"]["index"] = [int(f["index"]) for f in features]
        batch["index"] = torch.tensor(batch["host"]["index"], dtype=torch.long)  # (B,)
        return batch
