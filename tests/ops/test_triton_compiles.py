"""The LLM layer's Triton kernels compile for the GPUs we train on, without a GPU.

The interpreter runs a kernel's Python, not its compiled form: typing and lowering errors (a dtype mix,
a loop bound the compiler cannot take) show only when Triton compiles it. Triton compiles ahead of time
for a named target with no device present, so each kernel is compiled here for sm_90 (H100) in every
floating dtype and for sm_80 (A100) in bf16, with the specializations the launchers use.
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
    for needs_dw in (True, False):
        yield (
            rms_norm._rms_norm_backward_kernel,
            {
                "dy_ptr": f"*{dt}",
                "x_ptr": f"*{dt}",
                "w_ptr": f"*{dt}",
                "rstd_ptr": "*fp32",
                "dx_ptr": f"*{dt}",
                "dw_partial_ptr": "*fp32",
                "n_rows": "i32",
                "n_cols": "i32",
                "rows_per_program": "i32",
                "dy_stride": "i32",
                "x_stride": "i32",
                "dx_stride": "i32",
                "NEEDS_DW": "constexpr",
                "BLOCK_D": "constexpr",
            },
            {"NEEDS_DW": needs_dw, "BLOCK_D": 4096},
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


def compile_all(arch: int, dtype: str) -> None:
    """Compile every kernel for ``sm_<arch>``; run in a process without ``TRITON_INTERPRET=1`` (the
    interpreter replaces ``@triton.jit`` kernels and patches ``triton.language`` for the whole process)."""
    target = GPUTarget("cuda", arch, 32)
    for kernel, signature, constexprs, options in _kernels(dtype):
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=target, options=options)
        assert compiled.asm.get("cubin"), f"{kernel.__name__} for sm_{arch} {dtype}: no cubin"
        print(f"{kernel.__name__} {sorted(constexprs.items())} {signature}: sm_{arch} {dtype} ok")


@pytest.mark.parametrize(("arch", "dtype"), TARGETS, ids=[f"sm{a}-{d}" for a, d in TARGETS])
def test_llm_layer_kernels_compile(arch, dtype, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, __file__, str(arch), dtype], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count(" ok") == len(list(_kernels(dtype))), result.stdout


if __name__ == "__main__":
    compile_all(int(sys.argv[1]), sys.argv[2])
