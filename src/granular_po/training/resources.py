"""Preflight checks before training: will the chosen batch fit in memory (CPU), and a checkpoint on disk?

Called once the models are loaded, before the first step, so that a run that cannot fit fails in a
second with the figures and what to change, instead of being killed by the OOM killer an hour in or
dying half-way through writing a checkpoint:

    from granular_po.training.resources import preflight
    preflight(cfg, policy, reference, settings)   # raises ResourceError (a ValueError), or the estimate

The memory figure is an estimate, deliberately simple (shapes times a per-token factor), not a
measurement; it errs on the large side for activations, since the cost of being wrong is an OOM kill.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch import nn

from granular_po.settings import LogprobsSettings, TrainConfig
from granular_po.training.config import OPTIMIZER_STATES, RunSettings, existing_ancestor

logger = logging.getLogger(__name__)

GIB = 1024**3
# hidden-sized values kept per token and layer for the backward pass of a pre-norm decoder block:
# norms, q/k/v/o inputs and outputs, the residual, and the MLP's ~3 x (2.7 x hidden) intermediates.
# Measured on SmolLM2-135M, CPU, fp32, sdpa (peak RSS less the ~0.5 GiB held before loading):
# SFT/SGD 2 x 1024 tokens 3.9 GiB (estimate 4.2); DPO/AdamW 4 pairs x 128 tokens 4.1 GiB (estimate 4.4).
ACTIVATION_FACTOR = 20
# with activation checkpointing only each layer's input is kept (plus one layer recomputed at a time)
CHECKPOINTED_FACTOR = 2
# logits chunk: logits, log_softmax and their gradient, in float32
LOGIT_COPIES = 3
# tokenizer, trainer state, RNG state, config files, and slack for the filesystem
CHECKPOINT_MARGIN = 256 * 1024**2
# resident memory of the process before any weights (interpreter, torch, transformers, the dataset)
PROCESS_BASELINE = 512 * 1024**2


class ResourceError(ValueError):
    """The run cannot fit: names the estimate, what is available, and what to change."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one training step, in bytes, by part."""

    parameters: int  # policy weights
    reference: int  # reference weights (0 without one)
    gradients: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.parameters + self.reference + self.gradients + self.optimizer + self.activations + self.logits

    @property
    def weights(self) -> int:
        return self.parameters + self.reference

    def describe(self) -> str:
        parts = ("parameters", "reference", "gradients", "optimizer", "activations", "logits")
        return ", ".join(f"{name} {format_bytes(getattr(self, name))}" for name in parts)


def format_bytes(n_bytes: float) -> str:
    """Bytes as `1.23 GiB` or `4.5 MiB`."""
    return f"{n_bytes / GIB:.2f} GiB" if abs(n_bytes) >= GIB else f"{n_bytes / 1024**2:.1f} MiB"


