"""A seeded, length-grouped sampler: little padding, every record once per epoch, resumable order.

The order of epoch `e` depends only on `(seed, e)`, so a resumed run (which skips the batches it had
already trained on) sees exactly the batches an uninterrupted run would. The research code never
seeded its data order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class SeededLengthGroupedSampler(Sampler[int]):
    """Shuffle, then sort by length inside mega-batches of `group_size * mega_factor` records.

    Batches of similar length pad less; shuffling mega-batches keeps the order random. With
    `group_by_length=False` this is a plain seeded permutation.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        group_size: int,
        seed: int,
        group_by_length: bool = True,
        mega_factor: int = 16,
    ):
        self.lengths = list(lengths)
        self.group_size = max(1, group_size)
        self.seed = seed
        self.group_by_length = group_by_length
        self.mega_factor = mega_factor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def order(self, epoch: int) -> list[int]:
        """The record order of one epoch (a permutation of range(len))."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.lengths), generator=generator).tolist()
        if not self.group_by_length:
            return perm
        mega = self.group_size * self.mega_factor
        chunks = [perm[i : i + mega] for i in range(0, len(perm), mega)]
        out: list[int] = []
        for chunk in chunks:
            # longest first inside a mega-batch; batches stay group-aligned since mega % group == 0
            out.extend(sorted(chunk, key=lambda i: -self.lengths[i]))
        groups = [out[i : i + self.group_size] for i in range(0, len(out), self.group_size)]
        # shuffle whole groups so the long ones don't all come first; keep a short last group last
        full = [g for g in groups if len(g) == self.group_size]
        tail = [g for g in groups if len(g) != self.group_size]
        group_perm = torch.randperm(len(full), generator=generator).tolist()
        return [i for gi in group_perm for i in full[gi]] + [i for g in tail for i in g]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch))


def step_layout(step: int, n_records: int, per_device: int, accumulation: int, world_size: int, process: int,
                micro_batches: int) -> tuple[int, list[range]]:
    """The pairs optimizer step `step` of an epoch trains over all processes, and the epoch order's
    positions of the records in each of this process's `micro_batches` micro-batches (their leading rows).

    Accelerate deals the epoch's micro-batches of `per_device` positions round robin (micro-batch m to
    process m % world_size); to even out the last step it fills the short micro-batch and adds whole ones
    with records from the epoch's start (`even_batches`). Positions from `n_records` on are those repeats:
    they are in no range here, so they weigh nothing. One process: every row is a record."""
    group = per_device * accumulation * world_size
    first = step * accumulation * world_size  # the step's first micro-batch in the epoch
    ranges = []
    for j in range(micro_batches):
        start = (first + j * world_size + process) * per_device
        ranges.append(range(start, max(start, min(start + per_device, n_records))))
    return max(0, min(group, n_records - step * group)), ranges


def examples_after(steps: int, n_records: int, batch_size: int) -> int:
    """Examples trained on after `steps` optimizer steps of `batch_size` over epochs of `n_records`
    (each epoch's last step takes what is left: the last partial batch is kept)."""
    steps_per_epoch = -(-n_records // batch_size)
    epochs, rest = divmod(steps, steps_per_epoch)
    return epochs * n_records + min(rest * batch_size, n_records)
