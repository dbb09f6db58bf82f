"""Every benchmark script runs (tiny shapes on the CPU) and ends with its JSON headline line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

CASES = {
    "bench_packing.py": (["--samples", "3000"], {"packed_real_fraction", "padded_real_fraction"}),
    "bench_varlen_attention.py": (
        ["--smoke", "--forward-tiles", "32,16,4,1"],
        {
            "fwd_bwd_vs_best_peer",
            "best_peer",
            "device",
            "commit",
            "fwd_ms",
            "forward_tiles",
        },
    ),
    "bench_linear_cross_entropy.py": (["--smoke"], {"speedup_vs_eager", "memory_vs_eager"}),
    "bench_llm_layer_ops.py": (
        ["--smoke"],
        {
            "rms_norm_speedup",
            "residual_rms_norm_speedup",
            "swiglu_speedup",
            "rotary_speedup",
            "layer_ms_saved",
        },
    ),
    "bench_projector.py": (["--smoke"], {"fraction_of_gemm_rate", "measured_gemm_tflops"}),
    "bench_curation.py": (["--smoke"], {"requests_per_s", "ideal_requests_per_s", "fraction_of_ideal"}),
    "bench_serve.py": (["--smoke"], {"requests_per_s_1", "ttft_ms_1", "requests_per_s_4", "ttft_ms_4"}),
    "bench_train_step.py": (
        ["--smoke", "--profile", "--layers", "2", "--marginal-layers", "3"],
        {
            f"{v}_stage{s}_{k}"
            for v in ("v0", "v1.5")
            for s in (1, 2)
            for k in ("tokens_per_s", "speedup_vs_baseline", "per_layer_ms")
        }
        | {"budget"},
    ),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_prints_json_headline(script):
    args, keys = CASES[script]
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    headline = json.loads(result.stdout.strip().splitlines()[-1])
    assert keys <= set(headline), sorted(headline)


def test_packing_benchmark_meets_its_target():
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_packing.py"), "--samples", "20000"],
        capture_output=True,
        text=True,
        check=True,
    )
    headline = json.loads(result.stdout.strip().splitlines()[-1])
    # Not a timing: the fraction of real tokens is a property of the packer on this length mix.
    assert headline["packed_real_fraction"] >= 0.98 > headline["padded_real_fraction"]
