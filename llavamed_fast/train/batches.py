"""Which samples make each optimizer step, how they are packed into rows, and which rank runs which row.

Every rank computes the same plan from the same lengths and seed, so no data indices travel between
processes. Per epoch: shuffle the samples, and cut the order into steps of exactly ``global_batch_size``
samples (the last step of an epoch holds the rest), so that the batch the recipes' learning rates were
tuned for is the batch that trains, whatever the number of processes. A step's samples are then packed
into the fewest rows under the token budget whose count is a multiple of ``rows_multiple`` (the
data-parallel size: every rank runs the same number of micro-batches, as ZeRO-3 gathers parameters
collectively in every forward), balanced: longest first, each into the row with the fewest tokens so far,
so that no rank waits long for another. A row may stay empty (an epoch's last step with fewer samples than
rows, or samples too long to share rows evenly); it runs as a one-token placeholder with nothing
supervised. A global batch smaller than ``rows_multiple`` would leave ranks idle at every step, so it is
refused. Rank ``r`` runs rows
``r, r + world, ...`` of each step.

With many processes, a step's rows are less full than the budget (a step of 128 samples of ~600 tokens
on 8 ranks with an 8,192-token budget is 16 rows of ~4,800 tokens); a smaller budget fills them better.

Loss normalisation: the loss of a step is the mean over the supervised tokens of the whole global batch
(all micro-batches, all ranks): each micro-batch contributes its summed token losses divided by the
step's total supervised-token count. A long conversation therefore weighs in proportion to its tokens, as
in a single big padded batch, and the result does not depend on how samples fall into rows or ranks.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

# Bumped whenever the plan of the same data and seed changes: a checkpoint inside a stage is only valid
# with the plan that wrote it (its step count says how far into *that* plan the stage got).
PLAN_VERSION = 2


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
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    return [
        Step(epoch, pack_step(order[start : start + global_batch_size], lengths, budget, rows_multiple))
        for start in range(0, len(order), global_batch_size)
    ]


def pack_step(
    indices: np.ndarray, lengths: np.ndarray, budget: int, rows_multiple: int
) -> tuple[tuple[int, ...], ...]:
    """One step's samples (dataset ``indices``) in the fewest rows of at most ``budget`` tokens whose
    count is a multiple of ``rows_multiple``, balanced by longest-first into the least-filled row."""
    sizes = lengths[indices]
    if sizes.size and int(sizes.max()) > budget:
        raise ValueError(f"a sample of {int(sizes.max())} tokens is longer than the {budget}-token budget")
    longest_first = indices[np.argsort(-sizes, kind="stable")]
    count = rows_multiple * max(1, math.ceil(int(sizes.sum()) / (rows_multiple * budget)))
    while True:
        rows: list[list[int]] = [[] for _ in range(count)]
        room = [(0, row) for row in range(count)]  # (tokens so far, row): a heap, least filled first
        for index in longest_first:
            filled, row = heapq.heappop(room)
            if filled + int(lengths[index]) > budget:
                break  # the least-filled row has no room, so none has: more rows
            rows[row].append(int(index))
            heapq.heappush(room, (filled + int(lengths[index]), row))
        else:
            return tuple(tuple(row) for row in rows)
        count += rows_multiple


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
    if global_batch_size < rows_multiple:
        raise ValueError(
            f"a global batch of {global_batch_size} samples cannot give each of {rows_multiple} processes a "
            "sample: raise global_batch_size or use fewer processes"
        )
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
        raise ValueError("the stage's data holds no sample: no optimizer step to plan")
    return steps[:max_steps] if max_steps else steps
