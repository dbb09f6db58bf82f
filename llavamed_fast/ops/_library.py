"""torch.library registration of the ops, so that autograd and ``torch.compile`` see them as units.

Each differentiable op is a pair of custom ops, ``llavamed_fast::<op>`` and ``llavamed_fast::<op>_backward``,
with the chosen backend passed as a string argument. The autograd formula of the forward op calls the
backward op, so a compiled graph holds both as opaque nodes whatever the backend. A backend provides an
object with ``forward`` and ``backward`` functions following the op's contract below.
"""

from __future__ import annotations

import torch

from llavamed_fast.ops import reference
from llavamed_fast.ops.registry import REGISTRY


def _kernels(op: str, backend: str):
    return REGISTRY.implementation(op, backend)


def _empty(like: torch.Tensor) -> torch.Tensor:
    # Stands for "no gradient" in the tuple outputs of ops, which cannot hold None (same device as the rest).
    return like.new_empty(0)


# ---------------------------------------------------------------------------------------------------------------
# varlen_attention: forward -> (out [T, H, D], lse [H, T] float32, float64 for float64 inputs); backward -> (dq, dk, dv)


@torch.library.custom_op("llavamed_fast::varlen_attention", mutates_args=())
def varlen_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _kernels("varlen_attention", backend).forward(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    return out, lse


@varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, scale, backend):
    return torch.empty_like(q), q.new_empty(
        (q.shape[1], q.shape[0]), dtype=torch.promote_types(q.dtype, torch.float32)
    )


@torch.library.custom_op("llavamed_fast::varlen_attention_backward", mutates_args=())
def varlen_attention_backward_op(
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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _kernels("varlen_attention", backend).backward(
        dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale
    )
    return dq, dk, dv


@varlen_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _varlen_attention_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.args = (max_seqlen, causal, scale, backend)


def _varlen_attention_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = varlen_attention_backward_op(dout.contiguous(), q, k, v, out, lse, cu_seqlens, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


varlen_attention_op.register_autograd(_varlen_attention_backward, setup_context=_varlen_attention_setup)


class TorchVarlenAttention:
    forward = staticmethod(reference.varlen_attention)
    backward = staticmethod(reference.varlen_attention_backward)


# ---------------------------------------------------------------------------------------------------------------
# projector: forward -> (y, activations): y is [N, P, D], or embeds [T, D] with the image rows replaced;
# activations are the GELU's input and output [2, N, P, D1] kept for the backward (empty for the linear
# projector).
# backward -> (dx, dw1, db1, dw2, db2, dembeds), an empty tensor where no gradient is wanted or the input is absent


@torch.library.custom_op("llavamed_fast::projector", mutates_args=())
def projector_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
    embeds: torch.Tensor | None,
    image_offsets: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    y, activations = _kernels("projector", backend).forward(x, w1, b1, w2, b2, embeds, image_offsets)
    return y, activations


@projector_op.register_fake
def _(x, w1, b1, w2, b2, embeds, image_offsets, backend):
    activations = x.new_empty((2, *x.shape[:-1], w1.shape[0]) if w2 is not None else (0,))
    if embeds is not None:
        return torch.empty_like(embeds), activations
    width = (w2 if w2 is not None else w1).shape[0]
    return x.new_empty((*x.shape[:-1], width)), activations


@torch.library.custom_op("llavamed_fast::projector_backward", mutates_args=())
def projector_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
    embeds: torch.Tensor | None,
    image_offsets: torch.Tensor | None,
    activations: torch.Tensor,
    needs: list[bool],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _kernels("projector", backend).backward(
        dy, x, w1, b1, w2, b2, embeds, image_offsets, activations, needs
    )
    return tuple(_empty(dy) if g is None else g for g in grads)


@projector_backward_op.register_fake
def _(dy, x, w1, b1, w2, b2, embeds, image_offsets, activations, needs, backend):
    inputs = (x, w1, b1, w2, b2, embeds)
    return tuple(
        torch.empty_like(t) if need and t is not None else dy.new_empty(0)
        for t, need in zip(inputs, needs, strict=True)
    )


def _projector_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, embeds, image_offsets, backend = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2, embeds, image_offsets, output[1])
    ctx.backend = backend
    # Nothing flows back through the saved activations: no zero [2, N, P, D1] tensor for their gradient.
    ctx.set_materialize_grads(False)


def _projector_backward(ctx, dy, _dactivations):
    if dy is None:  # only the activations output was used: it is not differentiable
        return (None,) * 8
    x, w1, b1, w2, b2, embeds, image_offsets, activations = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:6]]
    grads = projector_backward_op(
        dy.contiguous(), x, w1, b1, w2, b2, embeds, image_offsets, activations, needs, ctx.backend
    )
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)), None, None)


