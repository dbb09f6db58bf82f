"""The Triton varlen attention against a float64 oracle, through the public op.

Accuracy follows flash-attention's criterion: against a float64 oracle (the torch reference on float64
copies of the inputs, itself checked against a dense block-diagonal SDPA in ``test_reference_ops.py``),
the kernel may be at most 2x (output) / 3x (dq, dk, dv) as wrong as plain PyTorch at the input precision
(the torch reference run on the same inputs), plus a floor of 1/16 of the input dtype's epsilon at the
oracle's scale (at least 1): without it a tensor that plain PyTorch happens to get exactly right (dk of
one-token samples is 0 up to rounding) would demand a bitwise-exact kernel.

CPU tests run the kernels under ``TRITON_INTERPRET=1`` in float32 and float16 (bf16 is a GPU test: the
interpreter's bf16 ``tl.dot`` is wrong); ``gpu`` tests need compiled Triton on CUDA
(``TRITON_INTERPRET=0 pytest -m gpu tests/ops/test_varlen_attention.py``).
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from accuracy import assert_as_accurate_as_plain
from torch.library import opcheck

from llavamed_fast import ops
from llavamed_fast.kernels import varlen_attention as kernels
from llavamed_fast.ops import _library, reference

# triton 3.6's interpreter turns one-element arrays into loop bounds the way numpy 2.x deprecates (and
# numpy 2.4 refuses: ENVIRONMENT.md); thousands of copies of that warning would bury real ones.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="CPU tests of Triton kernels need TRITON_INTERPRET=1"
)
compiled = pytest.mark.skipif(INTERPRETED, reason="needs compiled Triton: run with TRITON_INTERPRET=0")
ON_CPU = [interpreter]
ON_CUDA = [pytest.mark.gpu, compiled]


def _cu(lengths: list[int], device: str = "cpu") -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _inputs(lengths, heads, kv_heads, head_dim, dtype, *, device="cpu", seed=0):
    """Random q, k, v and an output gradient in ``dtype``, drawn in float32 (never zeros)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = sum(lengths)

    def draw(h):
        return torch.randn(tokens, h, head_dim, generator=generator, device=device).to(dtype)

    return draw(heads), draw(kv_heads), draw(kv_heads), draw(heads)


