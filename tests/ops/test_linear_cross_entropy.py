"""The Triton linear cross-entropy against float64 oracles, through the public op.

Accuracy follows flash-attention's criterion: against a float64 oracle (``F.cross_entropy`` on full
float64 logits), the kernel may be at most 2x (loss) / 3x (gradients) as wrong as plain PyTorch eager
at the input precision (``F.cross_entropy(hidden @ weight.T)`` with autograd), plus a floor of four units
in the last place of the output's dtype (float32 for the loss, the input dtype for the gradients) at the
oracle's largest magnitude, for cases where eager happens to be almost exact. CPU tests run the kernels under ``TRITON_INTERPRET=1`` in float32 and float16 (bf16 is
a GPU test: the interpreter's bf16 is unreliable); ``gpu`` tests need compiled Triton on CUDA.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_as_accurate_as_plain
from torch.library import opcheck

from llavamed_fast import ops
from llavamed_fast.kernels import linear_cross_entropy as lce
from llavamed_fast.ops import _library

IGNORE = -100
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="CPU tests of Triton kernels need TRITON_INTERPRET=1"
)
compiled = pytest.mark.skipif(INTERPRETED, reason="needs compiled Triton: run with TRITON_INTERPRET=0")
# The interpreter turns a run-time loop bound into a Python int through a 1-element array (triton 3.6).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _inputs(tokens, width, vocab, dtype, supervised, *, device="cpu", seed=0, weight_std=None):
    """Random hidden states, LM head and labels; ``supervised`` is a fraction or an exact count."""
    generator = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(tokens, width, generator=generator, device=device)
    # Logits with a standard deviation of about 2, as a trained LM head gives.
    std = weight_std if weight_std is not None else 2.0 / width**0.5
    weight = torch.randn(vocab, width, generator=generator, device=device) * std
    labels = torch.randint(0, vocab, (tokens,), generator=generator, device=device)
    if isinstance(supervised, int):
        keep = torch.randperm(tokens, generator=generator, device=device)[:supervised]
        mask = torch.ones(tokens, dtype=torch.bool, device=device)
        mask[keep] = False
    else:
        mask = torch.rand(tokens, generator=generator, device=device) >= supervised
    labels[mask] = IGNORE
    return hidden.to(dtype), weight.to(dtype), labels


def _loss_and_grads(fn, hidden, weight, labels, reduction, dtype=None):
    h = hidden.detach().to(dtype or hidden.dtype).requires_grad_()
    w = weight.detach().to(dtype or weight.dtype).requires_grad_()
    loss = fn(h, w, labels, reduction)
    return (loss.detach(), *torch.autograd.grad(loss, (h, w)))


def _triton(h, w, labels, reduction):
    with ops.use_backend(linear_cross_entropy="triton"):
        return ops.linear_cross_entropy(h, w, labels, ignore_index=IGNORE, reduction=reduction)


def _eager(h, w, labels, reduction):
    return F.cross_entropy(h @ w.T, labels, ignore_index=IGNORE, reduction=reduction)


def _assert_as_accurate_as_eager(name, got, plain, oracle, factor):
    floor = 4 * torch.finfo(got.dtype).eps * oracle.abs().max().item()
    assert_as_accurate_as_plain(name, got, plain, oracle, factor, floor=floor)


def _check_against_oracle(hidden, weight, labels, reduction):
    got = _loss_and_grads(_triton, hidden, weight, labels, reduction)
    eager = _loss_and_grads(_eager, hidden, weight, labels, reduction)
    oracle = _loss_and_grads(_eager, hidden, weight, labels, reduction, dtype=torch.float64)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    assert got[1].dtype == hidden.dtype and got[2].dtype == weight.dtype
    for name, factor, g, e, o in zip(
        ("loss", "dhidden", "dweight"), (2, 3, 3), got, eager, oracle, strict=True
    ):
        _assert_as_accurate_as_eager(name, g, e, o, factor)


class _Counter:
    """Wraps a module function and counts its calls (and keeps their arguments)."""

    def __init__(self, monkeypatch, name):
        self.calls = []
        inner = getattr(lce, name)

        def counted(*args, **kwargs):
            self.calls.append(args)
            return inner(*args, **kwargs)

        monkeypatch.setattr(lce, name, counted)


CASES = {
    # tokens, width, vocab, supervised (fraction or count)
    "30% supervised": (200, 64, 1000, 0.3),
    "all supervised": (64, 48, 1000, 1.0),
    "one supervised token, vocab 997": (37, 64, 997, 1),
}


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", CASES)
def test_matches_float64_oracle(case, reduction, dtype):
    tokens, width, vocab, supervised = CASES[case]
    hidden, weight, labels = _inputs(tokens, width, vocab, dtype, supervised, seed=len(case))
    _check_against_oracle(hidden, weight, labels, reduction)


@interpreter
@pytest.mark.parametrize("train_head", [False, True], ids=["rows in chunks", "vocabulary in blocks"])
@pytest.mark.parametrize(
    ("chunk_rows", "vocab_cols", "block_v"),
    [(1, 100, 128), (7, 256, 256), (16, 300, None), (None, None, 128)],
)
def test_chunks_and_vocabulary_blocks(monkeypatch, train_head, chunk_rows, vocab_cols, block_v):
    # 997 is not a multiple of any block: the last block of every row is masked; so is the last vocabulary
    # block when the head is trained (997 = 3 x 300 + 97).
    tokens, width, vocab = 90, 40, 997
    hidden, weight, labels = _inputs(tokens, width, vocab, torch.float64, 0.3, seed=3)
    n = int((labels != IGNORE).sum())
    launches = _Counter(monkeypatch, "_logsumexp_update")
    gemms = _Counter(monkeypatch, "_mm")
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_(train_head)
    if train_head:
        loss, dhidden_rows, rows, dweight = lce.linear_cross_entropy_forward(
            hidden, weight, labels, IGNORE, "mean", True, True, vocab_cols=vocab_cols, block_v=block_v
        )
        cols = min(vocab, vocab_cols or lce._vocab_cols(tokens, width, n, vocab))
        blocks = -(-vocab // cols)
        # Pass 1 computes every block's logits, pass 2 all but the one pass 1 ended on.
        assert len(gemms.calls) == 2 * blocks - 1
    else:
        loss, dhidden_rows, rows, dweight = lce.linear_cross_entropy_forward(
            hidden, weight, labels, IGNORE, "mean", True, False, chunk_rows=chunk_rows, block_v=block_v
        )
        blocks = -(-n // min(n, chunk_rows or lce._chunk_rows(tokens, width, vocab)))
        assert len(gemms.calls) == 2 * blocks  # the logits and dhidden per chunk
    assert len(launches.calls) == blocks > 1
    # The hidden-state gradient comes for the supervised rows only, with their positions.
    assert torch.equal(rows, (labels != IGNORE).nonzero().squeeze(1))
    dhidden = torch.zeros_like(hidden).index_copy_(0, rows, dhidden_rows)
    got = (loss, dhidden) if dweight is None else (loss, dhidden, dweight)
    assert (dweight is None) != train_head
    eager = _eager(h, w, labels, "mean")
    oracle = (eager, *torch.autograd.grad(eager, [h, w] if train_head else [h]))
    for name, g, o in zip(("loss", "dhidden", "dweight"), got, oracle, strict=False):
        torch.testing.assert_close(g, o, atol=1e-13, rtol=1e-11, msg=lambda m, n=name: f"{n}: {m}")


def test_vocabulary_blocks_bound_the_logits_by_the_hidden_states():
    # The worked example beside _vocab_cols: LLaMA-7B's head, 16384 tokens, 30 % supervised.
    assert lce._vocab_cols(16384, 4096, 4965, 32000) == 3328
    assert 4965 * 3328 <= 16384 * 4096 // 4
    assert lce._vocab_cols(16384, 4096, 10, 32000) == 32000  # few rows: the whole vocabulary at once
    assert lce._vocab_cols(100, 64, 100, 32000) == 256  # never narrower than a GEMM tile's worth


def test_chunk_rows_bound_the_logits_by_the_hidden_states():
    # The worked example beside _chunk_rows: LLaMA-7B's head, 8192 tokens.
    assert lce._chunk_rows(8192, 4096, 32000) == 1024
    assert lce._chunk_rows(8192, 4096, 128256) == 256  # LLaMA-3's vocabulary: ceil(128256 / 4096) = 32
    assert lce._chunk_rows(100, 4096, 1000) == 128  # vocabulary narrower than the hidden states: one chunk


@interpreter
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_float64_is_exact_and_scales_with_output_gradient(reduction):
    hidden, weight, labels = _inputs(50, 24, 97, torch.float64, 0.3, seed=4)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = _triton(h, w, labels, reduction)
    assert loss.dtype == torch.float64
    (2.5 * loss).backward()
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = _eager(h64, w64, labels, reduction)
    (2.5 * expected).backward()
    torch.testing.assert_close(loss, expected, atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(h.grad, h64.grad, atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(w.grad, w64.grad, atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter)])
def test_one_forward_serves_two_backwards(backend):
    # The backward scales the gradients the forward computed into new tensors, so a retained graph gives
    # the same, right, gradients again, whatever the output gradient.
    hidden, weight, labels = _inputs(20, 8, 30, torch.float64, 0.5, seed=15)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with ops.use_backend(linear_cross_entropy=backend):
        loss = ops.linear_cross_entropy(h, w, labels, ignore_index=IGNORE)
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    eager = _eager(h64, w64, labels, "mean")
    for factor in (3.0, -0.5):
        got = torch.autograd.grad(factor * loss, (h, w), retain_graph=True)
        expected = torch.autograd.grad(factor * eager, (h64, w64), retain_graph=True)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, atol=1e-14, rtol=1e-12)


@interpreter
def test_ignore_index_inside_the_vocabulary():
    hidden, weight, labels = _inputs(40, 16, 30, torch.float64, 1.0, seed=14)
    labels[::3] = 5  # a real token id used as ignore_index: those positions drop out
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with ops.use_backend(linear_cross_entropy="triton"):
        loss = ops.linear_cross_entropy(h, w, labels, ignore_index=5)
    expected = F.cross_entropy(hidden @ weight.T, labels, ignore_index=5)
    torch.testing.assert_close(loss, expected, atol=1e-13, rtol=1e-12)
    loss.backward()
    assert not h.grad[::3].any() and h.grad[1::3].abs().sum() > 0


@interpreter
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_supervised_tokens_give_zero_without_a_launch(monkeypatch, reduction):
    launches = _Counter(monkeypatch, "_logsumexp_update")
    hidden, weight, _ = _inputs(12, 16, 50, torch.float32, 0.3, seed=5)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss = _triton(h, w, torch.full((12,), IGNORE), reduction)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert not h.grad.any() and not w.grad.any()
    assert launches.calls == []


@interpreter
def test_frozen_weight_skips_the_weight_gemms(monkeypatch):
    hidden, weight, labels = _inputs(120, 32, 300, torch.float32, 0.3, seed=6)
    chunks = _Counter(monkeypatch, "_logsumexp_update")
    gemms = _Counter(monkeypatch, "_mm")
    accumulations = _Counter(monkeypatch, "_addmm_")
    h = hidden.requires_grad_()  # weight stays frozen, as in stage 1
    loss = _triton(h, weight, labels, "mean")
    loss.backward()
    assert weight.grad is None and h.grad is not None
    assert accumulations.calls == []
    assert len(gemms.calls) == 2 * len(chunks.calls) > 2  # logits and dhidden per chunk
    expected = _loss_and_grads(_eager, hidden, weight, labels, "mean", dtype=torch.float64)
    torch.testing.assert_close(h.grad, expected[1].float(), atol=1e-6, rtol=1e-4)


@interpreter
def test_frozen_hidden_computes_only_the_weight_gradient(monkeypatch):
    hidden, weight, labels = _inputs(120, 32, 300, torch.float32, 0.3, seed=7)
    blocks = _Counter(monkeypatch, "_logsumexp_update")
    gemms = _Counter(monkeypatch, "_mm")
    accumulations = _Counter(monkeypatch, "_addmm_")
    weight_blocks = _Counter(monkeypatch, "_mm_into")
    w = weight.requires_grad_()
    monkeypatch.setattr(lce, "_vocab_cols", lambda *_: 128)  # 300 words: blocks of 128, 128 and 44
    _triton(hidden, w, labels, "sum").backward()
    # The logits twice (but once for the block pass 1 ended on) and dweight per block; no dhidden.
    assert len(blocks.calls) == len(weight_blocks.calls) == 3
    assert len(gemms.calls) == 5 and accumulations.calls == []
    expected = _loss_and_grads(_eager, hidden, weight, labels, "sum", dtype=torch.float64)
    torch.testing.assert_close(w.grad, expected[2].float(), atol=1e-5, rtol=1e-4)


@interpreter
def test_no_grad_does_no_gradient_work(monkeypatch):
    hidden, weight, labels = _inputs(120, 32, 300, torch.float32, 0.3, seed=8)
    chunks = _Counter(monkeypatch, "_logsumexp_update")
    gradients = _Counter(monkeypatch, "_softmax_grad")
    gemms = _Counter(monkeypatch, "_mm")
    accumulations = _Counter(monkeypatch, "_addmm_")
    with torch.no_grad():
        loss = _triton(hidden.requires_grad_(), weight.requires_grad_(), labels, "mean")
    assert gradients.calls == []  # the log-sum-exp only
    assert len(gemms.calls) == len(chunks.calls) > 1 and accumulations.calls == []
    expected = _eager(hidden.double(), weight.double(), labels, "mean")
    torch.testing.assert_close(loss, expected.float(), atol=1e-6, rtol=1e-6)


@interpreter
@pytest.mark.parametrize("bad", [1000, -5])
def test_labels_outside_the_vocabulary_are_an_error(bad):
    hidden, weight, labels = _inputs(10, 8, 1000, torch.float32, 1.0, seed=9)
    labels[6] = bad
    with pytest.raises(ValueError, match=rf"labels\[6\] = {bad} is not a token id in \[0, 1000\)"):
        _triton(hidden, weight, labels, "mean")


@interpreter
def test_rejects_bad_arguments():
    forward = lce.TritonLinearCrossEntropy.forward
    hidden, weight, labels = _inputs(6, 8, 10, torch.float32, 1.0, seed=10)
    with pytest.raises(ValueError, match="labels must be int64"):
        forward(hidden, weight, labels.int(), IGNORE, "mean", [True, True])
    with pytest.raises(ValueError, match="must be float16/bfloat16/float32/float64"):
        forward(hidden.int(), weight, labels, IGNORE, "mean", [False, True])
    with pytest.raises(ValueError, match="hidden width 8 != weight width 7"):
        forward(hidden, weight[:, :7], labels, IGNORE, "mean", [True, True])
    with pytest.raises(ValueError, match="no vocabulary rows"):
        forward(hidden, weight[:0], labels, IGNORE, "mean", [True, True])
    with pytest.raises(ValueError, match="reduction must be"):
        forward(hidden, weight, labels, IGNORE, "none", [True, True])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter)])
def test_autocast_runs_the_head_in_its_lower_precision(backend):
    # float32 weights under autocast (the plain engine on a GPU): as autocast runs a matmul.
    hidden, weight, labels = _inputs(40, 16, 90, torch.float32, 0.5, seed=14)
    hidden.requires_grad_()
    weight.requires_grad_()
    with ops.use_backend(linear_cross_entropy=backend):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = ops.linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE)
        grads = torch.autograd.grad(loss, (hidden, weight))
        h16, w16 = hidden.detach().half().requires_grad_(), weight.detach().half().requires_grad_()
        want = ops.linear_cross_entropy(h16, w16, labels, ignore_index=IGNORE)
        want_grads = torch.autograd.grad(want, (h16, w16))
    assert loss.dtype == torch.float32 and [g.dtype for g in grads] == [torch.float32, torch.float32]
    torch.testing.assert_close(loss, want)
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected.float())


@interpreter
def test_passes_opcheck():
    torch.manual_seed(6)

    def leaf(*shape):
        return torch.randn(*shape, requires_grad=True)

    labels = torch.tensor([1, -100, 3, 4, -100, 0])
    for needs in ([True, True], [True, False], [False, True], [False, False]):
        args = (leaf(6, 5), leaf(7, 5), labels, -100, "mean", needs, "triton")
        opcheck(_library.linear_cross_entropy_op, args)
    opcheck(
        _library.linear_cross_entropy_op,
        (leaf(3, 5), leaf(7, 5), torch.full((3,), -100), -100, "sum", [True, True], "triton"),
    )


@interpreter
def test_training_matches_the_torch_backend_step_by_step():
    # Liger's convergence idea: the same tiny model trained with either backend follows the same losses.
    torch.manual_seed(11)
    tokens, features, width, vocab = 96, 24, 32, 300
    x = torch.randn(tokens, features)
    _, _, labels = _inputs(tokens, width, vocab, torch.float32, 0.3, seed=11)
    body = torch.nn.Sequential(torch.nn.Linear(features, width), torch.nn.Tanh())
    head = torch.nn.Linear(width, vocab, bias=False)

    def train(backend):
        b, h = copy.deepcopy(body), copy.deepcopy(head)
        optimizer = torch.optim.SGD([*b.parameters(), *h.parameters()], lr=2.0)
        losses = []
        with ops.use_backend(linear_cross_entropy=backend):
            for _ in range(20):
                loss = ops.linear_cross_entropy(b(x), h.weight, labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        return torch.tensor(losses), h.weight.detach()

    triton_losses, triton_head = train("triton")
    torch_losses, torch_head = train("torch")
    assert triton_losses[-1] < 0.8 * triton_losses[0], f"did not learn: {triton_losses.tolist()}"
    torch.testing.assert_close(triton_losses, torch_losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(triton_head, torch_head, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# GPU: a LLaMA-7B head on a realistic micro-batch.

GPU_SHAPE = (8192, 4096, 32000)  # tokens, hidden, vocabulary


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gpu_llama_head_matches_float64_oracle(dtype, reduction):
    tokens, width, vocab = GPU_SHAPE
    hidden, weight, labels = _inputs(
        tokens, width, vocab, dtype, 0.3, device="cuda", seed=12, weight_std=0.02
    )
    _check_against_oracle(hidden, weight, labels, reduction)


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("train_head", [False, True])
def test_gpu_peak_memory_is_far_below_the_full_logits(train_head):
    tokens, width, vocab = GPU_SHAPE
    hidden, weight, labels = _inputs(tokens, width, vocab, torch.bfloat16, 0.3, device="cuda", seed=13)
    hidden.requires_grad_()
    weight.requires_grad_(train_head)
    _triton(hidden, weight, labels, "mean")  # warm-up: kernel compilation, cuBLAS workspace
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = _triton(hidden, weight, labels, "mean")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    # The gradients autograd returns are outputs any implementation has; so is, for a gradient computed
    # in the forward, the saved weight gradient the backward scales into the returned one.
    outputs = hidden.numel() * hidden.element_size() + (
        2 * weight.numel() * weight.element_size() if train_head else 0
    )
    extra = peak - outputs
    full_logits = tokens * vocab * 4
    # Expected: a frozen head, a chunk's float32 logits and bf16 gradient (1024 x 32000 x 6 B = 197 MB) and
    # the gathered rows (20 MB); a trained one, a vocabulary block's (2458 x 3328 x 6 B = 49 MB), the
    # float32 dhidden accumulator (40 MB) and the gathered rows: no float32 [V, H] accumulator (500 MiB).
    assert extra < full_logits / 4, (
        f"extra {extra / 2**20:.0f} MiB vs full logits {full_logits / 2**20:.0f} MiB"
    )
    del loss
