"""Triton FlashAttention-2 over packed sequences: forward, and backward from the saved log-sum-exp.

Layout: ``q [T, H, D]``, ``k/v [T, H_kv, D]`` hold the concatenated samples of one packed row;
``cu_seqlens [S + 1]`` (int32) marks where each sample starts. Every program reads its sample's bounds from
``cu_seqlens`` and never loads a row outside them, so no sample can see another.

Programs are laid out over the row's tiles, not over ``samples x cdiv(max_seqlen, BLOCK)``: program ``p``
takes the ``p``-th tile of the row, whose sample and block a tiny kernel lists first from ``cu_seqlens``
(``_varlen_attention_tiles_kernel``; the attention kernels load two integers). A grid sized for the
longest sample would launch mostly empty programs on real rows (a stage-1 row of 16K tokens holds ~38
samples of ~430 tokens and, now and then, one of 2048: about 80 % of such a grid is empty), and the host
cannot size the grid exactly without reading ``cu_seqlens`` back (a sync); ``T // BLOCK + S`` bounds the
tile count, so at most ``S`` programs per head find no tile. The list is built apart, not by each
program, because the search's registers would crowd the backward kernels, which already run at the
register limit. For the same reason each kernel spells out its few lines of prologue (tile, sample,
bounds): moving them into a shared ``@triton.jit`` helper changed dQ's register allocation and made it
spill (``tests/ops/test_triton_compiles.py`` checks that it does not).

The file reads top to bottom: the ``@triton.jit`` kernels, the host launchers (checks, allocation, block
sizes, grids), then :class:`TritonVarlenAttention`, the backend object the op registry loads.

Scores are kept in the base-2 domain (``qk * scale * log2(e)``) so every exponential is one ``exp2``; the
saved ``lse`` is converted back to natural log so that it matches the reference's definition.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_OP = "varlen_attention (triton backend)"
_LOG2E = math.log2(math.e)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Register pressure, not correctness, sets the limit: the forward keeps a [BLOCK_M, D] fp32 accumulator
# and the dK/dV kernel two [BLOCK_N, D] ones per program; beyond 128 the block sizes below would spill.
_MAX_HEAD_DIM = 128
# CUDA limits grid dimensions y and z to 65535; heads ride on y.
_MAX_HEADS = 65535


# ---------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _tile_of(CU_SEQLENS, num_samples, tile, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """``(sample, block)``: the row's ``tile``-th tile of ``BLOCK`` rows is block ``block`` of ``sample``,
    counting each sample's ``cdiv(length, BLOCK)`` tiles in order; ``sample == num_samples`` past the last.

    A prefix sum of the tile counts, ``CHUNK`` samples at a time: one step for the rows training sees.
    """
    samples_before = 0  # samples whose tiles all come before this one
    tiles_before = 0
    seen = 0  # tiles of every sample read so far
    for first in range(0, num_samples, CHUNK):
        idx = first + tl.arange(0, CHUNK)
        valid = idx < num_samples
        lo = tl.load(CU_SEQLENS + idx, mask=valid, other=0)
        hi = tl.load(CU_SEQLENS + idx + 1, mask=valid, other=0)
        count = tl.where(valid, (hi - lo + BLOCK - 1) // BLOCK, 0)
        before = valid & (tl.cumsum(count, 0) + seen <= tile)
        samples_before += tl.sum(before.to(tl.int32), 0)
        tiles_before += tl.sum(tl.where(before, count, 0), 0)
        seen += tl.sum(count, 0)
    return samples_before, tile - tiles_before


@triton.jit
def _varlen_attention_tiles_kernel(CU_SEQLENS, num_samples, TILES, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """``TILES[p] = (sample, block)`` of the row's ``p``-th tile (``sample == num_samples`` past the last)."""
    tile = tl.program_id(0)
    sample, block = _tile_of(CU_SEQLENS, num_samples, tile, BLOCK, CHUNK)
    tl.store(TILES + 2 * tile, sample)
    tl.store(TILES + 2 * tile + 1, block)