def _attention(q, k, v, cu, max_seqlen, causal, scale, dout, backend):
    """``(out, dq, dk, dv)`` through the public op and autograd with the given backend."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with ops.use_backend(varlen_attention=backend):
        out = ops.varlen_attention(q, k, v, cu, max_seqlen, causal=causal, scale=scale)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def _assert_as_accurate_as_torch(name, got, plain, oracle, factor):
    floor = torch.finfo(got.dtype).eps / 16 * max(1.0, oracle.abs().max().item())
    assert_as_accurate_as_plain(name, got, plain, oracle, factor, floor=floor)


def _check_against_oracle(lengths, heads, kv_heads, head_dim, dtype, causal, scale, *, device="cpu", seed=0):
    q, k, v, dout = _inputs(lengths, heads, kv_heads, head_dim, dtype, device=device, seed=seed)
    cu, max_seqlen = _cu(lengths, device), max(lengths)
    got = _attention(q, k, v, cu, max_seqlen, causal, scale, dout, "triton")
    plain = _attention(q, k, v, cu, max_seqlen, causal, scale, dout, "torch")
    oracle = _attention(
        *(t.double() for t in (q, k, v)), cu, max_seqlen, causal, scale, dout.double(), "torch"
    )
    for name, factor, g, p, o in zip(
        ("out", "dq", "dk", "dv"), (2, 3, 3, 3), got, plain, oracle, strict=True
    ):
        assert g.dtype == dtype and g.shape == o.shape, name
        _assert_as_accurate_as_torch(name, g, p, o, factor)


ORACLE_CASES = {
    # lengths, heads, kv heads, head dim, scale (None: D ** -0.5)
    "realistic": ([200, 56], 4, 2, 64, None),
    # a one-token sample, an empty one inside the row, lengths off every tile size, MQA, a peaky scale
    "awkward": ([1, 37, 0, 70, 5], 4, 1, 80, 0.5),
    # 30 samples of 1-7 tokens between empty first and last samples
    "many_short": ([0, *random.Random(7).choices(range(1, 8), k=30), 0], 2, 1, 96, None),
    # 129 = one past a multiple of every tile size, the GPU's too; groups of 3 query heads
    "gqa_128": ([129, 31], 6, 2, 128, 0.3 * 128**-0.5),
}


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_matches_float64_oracle(case, causal, dtype):
    lengths, heads, kv_heads, head_dim, scale = ORACLE_CASES[case]
    _check_against_oracle(lengths, heads, kv_heads, head_dim, dtype, causal, scale)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_lse_is_the_references(dtype):
    lengths = [37, 1, 0, 64]
    q, k, v, _ = _inputs(lengths, 4, 2, 64, dtype, seed=1)
    cu = _cu(lengths)
    out, lse = _library.varlen_attention_op(q, k, v, cu, 64, True, 0.2, "triton")
    ref_out, ref_lse = reference.varlen_attention(q, k, v, cu, 64, True, 0.2)
    assert lse.dtype == torch.float32 and lse.shape == (4, sum(lengths))
    torch.testing.assert_close(lse, ref_lse)
    torch.testing.assert_close(out, ref_out, atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=0)


@pytest.mark.parametrize(
    ("device", "dtype", "causal"),
    [
        pytest.param("cpu", torch.float32, True, marks=ON_CPU, id="cpu-fp32-causal"),
        pytest.param("cpu", torch.float16, False, marks=ON_CPU, id="cpu-fp16-full"),
        pytest.param("cuda", torch.bfloat16, True, marks=ON_CUDA, id="cuda-bf16-causal"),
        pytest.param("cuda", torch.float16, False, marks=ON_CUDA, id="cuda-fp16-full"),
    ],
)
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_samples_do_not_leak(device, dtype, causal):
    # NaN in every input of the middle sample: any read of it by a neighbour, even one weighted by 0,
    # would show up as NaN there.
    lengths = [45, 70, 13]
    q, k, v, dout = _inputs(lengths, 4, 1, 64, dtype, device=device, seed=2)
    cu = _cu(lengths, device)
    clean = _attention(q, k, v, cu, 70, causal, None, dout, "triton")
    poisoned = slice(45, 115)
    for t in (q, k, v, dout):
        t[poisoned] = float("nan")
    dirty = _attention(q, k, v, cu, 70, causal, None, dout, "triton")
    for name, a, b in zip(("out", "dq", "dk", "dv"), clean, dirty, strict=True):
        for rows in (slice(0, 45), slice(115, 128)):
            assert torch.equal(a[rows], b[rows]), f"{name} of rows {rows} changed when another sample did"
        assert b[poisoned].isnan().all(), f"{name}: the poisoned sample did not reach the kernel"


TILES = {
    "gpu": None,  # the H100 tiles, 128-row forward tiles included
    "reversed": kernels._Config(
        forward=kernels._Blocks(16, 64, 4, 1),
        dkdv=kernels._Blocks(64, 16, 4, 1),
        dq=kernels._Blocks(16, 64, 4, 1),
        preprocess=kernels._Blocks(16, 0, 4, 1),
    ),
    "square": kernels._Config(
        forward=kernels._Blocks(32, 32, 4, 1),
        dkdv=kernels._Blocks(32, 32, 4, 1),
        dq=kernels._Blocks(32, 32, 4, 1),
        preprocess=kernels._Blocks(128, 0, 4, 1),
    ),
    # dQ's query tiles differ from dK/dV's key tiles: each backward kernel gets a tile list of its own
    "mixed": kernels._Config(
        forward=kernels._Blocks(32, 16, 4, 1),
        dkdv=kernels._Blocks(16, 32, 4, 1),
        dq=kernels._Blocks(64, 16, 4, 1),
        preprocess=kernels._Blocks(32, 0, 4, 1),
        chunk=2,
    ),
}


@interpreter
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("tiles", list(TILES))
def test_other_tile_shapes(monkeypatch, tiles, causal):
    # The masked/unmasked split of every loop depends on the tile sizes; run it with query tiles larger,
    # smaller and equal to key tiles, and with the GPU's own.
    original = kernels._config
    config = TILES[tiles]
    monkeypatch.setattr(
        kernels, "_config", lambda block_d, interpret: config or original(block_d, interpret=False)
    )
    _check_against_oracle([140, 1, 0, 45], 2, 1, 64, torch.float32, causal, None, seed=3)


@interpreter
@pytest.mark.parametrize(("block", "chunk"), [(16, 4), (64, 4), (16, 128)])
def test_tile_list_holds_each_tile_once(block, chunk):
    # The attention programs take their (sample, tile) from a list built from cu_seqlens; a grid of
    # tokens // block + samples programs must cover every tile of every sample once, in order, and the
    # rest must find none. Empty samples (first, inside, last), lengths on and off the block, more samples
    # than one step of the search.
    lengths = [0, 16, 1, 0, 47, 16, 33, 0, 5, 64, 17, 0]
    expected = [(s, b) for s, n in enumerate(lengths) for b in range(-(-n // block))]
    table = kernels._tile_table(_cu(lengths), sum(lengths), block, chunk)
    assert table.shape == (sum(lengths) // block + len(lengths), 2)
    found = [tuple(pair) for pair in table.tolist()]
    assert found[: len(expected)] == expected
    assert all(s == len(lengths) for s, _ in found[len(expected) :])


@interpreter
def test_views_give_the_same_result_as_contiguous_inputs():
    lengths = [40, 23]
    tokens = sum(lengths)
    q, k, v, dout = _inputs(lengths, 4, 2, 64, torch.float32, seed=4)
    cu = _cu(lengths)
    expected = _attention(q, k, v, cu, 40, True, None, dout, "triton")
    q_view = torch.randn(tokens, 4, 96)[:, :, :64].copy_(q)  # a slice: token and head strides only
    k_view = k.transpose(0, 1).contiguous().transpose(0, 1)  # [H_kv, T, D] storage
    v_view = v.permute(0, 2, 1).contiguous().permute(0, 2, 1)  # strided head dim: copied
    assert not (q_view.is_contiguous() or k_view.is_contiguous() or v_view.is_contiguous())
    got = _attention(q_view, k_view, v_view, cu, 40, True, None, dout, "triton")
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@interpreter
def test_passes_opcheck():
    torch.manual_seed(5)

    def leaf(*shape):
        return torch.randn(*shape, requires_grad=True)

    cu = _cu([4, 0, 5])
    opcheck(
        _library.varlen_attention_op,
        (leaf(9, 4, 8), leaf(9, 2, 8), leaf(9, 2, 8), cu, 5, True, 0.3, "triton"),
    )
    q, k, v = torch.randn(9, 4, 24), torch.randn(9, 1, 24), torch.randn(9, 1, 24)
    out, lse = _library.varlen_attention_op(q, k, v, cu, 5, False, 0.3, "triton")
    args = (torch.randn_like(out), q, k, v, out, lse, cu, 5, False, 0.3, "triton")
    opcheck(_library.varlen_attention_backward_op, args)


@interpreter
def test_degenerate_rows():
    # A row with no tokens at all, and a one-token sample (its output is its value, exactly).
    empty = torch.randn(0, 2, 16, requires_grad=True)
    with ops.use_backend(varlen_attention="triton"):
        out = ops.varlen_attention(empty, empty, empty, _cu([0, 0]), 0)
        assert out.shape == (0, 2, 16)
        out.sum().backward()
        q, k, v, _ = _inputs([1], 4, 2, 80, torch.float16, seed=6)
        out = ops.varlen_attention(q, k, v, _cu([1]), 1)
    assert torch.equal(out, v.repeat_interleave(2, dim=1))


@interpreter
def test_rejects_what_the_kernel_cannot_do():
    q = torch.randn(5, 2, 16, dtype=torch.float64)
    with ops.use_backend(varlen_attention="triton"):
        with pytest.raises(TypeError, match=r"varlen_attention \(triton backend\): dtype torch.float64"):
            ops.varlen_attention(q, q, q, _cu([5]), 5)
        wide = torch.randn(5, 2, 160)
        with pytest.raises(ValueError, match=r"triton backend\): head dim 160 > 128"):
            ops.varlen_attention(wide, wide, wide, _cu([5]), 5)


# ---------------------------------------------------------------------------------------------------------------
# GPU: compiled kernels, bf16 included, at model shapes


def _packed_row(tokens: int, seed: int) -> list[int]:
    """Sample lengths of one packed training row of ``tokens`` tokens: mostly image-text samples (256 image
    tokens plus 30-1500 text tokens), some text-only ones, the last one cut to fit."""
    rng = random.Random(seed)
    lengths: list[int] = []
    while sum(lengths) < tokens:
        length = rng.randint(30, 1500) + (256 if rng.random() < 0.8 else 0)
        lengths.append(min(length, tokens - sum(lengths)))
    return lengths


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize(
    ("dtype", "tokens"), [(torch.bfloat16, 16384), (torch.float16, 8192)], ids=["bf16-16k", "fp16-8k"]
)
def test_gpu_7b_rows(dtype, tokens):
    # Mistral-7B attention: 32 query heads, 8 KV heads, head dim 128. The float64 oracle is the reference,
    # one sample at a time: a few [32, L, L] float64 tensors for the longest sample (L < 1800), ~1 GB each.
    _check_against_oracle(_packed_row(tokens, seed=tokens), 32, 8, 128, dtype, True, None, device="cuda")


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize(
    ("head_dim", "dtype", "causal"),
    [
        (64, torch.bfloat16, True),
        (64, torch.float16, False),
        (80, torch.bfloat16, False),
        (96, torch.float16, True),
    ],
    ids=["d64-bf16-causal", "d64-fp16-full", "d80-bf16-full", "d96-fp16-causal"],
)
def test_gpu_head_dims(head_dim, dtype, causal):
    lengths = [1, *_packed_row(2048, seed=head_dim), 3]
    _check_against_oracle(lengths, 8, 2, head_dim, dtype, causal, None, device="cuda", seed=head_dim)
