"""Routes a transformers LLM's attention to ``ops.varlen_attention`` through the attention registry.

transformers' ``AttentionInterface`` lets a model call a named attention function; we register ours as
``llavamed_varlen`` and set it as the LLM's implementation. The packed row's ``cu_seq_lens_q`` and
``max_length_q`` (transformers' own keyword names for varlen attention) travel from the model's forward
through its layers to this function. No causal mask is ever built: the name is not in the mask registry,
so transformers skips mask creation, and the op masks within samples by itself.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from llavamed_fast import ops

ATTENTION_NAME = "llavamed_varlen"


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query [B, H, T, D]``, ``key/value [B, H_kv, T, D]`` -> ``[B, T, H, D]``.

    With ``cu_seq_lens_q`` the batch is one packed row (``B == 1``); without it each of the ``B`` rows is
    one whole sequence (no padding). Padding masks, KV caches, dropout and sliding windows are refused:
    packed training and prefill never need them, and ignoring them would silently change the result.
    """
    batch, _, length, head_dim = query.shape
    if attention_mask is not None:
        raise ValueError(
            f"{ATTENTION_NAME} attention takes packed rows, not padding masks; pack the batch instead"
        )
    if key.shape[2] != length:
        raise ValueError(
            f"{ATTENTION_NAME} attention got {length} queries for {key.shape[2]} keys (a KV cache); "
            "use attn_implementation='sdpa' for cached decoding"
        )
    if dropout:
        raise ValueError(f"{ATTENTION_NAME} attention has no dropout (got {dropout})")
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    max_seqlen = kwargs.get("max_length_q")
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=query.device)
        max_seqlen = length
    elif batch != 1:
        raise ValueError(f"with cu_seq_lens_q the batch must be one packed row, got {batch} rows")
    if window is not None and max_seqlen > window:
        raise ValueError(
            f"sliding-window attention (window {window}) is not supported for {max_seqlen}-token samples"
        )
    # [B, H, T, D] -> [B*T, H, D]: the projections produced [B, T, H, D], so this is their own memory layout.
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], head_dim) for t in (query, key, value))
    out = ops.varlen_attention(
        q,
        k,
        v,
        cu_seqlens.to(torch.int32),
        int(max_seqlen),
        causal=getattr(module, "is_causal", True),
        scale=scaling,
    )
    return out.view(batch, length, -1, head_dim), None


def register() -> str:
    """Make ``llavamed_varlen`` a valid ``attn_implementation`` (idempotent); returns the name."""
    AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
    return ATTENTION_NAME