def _config_int(config, names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    text_config = getattr(config, "text_config", None)
    return _config_int(text_config, names, default) if text_config is not None else default


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def estimate_memory(policy: nn.Module, reference: nn.Module | None, per_device_batch: int, rows_per_example: int,
                    max_length: int, optimizer: str, activation_checkpointing: bool = False,
                    logprobs_impl: str = LogprobsSettings.impl, chunk_size: int = LogprobsSettings.chunk_size
                    ) -> MemoryEstimate:
    """Estimated peak bytes of one training micro-batch of `per_device_batch` examples, each of
    `rows_per_example` sequences (2 for preference pairs) of at most `max_length` tokens."""
    params = list(policy.parameters())
    trainable = [p for p in params if p.requires_grad]
    config = getattr(policy, "config", None)
    hidden = _config_int(config, ("hidden_size", "n_embd", "d_model"), 1024)
    layers = _config_int(config, ("num_hidden_layers", "n_layer", "num_layers"), 12)
    heads = _config_int(config, ("num_attention_heads", "n_head"), 16)
    vocab = _config_int(config, ("vocab_size",), 32000)
    element = params[0].element_size() if params else 4

    tokens = per_device_batch * rows_per_example * max_length  # (B * rows, T) flattened
    factor = CHECKPOINTED_FACTOR if activation_checkpointing else ACTIVATION_FACTOR
    per_token_layer = factor * hidden
    if getattr(config, "_attn_implementation", "sdpa") == "eager":  # scores and probabilities, per head
        per_token_layer += 2 * heads * max_length
    activations = tokens * layers * per_token_layer * element
    if activation_checkpointing:  # one layer's full activations exist while it is recomputed
        activations += tokens * (per_token_layer - factor * hidden + ACTIVATION_FACTOR * hidden) * element
    logit_rows = min(chunk_size, tokens) if logprobs_impl == "chunked" else tokens * (1 + (reference is not None))
    states = OPTIMIZER_STATES.get(optimizer, 2)
    return MemoryEstimate(
        parameters=_bytes(params),
        reference=_bytes(reference.parameters()) if reference is not None else 0,
        gradients=_bytes(trainable),
        optimizer=states * _bytes(trainable),
        activations=activations,
        logits=logit_rows * vocab * 4 * LOGIT_COPIES,
    )


def checkpoint_bytes(policy: nn.Module, optimizer: str, margin: bool = True) -> int:
    """Bytes of one checkpoint: weights (the adapter only for LoRA) + optimizer state (+ margin)."""
    params = list(policy.parameters())
    trainable = _bytes(p for p in params if p.requires_grad)
    weights = trainable if hasattr(policy, "peft_config") else _bytes(params)
    return weights + OPTIMIZER_STATES.get(optimizer, 2) * trainable + (CHECKPOINT_MARGIN if margin else 0)


def checkpoint_size(cfg: TrainConfig, policy: nn.Module, resume_from: Path | None) -> tuple[int, str] | None:
    """One checkpoint's bytes and how they were found, for the start-up block: measured on the checkpoint
    resumed from, else estimated (weights + optimizer state); None when nothing is saved (debug)."""
    if cfg.debug:
        return None
    if resume_from is not None:
        return sum(f.stat().st_size for f in resume_from.rglob("*") if f.is_file()), f"measured on {resume_from.name}"
    return checkpoint_bytes(policy, cfg.optimizer, margin=False), f"weights + {cfg.optimizer} state"


def _on_cpu(policy: nn.Module) -> bool:
    first = next(iter(policy.parameters()), None)
    return first is None or first.device.type == "cpu"


def check_memory(cfg: TrainConfig, policy: nn.Module, reference: nn.Module | None, settings: RunSettings
                 ) -> MemoryEstimate | None:
    """On CPU: raise ResourceError when the step's estimate exceeds the available memory."""
    if not _on_cpu(policy):
        return None
    estimate = estimate_memory(
        policy, reference, per_device_batch=settings.per_device_batch_size,
        rows_per_example=2 if settings.loss.is_preference else 1, max_length=cfg.max_length,
        optimizer=cfg.optimizer, activation_checkpointing=cfg.activation_checkpointing,
        logprobs_impl=cfg.logprobs.impl, chunk_size=cfg.logprobs.chunk_size,
    )
    available = psutil.virtual_memory().available
    # Weights read from safetensors are memory-mapped and mostly not resident yet (they still count in
    # `available`); weights converted on load are. Credit what the process holds beyond its baseline.
    resident = max(0, psutil.Process().memory_info().rss - PROCESS_BASELINE)
    needed = estimate.total - min(estimate.weights, resident)
    logger.debug("memory estimate per step: %s (%s); %s more needed, %s available", format_bytes(estimate.total),
                estimate.describe(), format_bytes(needed), format_bytes(available))
    if needed > available:
        raise ResourceError(
            f"not enough memory: one training step needs about {format_bytes(estimate.total)} "
            f"({estimate.describe()}), {format_bytes(needed)} more than this process holds now, but only "
            f"{format_bytes(available)} is available. Per device: {settings.per_device_batch_size} examples x "
            f"{'2 sequences x ' if settings.loss.is_preference else ''}max_length={cfg.max_length}. "
            f"Lower batch_size={cfg.batch_size} or max_length={cfg.max_length}, or raise "
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} (same batch, fewer examples at once)"
            + ("" if cfg.activation_checkpointing else ", or set activation_checkpointing=true")
        )
    return estimate


def check_disk(cfg: TrainConfig, policy: nn.Module, settings: RunSettings) -> int | None:
    """Raise ResourceError when the run directory's disk cannot hold one checkpoint (skipped for debug)."""
    if cfg.debug:
        return None
    needed = checkpoint_bytes(policy, cfg.optimizer)
    where = existing_ancestor(settings.run_dir)
    free = shutil.disk_usage(where).free
    if needed > free:
        raise ResourceError(
            f"not enough disk space for a checkpoint in {settings.run_dir}: one needs about {format_bytes(needed)} "
            f"(weights + {cfg.optimizer} state + {format_bytes(CHECKPOINT_MARGIN)} margin), {format_bytes(free)} free on the disk "
            f"of {where}. Free space there or point local_dirs elsewhere."
        )
    return needed


def preflight(cfg: TrainConfig, policy: nn.Module, reference: nn.Module | None,
              settings: RunSettings) -> MemoryEstimate | None:
    """Both checks, before the first step; raises ResourceError with the figures and what to change.
    Returns the memory estimate (None off the CPU), for the start-up block."""
    with torch.no_grad():
        estimate = check_memory(cfg, policy, reference, settings)
        check_disk(cfg, policy, settings)
    return estimate
