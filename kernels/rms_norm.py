"""RMSNorm, forward and backward, one pass over the rows each.

The Triton backend of ``llavamed_fast::rms_norm`` (contract in ``llavamed_fast/ops/_library.py``, definition
in ``reference.rms_norm``, which is transformers' LLaMA/Mistral/Qwen2 RMSNorm). transformers computes it
as six elementwise kernels and a reduction, each a trip through memory in float32, and autograd saves a
float32 copy of the input: about ten times the traffic of reading the input and writing the output once.
Here the forward reads a row, reduces it and writes the output and the row's ``1/rms`` (float32, 4 bytes a
row); the backward reads the input, the output gradient and ``1/rms`` and writes the input gradient. In a
decoder layer the norm's input is also the residual stream, whose gradient autograd would add to the
norm's input gradient in a pass of its own (two reads, one write); given that gradient, the backward adds it
to the row before writing it (``ops.residual_rms_norm``).

Rounding follows transformers: the normalized row is rounded to the input dtype before the weight
multiplies it, so the output matches it up to the order of the sum of squares and the ulp or two of
the reciprocal square root. The weight
gradient is summed in float32 per program over a contiguous block of rows (``[programs, D]`` partials),
then the partials are added in a fixed order: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Programs of the backward: each sums the weight gradient of a contiguous block of rows. A few per SM
# keeps every SM busy for the reads; more would only grow the partials.
_BACKWARD_PROGRAMS_PER_SM = 4


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    rstd_ptr,
    n_cols,
    x_stride,
    y_stride,
    eps,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    # float32 (float64 for float64 inputs): the host chose rstd's dtype as the compute dtype.
    compute = x.to(rstd_ptr.dtype.element_ty)
    rstd = 1.0 / tl.sqrt(tl.sum(compute * compute, axis=0) / n_cols + eps)
    normed = (compute * rstd).to(x.dtype)  # rounded to the input dtype, as transformers does
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = w.to(compute.dtype) * normed.to(compute.dtype)
    tl.store(y_ptr + row * y_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_backward_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dres_ptr,
    dx_ptr,
    dw_partial_ptr,
    n_rows,
    n_cols,
    rows_per_program,
    dy_stride,
    x_stride,
    dres_stride,
    dx_stride,
    HAS_DRES: tl.constexpr,
    NEEDS_DW: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rows ``pid * rows_per_program ..``: ``dx = rstd * (g - xhat * mean(g * xhat)) (+ dres)`` with
    ``g = dy * w``, and this block's ``sum(dy * round(xhat))`` into row ``pid`` of the weight-gradient
    partials."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < n_cols
    compute_type = rstd_ptr.dtype.element_ty  # the forward's compute dtype
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(compute_type)
    dw = tl.zeros((BLOCK_D,), dtype=compute_type)
    first = pid.to(tl.int64) * rows_per_program  # 64-bit row indices, hence offsets
    last = tl.minimum(first + rows_per_program, n_rows)
    for row64 in range(first, last):
        x_raw = tl.load(x_ptr + row64 * x_stride + cols, mask=mask, other=0.0)
        x = x_raw.to(compute_type)
        dy = tl.load(dy_ptr + row64 * dy_stride + cols, mask=mask, other=0.0).to(compute_type)
        if HAS_DRES:  # the residual stream's gradient, loaded with the others so the loads overlap the sum
            dres = tl.load(dres_ptr + row64 * dres_stride + cols, mask=mask, other=0.0).to(compute_type)
        rstd = tl.load(rstd_ptr + row64).to(compute_type)
        xhat = x * rstd
        g = dy * w
        mean_gx = tl.sum(g * xhat, axis=0) / n_cols
        dx = (g - xhat * mean_gx) * rstd
        if HAS_DRES:  # added before the one rounding to the output dtype
            dx += dres
        tl.store(dx_ptr + row64 * dx_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEEDS_DW:
            dw += dy * xhat.to(x_raw.dtype).to(compute_type)
    if NEEDS_DW:
        tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


def _warps(block: int) -> int:
    """Warps for a row of ``block`` columns: 8 values a thread in the forward's one-row programs."""
    return min(16, max(1, block // 256))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` as ``[N, D]`` with unit column stride (a view where it can be one)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dtype not in _FLOATS or weight.dtype not in _FLOATS:
        raise TypeError(f"rms_norm takes floating tensors, got {x.dtype} and {weight.dtype}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match rows of width {x.shape[-1]}")


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)``: ``y`` like ``x`` in ``promote(x.dtype, weight.dtype)``, ``rstd [N]`` float32
    (float64 for float64 inputs) over the ``N`` rows of ``x``."""
    _check(x, weight)
    rows = _rows(x)
    compute = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(rows.shape[0], dtype=compute, device=x.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(rows.shape[1])
        _rms_norm_forward_kernel[(rows.shape[0],)](
            rows,
            weight.contiguous(),
            y.view(-1, rows.shape[1]),
            rstd,
            rows.shape[1],
            rows.stride(0),
            rows.shape[1],
            float(eps),
            BLOCK_D=block,
            num_warps=_warps(block),
        )
    return y, rstd


def _programs(device: torch.device, n_rows: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, _BACKWARD_PROGRAMS_PER_SM * sms))
    return max(1, min(n_rows, 4))  # the interpreter: a few blocks exercise the partial sums


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    needs_weight_grad: bool,
    dresidual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dx, dweight)``; ``dweight`` is None unless asked for. ``dresidual`` (like ``x``), if given, is
    added to ``dx``."""
    rows = _rows(x)
    grads = _rows(dy)
    if dresidual is not None and dresidual.shape != x.shape:
        raise ValueError(f"residual gradient {tuple(dresidual.shape)} does not match x {tuple(x.shape)}")
    extra = grads if dresidual is None else _rows(dresidual)  # a placeholder pointer when there is none
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows, n_cols = rows.shape
    programs = _programs(x.device, n_rows)
    per_program = -(-n_rows // programs) if n_rows else 0
    partial = torch.empty(
        (programs, n_cols) if needs_weight_grad else (0,), dtype=rstd.dtype, device=x.device
    )
    if n_rows:
        block = triton.next_power_of_2(n_cols)
        _rms_norm_backward_kernel[(programs,)](
            grads,
            rows,
            weight.contiguous(),
            rstd,
            extra,
            dx.view(-1, n_cols),
            partial,
            n_rows,
            n_cols,
            per_program,
            grads.stride(0),
            rows.stride(0),
            extra.stride(0),
            n_cols,
            HAS_DRES=dresidual is not None,
            NEEDS_DW=needs_weight_grad,
            BLOCK_D=block,
            num_warps=_warps(block),
        )
    if not needs_weight_grad:
        return dx, None
    if not n_rows:
        return dx, torch.zeros_like(weight)
    return dx, partial.sum(0).to(weight.dtype)


class TritonRmsNorm:
    """``rms_norm`` backend ``triton``."""

    forward = staticmethod(rms_norm_forward)
    backward = staticmethod(rms_norm_backward)
