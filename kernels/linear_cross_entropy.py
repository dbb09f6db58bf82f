"""LM head + cross-entropy over supervised tokens only, without the full ``[tokens, vocab]`` logits.

The Triton backend of ``llavamed_fast::linear_cross_entropy`` (contract in ``llavamed_fast/ops/_library.py``,
definition in ``reference.linear_cross_entropy_forward``). Following Liger-Kernel's fused linear
cross-entropy, the loss is the last layer, so its gradients are computed in the same pass as the loss and
autograd later only scales them by the output gradient:

1. gather the supervised rows (``labels != ignore_index``, ~30 % of the tokens of a conversation): no
   GEMM, softmax or gradient work is spent on the others;
2. for each chunk of gathered rows: ``logits = rows @ weight.T`` with float32 output (a bf16/fp16 GEMM with
   float32 output on CUDA; float32 operands on the CPU, where torch has no mixed-precision GEMM);
3. one Triton program per row streams the vocabulary twice: an online max / log-sum-exp, the loss term
   ``lse - logit[target]`` and, when a gradient is wanted, ``softmax - onehot`` written over the logits
   (in place for float32/float64 inputs; into a buffer of the input dtype for fp16/bf16, which is what the
   following GEMMs read);
4. ``dhidden[rows] = dlogits @ weight`` and ``dweight += dlogits.T @ rows`` (float32 accumulator across
   chunks, cast to the weight's dtype at the end), each only where asked for.

The ``1 / n_supervised`` of ``mean`` is applied after the GEMMs in float32 (GEMM ``alpha`` for dweight,
an epilogue multiply for dhidden) rather than inside the kernel: scaled by ``1 / n``, the probabilities of
a 32000-word vocabulary fall far below fp16's smallest normal number (6e-5) and would flush to zero in an
fp16 gradient buffer; unscaled, they round the same way whatever ``n`` is.
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
def _cross_entropy_rows_kernel(
    logits_ptr,
    grad_ptr,
    targets_ptr,
    loss_ptr,
    n_vocab,
    logits_stride,
    grad_stride,
    BLOCK_V: tl.constexpr,
    HAS_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_stride
    dtype = logits_ptr.dtype.element_ty  # float32, or float64 for float64 inputs
    cols = tl.arange(0, BLOCK_V)
    # The target's logit, read before anything is written: the gradient pass may overwrite it in place.
    target = tl.load(targets_ptr + row)
    target_logit = tl.load(logits_ptr + target)

    # Online log-sum-exp: a running max and the sum of exp(logit - max), rescaled when the max grows.
    m = tl.full([], float("-inf"), dtype)
    s = tl.full([], 0.0, dtype)
    for start in range(0, n_vocab, BLOCK_V):
        x = tl.load(logits_ptr + start + cols, mask=start + cols < n_vocab, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    tl.store(loss_ptr + row, lse - target_logit)

    if HAS_GRAD:
        # The warps run apart: without this barrier one could write the target's gradient over its logit
        # (in place, float32/float64) before the thread that reads target_logit has read it.
        tl.debug_barrier()
        grad_ptr += row * grad_stride
        for start in range(0, n_vocab, BLOCK_V):
            offs = start + cols
            mask = offs < n_vocab
            x = tl.load(logits_ptr + offs, mask=mask, other=0.0)
            g = tl.exp(x - lse) - tl.where(offs == target, 1.0, 0.0)
            tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss: torch.Tensor,
    grad: torch.Tensor | None,
    block_v: int | None = None,
) -> None:
    """Per row of ``logits [R, V]``: ``loss[r] = logsumexp - logits[r, targets[r]]`` and, when ``grad`` is
    given (``[R, V]``, may be ``logits`` itself), ``grad[r] = softmax(logits[r]) - onehot(targets[r])``."""
    rows, vocab = logits.shape
    block_v = block_v or min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    out = logits if grad is None else grad
    _cross_entropy_rows_kernel[(rows,)](
        logits,
        out,
        targets,
        loss,
        vocab,
        logits.stride(0),
        out.stride(0),
        BLOCK_V=block_v,
        HAS_GRAD=grad is not None,
        num_warps=min(32, max(4, block_v // 1024)),
    )


def _chunk_rows(tokens: int, hidden: int, vocab: int) -> int:
    # Only one chunk's logits (float32, plus their fp16/bf16 gradient on CUDA) are alive at a time. Bound
    # them, as Liger-Kernel does, by the size the hidden states already have: rows * V ~ T * H elements,
    # i.e. T / ceil(V / H) rows, rounded up to a power of two (full GEMM tiles, few distinct shapes).
    # Worked example, a LLaMA-7B head: V = 32000, H = 4096, T = 8192 tokens, 30 % supervised (2458 rows):
    # ceil(32000 / 4096) = 8, 8192 / 8 = 1024 rows -> 3 chunks; a chunk's logits are 1024 x 32000 x 4 B =
    # 131 MB (+ 66 MB for its bf16 gradient), against 1.05 GB for the full float32 logits [8192, 32000].
    return triton.next_power_of_2(triton.cdiv(tokens, triton.cdiv(vocab, hidden)))


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
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The loss and its gradients for a unit output gradient (see the module docstring).

    ``chunk_rows`` (supervised rows per chunk) and ``block_v`` (vocabulary block of the row kernel)
    default to the derived values; tests set them small to exercise chunking and masking.
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
        # The one host sync: the number of supervised rows sizes the gather and the chunks, and the
        # targets' range is checked in the same round trip. An out-of-range target would make the kernel
        # read outside its row, so it is an error rather than a clamp.
        picked = labels.masked_fill(~supervised, 0)
        n, lowest, highest = torch.stack([supervised.sum(), picked.min(), picked.max()]).tolist()
    if lowest < 0 or highest >= vocab:
        bad = supervised & ((labels < 0) | (labels >= vocab))
        position = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels[{position}] = {int(labels[position])} is not a token id in [0, {vocab}) nor "
            f"ignore_index ({ignore_index})"
        )

    dhidden = torch.zeros_like(hidden) if need_dhidden else None
    if n == 0:  # nothing supervised: loss 0 (also for "mean") and zero gradients, no launch
        dweight = torch.zeros_like(weight) if need_dweight else None
        return hidden.new_zeros((), dtype=loss_dtype), dhidden, dweight

    index = torch.nonzero_static(supervised, size=n).squeeze(1)
    rows = hidden.index_select(0, index).to(operands)
    targets = labels.index_select(0, index)
    w = weight.to(operands)
    scale = 1.0 / n if reduction == "mean" else 1.0
    # The dweight accumulator: the output itself when the weight is float32/float64, else float32.
    acc = None
    if need_dweight:
        acc = torch.zeros_like(weight, dtype=compute)
    row_loss = torch.empty(n, dtype=compute, device=hidden.device)

    chunk = min(n, chunk_rows or _chunk_rows(tokens, width, vocab))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows_c = rows[start:stop]
        logits = _mm(rows_c, w.t(), compute)
        grad = None
        if need_dhidden or need_dweight:
            grad = logits if operands == compute else torch.empty_like(logits, dtype=operands)
        _cross_entropy_rows(logits, targets[start:stop], row_loss[start:stop], grad, block_v)
        if need_dhidden:
            part = _mm(grad, w, compute).mul_(scale)
            dhidden.index_copy_(0, index[start:stop], part.to(hidden.dtype))
            del part
        if need_dweight:
            _addmm_(acc, grad.t(), rows_c, alpha=scale)
        # Free this chunk's [rows, V] buffers before the next chunk allocates its own.
        del logits, grad

    loss = (row_loss.sum() * scale).to(loss_dtype)
    dweight = None
    if need_dweight:
        dweight = acc if acc.dtype == weight.dtype else acc.to(weight.dtype)
    return loss, dhidden, dweight


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
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        return linear_cross_entropy_forward(
            hidden, weight, labels, ignore_index, reduction, bool(needs[0]), bool(needs[1])
        )
