"""LM head + cross-entropy over supervised tokens only, without the full ``[tokens, vocab]`` logits.

The Triton backend of ``llavamed_fast::linear_cross_entropy`` (contract in ``llavamed_fast/ops/_library.py``,
definition in ``reference.linear_cross_entropy_forward``). Following Liger-Kernel's fused linear
cross-entropy, the loss is the last layer, so its gradients are computed in the same call as the loss and
autograd later only scales them by the output gradient. First the supervised rows are gathered
(``labels != ignore_index``, ~30 % of the tokens of a conversation): no GEMM, softmax or gradient work is
spent on the others. Then one of two schedules:

- **Rows in chunks** (the LM head needs no gradient: stage 1, evaluation). For each chunk of rows:
  ``logits = rows @ weight.T`` with float32 output (a bf16/fp16 GEMM with float32 output on CUDA; float32
  operands on the CPU, where torch has no mixed-precision GEMM); a Triton program per row streams its
  logits for the log-sum-exp, a second writes ``softmax - onehot`` over them (in place for float32/float64
  inputs, into a buffer of the input dtype for fp16/bf16, which is what the next GEMM reads); then
  ``dhidden[rows] = dlogits @ weight``.
- **Vocabulary in blocks** (the LM head is trained: stage 2). Chunking the rows would leave ``dweight``
  as a sum over chunks, i.e. a float32 ``[vocab, hidden]`` accumulator (500 MiB for LLaMA-7B's head) next
  to the gradient itself. Blocking the vocabulary instead gives each block of ``dweight`` in one GEMM over
  all supervised rows, accumulated in float32 inside the GEMM and rounded once, straight into the output.
  The price is a second pass: pass 1 computes each block's logits for the running log-sum-exp of every
  row, pass 2 computes them again for ``softmax - onehot``, ``dweight[block] = dlogits.T @ rows`` and a
  float32 ``dhidden`` accumulator (``[rows, hidden]``, small). Pass 2 walks the blocks backwards and starts
  with the logits pass 1 ended on, so one block is not recomputed: 3 + (blocks - 1) / blocks GEMMs of
  ``rows x vocab x hidden`` instead of 3.

The ``1 / n_supervised`` of ``mean`` is applied after the GEMMs in float32 (GEMM ``alpha``, or an epilogue
multiply) rather than inside the kernels: scaled by ``1 / n``, the probabilities of a 32000-word vocabulary
fall far below fp16's smallest normal number (6e-5) and would flush to zero in an fp16 gradient buffer;
unscaled, they round the same way whatever ``n`` is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A [32768] float32 block is 32 values per thread at 32 warps, Liger-Kernel's choice for its cross-entropy
# kernel on A100/H100; larger blocks spill registers. Not yet tuned here.
MAX_BLOCK_V = 32768

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _linear_cross_entropy_lse_kernel(
    logits_ptr,
    targets_ptr,
    max_ptr,
    sum_ptr,
    target_logit_ptr,
    col_start,
    n_cols,
    logits_stride,
    BLOCK_V: tl.constexpr,
):
    """Row ``r`` of a ``[rows, n_cols]`` logits block holds vocabulary columns ``col_start ..``: fold them
    into the row's running max and sum of ``exp(logit - max)``, and keep the target's logit if it is here."""
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_stride
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row) - col_start
    if (target >= 0) & (target < n_cols):
        tl.store(target_logit_ptr + row, tl.load(logits_ptr + target))
    # Online log-sum-exp: the sum is rescaled whenever the max grows. A block has at least one finite
    # logit, so after it the max is finite and exp(-inf - max) of a first block is 0.
    m = tl.load(max_ptr + row)
    s = tl.load(sum_ptr + row)
    for start in range(0, n_cols, BLOCK_V):
        x = tl.load(logits_ptr + start + cols, mask=start + cols < n_cols, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    tl.store(max_ptr + row, m)
    tl.store(sum_ptr + row, s)


@triton.jit
def _linear_cross_entropy_grad_kernel(
    logits_ptr,
    grad_ptr,
    targets_ptr,
    lse_ptr,
    col_start,
    n_cols,
    logits_stride,
    grad_stride,
    BLOCK_V: tl.constexpr,
):
    """``grad = exp(logit - lse) - onehot(target)`` over a logits block (``grad`` may be ``logits``: each
    element is read and then written by the same thread)."""
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_stride
    grad_ptr += row * grad_stride
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row) - col_start
    lse = tl.load(lse_ptr + row)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        x = tl.load(logits_ptr + offs, mask=mask, other=0.0)
        g = tl.exp(x - lse) - tl.where(offs == target, 1.0, 0.0)
        tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _launch_shape(n_cols: int, block_v: int | None) -> tuple[int, int]:
    block_v = block_v or min(MAX_BLOCK_V, triton.next_power_of_2(n_cols))
    return block_v, min(32, max(4, block_v // 1024))


def _logsumexp_update(
    logits: torch.Tensor,
    targets: torch.Tensor,
    running_max: torch.Tensor,
    running_sum: torch.Tensor,
    target_logit: torch.Tensor,
    col_start: int,
    block_v: int | None = None,
) -> None:
    """Fold ``logits [R, C]`` (vocabulary columns ``col_start ..``) into the rows' running log-sum-exp."""
    rows, n_cols = logits.shape
    block_v, warps = _launch_shape(n_cols, block_v)
    _linear_cross_entropy_lse_kernel[(rows,)](
        logits,
        targets,
        running_max,
        running_sum,
        target_logit,
        col_start,
        n_cols,
        logits.stride(0),
        BLOCK_V=block_v,
        num_warps=warps,
    )


