"""The CUDA projector (``csrc/projector``) against a float64 oracle, through the public op.

Accuracy follows flash-attention's criterion: against a float64 oracle (the torch reference on float64
copies of the inputs, itself checked against ``nn.Linear``/``F.gelu`` in ``test_reference_ops.py``), the
kernel may be at most 2x (output) / 3x (gradients) as wrong as plain PyTorch at the input precision
(autograd through ``F.linear``, ``F.gelu``, ``F.linear`` and ``index_copy`` on the same inputs, which is
how a transformers projector trains: its backward rounds each intermediate gradient to the input dtype),
plus a floor of 1/16 of the input dtype's epsilon at the oracle's scale (at least 1). Text rows are checked bitwise: the output's against ``embeds``, the
embeddings' gradient against ``dy``.

Without a GPU only the CPU tests run: a build without CUDA must say so and register no CUDA op. The
``gpu`` tests need a CUDA build of the extension (``pip install --no-build-isolation .`` where nvcc and a
CUDA torch are present) and a GPU: ``pytest -m gpu tests/ops/test_projector.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_as_accurate_as_plain
from torch.library import opcheck

from llavamed_fast import _ext, ops
from llavamed_fast.ops import _library
from llavamed_fast.ops.cuda import CudaProjector
from llavamed_fast.ops.registry import BackendUnavailableError

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
OPS = ("projector_cuda_forward", "projector_cuda_backward")


# ---------------------------------------------------------------------------------------------------------
# CPU: what a build without CUDA reports


def test_cuda_backend_is_unavailable_without_a_cuda_build():
    if _ext.has_cuda():
        pytest.skip("this extension was built with CUDA (the gpu tests cover it)")
    reason = ops.REGISTRY.why_not("projector", "cuda", "cuda")
    assert reason is not None and "built without CUDA" in reason, reason
    with (
        ops.use_backend(projector="cuda"),
        pytest.raises(BackendUnavailableError, match="built without CUDA"),
    ):
        ops.backend_for("projector", "cuda")


def test_cuda_backend_refuses_cpu_tensors():
    x, w1, b1 = torch.randn(2, 3, 4), torch.randn(5, 4), torch.randn(5)
    with ops.use_backend(projector="cuda"), pytest.raises(BackendUnavailableError, match="cuda"):
        ops.projector(x, w1, b1)


def test_cuda_ops_are_registered_only_in_cuda_builds():
    _ext.load()
    for name in OPS:
        assert hasattr(torch.ops.llavamed_fast, name) == _ext.has_cuda(), name
    if not _ext.has_cuda():
        with pytest.raises(RuntimeError, match="built without CUDA"):
            CudaProjector.forward(torch.randn(1, 2, 3), torch.randn(4, 3), None, None, None, None, None)


# ---------------------------------------------------------------------------------------------------------
# GPU: accuracy against the float64 oracle


def _inputs(images, tokens, channels, hidden, width, total, dtype, *, mlp=True, bias=True, into=True, seed=0):
    """Random inputs in ``dtype`` on the GPU, drawn in float32 (never zeros), with the images at scattered
    offsets of a packed row of ``total`` rows, in shuffled order (offsets need not increase)."""
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, device="cuda") * scale).to(dtype)

    x = draw(images, tokens, channels)
    # Unit-variance pre-activations: the GELU's curved part, not only its linear tails.
    w1 = draw(hidden, channels, scale=channels**-0.5)
    b1 = draw(hidden, scale=0.5) if bias else None
    w2 = draw(width, hidden, scale=hidden**-0.5) if mlp else None
    b2 = draw(width, scale=0.5) if mlp and bias else None
    embeds = offsets = None
    if into:
        embeds = draw(total, width)
        text = total - images * tokens
        cuts = (
            torch.randint(0, text + 1, (images,), generator=generator, device="cuda").sort().values.tolist()
        )
        starts = [cut + i * tokens for i, cut in enumerate(cuts)]  # image i after `cut` text rows
        order = torch.randperm(images, generator=generator, device="cuda").tolist()
        offsets = torch.tensor([starts[i] for i in order], dtype=torch.int64, device="cuda")
    dy = draw(total, width) if into else draw(images, tokens, width)
    return x, w1, b1, w2, b2, embeds, offsets, dy


def _through(forward, x, w1, b1, w2, b2, embeds, offsets, dy, *, dtype=None, frozen_x=False):
    """``(y, grads)`` of ``forward(x, w1, b1, w2, b2, embeds, offsets)`` by autograd: grads for x (unless
    frozen), w1, b1, w2, b2, embeds, None where absent; inputs cast to ``dtype`` first (the float64
    oracle)."""
    leaves = [
        t if t is None else t.detach().to(dtype or t.dtype).requires_grad_(not (i == 0 and frozen_x))
        for i, t in enumerate((x, w1, b1, w2, b2, embeds))
    ]
    y = forward(*leaves, offsets)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(y, wanted, dy.to(y.dtype)))
    return y.detach(), [next(grads) if t is not None and t.requires_grad else None for t in leaves]


def _run(backend, *inputs, **options):
    """Through the public op on ``backend``."""

    def forward(x, w1, b1, w2, b2, embeds, offsets):
        with ops.use_backend(projector=backend):
            return ops.projector(x, w1, b1, w2, b2, embeds=embeds, image_offsets=offsets)

    return _through(forward, *inputs, **options)


def _eager(*inputs, **options):
    """Plain PyTorch in the inputs' dtype: how a transformers projector trains."""

    def forward(x, w1, b1, w2, b2, embeds, offsets):
        y = F.linear(x, w1, b1)
        if w2 is not None:
            y = F.linear(F.gelu(y), w2, b2)
        if embeds is None:
            return y
        tokens = x.shape[1]
        rows = torch.cat([torch.arange(start, start + tokens, device=x.device) for start in offsets.tolist()])
        return embeds.index_copy(0, rows, y.reshape(rows.numel(), -1))

    return _through(forward, *inputs, **options)


