"""Routes a transformers LLM's RMSNorm, gated-MLP activation and rotary embedding to ``ops.rms_norm``,
``ops.swiglu`` and ``ops.rotary``, and its q/k/v and gate/up projections to ``ops.shared_input_linear``.

transformers computes them eagerly: RMSNorm as six elementwise kernels and a reduction in float32, the
MLP's ``silu(gate) * up`` as two, the rotation of queries and keys as about ten, each a trip through
memory. By the formulas, a LLaMA-7B layer at 13K tokens moves about 15 GB more than one pass of each
needs, about 5 ms per training step on an H100. And autograd sums the input gradients of projections
that read one input (q/k/v, gate/up) with elementwise adds, three per layer, each reading two
``[tokens, hidden]`` tensors and writing one; ``shared_input_linear`` has the GEMMs accumulate them.
Only modules whose class is known to compute exactly what the op computes are changed, and only their
``forward`` (on the instance): parameters, names, checkpoints and every other module stay transformers'
own. Projections that are not plain ``nn.Linear`` (LoRA, quantized) or that carry hooks (DeepSpeed ZeRO-3
gathers weights in them) are called as modules. On a CPU the ops' default backend is their torch
reference, which is transformers' formula itself.

The fused forwards run where autograd records (training), the case they were built for: there the
saved passes are over whole packed rows, forward and backward. Without gradients (evaluation, serving)
transformers' own forwards run: decode steps are a few tokens each, launch-bound rather than
bandwidth-bound, and serving's numbers were measured on them.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from collections.abc import Iterator

import torch
from torch import nn

from llavamed_fast import ops
from llavamed_fast.model import attention

RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"})
"""``weight * (x / rms(x)).to(input dtype)`` in float32, ``eps`` in ``variance_epsilon``."""

GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
"""``down_proj(act_fn(gate_proj(x)) * up_proj(x))``; fused when ``act_fn`` is SiLU."""

SILU = ("silu", "swish")

ATTENTIONS = frozenset({"LlamaAttention", "MistralAttention", "Qwen2Attention"})
"""q/k/v projections, ``apply_rotary_pos_emb``, the attention function, ``o_proj``: in packed training (our
attention, no KV cache, autograd recording) the rotation runs through ``ops.rotary``; otherwise
transformers' own forward runs."""


def _plain_linears(*modules: nn.Module) -> bool:
    """Whether calling these modules is exactly ``F.linear`` with their parameters.

    A subclass (LoRA, quantized layers, parametrizations) computes something else, and a module with hooks
    must be called: DeepSpeed ZeRO-3 gathers a module's partitioned weight in its forward pre-hook, and
    accelerate's offloading replaces the instance's ``forward``. A weight that is a tensor subclass
    (FSDP2's DTensor, quantized wrappers) is left to its own ``F.linear`` too."""
    return all(
        type(m) is nn.Linear
        and "forward" not in vars(m)
        and type(m.weight.data) is torch.Tensor
        and not (m._forward_pre_hooks or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks)
        for m in modules
    ) and not (
        nn.modules.module._global_forward_pre_hooks
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_backward_hooks
        or nn.modules.module._global_backward_pre_hooks
    )


_SEPARATE = contextvars.ContextVar("llavamed_fast_separate_projections", default=False)


@contextlib.contextmanager
def separate_projections() -> Iterator[None]:
    """Inside the block, fused forwards call their q/k/v and gate/up projections one by one, as
    transformers does (benchmarks use it to attribute ``shared_input_linear``'s share)."""
    token = _SEPARATE.set(True)
    try:
        yield
    finally:
        _SEPARATE.reset(token)


def _projections(x: torch.Tensor, *modules: nn.Module) -> tuple[torch.Tensor, ...]:
    if not _SEPARATE.get() and _plain_linears(*modules):
        return ops.shared_input_linear(x, [m.weight for m in modules], [m.bias for m in modules])
    return tuple(m(x) for m in modules)


def _rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, hidden_states)
    return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _gated_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, x)
    gate, up = _projections(x, self.gate_proj, self.up_proj)
    return self.down_proj(ops.swiglu(gate, up))


def _attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    past_key_values=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if (
        past_key_values is not None
        or self.config._attn_implementation != attention.ATTENTION_NAME
        or not torch.is_grad_enabled()
    ):
        return type(self).forward(
            self, hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs
        )
    tokens = hidden_states.shape[:-1]
    shape = (*tokens, -1, self.head_dim)
    # [B, T, H, D] views of the projections: the layout the rotation and the attention op both take.
    q, k, v = (t.view(shape) for t in _projections(hidden_states, self.q_proj, self.k_proj, self.v_proj))
    q, k = ops.rotary(q, k, *position_embeddings)
    # Qwen2 keeps each layer's window on the layer (None on full-attention layers), Mistral on the config.
    window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
    out, _ = attention.varlen_attention_forward(
        self,
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attention_mask,
        dropout=self.attention_dropout if self.training else 0.0,
        scaling=self.scaling,
        sliding_window=window,
        **kwargs,
    )
    return self.o_proj(out.reshape(*tokens, -1)), None


def fuse(language_model: nn.Module) -> dict[str, int]:
    """Point the known RMSNorm and gated-MLP modules of ``language_model`` at the fused ops (idempotent).

    Returns how many modules of each kind now use them, e.g. ``{"rms_norm": 65, "swiglu": 32, "rotary": 32}``
    for a 32-layer LLaMA."""
    counts = {"rms_norm": 0, "swiglu": 0, "rotary": 0}
    for module in language_model.modules():
        kind = type(module).__name__
        if kind in RMS_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_forward, module)
            counts["rms_norm"] += 1
        elif kind in GATED_MLPS and getattr(getattr(module, "config", None), "hidden_act", None) in SILU:
            module.forward = types.MethodType(_gated_mlp_forward, module)
            counts["swiglu"] += 1
        elif kind in ATTENTIONS:
            module.forward = types.MethodType(_attention_forward, module)
            counts["rotary"] += 1
    return counts
