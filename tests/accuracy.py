"""flash-attention's accuracy criterion, shared by the kernel tests.

A fast kernel may be at most ``factor`` times as wrong as plain PyTorch at the same precision, both
measured against a float64 oracle (2x for forward outputs, 3x for gradients), plus a small absolute floor
so that two near-exact results do not fail on rounding alone.
"""

from __future__ import annotations

import pytest
import torch


def assert_as_accurate_as_plain(name, got, plain, oracle, factor: float, *, floor: float) -> None:
    """Fail with the max/mean error and where, unless ``|got - oracle| <= factor * |plain - oracle| + floor``."""
    assert got.shape == plain.shape == oracle.shape, (name, got.shape, plain.shape, oracle.shape)
    error = (got.double() - oracle).abs()
    plain_error = (plain.double() - oracle).abs().max().item() if plain.numel() else 0.0
    bound = factor * plain_error + floor
    worst = error.max().item() if error.numel() else 0.0
    if not worst <= bound:  # also catches NaN
        where = tuple(int(i) for i in torch.unravel_index(error.argmax(), error.shape))
        pytest.fail(
            f"{name}: max error {worst:.3e} at {where} (got {got[where].item():.6g}, oracle "
            f"{oracle[where].item():.6g}), mean {error.mean().item():.3e}; allowed {bound:.3e} = {factor} x "
            f"plain torch's {plain_error:.3e} + floor {floor:.1e}"
        )