projector_op.register_autograd(_projector_backward, setup_context=_projector_setup)


class TorchProjector:
    forward = staticmethod(reference.projector_forward)
    backward = staticmethod(reference.projector_backward)


# ---------------------------------------------------------------------------------------------------------------
# linear_cross_entropy: forward -> (loss, dhidden_rows, rows, dweight): the scalar loss (float32; float64 for
# float64 inputs) and its gradients for a unit output gradient, computed in the same pass where ``needs``
# asks for them (empty tensors otherwise). The hidden-state gradient is kept for the supervised rows only
# (``dhidden_rows [n, H]``, ``rows [n]`` their positions, int64): the others are zero, and a full [T, H]
# saved for the backward would sit beside the full one the backward returns. The autograd formula only
# scales the gradients by the output gradient (into new tensors: one forward may serve several backwards).


@torch.library.custom_op("llavamed_fast::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    reduction: str,
    needs: list[bool],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, dhidden_rows, rows, dweight = _kernels("linear_cross_entropy", backend).forward(
        hidden, weight, labels, ignore_index, reduction, needs
    )
    if dhidden_rows is None:
        dhidden_rows, rows = _empty(hidden), labels.new_empty(0)
    return loss, dhidden_rows, rows, _empty(weight) if dweight is None else dweight


@linear_cross_entropy_op.register_fake
def _(hidden, weight, labels, ignore_index, reduction, needs, backend):
    loss = hidden.new_empty((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    if needs[0]:
        n = torch.library.get_ctx().new_dynamic_size()  # the number of supervised rows
        dhidden_rows, rows = hidden.new_empty(n, hidden.shape[1]), labels.new_empty(n)
    else:
        dhidden_rows, rows = hidden.new_empty(0), labels.new_empty(0)
    dweight = torch.empty_like(weight) if needs[1] else weight.new_empty(0)
    return loss, dhidden_rows, rows, dweight


def _linear_cross_entropy_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.hidden_shape = inputs[0].shape
    ctx.needs = inputs[5]
    # Nothing flows back through the gradient outputs: no zero tensors of their shapes.
    ctx.set_materialize_grads(False)


def _linear_cross_entropy_backward(ctx, dloss, *_unused):
    dhidden_rows, rows, dweight = ctx.saved_tensors
    dhidden = None
    if ctx.needs[0] and dloss is not None:
        scaled = dhidden_rows * dloss.to(dhidden_rows.dtype)
        dhidden = scaled.new_zeros(ctx.hidden_shape).index_copy_(0, rows, scaled)
    dweight = dweight * dloss.to(dweight.dtype) if ctx.needs[1] and dloss is not None else None
    return dhidden, dweight, None, None, None, None, None


linear_cross_entropy_op.register_autograd(
    _linear_cross_entropy_backward, setup_context=_linear_cross_entropy_setup
)


class TorchLinearCrossEntropy:
    forward = staticmethod(reference.linear_cross_entropy_forward)


# ---------------------------------------------------------------------------------------------------------------
# rms_norm: forward -> (y like x in promote(x, weight) dtype, rstd [N] float32, float64 for float64 inputs: 1/rms
# of each of the N rows); backward -> (dx, dweight), dweight empty unless asked for. The torch backend does not
# come through here: it is reference.rms_norm under autograd.


@torch.library.custom_op("llavamed_fast::rms_norm", mutates_args=())
def rms_norm_op(
    x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    y, rstd = _kernels("rms_norm", backend).forward(x, weight, eps)
    return y, rstd


@rms_norm_op.register_fake
def _(x, weight, eps, backend):
    compute = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)), x.new_empty(
        rows, dtype=compute
    )


@torch.library.custom_op("llavamed_fast::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dresidual: torch.Tensor | None,
    needs_weight_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dweight = _kernels("rms_norm", backend).backward(dy, x, weight, rstd, needs_weight_grad, dresidual)
    return dx, _empty(weight) if dweight is None else dweight


@rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, dresidual, needs_weight_grad, backend):
    return x.new_empty(x.shape), weight.new_empty(weight.shape if needs_weight_grad else (0,))


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _eps, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.backend = backend
    ctx.set_materialize_grads(False)


def _rms_norm_grads(ctx, dy: torch.Tensor, dresidual: torch.Tensor | None):
    """``(dx, dweight, None, None)`` from what ``_rms_norm_setup`` saved, ``dresidual`` added to ``dx``."""
    x, weight, rstd = ctx.saved_tensors
    needs_weight_grad = bool(ctx.needs_input_grad[1])
    if dresidual is not None:
        dresidual = dresidual.contiguous()
    dx, dweight = rms_norm_backward_op(
        dy.contiguous(), x, weight, rstd, dresidual, needs_weight_grad, ctx.backend
    )
    return dx, dweight if needs_weight_grad else None, None, None


def _rms_norm_backward(ctx, dy, _drstd):
    if dy is None:  # only rstd was used: it is not differentiable
        return None, None, None, None
    return _rms_norm_grads(ctx, dy, None)


class ResidualRmsNorm(torch.autograd.Function):
    """``apply(x, weight, eps, backend)`` -> ``(rms_norm(x), x)``: the second output hands the residual stream
    on, and its gradient is added to the input gradient inside the norm's backward kernel.

    A custom op may not return its input, so this is an autograd Function around the two custom ops (a
    compiled graph still sees them as opaque nodes); autograd treats the returned ``x`` as a view of it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str):
        y, rstd = rms_norm_op(x, weight, eps, backend)
        _rms_norm_setup(ctx, (x, weight, eps, backend), (y, rstd))
        return y, x

    @staticmethod
    def backward(ctx, dy: torch.Tensor | None, dresidual: torch.Tensor | None):
        if dy is None:  # only the residual stream was used: its gradient passes through
            return dresidual, None, None, None
        return _rms_norm_grads(ctx, dy, dresidual)


rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


# ---------------------------------------------------------------------------------------------------------------
# swiglu: forward -> silu(gate) * up; backward -> (dgate, dup). The torch backend is reference.swiglu under autograd.


@torch.library.custom_op("llavamed_fast::swiglu", mutates_args=())
def swiglu_op(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    return _kernels("swiglu", backend).forward(gate, up)


@swiglu_op.register_fake
def _(gate, up, backend):
    return gate.new_empty(gate.shape)  # contiguous, as the kernels write it


@torch.library.custom_op("llavamed_fast::swiglu_backward", mutates_args=())
def swiglu_backward_op(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    dgate, dup = _kernels("swiglu", backend).backward(dout, gate, up)
    return dgate, dup


@swiglu_backward_op.register_fake
def _(dout, gate, up, backend):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _swiglu_backward(ctx, dout):
    gate, up = ctx.saved_tensors
    dgate, dup = swiglu_backward_op(dout.contiguous(), gate, up, ctx.backend)
    return dgate, dup, None


swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


# ---------------------------------------------------------------------------------------------------------------
# rotary: forward -> (q_out, k_out) rotated like q [B, T, H, D] and k [B, T, H_kv, D], contiguous; backward -> (dq, dk),
# the transposed rotation of the output gradients. cos and sin [B, T, D] take no gradient (transformers computes
# them without one). The torch backend is reference.rotary under autograd.


@torch.library.custom_op("llavamed_fast::rotary", mutates_args=())
def rotary_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    q_out, k_out = _kernels("rotary", backend).forward(q, k, cos, sin)
    return q_out, k_out


@rotary_op.register_fake
def _(q, k, cos, sin, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("llavamed_fast::rotary_backward", mutates_args=())
def rotary_backward_op(
    dq_out: torch.Tensor, dk_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    dq, dk = _kernels("rotary", backend).backward(dq_out, dk_out, cos, sin)
    return dq, dk


@rotary_backward_op.register_fake
def _(dq_out, dk_out, cos, sin, backend):
    return dq_out.new_empty(dq_out.shape), dk_out.new_empty(dk_out.shape)


def _rotary_setup(ctx, inputs, output):
    _q, _k, cos, sin, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.backend = backend


def _rotary_backward(ctx, dq_out, dk_out):
    cos, sin = ctx.saved_tensors
    dq, dk = rotary_backward_op(dq_out, dk_out, cos, sin, ctx.backend)
    return dq, dk, None, None, None


rotary_op.register_autograd(_rotary_backward, setup_context=_rotary_setup)
