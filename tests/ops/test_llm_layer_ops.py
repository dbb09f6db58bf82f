"""``rms_norm``, ``swiglu`` and ``rotary`` (the LLM layer's fused elementwise ops) against float64 oracles.

Accuracy follows flash-attention's criterion (``accuracy.py``): against the float64 reference, the Triton
kernel may be at most 2x (outputs) / 3x (gradients) as wrong as transformers' eager formula at the input
precision, plus a floor of a few units in the last place. CPU tests run the kernels under
``TRITON_INTERPRET=1`` in float32 and float16; ``gpu`` tests run compiled Triton in bf16 at LLaMA-7B widths.
``test_triton_compiles.py`` compiles the same kernels for sm_80/sm_90 without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from accuracy import assert_as_accurate_as_plain
from torch.library import opcheck

from llavamed_fast import ops
from llavamed_fast.ops import _library, reference

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="CPU tests of Triton kernels need TRITON_INTERPRET=1"
)
compiled = pytest.mark.skipif(INTERPRETED, reason="needs compiled Triton: run with TRITON_INTERPRET=0")
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _outputs_and_grads(fn, inputs, grad_out, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    wanted = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(out, wanted, grad_out.to(out.dtype))
    return (out.detach(), *grads)


def _assert_like_oracle(triton_fn, eager_fn, inputs, seed=0):
    generator = torch.Generator(device=inputs[0].device).manual_seed(seed)
    dtype = inputs[0].dtype
    probe = eager_fn(*[t.detach() for t in inputs])
    grad_out = torch.randn(probe.shape, generator=generator, device=probe.device).to(probe.dtype)
    got = _outputs_and_grads(triton_fn, inputs, grad_out)
    plain = _outputs_and_grads(eager_fn, inputs, grad_out)
    oracle = _outputs_and_grads(eager_fn, inputs, grad_out, dtype=torch.float64)
    names = ["output"] + [f"grad {i}" for i, t in enumerate(inputs) if t.requires_grad]
    for name, g, p, o in zip(names, got, plain, oracle, strict=True):
        assert g.dtype == p.dtype, (name, g.dtype, p.dtype)
        floor = 4 * torch.finfo(dtype).eps * o.abs().max().item()
        assert_as_accurate_as_plain(name, g, p, o, 2.0 if name == "output" else 3.0, floor=floor)


def _triton_rms_norm(eps):
    def fn(x, w):
        with ops.use_backend(rms_norm="triton"):
            return ops.rms_norm(x, w, eps)

    return fn


def _triton_swiglu(gate, up):
    with ops.use_backend(swiglu="triton"):
        return ops.swiglu(gate, up)


def _rms_inputs(shape, dtype, device="cpu", seed=0, train_weight=True):
    generator = torch.Generator(device=device).manual_seed(seed)
    # Rows with very different scales: the normalization must take each row's own.
    x = torch.randn(shape, generator=generator, device=device)
    x = x * torch.logspace(-2, 2, shape[-2] if len(shape) > 1 else 1, device=device).unsqueeze(-1)
    w = 1 + 0.3 * torch.randn(shape[-1], generator=generator, device=device)
    return x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(train_weight)


# ---------------------------------------------------------------------------------------------------------------
# rms_norm


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(37, 96), (2, 9, 100), (1, 64)], ids=str)
@pytest.mark.parametrize("train_weight", [True, False])
def test_rms_norm_matches_float64_oracle(dtype, shape, train_weight):
    eps = 1e-5
    x, w = _rms_inputs(shape, dtype, seed=len(shape), train_weight=train_weight)
    _assert_like_oracle(_triton_rms_norm(eps), lambda a, b: reference.rms_norm(a, b, eps), [x, w])


@interpreter
def test_rms_norm_rounds_like_transformers():
    # The normalized value is rounded to the input dtype before the weight multiplies it: the forward
    # equals transformers' eager result bit for bit unless the sum of squares rounds differently.
    x, w = _rms_inputs((64, 80), torch.float16, seed=3)
    got = _triton_rms_norm(1e-6)(x, w)
    eager = reference.rms_norm(x, w, 1e-6)
    assert (got != eager).float().mean().item() < 0.01


@interpreter
def test_rms_norm_empty_rows_and_output_dtype():
    x = torch.zeros(0, 8, requires_grad=True)
    w = torch.ones(8, dtype=torch.float64, requires_grad=True)
    y = _triton_rms_norm(1e-6)(x, w)
    assert y.shape == (0, 8) and y.dtype == torch.float64  # promote(x, weight), as transformers
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros_like(dw))


@interpreter
def test_rms_norm_weight_gradient_sums_over_program_blocks():
    # More rows than the backward's programs: the weight gradient is a sum of per-block partials.
    x, w = _rms_inputs((50, 24), torch.float32, seed=5)
    got = torch.autograd.grad(_triton_rms_norm(1e-6)(x, w).sum(), w)[0]
    x64, w64 = x.detach().double(), w.detach().double().requires_grad_()
    want = torch.autograd.grad(reference.rms_norm(x64, w64, 1e-6).sum(), w64)[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@interpreter
def test_rms_norm_passes_opcheck():
    for train_weight in (True, False):
        x, w = _rms_inputs((6, 16), torch.float32, seed=7, train_weight=train_weight)
        opcheck(_library.rms_norm_op, (x, w, 1e-6, "triton"))


def _residual_norm_outputs_and_grads(backend, x, w, gy, gr, dtype=None, use=(True, True)):
    """``(y, x handed on, dx, dw)`` of ``residual_rms_norm`` under the loss ``<y, gy> + <x handed on, gr>``
    (only the outputs in ``use`` enter the loss)."""
    x, w = (t.detach().to(dtype or t.dtype).requires_grad_() for t in (x, w))
    with ops.use_backend(rms_norm=backend):
        y, through = ops.residual_rms_norm(x, w, 1e-5)
    loss = sum((out * g.to(out.dtype)).sum() for out, g, u in ((y, gy, use[0]), (through, gr, use[1])) if u)
    return (y.detach(), through.detach(), *torch.autograd.grad(loss, (x, w), materialize_grads=True))


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "use", [(True, True), (True, False), (False, True)], ids=["both", "norm", "residual"]
)
def test_residual_rms_norm_matches_float64_oracle(dtype, use, monkeypatch):
    # The residual stream's gradient is added inside the norm's backward; against autograd's own sum
    # over the reference (plain at the input dtype, and float64).
    x, w = _rms_inputs((2, 19, 96), dtype, seed=11)
    generator = torch.Generator().manual_seed(12)
    gy, gr = (torch.randn(x.shape, generator=generator).to(dtype) for _ in "yr")
    from llavamed_fast.kernels.rms_norm import TritonRmsNorm

    seen = []
    original = TritonRmsNorm.backward

    def recording(dy, x, weight, rstd, needs_weight_grad, dresidual=None):
        seen.append(dresidual is not None)
        return original(dy, x, weight, rstd, needs_weight_grad, dresidual)

    monkeypatch.setattr(TritonRmsNorm, "backward", staticmethod(recording))
    got = _residual_norm_outputs_and_grads("triton", x, w, gy, gr, use=use)
    plain = _residual_norm_outputs_and_grads("torch", x, w, gy, gr, use=use)
    oracle = _residual_norm_outputs_and_grads("torch", x, w, gy, gr, dtype=torch.float64, use=use)
    # The kernel runs when the norm's output has a gradient, with the residual's when there is one.
    assert seen == ([use[1]] if use[0] else [])
    assert torch.equal(got[1], x)
    for name, g, p, o in zip(("output", "dx", "dw"), got[::2] + got[3:], plain[::2] + plain[3:],
                             oracle[::2] + oracle[3:], strict=True):  # fmt: skip
        assert g.dtype == p.dtype, (name, g.dtype, p.dtype)
        floor = 4 * torch.finfo(dtype).eps * o.abs().max().item()
        assert_as_accurate_as_plain(name, g, p, o, 2.0 if name == "output" else 3.0, floor=floor)


@interpreter
def test_residual_rms_norm_hands_on_x_itself_without_its_gradient():
    # x takes no gradient (a frozen embedding's output) while the weight trains: no residual gradient to
    # fold, so x itself goes on, without a gradient path it did not have; without autograd, the same.
    x, w = _rms_inputs((5, 32), torch.float32, seed=14)
    x = x.detach()
    with ops.use_backend(rms_norm="triton"):
        y, through = ops.residual_rms_norm(x, w, 1e-5)
        assert through is x and y.requires_grad
        torch.testing.assert_close(y, reference.rms_norm(x, w, 1e-5))
        with torch.no_grad():
            assert ops.residual_rms_norm(x.requires_grad_(), w, 1e-5)[1] is x


@interpreter
def test_rms_norm_backward_with_residual_gradient_passes_opcheck():
    x, w = _rms_inputs((6, 16), torch.float32, seed=13)
    _, rstd = _library.rms_norm_op(x.detach(), w.detach(), 1e-6, "triton")
    for dresidual in (torch.randn(6, 16), None):
        for needs_weight_grad in (True, False):
            args = (torch.randn(6, 16), x.detach(), w.detach(), rstd, dresidual, needs_weight_grad, "triton")
            opcheck(_library.rms_norm_backward_op, args)
    with pytest.raises(ValueError, match="residual gradient"):
        _library.rms_norm_backward_op(torch.randn(6, 16), x.detach(), w.detach(), rstd, torch.randn(5, 16),
                                      False, "triton")  # fmt: skip


def test_rms_norm_torch_backend_is_the_reference_and_checks_arguments():
    x, w = _rms_inputs((5, 12), torch.float32)
    with ops.use_backend(rms_norm="torch"):
        assert torch.equal(ops.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
    with pytest.raises(ValueError, match="does not match"):
        ops.rms_norm(x, w[:5])


# ---------------------------------------------------------------------------------------------------------------
# swiglu


def _swiglu_inputs(shape, dtype, device="cpu", seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    gate = 3 * torch.randn(shape, generator=generator, device=device)  # into silu's curved part and tails
    up = torch.randn(shape, generator=generator, device=device)
    return gate.to(dtype).requires_grad_(), up.to(dtype).requires_grad_()


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(37, 96), (1, 5, 1500)], ids=str)
def test_swiglu_matches_float64_oracle(dtype, shape):
    _assert_like_oracle(_triton_swiglu, reference.swiglu, list(_swiglu_inputs(shape, dtype, seed=1)))


@interpreter
def test_swiglu_forward_equals_transformers_eager():
    gate, up = _swiglu_inputs((40, 70), torch.float16, seed=2)
    assert torch.equal(_triton_swiglu(gate, up), reference.swiglu(gate, up))


@interpreter
def test_swiglu_passes_opcheck():
    gate, up = _swiglu_inputs((3, 40), torch.float32, seed=4)
    opcheck(_library.swiglu_op, (gate, up, "triton"))


def test_swiglu_checks_arguments():
    gate, up = _swiglu_inputs((3, 4), torch.float32)
    with pytest.raises(ValueError, match="differ"):
        ops.swiglu(gate, up[:, :3])
    with pytest.raises(ValueError, match="dtypes differ"):
        ops.swiglu(gate, up.double())


# ---------------------------------------------------------------------------------------------------------------
# rotary


def _rotary_inputs(batch, tokens, heads, kv_heads, head_dim, dtype, device="cpu", seed=0):
    """q and k as a projection's ``view`` gives them, and cos/sin as transformers' rotary embedding does."""
    generator = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, tokens, heads * head_dim, generator=generator, device=device)
    k = torch.randn(batch, tokens, kv_heads * head_dim, generator=generator, device=device)
    positions = torch.randint(0, 4096, (batch, tokens, 1), generator=generator, device=device)
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, device=device) / head_dim)
    angles = torch.cat([positions * inv_freq] * 2, dim=-1)
    q = q.to(dtype).view(batch, tokens, heads, head_dim).requires_grad_()
    k = k.to(dtype).view(batch, tokens, kv_heads, head_dim).requires_grad_()
    return q, k, angles.cos().to(dtype), angles.sin().to(dtype)


def _triton_rotary(q, k, cos, sin):
    with ops.use_backend(rotary="triton"):
        return ops.rotary(q, k, cos, sin)


def _assert_rotary_like_oracle(q, k, cos, sin):
    # Both outputs and both gradients, each against the float64 oracle (cos/sin take no gradient).
    def query(fn):
        return lambda a: fn(a, k.detach().to(a.dtype), cos.to(a.dtype), sin.to(a.dtype))[0]

    def key(fn):
        return lambda b: fn(q.detach().to(b.dtype), b, cos.to(b.dtype), sin.to(b.dtype))[1]

    _assert_like_oracle(query(_triton_rotary), query(reference.rotary), [q], seed=0)
    _assert_like_oracle(key(_triton_rotary), key(reference.rotary), [k], seed=1)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 19, 4, 4, 16), (2, 5, 6, 2, 32), (1, 3, 12, 1, 8), (1, 6, 3, 1, 20)], ids=str
)
def test_rotary_matches_float64_oracle(dtype, shape):
    _assert_rotary_like_oracle(*_rotary_inputs(*shape, dtype, seed=shape[2]))


@interpreter
def test_rotary_takes_transposed_views_and_broadcast_positions():
    # Heads-first views (as transformers' attention holds them) and one cos/sin row set for the batch.
    q, k, cos, sin = _rotary_inputs(3, 6, 4, 2, 16, torch.float32, seed=2)
    q_heads_first = q.detach().transpose(1, 2).contiguous().transpose(1, 2)
    got = _triton_rotary(q_heads_first, k.detach(), cos[:1], sin[:1])
    want = reference.rotary(q.detach(), k.detach(), cos[:1], sin[:1])
    for g, w in zip(got, want, strict=True):
        assert g.is_contiguous()
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@interpreter
def test_rotary_with_float32_cos_sin_returns_the_input_dtype():
    # Under autocast transformers gives float32 cos/sin for half-precision projections.
    q, k, cos, sin = _rotary_inputs(1, 9, 4, 2, 16, torch.float16, seed=5)
    cos32, sin32 = cos.float(), sin.float()
    for fn in (_triton_rotary, reference.rotary):
        out_q, out_k = fn(q.detach(), k.detach(), cos32, sin32)
        assert out_q.dtype == out_k.dtype == torch.float16
    _assert_like_oracle(
        lambda a: _triton_rotary(a, k.detach().to(a.dtype), cos32, sin32)[0],
        lambda a: reference.rotary(
            a,
            k.detach().to(a.dtype),
            cos32.to(torch.promote_types(a.dtype, cos32.dtype)),
            sin32.to(torch.promote_types(a.dtype, cos32.dtype)),
        )[0],
        [q],
    )


@interpreter
def test_rotary_passes_opcheck():
    q, k, cos, sin = _rotary_inputs(1, 5, 2, 1, 8, torch.float32, seed=3)
    opcheck(_library.rotary_op, (q, k, cos, sin, "triton"))


def test_rotary_checks_arguments():
    q, k, cos, sin = _rotary_inputs(1, 5, 2, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="must be \\[B, T, D\\]"):
        ops.rotary(q, k, cos[:, :4], sin[:, :4])
    with pytest.raises(ValueError, match="differ"):
        ops.rotary(q, k[:, :4], cos, sin)


# ---------------------------------------------------------------------------------------------------------------
# GPU: LLaMA-7B widths, a packed row's worth of tokens.


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("train_weight", [True, False])
def test_gpu_rms_norm_matches_float64_oracle(dtype, train_weight):
    x, w = _rms_inputs((1, 8191, 4096), dtype, device="cuda", seed=8, train_weight=train_weight)
    _assert_like_oracle(_triton_rms_norm(1e-5), lambda a, b: reference.rms_norm(a, b, 1e-5), [x, w])


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_swiglu_matches_float64_oracle(dtype):
    _assert_like_oracle(
        _triton_swiglu, reference.swiglu, list(_swiglu_inputs((1, 8191, 11008), dtype, device="cuda", seed=9))
    )


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kv_heads", [32, 8], ids=["llama", "mistral"])
def test_gpu_rotary_matches_float64_oracle(dtype, kv_heads):
    _assert_rotary_like_oracle(*_rotary_inputs(1, 8191, 32, kv_heads, 128, dtype, device="cuda", seed=10))
