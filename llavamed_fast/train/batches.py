"""Which packed rows make each optimizer step, and which rank runs which row.

Every rank computes the same plan from the same lengths and seed, so no data indices travel between
processes. Per epoch: shuffle the samples, pack them into rows under the token budget (C++ packer), shuffle
the rows; then cut the row sequence into steps: a step is the shortest run of rows that holds at least
``global_batch_size`` samples and whose row count is a multiple of ``rows_multiple`` (the data-parallel
size, so that every rank runs the same number of micro-batches — ZeRO-3 gathers parameters collectively
in every forward). Rows left at the end of an epoch that cannot fill a multiple of ``rows_multiple`` are
dropped (at most ``rows_multiple - 1`` rows per epoch; none in one process). Rank ``r`` runs rows
``r, r + world, ...`` of each step.

Loss normalisation: the loss of a step is the mean over the supervised tokens of the whole global batch
(all micro-batches, all ranks): each micro-batch contributes its summed token losses divided by the
step's total supervised-token count. A long conversation therefore weighs in proportion to its tokens, as
in a single big padded batch, and the result does not depend on how samples fall into rows or ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llavamed_fast.data.packing import PackedBatchSampler


@dataclass(frozen=True)
class Step:
    epoch: int
    rows: tuple[tuple[int, ...], ...]  # dataset indices of each row, all ranks

    @property
    def samples(self) -> int:
        return sum(len(r) for r in self.rows)

    def rows_for(self, rank: int, world_size: int) -> tuple[tuple[int, ...], ...]:
        return self.rows[rank::world_size]


def plan_epoch(
    lengths: np.ndarray,
    *,
    budget: int,
    global_batch_size: int,
    rows_multiple: int,
    seed: int,
    epoch: int,
) -> list[Step]:
    sampler = PackedBatchSampler(lengths, budget, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    rows = list(sampler)
    steps, current, samples = [], [], 0
    for row in rows:
        current.append(tuple(row))
        samples += len(row)
        if samples >= global_batch_size and len(current) % rows_multiple == 0:
            steps.append(Step(epoch, tuple(current)))
            current, samples = [], 0
    keep = len(current) - len(current) % rows_multiple
    if keep:
        steps.append(Step(epoch, tuple(current[:keep])))
    return steps


def plan_stage(
    lengths: np.ndarray,
    *,
    budget: int,
    global_batch_size: int,
    rows_multiple: int,
    seed: int,
    epochs: float,
    max_steps: int = 0,
) -> list[Step]:
    """All optimizer steps of a stage: whole epochs, then the first part of the last one for a fractional
    ``epochs``; capped at ``max_steps`` when positive."""
    steps: list[Step] = []
    for epoch in range(math.ceil(epochs)):
        planned = plan_epoch(
            lengths,
            budget=budget,
            global_batch_size=global_batch_size,
            rows_multiple=rows_multiple,
            seed=seed,
            epoch=epoch,
        )
        fraction = min(1.0, epochs - epoch)
        steps.extend(planned[: max(1, round(fraction * len(planned)))] if fraction < 1 else planned)
        if max_steps and len(steps) >= max_steps:
            break
    if not steps:
        raise ValueError(
            f"the data gives no optimizer step: {len(lengths)} samples, global batch {global_batch_size}, "
            f"{rows_multiple} rows per step at least"
        )
    return steps[:max_steps] if max_steps else steps