def _assert_as_accurate_as_torch(name, got, plain, oracle, factor):
    floor = torch.finfo(got.dtype).eps / 16 * max(1.0, oracle.abs().max().item())
    if got.dtype != torch.float32:
        assert_as_accurate_as_plain(name, got, plain, oracle, factor, floor=floor)
        return
    # float32: both sides are far more exact than their output's rounding, so the error is the summation
    # order of a long reduction (dW2 sums 6,912 rows at LLaVA-Med's shapes) and its maximum over millions of
    # elements is noisy (cuBLASLt's dW2 was once 3.05x torch's max error, 6e-6 relative). Judge the whole
    # tensor by its relative L2 error, as accurate as plain torch within the factor, and keep a looser bound
    # on the maximum so that a few wrong elements still fail.
    assert_as_accurate_as_plain(name, got, plain, oracle, 2 * factor, floor=floor)
    error = (got.double() - oracle).norm().item()
    plain_error = (plain.double() - oracle).norm().item()
    scale = max(oracle.norm().item(), 1e-30)
    assert error / scale <= factor * plain_error / scale + torch.finfo(torch.float32).eps, (
        f"{name}: relative L2 error {error / scale:.3e} > {factor} x plain torch's {plain_error / scale:.3e}"
    )


def _image_rows(offsets, tokens, total):
    mask = torch.zeros(total, dtype=torch.bool, device=offsets.device)
    for start in offsets.tolist():
        mask[start : start + tokens] = True
    return mask


def _check_against_oracle(*shape, dtype, frozen_x=False, **options):
    inputs = _inputs(*shape, dtype, **options)
    got, got_grads = _run("cuda", *inputs, frozen_x=frozen_x)
    plain, plain_grads = _eager(*inputs, frozen_x=frozen_x)
    oracle, oracle_grads = _run("torch", *inputs, dtype=torch.float64, frozen_x=frozen_x)
    _assert_as_accurate_as_torch("y", got, plain, oracle, 2)
    names = ("dx", "dw1", "db1", "dw2", "db2", "dembeds")
    for name, g, p, o in zip(names, got_grads, plain_grads, oracle_grads, strict=True):
        assert (g is None) == (p is None) == (o is None), name
        if g is not None:
            _assert_as_accurate_as_torch(name, g, p, o, 3)
    embeds, offsets, dy = inputs[5], inputs[6], inputs[7]
    if embeds is not None:
        images = _image_rows(offsets, shape[1], shape[5])
        assert torch.equal(got[~images], embeds[~images]), "text rows of the output differ from embeds"
        dembeds = got_grads[5]
        assert torch.equal(dembeds[~images], dy[~images]), (
            "text rows of the embeddings' gradient differ from dy"
        )
        assert not dembeds[images].any(), "image rows of the embeddings' gradient are not zero"
    return got_grads


gpu_dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))


@pytest.mark.gpu
@gpu_dtypes
def test_gpu_llava_med_shapes_match_float64_oracle(dtype):
    # LLaVA-Med v1.5: 576 CLIP-L/14-336 tokens of width 1024 per image, a 4096-wide LLM, 12 images
    # scattered through a 12,288-token packed row.
    _check_against_oracle(12, 576, 1024, 4096, 4096, 12288, dtype=dtype)


AWKWARD = {
    "one-image-one-token": dict(shape=(1, 1, 40, 36, 80, 7)),
    "odd-widths": dict(shape=(3, 5, 17, 33, 80, 29)),
    "no-biases": dict(shape=(4, 9, 40, 36, 80, 50), bias=False),
    "linear": dict(shape=(3, 5, 40, 80, 80, 23), mlp=False),
    "linear-no-bias": dict(shape=(2, 7, 24, 80, 80, 16), mlp=False, bias=False),
    "no-embeds": dict(shape=(3, 5, 40, 36, 80, 0), into=False),
    "linear-no-embeds": dict(shape=(3, 5, 40, 80, 80, 0), mlp=False, into=False),
    "images-only": dict(shape=(2, 6, 40, 36, 80, 12)),
}


