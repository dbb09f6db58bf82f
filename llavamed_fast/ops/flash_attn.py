"""The flash-attn package as a backend of ``varlen_attention`` (selectable where it is installed).

flash-attn's varlen kernels take exactly our layout: ``q [T, H, D]``, ``k/v [T, H_kv, D]``, int32
``cu_seqlens``, GQA by head count, and return the log-sum-exp as ``[H, T]`` float32. Its forward and
backward entry points are module-private and have changed keywords between releases, so they are called
by keyword after checking the installed signature (2.7 and later); another signature is a clear error.
"""

from __future__ import annotations

import inspect

import torch

_FORWARD_KEYWORDS = {"window_size_left", "window_size_right", "softcap", "alibi_slopes", "return_softmax"}
_BACKWARD_KEYWORDS = {"window_size_left", "window_size_right", "softcap", "alibi_slopes", "deterministic"}


def _interface():
    from flash_attn import __version__, flash_attn_interface

    for name, needed in (
        ("_flash_attn_varlen_forward", _FORWARD_KEYWORDS),
        ("_flash_attn_varlen_backward", _BACKWARD_KEYWORDS),
    ):
        parameters = set(inspect.signature(getattr(flash_attn_interface, name)).parameters)
        if not needed <= parameters:
            raise RuntimeError(
                f"flash_attn {__version__}: {name} lacks {sorted(needed - parameters)}; this backend supports "
                "flash-attn 2.7 and later (use the triton backend instead)"
            )
    return flash_attn_interface


class FlashAttnVarlenAttention:
    @staticmethod
    def forward(q, k, v, cu_seqlens, max_seqlen, causal, scale):
        interface = _interface()
        out, lse, *_ = interface._flash_attn_varlen_forward(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            dropout_p=0.0,
            softmax_scale=scale,
            causal=causal,
            window_size_left=-1,
            window_size_right=-1,
            softcap=0.0,
            alibi_slopes=None,
            return_softmax=False,
        )
        return out, lse

    @staticmethod
    def backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale):
        interface = _interface()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        interface._flash_attn_varlen_backward(
            dout.contiguous(),
            q,
            k,
            v,
            out,
            lse,
            dq,
            dk,
            dv,
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            dropout_p=0.0,
            softmax_scale=scale,
            causal=causal,
            window_size_left=-1,
            window_size_right=-1,
            softcap=0.0,
            alibi_slopes=None,
            deterministic=False,
        )
        return dq, dk, dv
