"""Our Triton kernels compile for the GPUs we train on, without a GPU.

The interpreter runs a kernel's Python, not its compiled form: typing and lowering errors (a dtype mix,
a loop bound the compiler cannot take) show only when Triton compiles it. Triton compiles ahead of time
for a named target with no device present, so each kernel is compiled here for sm_90 (H100) in every
floating dtype and for sm_80 (A100) in bf16, with the specializations the launchers use.

The LLM layer's kernels are listed with their signatures by hand. The attention and loss kernels are
compiled from what their launchers pass: the launchers run on CPU tensors of LLaMA-7B head and vocabulary
widths with Triton's launch replaced by a recorder, so their tile sizes, warps and stages are the ones a
GPU run would use, and the list cannot fall behind the launchers. Both compile the general variant: the
run-time specialisations Triton adds on a GPU (integers equal to 1 as constants, 16-byte alignment hints
for pointers and strides) are left out, so an error only in the vectorised form could still slip by.

The attention kernels run at the register limit, where an innocent edit can make the compiler spill to
local memory (moving a subtraction in dQ's prologue once did). The compiled forward and dQ kernels for
sm_90 must spill nothing (read from the cubin with the ``cuobjdump`` that Triton ships); the dK/dV kernel,
which keeps K, V, dK and dV of its tile for its whole walk, spills at 4 warps and was measured faster so
than at 8 (``kernels/varlen_attention.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from llavamed_fast.kernels import rms_norm, rotary, swiglu  # noqa: E402

TARGETS = [(90, "bf16"), (90, "fp16"), (90, "fp32"), (80, "bf16")]


def _kernels(dt: str):
    """(kernel, signature, constexprs, options) as the launchers call them for ``dt`` inputs (LLaMA-7B
    widths), with the launchers' warp counts."""
    norm_warps = {"num_warps": rms_norm._warps(4096)}
    # The weight in the input dtype, and (half precision) a float32 weight with a float32 output.
    for w, y in {(dt, dt), ("fp32", "fp32")}:
        yield (
            rms_norm._rms_norm_forward_kernel,
            {
                "x_ptr": f"*{dt}",
                "w_ptr": f"*{w}",
                "y_ptr": f"*{y}",
                "rstd_ptr": "*fp32",
                "n_cols": "i32",
                "x_stride": "i32",
                "y_stride": "i32",
                "eps": "fp32",
                "BLOCK_D": "constexpr",
            },
            {"BLOCK_D": 4096},
            norm_warps,
        )
    # stage 2 (the weight trains) with the residual stream's gradient, stage 1 (frozen) without and with
    for needs_dw, has_dres in ((True, True), (False, False), (False, True)):
        yield (
            rms_norm._rms_norm_backward_kernel,
            {
                "dy_ptr": f"*{dt}",
                "x_ptr": f"*{dt}",
                "w_ptr": f"*{dt}",
                "rstd_ptr": "*fp32",
                "dres_ptr": f"*{dt}",
                "dx_ptr": f"*{dt}",
                "dw_partial_ptr": "*fp32",
                "n_rows": "i32",
                "n_cols": "i32",
                "rows_per_program": "i32",
                "dy_stride": "i32",
                "x_stride": "i32",
                "dres_stride": "i32",
                "dx_stride": "i32",
                "HAS_DRES": "constexpr",
                "NEEDS_DW": "constexpr",
                "BLOCK_D": "constexpr",
            },
            {"HAS_DRES": has_dres, "NEEDS_DW": needs_dw, "BLOCK_D": 4096},
            norm_warps,
        )
    for backward in (False, True):
        yield (
            rotary._rotary_kernel,
            {
                "q_ptr": f"*{dt}",
                "k_ptr": f"*{dt}",
                "cos_ptr": f"*{dt}",
                "sin_ptr": f"*{dt}",
                "q_out_ptr": f"*{dt}",
                "k_out_ptr": f"*{dt}",
                "q_token_stride": "i32",
                "q_head_stride": "i32",
                "k_token_stride": "i32",
                "k_head_stride": "i32",
                "cs_token_stride": "i32",
                "q_heads": "i32",
                "k_heads": "i32",
                "half": "i32",
                "COMPUTE": "constexpr",
                "BACKWARD": "constexpr",
                "BLOCK_HALF": "constexpr",
                "BLOCK_H": "constexpr",
            },
            {"COMPUTE": triton.language.float32, "BACKWARD": backward, "BLOCK_HALF": 64, "BLOCK_H": 8},
            {"num_warps": 4},
        )
    yield (
        swiglu._swiglu_forward_kernel,
        {"gate_ptr": f"*{dt}", "up_ptr": f"*{dt}", "out_ptr": f"*{dt}", "n": "i32", "BLOCK": "constexpr"},
        {"BLOCK": swiglu._BLOCK},
        {"num_warps": 4},
    )
    yield (
        swiglu._swiglu_backward_kernel,
        {
            "dout_ptr": f"*{dt}",
            "gate_ptr": f"*{dt}",
            "up_ptr": f"*{dt}",
            "dgate_ptr": f"*{dt}",
            "dup_ptr": f"*{dt}",
            "n": "i64",
            "BLOCK": "constexpr",
        },
        {"BLOCK": swiglu._BLOCK},
        {"num_warps": 4},
    )


_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_TRITON_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "int32": "i32", "int64": "i64"}


