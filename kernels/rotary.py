"""Rotary position embedding of queries and keys, forward and backward, one pass each.

The Triton backend of ``llavamed_fast::rotary`` (contract in ``llavamed_fast/ops/_library.py``, definition in
``reference.rotary``: transformers' ``apply_rotary_pos_emb`` on ``[B, T, H, D]`` tensors). Eagerly it is
about ten kernels forward per tensor (two products, the half rotation as a negation and a concatenation,
a sum) and as many backward; here one program per token reads the token's ``cos``/``sin`` once and
rotates every query and key head of it, and the backward applies the transposed rotation to the output
gradients the same way.

With ``x = [x1, x2]`` (the two halves of a head), ``cos = [c1, c2]`` and ``sin = [s1, s2]``:
``y1 = x1 c1 - x2 s1`` and ``y2 = x2 c2 + x1 s2``; the backward is ``dx1 = dy1 c1 + dy2 s2`` and
``dx2 = dy2 c2 - dy1 s1``. Computed in float32 with one rounding to ``q``'s dtype (transformers rounds
each product); cos and sin are read in their own dtype (float32 under autocast).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _rotate_heads(
    x_ptr,
    y_ptr,
    token,
    x_token_stride,
    x_head_stride,
    y_token_stride,
    y_head_stride,
    n_heads,
    half,
    c1,
    c2,
    s1,
    s2,
    BACKWARD: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    for first in range(0, n_heads, BLOCK_H):
        head = (first + heads).to(tl.int64)  # heads-first inputs: head strides of T * D
        mask = (head < n_heads) & (cols < half)
        x_at = x_ptr + token * x_token_stride + head * x_head_stride + cols
        x1 = tl.load(x_at, mask=mask, other=0.0).to(c1.dtype)
        x2 = tl.load(x_at + half, mask=mask, other=0.0).to(c1.dtype)
        if BACKWARD:  # the transposed rotation
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        y_at = y_ptr + token * y_token_stride + head * y_head_stride + cols
        tl.store(y_at, y1.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_at + half, y2.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    cs_token_stride,
    q_heads,
    k_heads,
    half,
    COMPUTE: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Token ``program_id(0)`` (of the flattened ``B * T``): every query head, then every key head.
    The outputs are contiguous ``[B * T, heads, 2 * half]``."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    in_half = cols < half
    at = token * cs_token_stride + cols
    c1 = tl.load(cos_ptr + at, mask=in_half, other=0.0).to(COMPUTE)
    c2 = tl.load(cos_ptr + at + half, mask=in_half, other=0.0).to(COMPUTE)
    s1 = tl.load(sin_ptr + at, mask=in_half, other=0.0).to(COMPUTE)
    s2 = tl.load(sin_ptr + at + half, mask=in_half, other=0.0).to(COMPUTE)
    _rotate_heads(
        q_ptr, q_out_ptr, token, q_token_stride, q_head_stride, q_heads * 2 * half, 2 * half,
        q_heads, half, c1, c2, s1, s2, BACKWARD, BLOCK_HALF, BLOCK_H,
    )  # fmt: skip
    _rotate_heads(
        k_ptr, k_out_ptr, token, k_token_stride, k_head_stride, k_heads * 2 * half, 2 * half,
        k_heads, half, c1, c2, s1, s2, BACKWARD, BLOCK_HALF, BLOCK_H,
    )  # fmt: skip


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, D]`` as ``[B * T, H, D]`` with a unit last stride (a view where it can be one)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, x.shape[-2], x.shape[-1])
    except RuntimeError:  # batch and token strides that do not merge
        return x.contiguous().view(-1, x.shape[-2], x.shape[-1])


def _rotate(q, k, cos, sin, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if q.dtype not in _FLOATS or k.dtype != q.dtype or cos.dtype not in _FLOATS or sin.dtype != cos.dtype:
        raise TypeError(
            f"rotary takes q and k of one floating dtype and cos and sin of one, got {q.dtype}, {k.dtype}, "
            f"{cos.dtype}, {sin.dtype}"
        )
    head_dim = q.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head dim, got {head_dim}")
    qt, kt = _tokens(q), _tokens(k)
    cs_shape = (qt.shape[0], head_dim)
    cos_t = cos.expand(*q.shape[:-2], head_dim).reshape(cs_shape)
    sin_t = sin.expand(*q.shape[:-2], head_dim).reshape(cs_shape)
    if cos_t.stride(-1) != 1 or sin_t.stride() != cos_t.stride():
        cos_t, sin_t = cos_t.contiguous(), sin_t.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if qt.shape[0]:
        compute = tl.float64 if torch.float64 in (q.dtype, cos.dtype) else tl.float32
        _rotary_kernel[(qt.shape[0],)](
            qt, kt, cos_t, sin_t, q_out, k_out,
            qt.stride(0), qt.stride(1), kt.stride(0), kt.stride(1), cos_t.stride(0),
            qt.shape[1], kt.shape[1], head_dim // 2,
            COMPUTE=compute, BACKWARD=backward, BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
            BLOCK_H=min(8, triton.next_power_of_2(qt.shape[1])), num_warps=4,
        )  # fmt: skip
    return q_out, k_out


def rotary_forward(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(q, k, cos, sin, backward=False)


def rotary_backward(dq_out, dk_out, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(dq_out, dk_out, cos, sin, backward=True)


class TritonRotary:
    """``rotary`` backend ``triton``."""

    forward = staticmethod(rotary_forward)
    backward = staticmethod(rotary_backward)
