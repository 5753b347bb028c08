"""The reference's log-probs computed once over a dataset (`precompute_ref_log_probs=true`, DPO), cached.

The cache is kept across runs (under `cache_dir`, default the user cache directory), so its key is
content, never a path: a fingerprint of the reference's weights (each tensor's name, dtype, shape and
bytes), of the encoded data the reference reads (token ids and weights), and of every setting that
changes the numbers (the statistics' options, the forward route, the model's config and attention
implementation, mixed precision, device type, batch size, library versions). Other weights under the
same path are recomputed; the same weights under another path are reused. Truncation, prompt format
and granular options reach the key through the encoded data they produce.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from granular_po.forward.hidden import unwrap_model
from granular_po.models import has_adapters, reference_context

# bump when the way reference log-probs are computed changes without any key below changing
CACHE_VERSION = 1
# the columns of an encoded dataset that the reference's statistics read
DATA_COLUMNS = ("index", "prompt_ids", "chosen_ids", "chosen_weights", "rejected_ids", "rejected_weights")
# parameters of LoRA adapters: switched off in the reference (the policy with adapters disabled)
_ADAPTER_MARKERS = ("lora_", "modules_to_save.")


def weights_fingerprint(module: nn.Module, skip_adapters: bool = False) -> str:
    """sha256 over every tensor of `module.state_dict()`: name, dtype, shape and bytes (tied tensors once)."""
    h = hashlib.sha256()
    seen: set[tuple[int, int]] = set()
    for name, tensor in module.state_dict(keep_vars=False).items():
        if skip_adapters and any(marker in name for marker in _ADAPTER_MARKERS):
            continue
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else None
        if storage in seen:  # a tied tensor (e.g. lm_head = embeddings): its name above is enough
            h.update(b"tied")
            continue
        if storage is not None:
            seen.add(storage)
        data = tensor.detach().reshape(-1).contiguous().cpu()
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def data_fingerprint(dataset) -> str:
    """sha256 over the values and row lengths of the encoded columns the reference reads, in row order."""
    import pyarrow as pa

    table = dataset.with_format("arrow")[:]
    h = hashlib.sha256(f"rows={table.num_rows}".encode())
    for name in DATA_COLUMNS:
        column = table.column(name).combine_chunks()
        h.update(f"|{name}|{column.type}|".encode())
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            h.update(column.value_lengths().to_numpy(zero_copy_only=False).tobytes())
            column = column.flatten()
        h.update(column.to_numpy(zero_copy_only=False).tobytes())
    return h.hexdigest()


def _model_config(module: nn.Module) -> dict:
    config = getattr(unwrap_model(module), "config", None)
    if config is None:
        return {}
    out = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    out["attn_implementation"] = getattr(config, "_attn_implementation", None)
    return out


def cache_key(trainer, dataset, batch_size: int) -> str:
    """The content key of `trainer`'s reference log-probs over `dataset` (see the module docstring)."""
    import transformers

    from granular_po import __version__

    skip_adapters = trainer.ref_model is None and has_adapters(trainer.model)
    with reference_context(trainer.model, trainer.ref_model) as reference:
        weights = weights_fingerprint(unwrap_model(reference), skip_adapters=skip_adapters)
        config = _model_config(reference)
    settings = trainer.loss_settings
    args = trainer.args
    parts = {
        "version": [CACHE_VERSION, __version__, torch.__version__, transformers.__version__],
        "weights": weights,
        "data": data_fingerprint(dataset),
        "config": config,
        "statistics": {"average_log_prob": settings.average_log_prob, "impl": settings.logprobs_impl,
                       "chunk_size": settings.chunk_size},
        "route": dataclasses.asdict(trainer.route),
        "precision": {"bf16": bool(args.bf16), "fp16": bool(args.fp16), "device": args.device.type},
        "batch_size": batch_size,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def with_reference_logps(trainer, dataset, cache_dir: str | os.PathLike, batch_size: int):
    """`dataset` with the reference's per-sequence log-probs as columns `ref_chosen_logps` and
    `ref_rejected_logps`, read from the cache when its content key is there, else computed and stored."""
    from safetensors.torch import load_file, save_file

    cache = Path(cache_dir) / f"ref_logps-{cache_key(trainer, dataset, batch_size)}.safetensors"
    if cache.is_file():
        tensors = load_file(str(cache))
        chosen, rejected = tensors["chosen"].tolist(), tensors["rejected"].tolist()
        print(f"reference log-probs from cache {cache}", flush=True)
    else:
        chosen, rejected = trainer.reference_logps(dataset, batch_size=batch_size)
        if int(os.environ.get("RANK", "0")) == 0:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            save_file({"chosen": torch.tensor(chosen, dtype=torch.float64),
                       "rejected": torch.tensor(rejected, dtype=torch.float64)}, str(tmp))
            os.replace(tmp, cache)
    return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)
