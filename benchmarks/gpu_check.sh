#!/usr/bin/env bash
# The GPU check: on a fresh GPU machine with no network, build the extension against the torch that is
# there, run the GPU tests and every benchmark, and leave the results (device, versions, commit) in
# $OUT when set (the folder a remote run brings back) or in benchmarks/results/. Budget: about 8 minutes on
# one H100 for the default stages; each stage has its own time limit so that a hang in one still leaves
# the others' results. Serving a 7B model (up to 3 more minutes) is its own stage, run when asked for.
#   bash benchmarks/gpu_check.sh                                # build, GPU tests, kernel and training benchmarks
#   STAGES="build tests benchmarks serve" bash benchmarks/gpu_check.sh   # and serving
#   STAGES="build serve" bash benchmarks/gpu_check.sh           # serving alone
#   STAGES="build train" bash benchmarks/gpu_check.sh           # the training step alone ("kernels": the rest)
#   STAGES="build tune" bash benchmarks/gpu_check.sh            # attention tile sweep on stage 1's lengths
#   STAGES="build recipe" bash benchmarks/gpu_check.sh          # the trainer's tiny recipe on the GPU
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
results=${OUT:-benchmarks/results}
mkdir -p "$results"
log_file="$results/gpu_check.log"
export LLAVAMED_FAST_RESULTS="$results"
# Only the chip at hand: half the compile time of the default sm_80 + sm_90.
export LLAVAMED_FAST_CUDA_ARCHS=${LLAVAMED_FAST_CUDA_ARCHS:-$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
export LLAVAMED_FAST_COMMIT=${LLAVAMED_FAST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
stages=${STAGES:-"build tests benchmarks"}
python=${PYTHON:-python3}
failed=()

say() { echo "[gpu_check +$(($(date +%s) - start))s] $*" | tee -a "$log_file"; }
run() {  # run LIMIT NAME COMMAND...: time-limited, output to the log and the console
  local limit=$1 name=$2
  shift 2
  say "$name"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log_file"
  local code=${PIPESTATUS[0]}
  [ "$code" -eq 0 ] || { failed+=("$name (exit $code)"); say "FAILED: $name (exit $code)"; }
}

: >"$log_file"
say "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
$python - <<'PY' 2>&1 | tee -a "$log_file"
import platform, torch
import triton, transformers
print(f"python {platform.python_version()} torch {torch.__version__} cuda {torch.version.cuda} "
      f"triton {triton.__version__} transformers {transformers.__version__}")
PY

if [[ " $stages " == *" build "* ]]; then
  # No network: build against the installed torch, install nothing else.
  say "build (pip, editable)"
  if ! timeout 200 $python -m pip install --no-build-isolation --no-deps --no-index -e . >>"$log_file" 2>&1; then
    # Old setuptools cannot build editable wheels: build in place and map kernels/ by hand.
    say "pip could not install it editable; building in place"
    run 200 "build (in place)" $python setup.py build_ext --inplace
    ln -sfn ../kernels llavamed_fast/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  run 60 "extension has CUDA" $python -c \
    "from llavamed_fast import _ext, ops; assert _ext.has_cuda(), 'built without CUDA'; print(ops.REGISTRY.describe('cuda'))"
fi

if [[ " $stages " == *" tests "* ]]; then
  # tests/ops holds every GPU test; other folders import packages a bare GPU image may lack (deepspeed).
  run 200 "GPU tests" $python -m pytest -q -m gpu -p no:cacheprovider tests/ops
fi

# "benchmarks" is both of "kernels" and "train"; each can be asked for alone.
if [[ " $stages " == *" benchmarks "* || " $stages " == *" kernels "* ]]; then
  for bench in varlen_attention linear_cross_entropy llm_layer_ops; do
    run 60 "bench_$bench" $python benchmarks/bench_$bench.py
  done
  # Attention on stage 1's shorter samples too (under a tenth of a layer's time there, at a lower rate),
  # also with two 64-row forward tiles, which waste less of a short sample's tiles (two that compile for
  # sm_90 without spilling; 64 x 64 with 4 warps spills).
  run 90 "bench_varlen_attention (stage-1 lengths)" $python benchmarks/bench_varlen_attention.py \
    --stage 1 --forward-tiles 64,32,4,3 --forward-tiles 64,64,8,3
  # With the kernel-by-kernel profile of one fwd+bwd step (a few seconds more): the projector's target
  # is a fraction of the GEMM rate, and the profile says where the rest goes.
  run 60 "bench_projector" $python benchmarks/bench_projector.py --profile
fi

if [[ " $stages " == *" benchmarks "* || " $stages " == *" train "* ]]; then
  # The end-to-end training step: v0 and v1.5 shapes with 4 LLM layers, both stages, vs transformers' Llava;
  # ours again with 12 layers for the cost of one layer (the 32-layer model's MFU and the projection):
  # the difference of two step times over 8 layers rather than 4 halves the noise on one layer's cost
  # (v1.5 stage 2 with 12 layers: about 51 GB, from 20.6 GB at 4 layers and 40.8 GB at 8).
  # Each configuration's row is printed as it is measured, so a cut-short run keeps what it measured.
  run 330 "bench_train_step" $python benchmarks/bench_train_step.py --layers 4 --marginal-layers 12 --profile
fi

if [[ " $stages " == *" recipe "* ]]; then
  # The trainer itself on the GPU (the CLI, the plain engine, checkpoints, the export): the tiny recipe's
  # two stages in bf16 as the real recipes train (autocast over float32 weights; the recipe itself is
  # float32, which reports no MFU), then each stage's first and last step from its metrics.
  recipe_out=$(mktemp -d)
  run 150 "train --recipe tiny, bf16 (CUDA)" $python -m llavamed_fast.train --recipe tiny --out "$recipe_out/run" \
    --set dtype=bfloat16
  $python - "$recipe_out/run/metrics.jsonl" <<'PY' 2>&1 | tee -a "$log_file"
import json, sys
steps = [r for r in map(json.loads, open(sys.argv[1])) if "step" in r and "loss" in r]
for stage in dict.fromkeys(r["stage"] for r in steps):
    rows = [r for r in steps if r["stage"] == stage]
    for r in (rows[0], rows[-1]):
        print("recipe", json.dumps({k: r.get(k) for k in ("stage", "step", "loss", "tokens_per_s", "mfu", "memory_bytes")}))
PY
  cp "$recipe_out/run/metrics.jsonl" "$results/recipe_tiny_metrics.jsonl" 2>/dev/null
  rm -rf "$recipe_out"
fi

if [[ " $stages " == *" tune "* ]]; then
  # The attention kernels' tiles swept on stage 1's short samples (about 25 compiles: 2-3 minutes).
  run 240 "tune_varlen_attention (stage-1 lengths)" $python benchmarks/tune_varlen_attention.py --stage 1
fi

if [[ " $stages " == *" serve "* ]]; then
  # Serving needs fastapi, uvicorn and httpx, which a bare GPU image may lack, and it has no network: a
  # wheelhouse in .whl/ (ignored by git; send it along with the checkout) supplies them. Fill it with
  #   pip download -d .whl --only-binary=:all: --python-version 3.12 --implementation cp \
  #     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 fastapi uvicorn httpx
  # with the GPU image's Python version (the log's first lines print it; pydantic-core is compiled per version).
  serving_ready() { $python -c "import fastapi, uvicorn, httpx" 2>/dev/null; }
  if ! serving_ready && [ -d .whl ]; then
    run 60 "serving packages from .whl" $python -m pip install -q --no-index --find-links .whl fastapi uvicorn httpx
  fi
  if serving_ready; then
    run 180 "bench_serve" $python benchmarks/bench_serve.py --model 7b --layers 8 --max-tokens 32 --requests 16
  else
    say "bench_serve skipped: fastapi/uvicorn/httpx are not installed here (no .whl/ wheelhouse either)"
  fi
fi

# A summary of every benchmark's headline (its last output line) next to the raw rows.
$python - "$log_file" "$results/summary.md" <<'PY'
import json, sys
lines = open(sys.argv[1]).read().splitlines()
heads = []
for line in lines:
    if line.startswith("{") and line.endswith("}"):
        try:
            heads.append(json.loads(line))
        except json.JSONDecodeError:  # a printed dict, not a benchmark headline
            pass
with open(sys.argv[2], "w") as out:
    out.write("# GPU check summary\n\n")
    for h in heads:
        out.write("- " + json.dumps(h) + "\n")
print(f"{len(heads)} benchmark headlines -> {sys.argv[2]}")
PY
say "done in $(($(date +%s) - start)) s; failed: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
