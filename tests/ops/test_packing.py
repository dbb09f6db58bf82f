"""torch.ops.llavamed_fast.packing (C++) against reference.packing: same bins, same errors."""

from __future__ import annotations

import random
import re

import pytest
import torch

from llavamed_fast import _ext
from llavamed_fast.ops import reference

_ext.load()
packing = torch.ops.llavamed_fast.packing

DTYPES = [torch.int32, torch.int64]


def _random_cases() -> list[tuple[str, list[int], int]]:
    rng = random.Random(1234)
    cases: list[tuple[str, list[int], int]] = [
        ("empty", [], 16),
        ("one item", [5], 5),
        ("all ones", [1] * 50, 7),
        ("all at budget", [64] * 20, 64),
        ("budget 1", [1] * 9, 1),
    ]
    for trial in range(60):
        budget = rng.choice([1, 2, 7, 64, 512, 2048, 4096])
        n = rng.randint(0, 250)
        cases.append((f"uniform {trial}", [rng.randint(1, budget) for _ in range(n)], budget))
        # Few distinct values: most comparisons in the visit order are ties.
        values = [max(1, budget // d) for d in (1, 2, 3, 4)]
        cases.append((f"equal lengths {trial}", [rng.choice(values) for _ in range(n)], budget))
        near = [max(1, budget - rng.randint(0, 2)) for _ in range(n // 4)]
        short = [rng.randint(1, min(3, budget)) for _ in range(n)]
        cases.append((f"near budget {trial}", near + short, budget))
    for trial in range(5):
        # LLaVA-Med-like: 256 image tokens plus a lognormal caption (median ~90 tokens), cut to the budget.
        budget = 2048
        lengths = [min(budget, 256 + int(rng.lognormvariate(4.5, 0.9))) for _ in range(1000)]
        lengths += [rng.randint(1, 40) for _ in range(200)]  # text-only turns
        rng.shuffle(lengths)
        cases.append((f"llava-med mix {trial}", lengths, budget))
    return cases


CASES = _random_cases()


def _check_invariants(lengths: torch.Tensor, bins: torch.Tensor, budget: int) -> None:
    assert bins.dtype == torch.int64
    assert bins.shape == lengths.shape  # every item placed exactly once
    if bins.numel() == 0:
        return
    assert int(bins.min()) == 0
    used = torch.bincount(bins, weights=lengths.double())
    assert int(used.max()) <= budget, f"a bin holds {int(used.max())} > {budget}"
    assert bool((torch.bincount(bins) > 0).all()), "bin ids are not contiguous from 0"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "lengths", "budget"), CASES, ids=[case[0] for case in CASES])
def test_matches_reference(name: str, lengths: list[int], budget: int, dtype: torch.dtype) -> None:
    tensor = torch.tensor(lengths, dtype=dtype)
    bins = packing(tensor, budget)
    expected = reference.packing(lengths, budget)
    if bins.tolist() != expected:
        first = next(i for i, (a, b) in enumerate(zip(bins.tolist(), expected, strict=True)) if a != b)
        pytest.fail(
            f"{name}: item {first} (length {lengths[first]}) in bin {bins[first]}, not {expected[first]}"
        )
    _check_invariants(tensor, bins, budget)


def test_non_contiguous_lengths() -> None:
    lengths = torch.arange(1, 41, dtype=torch.int64)[::2]
    assert packing(lengths, 40).tolist() == reference.packing(lengths.tolist(), 40)


def test_many_items() -> None:
    # 100k items: an O(n * bins) packer would take minutes; this one milliseconds.
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 2049, (100_000,), generator=generator)
    bins = packing(lengths, 4096)
    _check_invariants(lengths, bins, 4096)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("lengths", "budget"),
    [
        ([3, 20, 5], 16),  # too long
        ([3, 0, 5], 16),  # zero
        ([3, 4, -2], 16),  # negative
        ([3, 0, 40], 16),  # the first bad item is named
        ([3, 4], 0),  # no budget
        ([3, 4], -8),
    ],
)
def test_bad_values_raise_as_the_reference(lengths: list[int], budget: int, dtype: torch.dtype) -> None:
    with pytest.raises(ValueError) as expected:
        reference.packing(lengths, budget)
    with pytest.raises(ValueError, match=re.escape(str(expected.value))):
        packing(torch.tensor(lengths, dtype=dtype), budget)


def test_error_names_item_length_and_budget() -> None:
    with pytest.raises(ValueError, match=re.escape("item 1 has length 20, outside (0, 16]")):
        packing(torch.tensor([3, 20, 5]), 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int16, torch.bool])
def test_wrong_dtype(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match="lengths must have dtype int64 or int32, got"):
        packing(torch.ones(3, dtype=dtype), 16)


def test_not_1d() -> None:
    with pytest.raises(ValueError, match=re.escape("lengths must be 1-D, got a 2-D tensor of shape [2, 3]")):
        packing(torch.ones(2, 3, dtype=torch.int64), 16)
    with pytest.raises(ValueError, match="lengths must be 1-D, got a 0-D tensor"):
        packing(torch.tensor(3), 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_tensor_is_refused() -> None:
    with pytest.raises(ValueError, match="lengths must be a CPU tensor, got one on cuda"):
        packing(torch.ones(3, dtype=torch.int64, device="cuda"), 16)


def test_op_registration() -> None:
    # Schema, fake-tensor (meta) kernel and autograd registration, as torch.compile needs them.
    lengths = torch.tensor([4, 7, 3, 5, 2])
    results = torch.library.opcheck(packing.default, (lengths, 10))
    assert set(results.values()) == {"SUCCESS"}, results
