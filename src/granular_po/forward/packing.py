"""Padding-free forwards: the real tokens of a padded batch packed into fewer rows, and back.

A batch of N right-padded rows (N, T) becomes K <= N packed rows (K, L) holding only real tokens,
each sequence with its own position ids starting at 0 and no attention mask: Hugging Face models
detect the restarts and keep every sequence to itself (a block-causal mask for sdpa / eager, the
variable-length kernel for flash attention). The model's outputs are then scattered back into the
padded (N, T, D) layout, so everything after the forward (token statistics, losses) is unchanged.

Flash attention takes one packed row only (it finds sequences from position ids when the batch
is 1); other attention implementations compute the whole (L, L) score matrix of a row, so their
sequences are packed first-fit-decreasing into rows no longer than the padded batch (T): never more
attention work than the padded batch, and fewer rows whenever sequences are shorter than T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from granular_po.forward.exactness import materialised, require_same_outputs

# attention implementations that take packed sequences as one row (variable-length kernels)
FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "flash_paged")


@dataclass(frozen=True)
class PackedBatch:
    """Where each real token of the padded batch sits in the packed one.

    Shape: input_ids, position_ids (K, L); padded_index, packed_index (R,) long, R real tokens:
    token `padded_index[i]` of the flattened (N * T) batch is token `packed_index[i]` of the
    flattened (K * L) packed one. `padded_shape` is (N, T).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    padded_index: torch.Tensor
    packed_index: torch.Tensor
    padded_shape: tuple[int, int]

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Per-token outputs back into the padded layout, zeros at padding (differentiable).

        Shape: packed (K, L, D) -> (N, T, D).
        """
        k, l_ = packed.shape[:2]
        n, t = self.padded_shape
        flat = packed.reshape(k * l_, *packed.shape[2:]).index_select(0, self.packed_index)
        out = packed.new_zeros(n * t, *packed.shape[2:]).index_copy(0, self.padded_index, flat)
        return out.reshape(n, t, *packed.shape[2:])


def _bins(lengths: list[int], capacity: int | None) -> list[list[int]]:
    """Row indices grouped first-fit-decreasing into bins holding at most `capacity` tokens (None: one bin)."""
    if capacity is None:
        return [list(range(len(lengths)))]
    bins: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[row] <= free:
                bins[b].append(row)
                room[b] -= lengths[row]
                break
        else:
            bins.append([row])
            room.append(capacity - lengths[row])
    return bins


def _layout_cost(bins: list[list[int]], lengths: list[int], attention_cost: float) -> float:
    """Estimated work of a layout: rows x width x (1 + attention_cost x width); see `attention_cost`."""
    width = max(sum(lengths[i] for i in rows) for rows in bins)
    return len(bins) * width * (1.0 + attention_cost * width)


def choose_bins(lengths: list[int], one_row: bool, attention_cost: float | None) -> list[list[int]] | None:
    """The packed rows (lists of sequence indices) for these lengths, or None when padding is cheaper.

    `one_row`: all in one row. `attention_cost` None: rows of at most T = max(lengths) tokens.
    Otherwise the capacity among T x (1, 1.5, 2, 3, 4) and one row with the least estimated work.
    """
    t = max(lengths)
    if one_row:
        return _bins(lengths, None)
    if attention_cost is None:
        return _bins(lengths, t)
    options = [_bins(lengths, int(t * f)) for f in (1, 1.5, 2, 3, 4)] + [_bins(lengths, None)]
    best = min(options, key=lambda bins: _layout_cost(bins, lengths, attention_cost))
    padded = len(lengths) * t * (1.0 + attention_cost * t)
    return best if _layout_cost(best, lengths, attention_cost) < padded else None


def pack_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pad_token_id: int,
    one_row: bool = False,
    attention_cost: float | None = None,
    lengths: list[int] | None = None,
) -> PackedBatch | None:
    """Pack the real tokens of right-padded rows; None when there is no padding worth removing.

    `one_row`: every sequence in a single row (flash attention). Otherwise `choose_bins` decides.
    `lengths`: the rows' real tokens as the collator lists them (`batch["host"]`); the layout is then
    built on the host and the packed ids gathered on the device, with nothing read back from it.
    Without them they are read from `attention_mask`, which must be right-padded.
    Shape: input_ids, attention_mask (N, T) -> PackedBatch.
    """
    n, t = input_ids.shape
    if lengths is None:
        real = attention_mask.sum(-1)
        lengths = real.tolist()
        if not bool((attention_mask == (torch.arange(t, device=real.device) < real[:, None])).all()):
            raise ValueError("padding_free needs right-padded rows (attention_mask 1...1 0...0)")
    if all(length == t for length in lengths):
        return None
    bins = choose_bins(lengths, one_row, attention_cost)
    if bins is None:
        return None
    width = max(sum(lengths[i] for i in rows) for rows in bins)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long)
    padded_index, packed_index = [], []
    for b, rows in enumerate(bins):
        offset = 0
        for row in rows:
            length = lengths[row]
            position_ids[b, offset : offset + length] = torch.arange(length)
            padded_index.append(torch.arange(length) + row * t)
            packed_index.append(torch.arange(length) + b * width + offset)
            offset += length
        # the tail is a sequence of its own (positions restart), so it attends to nothing real
        position_ids[b, offset:] = torch.arange(width - offset)
    device = input_ids.device
    padded = torch.cat(padded_index).to(device, non_blocking=True)  # host to device: no wait
    packed = torch.cat(packed_index).to(device, non_blocking=True)
    packed_ids = input_ids.new_full((len(bins) * width,), pad_token_id).index_copy(
        0, packed, input_ids.reshape(-1).index_select(0, padded))
    return PackedBatch(
        input_ids=packed_ids.view(len(bins), width),
        position_ids=position_ids.to(device, non_blocking=True),
        padded_index=padded,
        packed_index=packed,
        padded_shape=(n, t),
    )


# sdpa / eager compute every (query, key) pair of a row with an explicit mask; measured on CPU (sdpa,
# SmolLM2-135M) such a pair costs about 1.5x what its multiply-adds alone suggest
MASKED_ATTENTION_OVERHEAD = 1.5


def attention_cost(model: nn.Module) -> float | None:
    """The cost of one (query, key) pair relative to one token's pass through a layer's linear maps.

    From the model's own shapes: 4 x hidden_size FLOPs per pair (its score and its share of the
    weighted values, over all heads) against 2 x a layer's parameters FLOPs per token, times the
    measured overhead of masked attention. None when the shapes cannot be read.
    """
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not layers or not hidden:
        return None
    embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                  for p in m.parameters()}
    body = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    per_layer = max(body / layers, 1.0)
    return MASKED_ATTENTION_OVERHEAD * 4 * hidden / (2 * per_layer)


def packs_in_one_row(model: nn.Module) -> bool:
    """Whether the model's attention takes packed sequences as a single row (flash attention)."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or ""
    return impl in FLASH_IMPLEMENTATIONS or "flash" in impl


def check_packing(model: nn.Module, what: str = "model") -> None:
    """Refuse (ValueError) a model whose packed forward differs from its padded one.

    Runs three short sequences (lengths 7, 4 and 3, so that two of them share a packed row) both
    ways in eval mode and compares the logits of every real token, to a tolerance set by the dtype.
    """
    if not materialised(model):
        return  # weights not on this process (sharded loading): nothing to run
    lengths = (7, 4, 3)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", None) or 100)
    ids = torch.randint(1, max(2, min(vocab, 1000)), (len(lengths), max(lengths)),
                        generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * n + [0] * (max(lengths) - n) for n in lengths])
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    packed = pack_batch(ids, mask, pad_token_id=0, one_row=packs_in_one_row(model))

    def run_two_ways():
        padded = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
        real = mask.bool()
        return padded[real], packed.unpack(out)[real]

    # a model that derives positions from the mask (OPT, Bloom) lets packed sequences see wrong ones
    require_same_outputs(model, run_two_ways, key="padding_free", what=what, route="packed sequences")
