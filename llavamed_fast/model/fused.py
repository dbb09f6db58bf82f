"""Routes a transformers LLM's RMSNorm, gated-MLP activation and rotary embedding to ``ops.rms_norm``,
``ops.swiglu`` and ``ops.rotary``, and its q/k/v and gate/up projections to ``ops.shared_input_linear``.

transformers computes them eagerly: RMSNorm as six elementwise kernels and a reduction in float32, the
MLP's ``silu(gate) * up`` as two, the rotation of queries and keys as about ten, each a trip through
memory. By the formulas, a LLaMA-7B layer at 13K tokens moves about 15 GB more than one pass of each
needs, about 5 ms per training step on an H100. And autograd sums the input gradients of projections
that read one input (q/k/v, gate/up) with elementwise adds, three per layer, each reading two
``[tokens, hidden]`` tensors and writing one; ``shared_input_linear`` has the GEMMs accumulate them.
Likewise each decoder layer's two residual adds become the addend of the ``o_proj`` and ``down_proj``
GEMMs, which read the residual in their epilogue instead of a separate pass reading two tensors, and in
the backward the residual stream's gradient is added to each norm's input gradient inside the norm's
kernel (``ops.residual_rms_norm``) instead of by autograd in a pass of its own.
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

DECODER_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"})
"""``h = x + self_attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h))``. Where its attention
and MLP run fused, the two residual adds ride in the ``o_proj`` and ``down_proj`` GEMMs (``addmm``, the
residual as addend); otherwise, and under autocast, transformers' own forward runs."""

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
    return _unhooked(*modules) and all(
        type(m) is nn.Linear and "forward" not in vars(m) and type(m.weight.data) is torch.Tensor
        for m in modules
    )


def _unhooked(*modules: nn.Module) -> bool:
    """No hook would see these modules called (theirs or the global ones): they may be skipped."""
    return not any(
        m._forward_pre_hooks or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in modules
    ) and not (
        nn.modules.module._global_forward_pre_hooks
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_backward_hooks
        or nn.modules.module._global_backward_pre_hooks
    )


_TRANSFORMERS_LINEARS = contextvars.ContextVar("llavamed_fast_transformers_linears", default=False)


@contextlib.contextmanager
def transformers_linears() -> Iterator[None]:
    """Inside the block, fused forwards arrange their linear layers as transformers does: the q/k/v and
    gate/up projections one by one, the residual adds as passes of their own (benchmarks use it to
    attribute ``shared_input_linear``'s and the residual GEMMs' share)."""
    token = _TRANSFORMERS_LINEARS.set(True)
    try:
        yield
    finally:
        _TRANSFORMERS_LINEARS.reset(token)


def _projections(x: torch.Tensor, *modules: nn.Module) -> tuple[torch.Tensor, ...]:
    if not _TRANSFORMERS_LINEARS.get() and _plain_linears(*modules):
        return ops.shared_input_linear(x, [m.weight for m in modules], [m.bias for m in modules])
    return tuple(m(x) for m in modules)


def _rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, hidden_states)
    return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _gated_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, x)
    return self.down_proj(_mlp_activation(self, x))


def _mlp_activation(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP up to ``down_proj``: ``silu(gate_proj(x)) * up_proj(x)``."""
    gate, up = _projections(x, self.gate_proj, self.up_proj)
    return ops.swiglu(gate, up)


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
    return self.o_proj(
        _attention_output(self, hidden_states, position_embeddings, attention_mask, **kwargs)
    ), None


def _attention_output(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> torch.Tensor:
    """The packed-training attention up to ``o_proj``: ``[B, T, H * D]``."""
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
    return out.reshape(*tokens, -1)


def _plus_linear(residual: torch.Tensor, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``residual + linear(x)`` as one GEMM with ``residual`` as its addend (beta 1): the sum is formed in
    the GEMM's epilogue, in its float32 accumulator, and rounded once, with no elementwise pass."""
    rows = residual.reshape(-1, residual.shape[-1])
    return torch.addmm(rows, x.reshape(-1, x.shape[-1]), linear.weight.t()).view(residual.shape)


def _decoder_layer_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values=None,
    use_cache: bool | None = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs,
) -> torch.Tensor:
    attn, mlp = self.self_attn, self.mlp
    if not (
        torch.is_grad_enabled()
        and not _TRANSFORMERS_LINEARS.get()
        and past_key_values is None
        and attn.config._attn_implementation == attention.ATTENTION_NAME
        and _forward_is(attn, _attention_forward)
        and _forward_is(mlp, _gated_mlp_forward)
        and _unhooked(attn, mlp)
        and _plain_linears(attn.o_proj, mlp.down_proj)
        and attn.o_proj.bias is None
        and mlp.down_proj.bias is None
        # Under autocast transformers adds a half-precision branch to a float32 residual stream (the sum
        # stays float32); a GEMM with the residual as addend would make it half precision.
        and not torch.is_autocast_enabled(hidden_states.device.type)
        and hidden_states.dtype == attn.o_proj.weight.dtype == mlp.down_proj.weight.dtype
    ):
        return type(self).forward(
            self,
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
    normed, hidden_states = _residual_norm(self.input_layernorm, hidden_states)
    out = _attention_output(
        attn,
        normed,
        position_embeddings,
        attention_mask,
        position_ids=position_ids,
        use_cache=use_cache,
        **kwargs,
    )
    hidden_states = _plus_linear(hidden_states, out, attn.o_proj)
    normed, hidden_states = _residual_norm(self.post_attention_layernorm, hidden_states)
    return _plus_linear(hidden_states, _mlp_activation(mlp, normed), mlp.down_proj)


def _residual_norm(norm: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x), x)``; where the norm is ours and unhooked, the residual stream ``x`` goes on through
    ``ops.residual_rms_norm``, so that its gradient is summed in the norm's backward kernel."""
    if _forward_is(norm, _rms_norm_forward) and _unhooked(norm):
        return ops.residual_rms_norm(x, norm.weight, norm.variance_epsilon)
    return norm(x), x


def _forward_is(module: nn.Module, function) -> bool:
    return getattr(vars(module).get("forward"), "__func__", None) is function


def fuse(language_model: nn.Module) -> dict[str, int]:
    """Point the known RMSNorm and gated-MLP modules of ``language_model`` at the fused ops (idempotent).

    Returns how many modules of each kind now use them, e.g. ``{"rms_norm": 65, "swiglu": 32, "rotary": 32,
    "residual": 32}`` for a 32-layer LLaMA (``residual``: decoder layers whose residual adds ride in GEMMs)."""
    counts = {"rms_norm": 0, "swiglu": 0, "rotary": 0, "residual": 0}
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
    for module in language_model.modules():  # after their attention and MLP, which they rely on
        if (
            type(module).__name__ in DECODER_LAYERS
            and _forward_is(module.self_attn, _attention_forward)
            and _forward_is(module.mlp, _gated_mlp_forward)
        ):
            module.forward = types.MethodType(_decoder_layer_forward, module)
            counts["residual"] += 1
    return counts
