"""``ops.shared_input_linear``: the values and gradients of separate ``F.linear`` calls, with the input's
gradient summed by the GEMMs rather than by elementwise adds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llavamed_fast import ops


def _params(widths, k, dtype, biases=(False, True, True), seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [(torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5).to(dtype) for n in widths]
    bs = [
        torch.randn(n, generator=g, dtype=torch.float64).to(dtype) if b else None
        for n, b in zip(widths, biases, strict=True)
    ]
    return [w.requires_grad_() for w in weights], [b if b is None else b.requires_grad_() for b in bs]


def test_gradcheck_float64():
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    weights, biases = _params((4, 6, 3), 8, torch.float64)

    def fn(x, w0, w1, w2, b1, b2):
        return ops.shared_input_linear(x, [w0, w1, w2], [None, b1, b2])

    assert torch.autograd.gradcheck(fn, (x, *weights, biases[1], biases[2]))


def _assert_like_separate_linears(dtype, tokens, k, widths, device="cpu"):
    # Ours and autograd's separate F.linear in `dtype`, each judged against float64: ours may differ from
    # the separate calls only by rounding, and must be no further from the truth than they are.
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(tokens, k, generator=g, dtype=torch.float64).to(device)
    w64, b64 = _params(widths, k, torch.float64, biases=(False, True, True)[: len(widths)])
    w64 = [w.detach().to(device) for w in w64]
    b64 = [None if b is None else b.detach().to(device) for b in b64]
    cotangents = [torch.randn(tokens, n, generator=g, dtype=torch.float64).to(device) for n in widths]

    def run(fn, dt):
        x = x64.detach().to(dt).requires_grad_()
        ws = [w.detach().to(dt).requires_grad_() for w in w64]
        bs = [None if b is None else b.detach().to(dt).requires_grad_() for b in b64]
        outs = fn(x, ws, bs)
        torch.autograd.backward(outs, [c.to(dt) for c in cotangents])
        grads = [x.grad, *(w.grad for w in ws), *(b.grad for b in bs if b is not None)]
        return [o.detach().double() for o in outs], [g.double() for g in grads]

    def separate(x, ws, bs):
        return tuple(F.linear(x, w, b) for w, b in zip(ws, bs, strict=True))

    truth = run(separate, torch.float64)
    ours = run(ops.shared_input_linear, dtype)
    theirs = run(separate, dtype)
    for got, plain, want in zip(ours[0] + ours[1], theirs[0] + theirs[1], truth[0] + truth[1], strict=True):
        err, plain_err = (got - want).abs().max(), (plain - want).abs().max()
        assert err <= 2 * plain_err + 1e-6 * want.abs().max(), (err, plain_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_separate_linears_against_float64(dtype):
    _assert_like_separate_linears(dtype, 21, 16, (8, 12, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_matches_separate_linears_against_float64(dtype):
    # Mistral-7B's q/k/v widths over most of a packed row (cuBLAS, accumulation in the GEMM epilogue).
    _assert_like_separate_linears(dtype, 8191, 4096, (4096, 1024, 1024), device="cuda")


def test_unused_output_frozen_weights_and_frozen_input():
    x = torch.randn(5, 8, requires_grad=True)
    weights, biases = _params((4, 6, 3), 8, torch.float32)
    weights[1].requires_grad_(False)  # frozen: no gradient
    q, _k, v = ops.shared_input_linear(x, weights, biases)
    (q.sum() + 2 * v.sum()).backward()  # k unused: its weight, bias and input share get nothing
    assert weights[1].grad is None and biases[1].grad is None
    want_dx = torch.ones(5, 4) @ weights[0] + 2 * torch.ones(5, 3) @ weights[2]
    torch.testing.assert_close(x.grad, want_dx.detach())
    torch.testing.assert_close(weights[2].grad, 2 * torch.ones(3, 5) @ x.detach())

    x2 = torch.randn(5, 8)  # an input that needs no gradient: weights still get theirs
    (out,) = ops.shared_input_linear(x2, [weights[0]])
    out.square().sum().backward()
    assert x2.grad is None and weights[0].grad is not None


def _saved_shapes(x, weights, biases) -> list[tuple[int, ...]]:
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops.shared_input_linear(x, weights, biases)
    return saved


def test_keeps_only_what_its_backward_needs():
    # Like F.linear: the input only for weight gradients, the weights only for the input's gradient. A
    # frozen LLM (stage 1) must not keep every layer's normed input alive until the backward.
    weights, biases = _params((4, 6, 3), 8, torch.float32)
    for w in weights:
        w.requires_grad_(False)
    assert _saved_shapes(torch.randn(5, 8, requires_grad=True), weights, biases) == [(4, 8), (6, 8), (3, 8)]
    weights[0].requires_grad_(True)
    assert _saved_shapes(torch.randn(5, 8), weights, biases) == [(5, 8)]


def test_input_gradient_has_no_elementwise_sum():
    x = torch.randn(6, 16, requires_grad=True)
    weights, biases = _params((16, 8, 8), 16, torch.float32)
    outs = ops.shared_input_linear(x, weights, biases)
    seen: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    ops_run = [name.split(".")[1] for name in seen]  # "aten.addmm_.default" -> "addmm_"
    assert ops_run.count("addmm_") == 2, seen
    assert not {"add", "add_"} & set(ops_run), seen


def test_float32_weights_under_autocast_cast_like_linear():
    x = torch.randn(4, 8)
    weights, biases = _params((4, 6), 8, torch.float32, biases=(True, False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.shared_input_linear(x, weights, biases)
        want = [F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)]
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == torch.bfloat16
        torch.testing.assert_close(g, w)
    sum(o.float().sum() for o in got).backward()
    assert weights[0].grad.dtype == torch.float32 and biases[0].grad.dtype == torch.float32


def test_bad_shapes_and_dtypes_are_named():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight 1 .* width 8"):
        ops.shared_input_linear(x, [torch.randn(3, 8), torch.randn(3, 5)])
    with pytest.raises(ValueError, match="bias 0"):
        ops.shared_input_linear(x, [torch.randn(3, 8)], [torch.randn(4)])
    with pytest.raises(ValueError, match="one dtype"):
        ops.shared_input_linear(x, [torch.randn(3, 8, dtype=torch.float64)])
    with pytest.raises(ValueError, match="at least one"):
        ops.shared_input_linear(x, [])
