"""The torch reference ops against independent float64 oracles, and their torch.library registration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from llavamed_fast import ops
from llavamed_fast.ops import _library, reference


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _dense_attention(q, k, v, lengths, causal, scale):
    """Oracle: one SDPA call over the whole row with a block-diagonal (and causal) mask."""
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = segment[:, None] == segment[None, :]
    if causal:
        mask &= torch.ones_like(mask).tril()
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.transpose(0, 1)


ATTENTION_CASES = [
    # lengths, heads, kv heads, head dim
    ([37, 1, 64, 5], 4, 4, 64),  # a length-1 sample, lengths off any block size
    ([3] * 20, 4, 2, 80),  # many short samples, GQA, head dim 80
    ([1], 2, 1, 96),  # a single one-token sample, MQA
    ([129, 31], 8, 2, 128),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("lengths", "heads", "kv_heads", "head_dim"), ATTENTION_CASES)
def test_varlen_attention_matches_dense_oracle(lengths, heads, kv_heads, head_dim, causal):
    torch.manual_seed(sum(lengths) + heads)
    total = sum(lengths)
    q = torch.randn(total, heads, head_dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(total, kv_heads, head_dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(total, kv_heads, head_dim, dtype=torch.float64, requires_grad=True)
    scale = 0.3 / head_dim**0.5  # not the default, so a dropped scale shows
    out = ops.varlen_attention(q, k, v, _cu(lengths), max(lengths), causal=causal, scale=scale)
    expected = _dense_attention(q, k, v, lengths, causal, scale)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)

    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected_grads = torch.autograd.grad(expected, (q, k, v), dout)
    for name, got, want in zip("qkv", grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-9, msg=lambda m, n=name: f"d{n}: {m}")


def test_varlen_attention_lse_is_logsumexp_of_scores():
    torch.manual_seed(0)
    q, k, v = (torch.randn(9, 2, 8, dtype=torch.float64) for _ in range(3))
    _, lse = reference.varlen_attention(q, k, v, _cu([4, 5]), 5, True, 0.5)
    scores = torch.einsum("qhd,khd->hqk", q[:4], k[:4]) * 0.5
    scores = scores.masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse[:, :4], torch.logsumexp(scores, -1))


def test_varlen_attention_samples_do_not_mix():
    torch.manual_seed(1)
    q, k, v = (torch.randn(12, 2, 16) for _ in range(3))
    cu = _cu([5, 7])
    base = ops.varlen_attention(q, k, v, cu, 7)
    k2, v2 = k.clone(), v.clone()
    k2[5:] += 10.0  # change only the second sample's keys and values
    v2[5:] -= 3.0
    changed = ops.varlen_attention(q, k2, v2, cu, 7)
    torch.testing.assert_close(changed[:5], base[:5], atol=0, rtol=0)
    assert not torch.allclose(changed[5:], base[5:])


def test_varlen_attention_float32_error_is_that_of_plain_torch():
    # The reference at float32 must be as accurate as one SDPA call at float32, against float64.
    torch.manual_seed(2)
    lengths = [100, 28]
    q64, k64, v64 = (torch.randn(128, 4, 64, dtype=torch.float64) for _ in range(3))
    oracle = _dense_attention(q64, k64, v64, lengths, True, None)
    q, k, v = q64.float(), k64.float(), v64.float()
    ours = ops.varlen_attention(q, k, v, _cu(lengths), 100)
    plain = _dense_attention(q, k, v, lengths, True, None)
    assert (ours.double() - oracle).abs().max() <= 2 * (plain.double() - oracle).abs().max() + 1e-7


def test_varlen_attention_rejects_bad_arguments():
    q = torch.randn(6, 4, 8)
    k = torch.randn(6, 3, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        ops.varlen_attention(q, k, k, _cu([6]), 6)
    with pytest.raises(ValueError, match="cu_seqlens must have dtype int32"):
        ops.varlen_attention(q, q, q, torch.tensor([0, 6]), 6)


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("into_embeds", [False, True])
def test_projector_matches_modules(linear, into_embeds):
    torch.manual_seed(3)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    first = torch.nn.Linear(12, 16, dtype=torch.float64)
    second = torch.nn.Linear(16, 16, dtype=torch.float64)
    embeds = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([2, 10, 33])
    w2, b2 = (None, None) if linear else (second.weight, second.bias)
    kwargs = {"embeds": embeds, "image_offsets": offsets} if into_embeds else {}
    out = ops.projector(x, first.weight, first.bias, w2, b2, **kwargs)

    projected = first(x) if linear else second(F.gelu(first(x)))
    expected = projected
    if into_embeds:
        expected = embeds.clone()
        for i, start in enumerate(offsets.tolist()):
            expected[start : start + 5] = projected[i]
    torch.testing.assert_close(out, expected)

    inputs = [x, first.weight, first.bias] + ([] if linear else [second.weight, second.bias])
    inputs += [embeds] if into_embeds else []
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)
    expected_grads = torch.autograd.grad(expected, inputs, dout)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)
    if into_embeds:  # text rows get their gradient through, image rows none
        text = torch.ones(40, dtype=torch.bool)
        for start in offsets.tolist():
            text[start : start + 5] = False
        torch.testing.assert_close(grads[-1][text], dout[text])
        assert not grads[-1][~text].any()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_matches_full_logits(reduction):
    torch.manual_seed(4)
    hidden = torch.randn(50, 24, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(97, 24, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 97, (50,))
    labels[torch.rand(50) < 0.7] = -100  # ~30 % supervised, as in conversations
    loss = ops.linear_cross_entropy(hidden, weight, labels, reduction=reduction)
    expected = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction=reduction)
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, (hidden, weight))
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_linear_cross_entropy_without_supervised_tokens_is_zero():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    loss = ops.linear_cross_entropy(hidden, weight, torch.full((4,), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert not hidden.grad.any() and not weight.grad.any()


def test_linear_cross_entropy_frozen_weight_gets_no_gradient():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(10, 8)  # frozen LM head (stage 1)
    ops.linear_cross_entropy(hidden, weight, torch.randint(0, 10, (6,))).backward()
    assert weight.grad is None and hidden.grad is not None


def _gradcheck(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_explicit_backwards_pass_gradcheck():
    torch.manual_seed(5)
    cu = _cu([4, 1, 3])
    q = torch.randn(8, 4, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(8, 2, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(8, 2, 6, dtype=torch.float64, requires_grad=True)
    _gradcheck(lambda q, k, v: ops.varlen_attention(q, k, v, cu, 4), q, k, v)
    _gradcheck(lambda q, k, v: ops.varlen_attention(q, k, v, cu, 4, causal=False), q, k, v)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w1, w2 = (torch.randn(6, n, dtype=torch.float64, requires_grad=True) for n in (5, 6))
    b1, b2 = (torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    embeds = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([0, 5])
    _gradcheck(
        lambda *a: ops.projector(*a[:5], embeds=a[5], image_offsets=offsets), x, w1, b1, w2, b2, embeds
    )
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, -100, 3, 10, -100, 0, 2])
    _gradcheck(lambda h, w: ops.linear_cross_entropy(h, w, labels), hidden, weight)


def test_ops_pass_opcheck():
    torch.manual_seed(6)

    def leaf(*shape):
        return torch.randn(*shape, requires_grad=True)

    opcheck(
        _library.varlen_attention_op,
        (leaf(9, 4, 8), leaf(9, 2, 8), leaf(9, 2, 8), _cu([4, 5]), 5, True, 0.3, "torch"),
    )
    x, w1, b1, w2, b2 = leaf(2, 3, 5), leaf(6, 5), leaf(6), leaf(6, 6), leaf(6)
    opcheck(_library.projector_op, (x, w1, b1, w2, b2, leaf(10, 6), torch.tensor([1, 6]), "torch"))
    opcheck(_library.projector_op, (x, w1, b1, None, None, None, None, "torch"))
    labels = torch.tensor([1, -100, 3, 4, -100, 0])
    for needs in ([True, True], [True, False], [False, False]):
        args = (leaf(6, 5), leaf(7, 5), labels, -100, "mean", needs, "torch")
        opcheck(_library.linear_cross_entropy_op, args)


def test_ops_compile_with_autograd():
    torch.manual_seed(7)
    cu = _cu([3, 5])
    q = torch.randn(8, 2, 4, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    labels = torch.tensor([1, 2, -100, 4, 5, -100, 7, 8])

    def step(q):
        out = ops.varlen_attention(q, q, q, cu, 5)
        return ops.linear_cross_entropy(out.reshape(8, 8), weight, labels)

    eager = torch.autograd.grad(step(q), q)[0]
    compiled = torch.compile(step, backend="aot_eager", fullgraph=False)
    got = torch.autograd.grad(compiled(q), q)[0]
    torch.testing.assert_close(got, eager)