@triton.jit
def _fwd_steps(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    offs_m,
    offs_d,
    d_mask,
    seqlen,
    qk_scale,
    lo,
    hi,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online softmax over the key blocks ``[lo, hi)`` of one query block."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < seqlen) & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASK:
            keep = offs_n[None, :] < seqlen
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            qk = tl.where(keep, qk, float("-inf"))
        # Key 0 is in the first block every row visits and is never masked, so m_new is finite from then
        # on and no row ever computes exp2(-inf - -inf).
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _varlen_attention_fwd_kernel(
    Q,
    K,
    V,
    OUT,
    LSE,
    CU_SEQLENS,
    TILES,
    num_samples,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_lse_h,
    qk_scale,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    sample = tl.load(TILES + 2 * tile)
    if sample >= num_samples:  # the grid bounds the tile count from above
        return
    block_m = tl.load(TILES + 2 * tile + 1)
    head = tl.program_id(1).to(tl.int64)
    start = tl.load(CU_SEQLENS + sample).to(tl.int64)
    seqlen = (tl.load(CU_SEQLENS + sample + 1) - tl.load(CU_SEQLENS + sample)).to(tl.int32)
    if CAUSAL:
        # Within a sample, the last query tiles see the most keys: they start first.
        block_m = tl.cdiv(seqlen, BLOCK_M) - 1 - block_m
    m0 = block_m * BLOCK_M
    kv_head = head // GROUPS

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_mask = (offs_m[:, None] < seqlen) & d_mask[None, :]
    q_base = Q + start * stride_qt + head * stride_qh
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
    k_base = K + start * stride_kt + kv_head * stride_kh
    v_base = V + start * stride_vt + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Key blocks every query of this block sees whole (inside the sample and, if causal, not after the
    # block's first query) need no mask; the rest (causal diagonal, sample's end) do.
    if CAUSAL:
        hi = tl.minimum(seqlen, m0 + BLOCK_M)
        full = tl.minimum((m0 + 1) // BLOCK_N, seqlen // BLOCK_N) * BLOCK_N
    else:
        hi = seqlen
        full = (seqlen // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_steps(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, d_mask, seqlen, qk_scale,
        0, full, False, CAUSAL, BLOCK_N, PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_steps(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, d_mask, seqlen, qk_scale,
        full, hi, True, CAUSAL, BLOCK_N, PRECISION,
    )  # fmt: skip

    out = acc / l_i[:, None]
    o_ptrs = OUT + start * stride_ot + head * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=q_mask)
    lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634  # back to natural log
    tl.store(LSE + head * stride_lse_h + start + offs_m, lse, mask=offs_m < seqlen)


@triton.jit
def _varlen_attention_bwd_preprocess_kernel(
    OUT,
    DO,
    DELTA,
    num_tokens,
    stride_ot,
    stride_oh,
    stride_dot,
    stride_doh,
    stride_delta_h,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32, which equals rowsum(P * dP) for every query."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t[:, None] < num_tokens) & (offs_d[None, :] < HEAD_DIM)
    rows = offs_t.to(tl.int64)[:, None]
    o = tl.load(OUT + head * stride_oh + rows * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + head * stride_doh + rows * stride_dot + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head * stride_delta_h + offs_t, delta, mask=offs_t < num_tokens)


@triton.jit
def _bwd_dkdv_steps(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qt,
    stride_dot,
    offs_n,
    offs_d,
    d_mask,
    seqlen,
    qk_scale,
    lo,
    hi,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Accumulate dK, dV of one key block over the query blocks ``[lo, hi)`` of one query head.

    Works on transposed scores ``[BLOCK_N, BLOCK_M]`` so that both updates are ``tl.dot`` with the key
    block's rows as M: no transpose of the probabilities is needed.
    """
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < seqlen
        row_mask = m_valid[:, None] & d_mask[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_mask, other=0.0)
        lse2 = tl.load(lse_base + offs_m, mask=m_valid, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m, mask=m_valid, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
        if MASK:
            keep = m_valid[None, :]
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            p_t = tl.where(keep, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _varlen_attention_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    CU_SEQLENS,
    TILES,
    num_samples,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    stride_lse_h,
    qk_scale,
    sm_scale,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Causal key tiles in order are already heaviest first: the first keys are seen by every query.
    tile = tl.program_id(0)
    sample = tl.load(TILES + 2 * tile)
    if sample >= num_samples:
        return
    block_n = tl.load(TILES + 2 * tile + 1)
    kv_head = tl.program_id(1).to(tl.int64)
    start = tl.load(CU_SEQLENS + sample).to(tl.int64)
    seqlen = (tl.load(CU_SEQLENS + sample + 1) - tl.load(CU_SEQLENS + sample)).to(tl.int32)
    n0 = block_n * BLOCK_N

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    kv_mask = (offs_n[:, None] < seqlen) & d_mask[None, :]
    k_ptrs = K + start * stride_kt + kv_head * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + start * stride_vt + kv_head * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query blocks in [a, b) see the whole key block and lie inside the sample: no mask. Causal queries
    # before this key block see none of it, so the walk starts at the query block holding key n0.
    full_end = (seqlen // BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (n0 // BLOCK_M) * BLOCK_M
        a = tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        a = 0
    b = tl.maximum(a, full_end)
    # The query heads of this KV head's group run here, one after another, so dK/dV of a KV head are
    # summed in registers and written once: no atomics, no second reduction pass.
    for g in range(GROUPS):
        head = kv_head * GROUPS + g
        q_base = Q + start * stride_qt + head * stride_qh
        do_base = DO + start * stride_dot + head * stride_doh
        lse_base = LSE + head * stride_lse_h + start
        delta_base = DELTA + head * stride_lse_h + start
        dk, dv = _bwd_dkdv_steps(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n, offs_d,
            d_mask, seqlen, qk_scale, lo, tl.minimum(a, seqlen), True, CAUSAL, BLOCK_M, PRECISION,
        )  # fmt: skip
        dk, dv = _bwd_dkdv_steps(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n, offs_d,
            d_mask, seqlen, qk_scale, a, b, False, CAUSAL, BLOCK_M, PRECISION,
        )  # fmt: skip
        dk, dv = _bwd_dkdv_steps(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n, offs_d,
            d_mask, seqlen, qk_scale, b, seqlen, True, CAUSAL, BLOCK_M, PRECISION,
        )  # fmt: skip

    dk_ptrs = DK + start * stride_dkt + kv_head * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    dv_ptrs = DV + start * stride_dvt + kv_head * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_steps(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    offs_m,
    offs_d,
    d_mask,
    seqlen,
    qk_scale,
    lo,
    hi,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Accumulate dQ of one query block over the key blocks ``[lo, hi)``."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < seqlen) & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASK:
            keep = offs_n[None, :] < seqlen
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _varlen_attention_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    CU_SEQLENS,
    TILES,
    num_samples,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dqt,
    stride_dqh,
    stride_lse_h,
    qk_scale,
    sm_scale,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    sample = tl.load(TILES + 2 * tile)
    if sample >= num_samples:
        return
    block_m = tl.load(TILES + 2 * tile + 1)
    head = tl.program_id(1).to(tl.int64)
    start = tl.load(CU_SEQLENS + sample).to(tl.int64)
    seqlen = (tl.load(CU_SEQLENS + sample + 1) - tl.load(CU_SEQLENS + sample)).to(tl.int32)
    # No heaviest-first order here, unlike the forward: computing it pushed this kernel from 196 registers
    # to the 255 limit and spilled (sm_90, D = 128, causal).
    m0 = block_m * BLOCK_M
    kv_head = head // GROUPS

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_valid = offs_m < seqlen
    row_mask = m_valid[:, None] & d_mask[None, :]
    q = tl.load(Q + start * stride_qt + head * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_mask, other=0.0)  # fmt: skip
    do = tl.load(DO + start * stride_dot + head * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_mask, other=0.0)  # fmt: skip
    lse2 = tl.load(LSE + head * stride_lse_h + start + offs_m, mask=m_valid, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + head * stride_lse_h + start + offs_m, mask=m_valid, other=0.0)
    k_base = K + start * stride_kt + kv_head * stride_kh
    v_base = V + start * stride_vt + kv_head * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # The same split as the forward: whole key blocks without a mask, then the diagonal and the tail.
    if CAUSAL:
        hi = tl.minimum(seqlen, m0 + BLOCK_M)
        full = tl.minimum((m0 + 1) // BLOCK_N, seqlen // BLOCK_N) * BLOCK_N
    else:
        hi = seqlen
        full = (seqlen // BLOCK_N) * BLOCK_N
    dq = _bwd_dq_steps(
        dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, d_mask, seqlen,
        qk_scale, 0, full, False, CAUSAL, BLOCK_N, PRECISION,
    )  # fmt: skip
    dq = _bwd_dq_steps(
        dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, d_mask, seqlen,
        qk_scale, full, hi, True, CAUSAL, BLOCK_N, PRECISION,
    )  # fmt: skip

    dq_ptrs = DQ + start * stride_dqt + head * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_mask)


# ---------------------------------------------------------------------------------------------------------------
# Host launchers


class _Blocks(NamedTuple):
    m: int  # query rows per tile
    n: int  # key rows per tile
    warps: int
    stages: int


class _Config(NamedTuple):
    forward: _Blocks
    dkdv: _Blocks
    dq: _Blocks
    preprocess: _Blocks  # m: token rows per program; n unused
    # Samples per step of ``_tile_of``'s prefix sum (a power of two): a training row's (~20-60) in one.
    chunk: int = 128


def _config(block_d: int, interpret: bool) -> _Config:
    """Block sizes for a padded head dim ``block_d`` (16..128).

    GPU (tuned by reasoning for H100/H200, fp16/bf16; ``benchmarks/`` may refine them):
    - forward 128 x 64: each K/V tile loaded from HBM serves 128 queries, twice the reuse of 64, which is
      what keeps the loop on the tensor cores rather than on memory. With 4 warps the [128, 64] fp32 score
      tile and a [128, 64] fp32 accumulator take 64 registers per thread each, Q 32 more: fine up to
      D = 64; at D = 128 the accumulator alone would take 128, so 8 warps there. 3 stages of K and V
      (2 x 64 x 128 x 2 B = 32 KB each at D = 128) stay well inside Hopper's 228 KB of shared memory.
    - dK/dV 64 keys x 32 queries, 4 warps: the kernel keeps K, V (input dtype) and dK, dV (fp32) of its key
      block in registers for the whole walk, and every query step holds a few [64, 32] fp32 tiles (scores,
      dP, dS) besides; 64 keys give each ``tl.dot`` an M of 64, one Hopper wgmma tile.
    - dQ 64 queries x 32 keys, 4 warps: the mirror image (Q, dO, dQ held; K, V streamed).
    The backward tiles are measured, not reasoned (``benchmarks/tune_varlen_attention.py``, H100, 16K-token
    row, 32/8 heads, D = 128, bf16): 4 warps beat 8 for both kernels at D = 128 (backward 3.09 ms -> 2.06 ms
    from the dK/dV kernel, -> 2.65 ms from the dQ kernel, each changed alone; 8 warps had been chosen for
    the register count), and wider tiles (32 x 128, 64 x 128, 128 x 32) were slower than 4-warp 32 x 64.
    Interpreter (tests): half the GPU tiles, and 4 samples per step of the tile search, so that rows of a
    few samples already take several steps. The interpreter's time grows with the number of tile steps,
    so smaller tiles only slow the tests down; test sequences of 30-200 tokens still cross several tiles,
    and the tests run other tile shapes (the GPU's among them) by replacing this function.
    """
    if interpret:
        return _Config(
            forward=_Blocks(64, 32, 4, 1),
            dkdv=_Blocks(32, 64, 4, 1),
            dq=_Blocks(64, 32, 4, 1),
            preprocess=_Blocks(64, 0, 4, 1),
            chunk=4,
        )
    wide = block_d > 64
    return _Config(
        forward=_Blocks(128, 64, 8 if wide else 4, 3),
        dkdv=_Blocks(32, 64, 4, 2),
        dq=_Blocks(64, 32, 4, 2),
        preprocess=_Blocks(64, 0, 4, 1),
    )


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    # The kernels take token and head strides, so views (slices, [H, T, D] storage) need no copy; only the
    # head dim must be contiguous for vectorised loads.
    return x if x.stride(-1) == 1 else x.contiguous()


def _like(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The result takes the op's fake layout (empty_like), so compiled graphs see the strides they were
    # promised; the kernels write into it directly unless that layout strides the head dim, where they
    # write a contiguous buffer that ``_settle`` copies over.
    out = torch.empty_like(x)
    return out, out if out.stride(-1) == 1 else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _settle(*pairs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    for out, buffer in pairs:
        if buffer is not out:
            out.copy_(buffer)
    return tuple(out for out, _ in pairs)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.dtype not in _DTYPES:
        raise TypeError(
            f"{_OP}: dtype {q.dtype} is not supported (float16, bfloat16 or float32); "
            "use the torch backend for float64"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{_OP}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"{_OP}: head dim {q.shape[-1]} > {_MAX_HEAD_DIM} is not supported")
    device = q.device
    if device.type != "cuda" and not (device.type == "cpu" and _INTERPRET):
        raise ValueError(
            f"{_OP}: tensors on {device} are not supported; it runs on CUDA, or on CPU when "
            "TRITON_INTERPRET=1 is set before triton is imported"
        )
    for name, t in (("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        if t.device != device:
            raise ValueError(f"{_OP}: {name} is on {t.device}, q on {device}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{_OP}: cu_seqlens must have dtype int32, got {cu_seqlens.dtype}")
    if q.shape[1] > _MAX_HEADS:
        raise ValueError(f"{_OP}: {q.shape[1]} heads; at most {_MAX_HEADS}")


def _tiles(tokens: int, samples: int, block: int) -> int:
    """Programs per head: the row's tile count is ``sum(cdiv(length, block)) <= tokens // block + samples``."""
    return tokens // block + samples


def _tile_table(cu_seqlens: torch.Tensor, tokens: int, block: int, chunk: int) -> torch.Tensor:
    """``[_tiles(...), 2]`` int32: the (sample, block) of each tile of ``block`` rows, in row order."""
    samples = cu_seqlens.numel() - 1
    programs = _tiles(tokens, samples, block)
    table = torch.empty((programs, 2), dtype=torch.int32, device=cu_seqlens.device)
    _varlen_attention_tiles_kernel[(programs,)](
        cu_seqlens, samples, table, BLOCK=block, CHUNK=chunk, num_warps=1
    )
    return table


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs are for tests and oracles: exact fp32 products rather than TF32's 10-bit mantissa.
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward(q, k, v, cu_seqlens, max_seqlen: int, causal: bool, scale: float):
    _check(q, k, v, cu_seqlens)
    result = _like(q)
    out = result[1]
    tokens, heads, head_dim = q.shape
    lse = torch.empty((heads, tokens), dtype=torch.float32, device=q.device)
    samples = cu_seqlens.numel() - 1
    if tokens == 0 or samples == 0:
        return result[0], lse
    q, k, v, cu_seqlens = _unit_last(q), _unit_last(k), _unit_last(v), cu_seqlens.contiguous()
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16
    config = _config(block_d, _INTERPRET)
    blocks = config.forward
    tiles = _tile_table(cu_seqlens, tokens, blocks.m, config.chunk)
    _varlen_attention_fwd_kernel[(tiles.shape[0], heads)](
        q, k, v, out, lse, cu_seqlens, tiles, samples,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        scale * _LOG2E,
        GROUPS=heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=blocks.m, BLOCK_N=blocks.n,
        CAUSAL=causal, PRECISION=_precision(q.dtype), num_warps=blocks.warps, num_stages=blocks.stages,
    )  # fmt: skip
    return (*_settle(result), lse)


def _backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen: int, causal: bool, scale: float):
    _check(q, k, v, cu_seqlens)
    results = _like(q), _like(k), _like(v)
    dq, dk, dv = (buffer for _, buffer in results)
    tokens, heads, head_dim = q.shape
    samples = cu_seqlens.numel() - 1
    if tokens == 0 or samples == 0:
        return _settle(*results)
    q, k, v, out, dout = (_unit_last(t) for t in (q, k, v, out, dout))
    lse, cu_seqlens = lse.contiguous(), cu_seqlens.contiguous()
    block_d = max(16, triton.next_power_of_2(head_dim))
    config = _config(block_d, _INTERPRET)
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    precision = _precision(q.dtype)

    delta = torch.empty_like(lse)
    pre = config.preprocess
    _varlen_attention_bwd_preprocess_kernel[(triton.cdiv(tokens, pre.m), heads)](
        out, dout, delta, tokens, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=pre.m, num_warps=pre.warps, num_stages=pre.stages,
    )  # fmt: skip

    blocks = config.dkdv
    key_tiles = _tile_table(cu_seqlens, tokens, blocks.n, config.chunk)
    _varlen_attention_bwd_dkdv_kernel[(key_tiles.shape[0], kv_heads)](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens, key_tiles, samples,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
        scale * _LOG2E, scale,
        GROUPS=groups, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=blocks.m, BLOCK_N=blocks.n,
        CAUSAL=causal, PRECISION=precision, num_warps=blocks.warps, num_stages=blocks.stages,
    )  # fmt: skip

    blocks = config.dq
    # The dK/dV kernel's list serves when its key tiles are as tall as these query tiles (the GPU's are).
    query_tiles = (
        key_tiles if blocks.m == config.dkdv.n else _tile_table(cu_seqlens, tokens, blocks.m, config.chunk)
    )
    _varlen_attention_bwd_dq_kernel[(query_tiles.shape[0], heads)](
        q, k, v, dout, lse, delta, dq, cu_seqlens, query_tiles, samples,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
        scale * _LOG2E, scale,
        GROUPS=groups, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=blocks.m, BLOCK_N=blocks.n,
        CAUSAL=causal, PRECISION=precision, num_warps=blocks.warps, num_stages=blocks.stages,
    )  # fmt: skip
    return _settle(*results)


# ---------------------------------------------------------------------------------------------------------------
# Backend object (the op's torch.library wrapper in llavamed_fast/ops/_library.py saves for backward)


class TritonVarlenAttention:
    """The ``triton`` backend of ``llavamed_fast::varlen_attention``.

    ``q [T, H, D]``, ``k/v [T, H_kv, D]`` (``H % H_kv == 0``; float16, bfloat16 or float32; ``D <= 128``),
    ``cu_seqlens [S + 1]`` int32 with ``cu_seqlens[S] == T``; ``max_seqlen`` (the longest sample) is not
    needed here, the programs find their tiles in ``cu_seqlens``. Rows are computed in fp32 and written in
    the input dtype; ``lse [H, T]`` is float32.
    """

    @staticmethod
    def forward(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        causal: bool,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _forward(q, k, v, cu_seqlens, int(max_seqlen), bool(causal), float(scale))

    @staticmethod
    def backward(
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        causal: bool,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _backward(dout, q, k, v, out, lse, cu_seqlens, int(max_seqlen), bool(causal), float(scale))