def _softmax_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    col_start: int,
    block_v: int | None = None,
) -> None:
    """``grad [R, C] = softmax - onehot`` for vocabulary columns ``col_start ..`` (``grad`` may be ``logits``)."""
    rows, n_cols = logits.shape
    block_v, warps = _launch_shape(n_cols, block_v)
    _linear_cross_entropy_grad_kernel[(rows,)](
        logits,
        grad,
        targets,
        lse,
        col_start,
        n_cols,
        logits.stride(0),
        grad.stride(0),
        BLOCK_V=block_v,
        num_warps=warps,
    )


def _chunk_rows(tokens: int, hidden: int, vocab: int) -> int:
    # Only one chunk's logits (float32, plus their fp16/bf16 gradient on CUDA) are alive at a time. Bound
    # them, as Liger-Kernel does, by the size the hidden states already have: rows * V ~ T * H elements,
    # i.e. T / ceil(V / H) rows, rounded up to a power of two (full GEMM tiles, few distinct shapes).
    # Worked example, a LLaMA-7B head: V = 32000, H = 4096, T = 8192 tokens, 30 % supervised (2458 rows):
    # ceil(32000 / 4096) = 8, 8192 / 8 = 1024 rows -> 3 chunks; a chunk's logits are 1024 x 32000 x 4 B =
    # 131 MB (+ 66 MB for its bf16 gradient), against 1.05 GB for the full float32 logits [8192, 32000].
    return triton.next_power_of_2(triton.cdiv(tokens, triton.cdiv(vocab, hidden)))