def _recorded_launches(dt: str) -> list[tuple]:
    """(kernel, signature, constexprs, options) of every launch the attention (forward and backward, 32
    query / 8 KV heads of 128) and loss launchers (a frozen head's full 32,000-column rows and a trained
    head's 3,328-column blocks) make for ``dt`` inputs, recorded instead of run."""
    import torch
    from triton.runtime.jit import JITFunction

    from llavamed_fast.kernels import linear_cross_entropy, varlen_attention

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    varlen_attention._check = lambda *args: None  # it refuses CPU tensors outside the interpreter
    dtype = getattr(torch, _TORCH_DTYPES[dt])
    q = torch.empty(64, 32, 128, dtype=dtype)
    k, v = torch.empty(64, 8, 128, dtype=dtype), torch.empty(64, 8, 128, dtype=dtype)
    cu_seqlens = torch.tensor([0, 40, 64], dtype=torch.int32)
    varlen_attention._forward(q, k, v, cu_seqlens, 40, True, 0.0884)
    lse = torch.empty(32, 64)
    varlen_attention._backward(
        torch.empty_like(q), q, k, v, torch.empty_like(q), lse, cu_seqlens, 40, True, 0.0884
    )
    for columns in (32000, 3328):
        logits, targets, rows = torch.empty(4, columns), torch.zeros(4, dtype=torch.int64), torch.empty(4)
        linear_cross_entropy._logsumexp_update(logits, targets, rows, rows.clone(), rows.clone(), 0)
        linear_cross_entropy._softmax_grad(logits, targets, rows, torch.empty(4, columns, dtype=dtype), 0)

    out = []
    for kernel, args, kwargs in launches:
        options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
        bound = kernel.signature.bind(*args, **kwargs).arguments
        signature, constexprs = {}, {}
        for param in kernel.params:
            value = bound[param.name]
            if param.is_constexpr:
                signature[param.name], constexprs[param.name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = "*" + _TRITON_TYPES[str(value.dtype).removeprefix("torch.")]
            elif isinstance(value, bool):
                signature[param.name] = "i1"
            elif isinstance(value, int):
                signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            elif isinstance(value, float):
                signature[param.name] = "fp32"
            else:
                raise TypeError(f"{kernel.__name__}: argument {param.name} of type {type(value).__name__}")
        out.append((kernel, signature, constexprs, options))
    return out


def _spill_bytes(cubin: bytes) -> int:
    """Bytes of local stack the compiled kernel uses (its register spills), from ``cuobjdump``."""
    import importlib
    import re
    import tempfile

    nvidia = importlib.import_module("triton.backends.nvidia")
    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        )
    return int(re.search(r"STACK:(\d+)", usage.stdout).group(1))


def compile_all(arch: int, dtype: str, which: str) -> None:
    """Compile every kernel for ``sm_<arch>``; run in a process without ``TRITON_INTERPRET=1`` (the
    interpreter replaces ``@triton.jit`` kernels and patches ``triton.language`` for the whole process).
    Prints each kernel's line ending in `` ok``, with its spill stack in bytes."""
    target = GPUTarget("cuda", arch, 32)
    kernels = _kernels(dtype) if which == "layer" else _recorded_launches(dtype)
    for kernel, signature, constexprs, options in kernels:
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=target, options=options)
        cubin = compiled.asm.get("cubin")
        assert cubin, f"{kernel.__name__} for sm_{arch} {dtype}: no cubin"
        print(
            f"{kernel.__name__} {sorted(constexprs.items())} {signature}: sm_{arch} {dtype} "
            f"spill={_spill_bytes(cubin)} ok"
        )


def _compile_in_subprocess(arch: int, dtype: str, which: str, tmp_path) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, __file__, str(arch), dtype, which],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.parametrize(("arch", "dtype"), TARGETS, ids=[f"sm{a}-{d}" for a, d in TARGETS])
def test_llm_layer_kernels_compile(arch, dtype, tmp_path):
    stdout = _compile_in_subprocess(arch, dtype, "layer", tmp_path)
    assert stdout.count(" ok") == len(list(_kernels(dtype))), stdout


@pytest.mark.parametrize(("arch", "dtype"), TARGETS, ids=[f"sm{a}-{d}" for a, d in TARGETS])
def test_attention_and_loss_kernels_compile(arch, dtype, tmp_path):
    stdout = _compile_in_subprocess(arch, dtype, "recorded", tmp_path)
    # Forward, preprocess, dK/dV and dQ, and the tile lists (the forward's, and one for both backward
    # kernels); the loss's two row kernels at two widths.
    names = [line.split()[0] for line in stdout.splitlines() if line.endswith(" ok")]
    assert sorted(set(names)) == [
        "_linear_cross_entropy_grad_kernel",
        "_linear_cross_entropy_lse_kernel",
        "_varlen_attention_bwd_dkdv_kernel",
        "_varlen_attention_bwd_dq_kernel",
        "_varlen_attention_bwd_preprocess_kernel",
        "_varlen_attention_fwd_kernel",
        "_varlen_attention_tiles_kernel",
    ], stdout
    assert len(names) == 10, stdout
    if arch == 90 and dtype in ("bf16", "fp16"):  # the training precisions on the H100
        spills = {
            line.split()[0]: line.split("spill=")[1].split()[0]
            for line in stdout.splitlines()
            if "spill=" in line
        }
        for kernel in ("_varlen_attention_fwd_kernel", "_varlen_attention_bwd_dq_kernel"):
            assert spills[kernel] == "0", f"{kernel} spills {spills[kernel]} bytes on sm_90 {dtype}"


if __name__ == "__main__":
    compile_all(int(sys.argv[1]), sys.argv[2], sys.argv[3])
