"""Torch reference implementations: the definition of every op.

These are the test oracles, the CPU path and the benchmark baselines. They favour clarity over speed,
but they must stay usable for tiny models on a CPU (no dense [tokens, tokens] masks across samples).
Each differentiable op has an explicit backward here (the FlashAttention / fused-kernel formulas written
plainly), which the tests check against autograd in float64.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F


def _samples(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool, scale
):
    """Per non-empty sample: its rows, ``q/k/v`` as ``[H, L, D]`` (KV heads repeated per group) in the
    compute dtype (float32 at least; float64 stays float64 for the oracles) and its masked scaled scores."""
    compute = torch.promote_types(q.dtype, torch.float32)
    groups = q.shape[1] // k.shape[1]
    for start, end in itertools.pairwise(cu_seqlens.tolist()):
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1).to(compute)
        ks = k[start:end].transpose(0, 1).to(compute).repeat_interleave(groups, dim=0)
        vs = v[start:end].transpose(0, 1).to(compute).repeat_interleave(groups, dim=0)
        scores = torch.matmul(qs, ks.transpose(1, 2)) * scale
        if causal:
            future = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        yield slice(start, end), qs, ks, vs, scores


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool = True,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention within each packed sample. Returns ``(out [T, H, D], lse [H, T])``.

    ``lse`` (log-sum-exp of each query's scaled scores) is float32, or float64 for float64 inputs.
    """
    del max_seqlen  # only the fast kernels need it to size their grids
    scale = q.shape[2] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty(
        q.shape[1], q.shape[0], dtype=torch.promote_types(q.dtype, torch.float32), device=q.device
    )
    for rows, _, _, vs, scores in _samples(q, k, v, cu_seqlens, causal, scale):
        sample_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - sample_lse.unsqueeze(-1))
        out[rows] = torch.matmul(probs, vs).transpose(0, 1).to(q.dtype)
        lse[:, rows] = sample_lse
    return out, lse


def varlen_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool = True,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`varlen_attention` from the saved ``out`` and ``lse`` (no softmax re-normalisation)."""
    del max_seqlen
    num_kv_heads, head_dim = k.shape[1], q.shape[2]
    groups = q.shape[1] // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rows, qs, ks, vs, scores in _samples(q, k, v, cu_seqlens, causal, scale):
        os_, dos = (t[rows].transpose(0, 1).to(qs.dtype) for t in (out, dout))
        probs = torch.exp(scores - lse[:, rows].to(qs.dtype).unsqueeze(-1))
        dvs = torch.matmul(probs.transpose(1, 2), dos)
        dprobs = torch.matmul(dos, vs.transpose(1, 2))
        delta = (dos * os_).sum(-1, keepdim=True)  # rowsum(dO * O) == rowsum(P * dP)
        dscores = probs * (dprobs - delta) * scale
        dqs = torch.matmul(dscores, ks)
        dks = torch.matmul(dscores.transpose(1, 2), qs)
        # KV heads shared by a group of query heads receive the sum of the group's gradients.
        fold = (num_kv_heads, groups, qs.shape[1], head_dim)
        dq[rows] = dqs.transpose(0, 1).to(q.dtype)
        dk[rows] = dks.reshape(fold).sum(1).transpose(0, 1).to(k.dtype)
        dv[rows] = dvs.reshape(fold).sum(1).transpose(0, 1).to(v.dtype)
    return dq, dk, dv


def _image_rows(image_offsets: torch.Tensor, tokens_per_image: int) -> torch.Tensor:
    """``[N * P]`` rows of the packed row that image tokens occupy, image by image."""
    steps = torch.arange(tokens_per_image, device=image_offsets.device)
    return (image_offsets.to(torch.long)[:, None] + steps).reshape(-1)


def projector_forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    embeds: torch.Tensor | None = None,
    image_offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`projector` and, for the backward, the GELU's input and output stacked ``[2, N, P, D1]``
    (empty for ``linear``)."""
    h = F.linear(x, w1, b1)
    if w2 is None:
        y, activations = h, h.new_empty(0)
    else:
        activations = torch.stack([h, F.gelu(h)])
        y = F.linear(activations[1], w2, b2)
    if embeds is None:
        return y, activations
    rows = _image_rows(image_offsets, x.shape[1])
    return embeds.index_copy(0, rows, y.reshape(rows.numel(), -1).to(embeds.dtype)), activations


