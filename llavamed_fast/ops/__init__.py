"""The op surface the model calls: one function per op, the backend chosen by the registry.

``varlen_attention``, ``projector`` and ``linear_cross_entropy`` are differentiable custom ops
(``torch.ops.llavamed_fast.*``); so are ``rms_norm`` and ``swiglu`` on their fast backends (their torch
backend is the reference under autograd); ``shared_input_linear`` is torch GEMMs under its own autograd
(no backends); ``packing`` is host-side bin packing for the collator. See
``registry.py`` for how a backend is chosen (``LLAVAMED_FAST_BACKEND=torch|triton|cuda`` and per-op
``LLAVAMED_FAST_BACKEND_<OP>``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from llavamed_fast.ops import _library, backends, reference  # noqa: F401 (backends registers the implementations)
from llavamed_fast.ops._shared_input_linear import SharedInputLinear
from llavamed_fast.ops.registry import (
    BACKENDS,
    REGISTRY,
    BackendUnavailableError,
    Implementation,
    use_backend,
)

__all__ = [
    "BACKENDS",
    "REGISTRY",
    "BackendUnavailableError",
    "Implementation",
    "backend_for",
    "linear_cross_entropy",
    "packing",
    "projector",
    "residual_rms_norm",
    "rms_norm",
    "rotary",
    "shared_input_linear",
    "swiglu",
    "use_backend",
    "varlen_attention",
]


def backend_for(op: str, device: torch.device | str) -> str:
    """The backend that ``op`` would use for tensors on ``device`` (raises if none can run)."""
    return REGISTRY.resolve(op, torch.device(device).type)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The lower precision autocast runs matmuls in here, or None outside autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _without_autocast(device_type: str):
    # An op's own matmuls (the references', the extension's) must not be recast inside it: the op already
    # took its inputs in the precision autocast would have chosen for it.
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over packed sequences; no token attends outside its own sample.

    Args:
        q: ``[T, H, D]`` queries of all samples, concatenated (float32/float16/bfloat16).
        k, v: ``[T, H_kv, D]`` with ``H % H_kv == 0`` (GQA/MQA when ``H_kv < H``), same dtype as ``q``.
        cu_seqlens: ``[S + 1]`` int32, sample boundaries: ``0 = c[0] <= c[1] <= ... <= c[S] = T``.
        max_seqlen: the longest sample (``max(c[i+1] - c[i])``); flash-attn's and torch's kernels size
            their grids with it.
        causal: mask future tokens within each sample.
        scale: softmax scale, default ``D ** -0.5``.

    Returns: ``[T, H, D]`` in the dtype of ``q``.
    """
    _check(q.dim() == 3 and k.dim() == 3 and v.dim() == 3, "q, k, v must be [tokens, heads, head_dim]")
    _check(k.shape == v.shape, f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    _check(
        q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2],
        f"q {tuple(q.shape)} and k {tuple(k.shape)} differ",
    )
    _check(
        q.shape[1] % k.shape[1] == 0, f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads"
    )
    low = _autocast_dtype(q.device.type)
    if low is not None:
        # As autocast runs SDPA: in its lower precision. (Under autocast transformers hands over q and k
        # in float32, rotated with float32 cos/sin, and v in the autocast dtype.)
        q, k, v = q.to(low), k.to(low), v.to(low)
    _check(q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    _check(cu_seqlens.dtype == torch.int32, f"cu_seqlens must have dtype int32, got {cu_seqlens.dtype}")
    _check(
        cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2, "cu_seqlens must be 1-D with at least 2 entries"
    )
    _check(cu_seqlens.device == q.device, f"cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    backend = REGISTRY.resolve("varlen_attention", q.device.type)
    with _without_autocast(q.device.type):
        out, _ = _library.varlen_attention_op(
            q, k, v, cu_seqlens, int(max_seqlen), bool(causal), scale, backend
        )
    return out


def projector(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    *,
    embeds: torch.Tensor | None = None,
    image_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Project vision features into the LLM's space, optionally straight into the packed embeddings.

    Args:
        x: ``[N, P, C]`` vision features of N images with P tokens each.
        w1, b1: ``[D1, C]``, ``[D1]`` first linear layer (the only one for the ``linear`` projector).
        w2, b2: ``[D, D1]``, ``[D]`` second layer after an exact GELU (``mlp2x_gelu``), or None.
        embeds: ``[T, D]`` packed text embeddings; when given, the result is ``embeds`` with rows
            ``image_offsets[i] .. image_offsets[i] + P - 1`` replaced by image i's projected tokens.
        image_offsets: ``[N]`` int64, first row of each image's contiguous run of image tokens.

    Returns: ``[N, P, D]``, or ``[T, D]`` when ``embeds`` is given.
    """
    _check(x.dim() == 3, f"x must be [images, tokens, channels], got shape {tuple(x.shape)}")
    _check(
        w1.dim() == 2 and w1.shape[1] == x.shape[2],
        f"w1 {tuple(w1.shape)} does not take {x.shape[2]} channels",
    )
    _check(not (w2 is None and b2 is not None), "b2 given without w2")
    if w2 is not None:
        _check(
            w2.dim() == 2 and w2.shape[1] == w1.shape[0],
            f"w2 {tuple(w2.shape)} does not follow w1 {tuple(w1.shape)}",
        )
    if embeds is not None or image_offsets is not None:
        _check(embeds is not None and image_offsets is not None, "embeds and image_offsets go together")
        width = (w2 if w2 is not None else w1).shape[0]
        _check(
            embeds.dim() == 2 and embeds.shape[1] == width,
            f"embeds {tuple(embeds.shape)} are not [T, {width}]",
        )
        _check(
            image_offsets.shape == (x.shape[0],),
            f"image_offsets must be [{x.shape[0]}], got {tuple(image_offsets.shape)}",
        )
        _check(image_offsets.dtype == torch.int64, f"image_offsets must be int64, got {image_offsets.dtype}")
    backend = REGISTRY.resolve("projector", x.device.type)
    # In the inputs' own precision under autocast too: its output is written into the embeddings, whose
    # dtype the weights share (a small GEMM next to the LLM's).
    with _without_autocast(x.device.type):
        return _library.projector_op(x, w1, b1, w2, b2, embeds, image_offsets, backend)[0]


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """LM head + cross-entropy over supervised positions only, without the full ``[T, V]`` logits.

    Args:
        hidden: ``[T, H]`` final hidden states.
        weight: ``[V, H]`` LM head weight.
        labels: ``[T]`` int64 target token per position, ``ignore_index`` where not supervised.
        reduction: ``"mean"`` over supervised tokens (0 when there are none) or ``"sum"``.

    Returns: a float32 scalar.
    """
    _check(hidden.dim() == 2 and weight.dim() == 2, "hidden must be [T, H] and weight [V, H]")
    _check(
        hidden.shape[1] == weight.shape[1],
        f"hidden width {hidden.shape[1]} != weight width {weight.shape[1]}",
    )
    _check(
        labels.shape == hidden.shape[:1],
        f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}",
    )
    _check(labels.dtype == torch.int64, f"labels must be int64, got {labels.dtype}")
    _check(reduction in ("mean", "sum"), f"reduction must be 'mean' or 'sum', got {reduction!r}")
    low = _autocast_dtype(hidden.device.type)
    if low is not None:
        # The LM head is a matmul, which autocast runs in its lower precision (float32 weights under
        # autocast would otherwise make the vocabulary GEMMs float32); the loss stays float32.
        hidden, weight = hidden.to(low), weight.to(low)
    backend = REGISTRY.resolve("linear_cross_entropy", hidden.device.type)
    # Gradients are computed in the loss's own pass, and only those that autograd will ask for.
    grad = torch.is_grad_enabled()
    needs = [grad and hidden.requires_grad, grad and weight.requires_grad]
    with _without_autocast(hidden.device.type):
        loss, *_ = _library.linear_cross_entropy_op(
            hidden, weight, labels, int(ignore_index), reduction, needs, backend
        )
    return loss


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension, as transformers' LLaMA/Mistral/Qwen2 layers compute it.

    Args:
        x: ``[..., D]`` (float32/float16/bfloat16).
        weight: ``[D]`` scale.
        eps: added to the mean square.

    Returns: ``weight * round(x / sqrt(mean(x ** 2) + eps))`` like ``x``, in ``promote(x.dtype, weight.dtype)``;
    the normalized value is computed in float32 and rounded to ``x``'s dtype before the weight multiplies it.
    """
    _check(x.dim() >= 1 and weight.dim() == 1, "x must be [..., D] and weight [D]")
    _check(x.shape[-1] == weight.shape[0], f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    return _rms_norm_on(REGISTRY.resolve("rms_norm", x.device.type), x, weight, eps)


def _rms_norm_on(backend: str, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if backend == "torch":
        return reference.rms_norm(x, weight, eps)
    return _library.rms_norm_op(x, weight, float(eps), backend)[0]


def residual_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x, weight, eps), x)`` for a norm whose input is also the residual stream.

    The second output is ``x`` handed on (under autograd, a view of it): use it, not ``x``, where the
    residual stream goes on, and modify neither in place afterwards (autograd refuses in-place changes
    of a custom function's view). Its gradient is then added to the norm's input gradient by the norm's
    backward kernel, rather than by autograd in an elementwise pass of its own (two reads and a write of
    ``[tokens, hidden]``, twice per decoder layer). Where ``x`` takes no gradient, and on the torch backend,
    this is ``(rms_norm(x, weight, eps), x)`` and ``x`` itself is handed on.
    """
    _check(x.dim() >= 1 and weight.dim() == 1, "x must be [..., D] and weight [D]")
    _check(x.shape[-1] == weight.shape[0], f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    backend = REGISTRY.resolve("rms_norm", x.device.type)
    if backend == "torch" or not (torch.is_grad_enabled() and x.requires_grad):
        # No residual gradient to fold in (and a view would give x a gradient path it does not have).
        return _rms_norm_on(backend, x, weight, eps), x
    return _library.ResidualRmsNorm.apply(x, weight, float(eps), backend)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of queries and keys, as transformers' ``apply_rotary_pos_emb``.

    Args:
        q: ``[B, T, H, D]`` queries (any strides with a unit last stride: a projection's ``view``).
        k: ``[B, T, H_kv, D]`` keys, same dtype.
        cos, sin: ``[B, T, D]`` (or broadcastable over ``B``) for each token's position, one dtype (under
            autocast transformers gives float32 ones for bf16 projections: they are used as they are).

    Returns: ``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)`` in ``q``'s dtype,
    computed in float32 at least and rounded once; contiguous.
    """
    _check(q.dim() == 4 and k.dim() == 4, "q and k must be [batch, tokens, heads, head_dim]")
    _check(
        q.shape[:2] == k.shape[:2] and q.shape[3] == k.shape[3],
        f"q {tuple(q.shape)} and k {tuple(k.shape)} differ",
    )
    _check(q.dtype == k.dtype, f"q and k dtypes differ: {q.dtype}, {k.dtype}")
    _check(
        cos.shape == sin.shape and cos.dim() == 3 and cos.shape[1:] == (q.shape[1], q.shape[3]),
        f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be [B, T, D] for q {tuple(q.shape)}",
    )
    _check(cos.dtype == sin.dtype, f"cos and sin dtypes differ: {cos.dtype}, {sin.dtype}")
    backend = REGISTRY.resolve("rotary", q.device.type)
    if backend == "torch":
        return reference.rotary(q, k, cos, sin)
    q_out, k_out = _library.rotary_op(q, k, cos, sin, backend)
    return q_out, k_out


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (the gated MLP activation), ``silu(gate)`` rounded to the input dtype first.

    Args:
        gate, up: the same shape and dtype.
    """
    _check(gate.shape == up.shape, f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    _check(gate.dtype == up.dtype, f"gate and up dtypes differ: {gate.dtype}, {up.dtype}")
    backend = REGISTRY.resolve("swiglu", gate.device.type)
    if backend == "torch":
        return reference.swiglu(gate, up)
    return _library.swiglu_op(gate, up, backend)


def shared_input_linear(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, ...]:
    """``F.linear(x, w_i, b_i)`` for each weight: the q/k/v or gate/up projections of one input.

    The same values and gradients as separate ``F.linear`` calls; in the backward the input's gradient is
    accumulated by the GEMMs themselves instead of by autograd's elementwise sums (see
    ``_shared_input_linear.py``). No backend choice: these are torch's GEMMs.

    Args:
        x: ``[..., K]``.
        weights: ``[N_i, K]`` each, ``x``'s dtype (under autocast all are cast to its dtype, as
            ``F.linear`` would be).
        biases: ``[N_i]`` or None for each weight; None for no biases at all.
    """
    weights = list(weights)
    biases = [None] * len(weights) if biases is None else list(biases)
    _check(len(weights) > 0, "shared_input_linear needs at least one weight")
    _check(len(biases) == len(weights), f"{len(biases)} biases for {len(weights)} weights")
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        _check(
            w.dim() == 2 and w.shape[1] == x.shape[-1],
            f"weight {i} {tuple(w.shape)} does not take inputs of width {x.shape[-1]}",
        )
        _check(b is None or b.shape == w.shape[:1], f"bias {i} does not match weight {i} {tuple(w.shape)}")
    low = _autocast_dtype(x.device.type)
    if low is not None:
        x = x.to(low)
        weights = [w.to(low) for w in weights]
        biases = [None if b is None else b.to(low) for b in biases]
    dtypes = {t.dtype for t in (x, *weights, *biases) if t is not None}
    _check(len(dtypes) == 1, f"x, weights and biases must share one dtype, got {sorted(map(str, dtypes))}")
    with _without_autocast(x.device.type):
        return SharedInputLinear.apply(x, len(weights), *weights, *biases)


def packing(lengths: Sequence[int] | torch.Tensor, budget: int) -> torch.Tensor:
    """Place items of the given lengths into bins of ``budget`` tokens (first-fit-decreasing).

    Returns ``[n]`` int64: the bin of each item, bins numbered from 0 in order of opening (the first
    bin holds the longest item). Raises ``ValueError`` for an item that is not in ``(0, budget]``.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    _check(lengths.dim() == 1, f"lengths must be 1-D, got shape {tuple(lengths.shape)}")
    if lengths.numel():
        too = (lengths <= 0) | (lengths > budget)
        if bool(too.any()):
            index = int(too.nonzero()[0])
            raise ValueError(f"item {index} has length {int(lengths[index])}, outside (0, {budget}]")
    return REGISTRY.implementation("packing", REGISTRY.resolve("packing", "cpu"))(lengths.cpu(), int(budget))
