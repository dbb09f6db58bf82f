"""The autograd of ``ops.shared_input_linear``: linear maps of one input whose input gradients are summed
inside the GEMMs.

Autograd computes each map's input gradient with its own GEMM and adds them in its input buffer, one
elementwise kernel per extra consumer, each reading two ``[tokens, hidden]`` tensors and writing one.
Here the first GEMM writes the input gradient and the others accumulate into it (``addmm_``, beta 1:
one more read, in the GEMM's epilogue). Weight and bias gradients are the usual ones, computed only where
autograd asks for them, and, as ``F.linear`` does, the input is kept for the backward only when a weight
trains and the weights only when the input needs a gradient (a frozen LLM keeps no activations here).
Plain torch GEMMs: cuBLAS on GPUs, nothing to choose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SharedInputLinear(torch.autograd.Function):
    """``apply(x, n, w_1..w_n, b_1..b_n)`` -> ``(F.linear(x, w_i, b_i) for each i)``; ``b_i`` may be None."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int, *params: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        weights, biases = params[:n], params[n:]
        need_x, need_w = ctx.needs_input_grad[0], any(ctx.needs_input_grad[2 : 2 + n])
        ctx.save_for_backward(x if need_w else None, *(w if need_x else None for w in weights))
        ctx.x_shape = x.shape
        # Unused outputs get no gradient tensor at all, rather than zeros to multiply (eagerly: a compiled
        # graph materialises them, so an unused output's weight would get a zero gradient there).
        ctx.set_materialize_grads(False)
        return tuple(F.linear(x, w, b) for w, b in zip(weights, biases, strict=True))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        x, *weights = ctx.saved_tensors
        n = len(weights)
        need_x = ctx.needs_input_grad[0]
        need_w, need_b = ctx.needs_input_grad[2 : 2 + n], ctx.needs_input_grad[2 + n :]
        dx = None
        dws: list[torch.Tensor | None] = [None] * n
        dbs: list[torch.Tensor | None] = [None] * n
        present = [g for g in grads if g is not None]
        if not present:
            return None, None, *dws, *dbs
        rows = None if x is None else x.reshape(-1, x.shape[-1])
        # The forward ran in the inputs' precision with autocast off; so does the backward, wherever it
        # is called from.
        with torch.autocast(present[0].device.type, enabled=False):
            for i, (grad, weight) in enumerate(zip(grads, weights, strict=True)):
                if grad is None:
                    continue
                grad = grad.reshape(-1, grad.shape[-1])
                if need_x:
                    if dx is None:
                        dx = grad @ weight
                    else:
                        dx.addmm_(grad, weight)
                if need_w[i]:
                    dws[i] = grad.t() @ rows
                if need_b[i]:
                    dbs[i] = grad.sum(0)
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, None, *dws, *dbs