def projector(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    embeds: torch.Tensor | None = None,
    image_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Linear (v0) or Linear→GELU→Linear (mlp2x_gelu), optionally written into packed embeddings.

    Without ``embeds`` returns the projected features ``[N, P, D]``. With ``embeds [T, D]`` and
    ``image_offsets [N]`` returns a copy of ``embeds`` whose rows ``image_offsets[i] + j`` hold image i's
    token j; the other rows (text) are untouched and keep their gradient path.
    """
    return projector_forward(x, w1, b1, w2, b2, embeds, image_offsets)[0]


def _gelu_grad(h: torch.Tensor) -> torch.Tensor:
    # d/dh [h * Phi(h)] = Phi(h) + h * phi(h), for the exact (erf) GELU that HF's "gelu" is.
    cdf = 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + h * pdf


def projector_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
    embeds: torch.Tensor | None,
    image_offsets: torch.Tensor | None,
    activations: torch.Tensor,
    needs: tuple[bool, ...] = (True,) * 6,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of :func:`projector` for ``(x, w1, b1, w2, b2, embeds)``; None where not needed.

    ``activations`` is what :func:`projector_forward` returned with the output.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    dembeds = None
    if embeds is not None:
        rows = _image_rows(image_offsets, x.shape[1])
        if needs[5]:
            dembeds = dy.index_fill(0, rows, 0)
        dy = dy.index_select(0, rows)
    xf = x.reshape(-1, x.shape[-1]).to(compute)
    dyf = dy.reshape(-1, dy.shape[-1]).to(compute)
    if w2 is None:
        dh = dyf
        dw2 = db2 = None
    else:
        h, a = (t.reshape(-1, t.shape[-1]).to(compute) for t in activations)
        dw2 = (dyf.t() @ a).to(w2.dtype) if needs[3] else None
        db2 = dyf.sum(0).to(b2.dtype) if b2 is not None and needs[4] else None
        dh = (dyf @ w2.to(compute)) * _gelu_grad(h)
    dw1 = (dh.t() @ xf).to(w1.dtype) if needs[1] else None
    db1 = dh.sum(0).to(b1.dtype) if b1 is not None and needs[2] else None
    dx = (dh @ w1.to(compute)).reshape(x.shape).to(x.dtype) if needs[0] else None
    return dx, dw1, db1, dw2, db2, dembeds


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels``, over supervised positions only.

    Logits are computed in float32 (float64 for float64 inputs). ``mean`` divides by the number of supervised tokens and is 0 when
    there are none (a micro-batch whose every target was truncated away must not poison the step).
    """
    supervised = labels != ignore_index
    compute = torch.promote_types(hidden.dtype, torch.float32)
    logits = F.linear(hidden[supervised].to(compute), weight.to(compute))
    loss = F.cross_entropy(logits, labels[supervised], reduction="sum")
    if reduction == "sum":
        return loss
    return loss / supervised.sum().clamp(min=1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LLaMA/Mistral/Qwen2 RMSNorm: ``weight * round(x / rms(x))``, computed in float32
    (float64 for float64 inputs) and rounded to the input dtype before the weight multiplies it.
    Differentiated by autograd (the ``torch`` backend is this function itself)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    h = x.to(compute)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, the activation of the LLaMA/Mistral/Qwen2 MLP, as transformers computes it.
    Differentiated by autograd (the ``torch`` backend is this function itself)."""
    return F.silu(gate) * up


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` on ``[B, T, H, D]`` queries and keys with ``[B, T, D]`` cos
    and sin: ``x * cos + rotate_half(x) * sin``, ``rotate_half([x1, x2]) = [-x2, x1]``, returned in the
    input's dtype (float32 cos/sin with bf16 q, as under autocast, compute in float32 first).
    Differentiated by autograd (the ``torch`` backend is this function itself)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        return (x * cos + rotate_half(x) * sin).to(x.dtype)

    return rotate(q), rotate(k)


def packing(lengths: list[int], budget: int) -> list[int]:
    """First-fit-decreasing: the bin of each item, bins numbered in order of opening.

    Items are visited longest first (ties by index); each goes into the lowest-numbered open bin with
    room for it, else into a new bin. Raises ``ValueError`` naming the first item that is not positive
    or longer than ``budget``.
    """
    if budget <= 0:
        raise ValueError(f"packing budget must be positive, got {budget}")
    for index, length in enumerate(lengths):
        if length <= 0 or length > budget:
            raise ValueError(f"item {index} has length {length}, outside (0, {budget}]")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[int] = []
    bins = [0] * len(lengths)
    for item in order:
        for b, room in enumerate(free):
            if room >= lengths[item]:
                free[b] -= lengths[item]
                bins[item] = b
                break
        else:
            free.append(budget - lengths[item])
            bins[item] = len(free) - 1
    return bins


def linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    needs: tuple[bool, bool] = (True, True),
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """:func:`linear_cross_entropy` and its gradients, from one softmax: ``d loss / d logits =
    (softmax - onehot) / n`` (``mean``) or without ``/ n`` (``sum``). Returns ``(loss, dhidden_rows, rows,
    dweight)``: the hidden-state gradient of the supervised rows only, at positions ``rows`` (the others are
    zero), and the weight gradient; None where ``needs`` does not ask. Fused kernels compute the gradients
    in the same pass as the loss; autograd then only scales them."""
    compute = torch.promote_types(hidden.dtype, torch.float32)
    supervised = labels != ignore_index
    rows = hidden[supervised].to(compute)
    targets = labels[supervised]
    logits = rows @ weight.to(compute).t()
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = torch.arange(targets.numel(), device=targets.device)
    loss = -log_probs[picked, targets].sum()
    scale = 1.0 / supervised.sum().clamp(min=1).to(compute) if reduction == "mean" else 1.0
    loss = loss * scale
    dhidden_rows = positions = dweight = None
    if needs[0] or needs[1]:
        dlogits = log_probs.exp_()
        dlogits[picked, targets] -= 1.0
        dlogits *= scale
        if needs[0]:
            dhidden_rows = (dlogits @ weight.to(compute)).to(hidden.dtype)
            positions = supervised.nonzero().squeeze(1)
        if needs[1]:
            dweight = (dlogits.t() @ rows).to(weight.dtype)
    return loss, dhidden_rows, positions, dweight
