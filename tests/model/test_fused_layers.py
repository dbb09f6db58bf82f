"""The fused RMSNorm, SwiGLU and rotary inside transformers' own LLMs give transformers' own results.

Two copies of a tiny random LLaMA / Mistral / Qwen2 (float32, CPU): one as transformers builds it, one
with ``fused.fuse``, our attention and the ops on their Triton kernels (under ``TRITON_INTERPRET=1``). Logits and every
parameter's gradient must agree; a family whose modules compute something else is left alone.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llavamed_fast import ops
from llavamed_fast.model import attention, fused

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

TINY = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 120,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
}


def _model(model_type: str, **extra):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY, **extra)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms away from their all-ones init, so the weight matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def _logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits
    (logits.square().mean()).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def _counted_kernels(monkeypatch) -> dict[str, int]:
    from llavamed_fast.kernels.rms_norm import TritonRmsNorm
    from llavamed_fast.kernels.rotary import TritonRotary
    from llavamed_fast.kernels.swiglu import TritonSwiglu

    calls: dict[str, int] = {}
    for kernels in (TritonRmsNorm, TritonSwiglu, TritonRotary):
        for name in ("forward", "backward"):
            _count_calls(monkeypatch, kernels, f"{kernels.__name__}.{name}", calls)
    return calls


def _count_calls(monkeypatch, kernels, key: str, calls: dict) -> None:
    name = key.rsplit(".", 1)[1]
    original = getattr(kernels, name)

    def counted(*args, **kwargs):
        calls[key] = calls.get(key, 0) + 1
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, name, staticmethod(counted) if isinstance(kernels, type) else counted)


def _check_against_plain(model_type, monkeypatch, attn_implementation):
    calls = _counted_kernels(monkeypatch)
    _count_calls(monkeypatch, ops, "ops.shared_input_linear", calls)
    _count_calls(monkeypatch, fused, "fused._plus_linear", calls)
    _count_calls(monkeypatch, ops, "ops.residual_rms_norm", calls)
    plain = _model(model_type)
    fast = copy.deepcopy(plain)
    fast.set_attn_implementation(attn_implementation)
    layers = TINY["num_hidden_layers"]
    assert fused.fuse(fast) == {
        "rms_norm": 2 * layers + 1,
        "swiglu": layers,
        "rotary": layers,
        "residual": layers,
    }
    ids = torch.randint(0, TINY["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(1))
    want_logits, want_grads = _logits_and_grads(plain, ids)
    with ops.use_backend(rms_norm="triton", swiglu="triton", rotary="triton"):
        got_logits, got_grads = _logits_and_grads(fast, ids)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert want_grads.keys() == got_grads.keys()
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-4, atol=1e-6, msg=name)
    return calls


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_fused_llm_matches_transformers(model_type, monkeypatch):
    # Our attention (each row one whole sequence) against transformers' SDPA, the rest on the kernels.
    calls = _check_against_plain(model_type, monkeypatch, attention.register())
    layers = TINY["num_hidden_layers"]
    want = {"TritonRmsNorm": 2 * layers + 1, "TritonSwiglu": layers, "TritonRotary": layers}
    want_calls = {f"{k}.{way}": n for k, n in want.items() for way in ("forward", "backward")}
    # q/k/v and gate/up; the two residual adds of each layer in its o_proj and down_proj GEMMs, and their
    # gradients in its two norms' backward
    assert calls == {
        **want_calls,
        "ops.shared_input_linear": 2 * layers,
        "fused._plus_linear": 2 * layers,
        "ops.residual_rms_norm": 2 * layers,
    }


def test_other_attention_implementations_keep_transformers_forward(monkeypatch):
    # Cached decoding and the other implementations run transformers' own attention forward.
    calls = _check_against_plain("llama", monkeypatch, "sdpa")
    assert "TritonRotary.forward" not in calls and calls["TritonSwiglu.forward"] == TINY["num_hidden_layers"]
    assert calls["ops.shared_input_linear"] == TINY["num_hidden_layers"]  # the MLPs' gate/up only
    # the layers run transformers' forward around SDPA
    assert "fused._plus_linear" not in calls and "ops.residual_rms_norm" not in calls


def test_transformers_linears_turns_the_linear_fusions_off(monkeypatch):
    fast = _model("qwen2")  # q/k/v with biases
    fast.set_attn_implementation(attention.register())
    fused.fuse(fast)
    calls: dict[str, int] = {}
    _count_calls(monkeypatch, ops, "ops.shared_input_linear", calls)
    _count_calls(monkeypatch, fused, "fused._plus_linear", calls)
    ids = torch.randint(0, TINY["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(5))
    with fused.transformers_linears():
        separate_logits, separate_grads = _logits_and_grads(fast, ids)
    assert calls == {}
    shared_logits, shared_grads = _logits_and_grads(fast, ids)
    layers = TINY["num_hidden_layers"]
    assert calls == {"ops.shared_input_linear": 2 * layers, "fused._plus_linear": 2 * layers}
    torch.testing.assert_close(shared_logits, separate_logits)
    for name, want in separate_grads.items():
        torch.testing.assert_close(shared_grads[name], want, rtol=1e-5, atol=1e-6, msg=name)


def test_hooked_or_wrapped_projections_are_called_as_modules(monkeypatch):
    # A forward pre-hook (as DeepSpeed ZeRO-3 puts on every module to gather its weight) and a replaced
    # instance forward (accelerate's offloading) must run, and a Linear subclass (LoRA-like) computes
    # something else: such projections keep their module call.
    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    plain = _model("llama")
    with torch.no_grad():
        for layer in plain.model.layers:
            old = layer.mlp.up_proj
            layer.mlp.up_proj = Scaled(old.in_features, old.out_features, bias=False)
            layer.mlp.up_proj.weight.copy_(old.weight)
    fast = copy.deepcopy(plain)
    fast.set_attn_implementation(attention.register())
    fused.fuse(fast)
    hooked = []
    for layer in fast.model.layers:
        layer.self_attn.k_proj.register_forward_pre_hook(lambda module, args: hooked.append(module))
        # accelerate's offloading hooks replace the instance's forward instead of registering a hook.
        gate = layer.mlp.gate_proj
        gate.forward = lambda x, gate=gate: (hooked.append(gate), torch.nn.Linear.forward(gate, x))[1]
    calls: dict[str, int] = {}
    _count_calls(monkeypatch, ops, "ops.shared_input_linear", calls)
    ids = torch.randint(0, TINY["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(4))
    want_logits, want_grads = _logits_and_grads(plain, ids)
    got_logits, got_grads = _logits_and_grads(fast, ids)
    assert calls == {} and len(hooked) == 2 * TINY["num_hidden_layers"]
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-4, atol=1e-6, msg=name)


def test_without_gradients_transformers_forwards_run(monkeypatch):
    calls = _counted_kernels(monkeypatch)
    plain = _model("mistral")
    fast = copy.deepcopy(plain)
    fast.set_attn_implementation(attention.register())
    fused.fuse(fast)
    ids = torch.randint(0, TINY["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), ops.use_backend(rms_norm="triton", swiglu="triton", rotary="triton"):
        got = fast(input_ids=ids, use_cache=False).logits
        want = plain(input_ids=ids, use_cache=False).logits
    assert calls == {}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_other_activations_and_norms_are_left_alone():
    # Gemma's norm scales by (1 + weight) and its MLP is GELU-gated: neither is what the ops compute.
    gemma = _model("gemma", head_dim=16)
    assert fused.fuse(gemma) == {"rms_norm": 0, "swiglu": 0, "rotary": 0, "residual": 0}
    llama_gelu = _model("llama", hidden_act="gelu")
    assert fused.fuse(llama_gelu) == {"rms_norm": 5, "swiglu": 0, "rotary": 2, "residual": 0}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float32_weights_under_autocast_match_transformers(backend, monkeypatch):
    # How the plain engine trains on a GPU: float32 weights, autocast to half precision. transformers then
    # rotates half-precision q/k with float32 cos/sin and hands SDPA float32 q/k with a half-precision v;
    # the fused path rotates in float32 and rounds once, and our attention casts as autocast casts SDPA.
    # The residual stream stays float32 as in transformers: no residual add rides in a half-precision GEMM.
    calls: dict[str, int] = {}
    _count_calls(monkeypatch, fused, "fused._plus_linear", calls)
    plain = _model("llama")
    fast = copy.deepcopy(plain)
    fast.set_attn_implementation(attention.register())
    fused.fuse(fast)
    ids = torch.randint(0, TINY["vocab_size"], (1, 11), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.float16):
        want_logits, want_grads = _logits_and_grads(plain, ids)
        with ops.use_backend(rms_norm=backend, swiglu=backend, rotary=backend):
            got_logits, got_grads = _logits_and_grads(fast, ids)
    assert calls == {}
    torch.testing.assert_close(got_logits, want_logits, rtol=2e-3, atol=2e-3)
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=2e-2, atol=1e-4, msg=name)