@pytest.mark.gpu
@gpu_dtypes
@pytest.mark.parametrize("case", AWKWARD)
def test_gpu_awkward_shapes_match_float64_oracle(case, dtype):
    options = dict(AWKWARD[case])
    _check_against_oracle(*options.pop("shape"), dtype=dtype, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("offsets_on", ["cuda", "cpu"])
def test_gpu_frozen_vision_features_get_no_gradient(offsets_on):
    x, w1, b1, w2, b2, embeds, offsets, dy = _inputs(3, 8, 40, 48, 64, 40, torch.bfloat16)
    offsets = offsets.to(offsets_on)
    _, activations = CudaProjector.forward(x, w1, b1, w2, b2, embeds, offsets)
    needs = [False, True, True, True, True, False]
    dx, dw1, db1, dw2, db2, dembeds = CudaProjector.backward(
        dy, x, w1, b1, w2, b2, embeds, offsets, activations, needs
    )
    assert dx is None and dembeds is None
    assert all(g is not None for g in (dw1, db1, dw2, db2))
    # Through autograd: the features do not require grad, the rest does.
    grads = _check_against_oracle(3, 8, 40, 48, 64, 40, dtype=torch.bfloat16, frozen_x=True)
    assert grads[0] is None and all(g is not None for g in grads[1:])


@pytest.mark.gpu
def test_gpu_only_asked_gradients_are_computed():
    x, w1, b1, w2, b2, embeds, offsets, dy = _inputs(2, 4, 16, 24, 32, 20, torch.float32)
    _, activations = CudaProjector.forward(x, w1, b1, w2, b2, embeds, offsets)
    everything = CudaProjector.backward(dy, x, w1, b1, w2, b2, embeds, offsets, activations, [True] * 6)
    for i in range(6):
        needs = [j == i for j in range(6)]
        grads = CudaProjector.backward(dy, x, w1, b1, w2, b2, embeds, offsets, activations, needs)
        for j, (g, full) in enumerate(zip(grads, everything, strict=True)):
            if j == i:
                # A bias gradient alone is a column sum, with the weight's GEMM its epilogue: not bitwise.
                torch.testing.assert_close(g, full)
            else:
                assert g is None, (i, j)


@pytest.mark.gpu
def test_gpu_float64_is_refused_with_the_backend_named():
    x, w1, b1, *_ = _inputs(2, 3, 8, 16, 16, 0, torch.float64, mlp=False, into=False)
    with (
        ops.use_backend(projector="cuda"),
        pytest.raises(TypeError, match=r"projector \(cuda backend\).*float64"),
    ):
        ops.projector(x, w1, b1)


@pytest.mark.gpu
def test_gpu_offsets_outside_embeds_are_refused():
    x, w1, b1, w2, b2, embeds, offsets, _ = _inputs(2, 4, 16, 24, 32, 20, torch.bfloat16)
    offsets = torch.tensor([0, 17], device="cuda")  # 17 + 4 > 20
    with ops.use_backend(projector="cuda"), pytest.raises(ValueError, match="image 1 starts at row 17"):
        ops.projector(x, w1, b1, w2, b2, embeds=embeds, image_offsets=offsets)


@pytest.mark.gpu
@pytest.mark.parametrize("mlp", [True, False], ids=["mlp2x_gelu", "linear"])
def test_gpu_passes_opcheck(mlp):
    width = 32 if mlp else 24  # the linear projector's output width is its only layer's
    x, w1, b1, w2, b2, embeds, offsets, _ = _inputs(2, 3, 16, 24, width, 11, torch.float32, mlp=mlp)
    leaves = [t if t is None else t.requires_grad_() for t in (x, w1, b1, w2, b2, embeds)]
    opcheck(_library.projector_op, (*leaves, offsets, "cuda"))
    opcheck(_library.projector_op, (*leaves[:5], None, None, "cuda"))


@pytest.mark.gpu
def test_gpu_graph_capture_on_a_side_stream_replays_the_eager_result():
    # Host offsets: nothing waits for the device, so forward and backward can be captured; a kernel
    # launched on another stream than the current one would be missing from the replay.
    x, w1, b1, w2, b2, embeds, offsets, dy = _inputs(3, 8, 40, 48, 64, 40, torch.bfloat16)
    offsets = offsets.cpu()
    needs = [True] * 6

    def step():
        y, activations = CudaProjector.forward(x, w1, b1, w2, b2, embeds, offsets)
        return (y, *CudaProjector.backward(dy, x, w1, b1, w2, b2, embeds, offsets, activations, needs))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up on the capture stream: cuBLASLt handle and workspace exist before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        captured = step()
    for t in (x, w1, b1, w2, b2, embeds, dy):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, step(), strict=True):
        torch.testing.assert_close(got, want)