def _vocab_cols(tokens: int, hidden: int, rows: int, vocab: int) -> int:
    # Vocabulary columns per block when the head is trained. A block's float32 logits and fp16/bf16
    # gradient (6 B per element, all supervised rows) are bounded by a quarter of the hidden states'
    # elements, T * H / 4: the dweight the call returns is already V * H, so the workspace stays a small
    # part of the call's memory. Multiples of 256 keep the GEMM tiles full.
    # Worked example, a LLaMA-7B head: T = 16384, H = 4096, 30 % supervised (4965 rows): 16.8M / 4965 =
    # 3379 -> 3328 columns, 10 blocks; a block is 4965 x 3328 x 6 B = 99 MB.
    cols = (tokens * hidden // 4) // max(rows, 1) // 256 * 256
    return min(vocab, max(256, cols))


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` accumulated and returned in ``out_dtype`` (float32 for fp16/bf16 operands)."""
    if a.dtype == out_dtype:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=out_dtype)  # cuBLAS fp16/bf16 -> fp32 (torch >= 2.8)
    return torch.mm(a.to(out_dtype), b.to(out_dtype))  # the CPU has no mixed-precision GEMM


def _addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """``acc += alpha * a @ b``, accumulated in ``acc``'s dtype (float32 for fp16/bf16 operands)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, alpha=alpha)
    elif a.is_cuda:
        # An fp32 `self` with bf16/fp16 operands is accepted since torch 2.10 (pytorch#167931).
        torch.addmm(acc, a, b, out_dtype=acc.dtype, alpha=alpha, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype), alpha=alpha)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """``out = alpha * a @ b`` (``out`` may be a view), accumulated in float32 at least, rounded once."""
    if a.is_cuda or a.dtype not in (torch.float16, torch.bfloat16):
        # cuBLAS accumulates fp16/bf16 in float32 and applies alpha before rounding; beta = 0 ignores
        # whatever `out` held (it may be uninitialised).
        torch.addmm(out, a, b, beta=0, alpha=alpha, out=out)
    else:
        out.copy_(torch.mm(a.float(), b.float()).mul_(alpha))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    reduction: str,
    need_dhidden: bool,
    need_dweight: bool,
    *,
    chunk_rows: int | None = None,
    vocab_cols: int | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The loss and its gradients for a unit output gradient (see the module docstring), as
    ``(loss, dhidden_rows, rows, dweight)``: the hidden-state gradient of the supervised rows only, at
    positions ``rows`` (the others are zero), and the weight gradient; None where not asked for.

    ``chunk_rows`` (supervised rows per chunk, when the weight needs no gradient), ``vocab_cols``
    (vocabulary columns per block, when it does) and ``block_v`` (columns per step of the row kernels)
    default to the derived values; tests set them small to exercise the blocking and the masking.
    """
    _check(hidden.dim() == 2 and weight.dim() == 2, "hidden must be [T, H] and weight [V, H]")
    _check(
        hidden.shape[1] == weight.shape[1],
        f"hidden width {hidden.shape[1]} != weight width {weight.shape[1]}",
    )
    _check(
        weight.shape[0] > 0,
        f"weight {tuple(weight.shape)} has no vocabulary rows (a ZeRO-3 parameter that was not gathered?)",
    )
    _check(
        hidden.dtype in _FLOATS and weight.dtype in _FLOATS,
        f"hidden and weight must be float16/bfloat16/float32/float64, got {hidden.dtype} and {weight.dtype}",
    )
    _check(labels.dtype == torch.int64, f"labels must be int64, got {labels.dtype}")
    _check(
        labels.shape == hidden.shape[:1],
        f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}",
    )
    _check(
        hidden.device == weight.device == labels.device,
        f"hidden, weight and labels must be on one device, got {hidden.device}, {weight.device}, {labels.device}",
    )
    _check(reduction in ("mean", "sum"), f"reduction must be 'mean' or 'sum', got {reduction!r}")

    tokens, width = hidden.shape
    vocab = weight.shape[0]
    loss_dtype = torch.promote_types(hidden.dtype, torch.float32)
    operands = torch.promote_types(hidden.dtype, weight.dtype)  # the GEMMs' input dtype
    compute = torch.promote_types(operands, torch.float32)  # logits, softmax and accumulation

    supervised = labels != ignore_index
    n, lowest, highest = 0, 0, 0
    if tokens:
        # The one host sync: the number of supervised rows sizes the gather and the blocks, and the
        # targets' range is checked in the same round trip. An out-of-range target would never be found
        # in any block (a loss without its target term), so it is an error rather than a clamp.
        picked = labels.masked_fill(~supervised, 0)
        n, lowest, highest = torch.stack([supervised.sum(), picked.min(), picked.max()]).tolist()
    if lowest < 0 or highest >= vocab:
        bad = supervised & ((labels < 0) | (labels >= vocab))
        position = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels[{position}] = {int(labels[position])} is not a token id in [0, {vocab}) nor "
            f"ignore_index ({ignore_index})"
        )

    index = torch.nonzero_static(supervised, size=n).squeeze(1)
    dhidden = hidden.new_empty((n, width)) if need_dhidden else None
    if n == 0:  # nothing supervised: loss 0 (also for "mean") and zero gradients, no launch
        dweight = torch.zeros_like(weight) if need_dweight else None
        return hidden.new_zeros((), dtype=loss_dtype), dhidden, index if need_dhidden else None, dweight

    rows = hidden.index_select(0, index).to(operands)
    targets = labels.index_select(0, index)
    w = weight.to(operands)
    scale = 1.0 / n if reduction == "mean" else 1.0
    # Per row: the running max and sum of the log-sum-exp, and the target's logit.
    running_max = torch.full((n,), float("-inf"), dtype=compute, device=hidden.device)
    running_sum = torch.zeros(n, dtype=compute, device=hidden.device)
    target_logit = torch.empty(n, dtype=compute, device=hidden.device)

    def grad_buffer(logits: torch.Tensor) -> torch.Tensor:
        return logits if operands == compute else torch.empty_like(logits, dtype=operands)

    dweight = None
    if not need_dweight:
        chunk = min(n, chunk_rows or _chunk_rows(tokens, width, vocab))
        for start in range(0, n, chunk):
            part = slice(start, min(start + chunk, n))
            logits = _mm(rows[part], w.t(), compute)
            _logsumexp_update(
                logits, targets[part], running_max[part], running_sum[part], target_logit[part], 0, block_v
            )
            if need_dhidden:
                lse = running_max[part] + running_sum[part].log()
                grad = grad_buffer(logits)
                _softmax_grad(logits, targets[part], lse, grad, 0, block_v)
                dhidden[part] = _mm(grad, w, compute).mul_(scale)
                del grad
            # Free this chunk's [rows, V] buffers before the next chunk allocates its own.
            del logits
    else:
        cols = min(vocab, vocab_cols or _vocab_cols(tokens, width, n, vocab))
        blocks = [slice(start, min(start + cols, vocab)) for start in range(0, vocab, cols)]
        logits = None
        for block in blocks:  # pass 1: the log-sum-exp of every row
            del logits
            logits = _mm(rows, w[block].t(), compute)
            _logsumexp_update(logits, targets, running_max, running_sum, target_logit, block.start, block_v)
        lse = running_max + running_sum.log()
        dweight = torch.empty_like(weight, dtype=operands)
        acc = torch.zeros((n, width), dtype=compute, device=hidden.device) if need_dhidden else None
        for block in reversed(blocks):  # pass 2: the gradients; the last block's logits are still here
            if logits is None:
                logits = _mm(rows, w[block].t(), compute)
            grad = grad_buffer(logits)
            _softmax_grad(logits, targets, lse, grad, block.start, block_v)
            del logits
            logits = None
            if need_dhidden:
                _addmm_(acc, grad, w[block], alpha=1.0)
            _mm_into(dweight[block], grad.t(), rows, alpha=scale)
            del grad
        if need_dhidden:
            dhidden.copy_(acc.mul_(scale))
        if dweight.dtype != weight.dtype:
            dweight = dweight.to(weight.dtype)

    loss = ((running_max + running_sum.log() - target_logit).sum() * scale).to(loss_dtype)
    return loss, dhidden, index if need_dhidden else None, dweight


class TritonLinearCrossEntropy:
    """``linear_cross_entropy`` backend ``triton``: the loss and, where ``needs`` asks, its gradients."""

    @staticmethod
    def forward(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        ignore_index: int,
        reduction: str,
        needs: list[bool],
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        return linear_cross_entropy_forward(
            hidden, weight, labels, ignore_index, reduction, bool(needs[0]), bool(needs[1])
        )
