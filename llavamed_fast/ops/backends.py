"""Which implementations of each op exist, where they run, and which one is each device's default.

Imported by ``llavamed_fast.ops``; every implementation loads lazily, so importing the ops imports no
optional package (Triton, flash_attn) and does not load the extension until an op needs it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from llavamed_fast.ops import _library, reference
from llavamed_fast.ops.registry import REGISTRY, Implementation

_ANYWHERE = frozenset({"cpu", "cuda"})
_CUDA = frozenset({"cuda"})
# Triton kernels run on CPU tensors only under the interpreter, which must be chosen before the first
# kernel is defined: read once, here.
_TRITON_DEVICES = _ANYWHERE if os.environ.get("TRITON_INTERPRET") == "1" else _CUDA


def _load(module: str, name: str):
    return lambda: getattr(importlib.import_module(module), name)


def _missing(package: str) -> str | None:
    if importlib.util.find_spec(package) is None:
        return f"the {package} package is not installed"
    return None


def _extension_unavailable() -> str | None:
    # The extension is part of the package; if it does not load, say so rather than pretend.
    from llavamed_fast import _ext

    try:
        _ext.load()
    except ImportError as error:
        return str(error)
    return None


def _extension_without_cuda() -> str | None:
    from llavamed_fast import _ext

    reason = _extension_unavailable()
    if reason is None and not _ext.has_cuda():
        return "llavamed_fast._C was built without CUDA (rebuild where nvcc and a CUDA torch are present)"
    return reason


def _extension_packing():
    from llavamed_fast import _ext

    _ext.load()
    return torch.ops.llavamed_fast.packing


def _reference_packing(lengths: torch.Tensor, budget: int) -> torch.Tensor:
    return torch.tensor(reference.packing(lengths.tolist(), budget), dtype=torch.int64)


# Defaults: the reference on CPU; on CUDA the fast paths, best first. `benchmarks/` decides the order.
REGISTRY.define("varlen_attention", {"cpu": ("torch",), "cuda": ("triton", "torch")})
REGISTRY.define("projector", {"cpu": ("torch",), "cuda": ("cuda", "torch")})
REGISTRY.define("linear_cross_entropy", {"cpu": ("torch",), "cuda": ("triton", "torch")})
REGISTRY.define("rms_norm", {"cpu": ("torch",), "cuda": ("triton", "torch")})
REGISTRY.define("swiglu", {"cpu": ("torch",), "cuda": ("triton", "torch")})
REGISTRY.define("rotary", {"cpu": ("torch",), "cuda": ("triton", "torch")})
# Packing runs on the host whatever the training device. The compiled C++ packer is the only default: a
# package whose extension does not load is broken and must say so, not slow down quietly.
REGISTRY.define("packing", {"cpu": ("cuda",)})

REGISTRY.register(
    "varlen_attention", Implementation("torch", _ANYWHERE, lambda: _library.TorchVarlenAttention)
)
REGISTRY.register(
    "varlen_attention",
    Implementation(
        "triton",
        _TRITON_DEVICES,
        _load("llavamed_fast.kernels.varlen_attention", "TritonVarlenAttention"),
        unavailable=lambda: _missing("triton"),
    ),
)
REGISTRY.register(
    "varlen_attention",
    Implementation(
        "flash_attn",
        _CUDA,
        _load("llavamed_fast.ops.flash_attn", "FlashAttnVarlenAttention"),
        unavailable=lambda: _missing("flash_attn"),
    ),
)

REGISTRY.register("projector", Implementation("torch", _ANYWHERE, lambda: _library.TorchProjector))
REGISTRY.register(
    "projector",
    Implementation(
        "cuda", _CUDA, _load("llavamed_fast.ops.cuda", "CudaProjector"), unavailable=_extension_without_cuda
    ),
)

REGISTRY.register(
    "linear_cross_entropy", Implementation("torch", _ANYWHERE, lambda: _library.TorchLinearCrossEntropy)
)
REGISTRY.register(
    "linear_cross_entropy",
    Implementation(
        "triton",
        _TRITON_DEVICES,
        _load("llavamed_fast.kernels.linear_cross_entropy", "TritonLinearCrossEntropy"),
        unavailable=lambda: _missing("triton"),
    ),
)

# The LLM layer's elementwise ops: the torch backend is the reference under autograd (the ops module
# calls it directly); Triton fuses each into one pass forward and one backward.
for _name, _kernel in (("rms_norm", "TritonRmsNorm"), ("swiglu", "TritonSwiglu"), ("rotary", "TritonRotary")):
    REGISTRY.register(_name, Implementation("torch", _ANYWHERE, _load("llavamed_fast.ops.reference", _name)))
    REGISTRY.register(
        _name,
        Implementation(
            "triton",
            _TRITON_DEVICES,
            _load(f"llavamed_fast.kernels.{_name}", _kernel),
            unavailable=lambda: _missing("triton"),
        ),
    )

REGISTRY.register("packing", Implementation("torch", frozenset({"cpu"}), lambda: _reference_packing))
REGISTRY.register(
    "packing",
    Implementation(
        "cuda",
        frozenset({"cpu"}),
        _extension_packing,
        unavailable=_extension_unavailable,
        # "cuda" names the compiled extension; the packer in it is plain C++, so say so (it needs no GPU).
        runs_as="the extension's C++ packer, on the CPU",
    ),
)
