"""What the trainer keeps across the micro-batches of a step, on the device, read back once.

On a GPU every read of a tensor's value on the host (`.item()`, `.tolist()`, `.cpu()`, `bool(t)`)
waits for all queued work: a read per micro-batch keeps the GPU idle while the host catches up. So:
- `StepGuard` holds each micro-batch's loss (a device scalar) and its record indices (host lists), and
  decides once, at the optimizer step, from one read of all of them with the gradient norm. With
  several processes the decision is agreed by one all-reduce, so every rank skips (or stops) at the
  same step and runs the same collectives.
- `MetricBuffer` holds per-example metric tensors on the device: a step's are kept when its update is
  applied (dropped with a skipped step) and reduced over processes and read back once per log.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]  # a sum over processes (identity for one process)


class NonFiniteError(RuntimeError):
    """A loss or gradient norm became NaN or infinite; names the step and the batch's records."""


@dataclass
class StepDecision:
    """The guard's verdict for one optimizer step (all host values)."""

    grad_norm: float
    skip: bool = False
    message: str | None = None  # why, naming the step and records (None: a clean step)


@dataclass
class StepGuard:
    """Non-finite losses and gradient norms, checked once per optimizer step."""

    skip_nonfinite: bool
    losses: list[torch.Tensor] = field(default_factory=list)  # one device scalar per micro-batch
    records: list[list[int]] = field(default_factory=list)  # record indices per micro-batch (host)

    def add(self, loss: torch.Tensor, records: list[int]) -> torch.Tensor:
        """Keep the micro-batch's loss for the step's check; returns it with non-finite values zeroed
        (so Trainer's running loss stays finite; the step's gradients are dropped or the run stops)."""
        self.losses.append(loss.detach().float().reshape(()))
        self.records.append(list(records))
        return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)

    def step_records(self) -> list[int]:
        return [i for batch in self.records for i in batch]

    def decide(self, grad_norm, step: int, rank: int = 0, world_size: int = 1, reduce: Reduce | None = None,
               scaler_handles_overflow: bool = False) -> StepDecision:
        """One read of the step's losses and gradient norm (after one all-reduce of a per-rank count of
        non-finite losses). Raises NonFiniteError unless `skip_nonfinite`; `scaler_handles_overflow`
        (fp16 loss scaling) leaves a non-finite gradient norm with finite losses to the scaler."""
        losses, records = self.losses, self.records
        self.losses, self.records = [], []
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor (replicated): the plain value
            grad_norm = grad_norm.full_tensor()
        norm = grad_norm if isinstance(grad_norm, torch.Tensor) else torch.tensor(
            float("nan") if grad_norm is None else float(grad_norm))
        device = losses[0].device if losses else norm.device
        local = torch.stack(losses) if losses else torch.zeros(0, device=device)
        per_rank = torch.zeros(world_size, device=device)
        per_rank[rank] = (~torch.isfinite(local)).sum()
        if world_size > 1 and reduce is not None:
            per_rank = reduce(per_rank)
        values = torch.cat([per_rank, norm.detach().float().reshape(1).to(device), local]).tolist()  # the read
        bad_ranks = [r for r in range(world_size) if values[r] > 0]
        value = values[world_size] if grad_norm is not None else 0.0
        if not bad_ranks and (math.isfinite(value) or scaler_handles_overflow):
            return StepDecision(grad_norm=value)
        where = f"step {step}"
        if bad_ranks:
            here = [(v, r) for v, r in zip(values[world_size + 1:], records) if not math.isfinite(v)]
            if here:
                what = f"non-finite loss ({here[0][0]}) at {where}, records {[i for _, r in here for i in r]}"
            else:
                what = f"non-finite loss at {where} on rank(s) {bad_ranks}"
            hint = "set skip_nonfinite=true to skip"
        else:
            flat = [i for r in records for i in r]
            what = f"non-finite gradient norm ({value}) at {where}, records {flat}"
            hint = "set skip_nonfinite=true to skip such steps"
        if not self.skip_nonfinite:
            raise NonFiniteError(f"{what}; {hint}")
        return StepDecision(grad_norm=value, skip=True, message=what)


class MetricBuffer:
    """Per-example metrics on the device: pending for the current step, kept once the step is applied,
    and read back as means, once per log."""

    def __init__(self):
        self.pending: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.kept: dict[str, list[torch.Tensor]] = defaultdict(list)

    def add(self, metrics: dict[str, torch.Tensor], keep: bool = False) -> None:
        """`keep`: straight into the kept values (evaluation: no step to wait for)."""
        target = self.kept if keep else self.pending
        for key, value in metrics.items():
            target[key].append(value.detach().float().reshape(-1))

    def end_step(self, applied: bool) -> None:
        """The step's update was applied (its metrics are kept) or skipped (they are dropped)."""
        if applied:
            for key, values in self.pending.items():
                self.kept[key].extend(values)
        self.pending.clear()

    def means(self, reduce: Reduce | None = None) -> dict[str, float]:
        """Mean of every kept metric over all its examples (of all processes, through `reduce`), in one
        read; the kept values are cleared."""
        if not self.kept:
            return {}
        keys = list(self.kept)
        sums = torch.stack([torch.cat(self.kept[k]).sum() for k in keys])  # (K,) on the device
        counts = torch.tensor([float(sum(v.numel() for v in self.kept[k])) for k in keys])  # known on the host
        sums = torch.stack([sums, counts.to(sums.device, non_blocking=True)], dim=1)  # (K, 2)
        if reduce is not None:
            sums = reduce(sums)
        self.kept.clear()
        totals = sums.tolist()  # the read
        return {key: total / max(count, 1) for key, (total, count) in zip(keys, totals)}
