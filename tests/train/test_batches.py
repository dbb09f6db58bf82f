"""The step plan: exactly ``global_batch_size`` samples a step, whatever the number of processes, packed
into balanced rows under the token budget, every sample once an epoch."""

from __future__ import annotations

import numpy as np
import pytest

from llavamed_fast.train.batches import plan_epoch, plan_stage


def mix(count: int, seed: int = 0) -> np.ndarray:
    """A LLaVA-Med-like length mix: short caption pairs and longer conversations (tokens)."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(count) < 0.6, rng.integers(300, 700, count), rng.integers(700, 2500, count))


@pytest.mark.parametrize("world", [1, 2, 8])
def test_every_step_holds_the_global_batch_in_balanced_rows(world):
    lengths, budget, batch = mix(1000), 8192, 128
    steps = plan_epoch(lengths, budget=budget, global_batch_size=batch, rows_multiple=world, seed=3, epoch=0)
    assert [step.samples for step in steps] == [128] * 7 + [1000 - 7 * 128]
    seen = [i for step in steps for row in step.rows for i in row]
    assert sorted(seen) == list(range(1000))  # every sample once
    for step in steps:
        loads = [int(lengths[list(row)].sum()) for row in step.rows]
        assert len(loads) % world == 0 and max(loads) <= budget
        # The fewest rows that can hold the step, unless the lengths do not split that finely.
        least = world * -(-sum(loads) // (world * budget))
        assert least <= len(loads) <= least + world
        # Longest first into the least-filled row: no row exceeds another by more than one sample.
        assert max(loads) - min(loads) <= int(lengths.max())


def test_the_samples_of_a_step_do_not_depend_on_the_number_of_processes():
    lengths = mix(700, seed=1)

    def batches(world: int) -> list[set[int]]:
        steps = plan_epoch(lengths, budget=4096, global_batch_size=64, rows_multiple=world, seed=5, epoch=2)
        return [{i for row in step.rows for i in row} for step in steps]

    assert batches(1) == batches(4) == batches(8)


def test_epochs_reshuffle_and_a_short_last_step_gets_empty_rows():
    lengths = mix(70, seed=2)
    plan = plan_stage(lengths, budget=8192, global_batch_size=32, rows_multiple=8, seed=0, epochs=2)
    assert [step.samples for step in plan] == [32, 32, 6, 32, 32, 6]
    first, second = ([i for s in plan[k : k + 3] for r in s.rows for i in r] for k in (0, 3))
    assert sorted(first) == sorted(second) == list(range(70)) and first != second
    last = plan[2].rows
    assert len(last) == 8 and sum(1 for row in last if not row) == 2  # six samples, eight ranks
    with pytest.raises(ValueError, match="a global batch of 4 samples cannot give each of 8 processes"):
        plan_stage(lengths, budget=8192, global_batch_size=4, rows_multiple=8, seed=0, epochs=1)
    with pytest.raises(ValueError, match="longer than the 1000-token budget"):
        plan_stage(np.array([500, 1200]), budget=1000, global_batch_size=2, rows_multiple=1, seed=0, epochs=1)
