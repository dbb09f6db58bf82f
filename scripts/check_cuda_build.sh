#!/usr/bin/env bash
# Compile check of the CUDA sources, no GPU needed: builds llavamed_fast._C with CUDA against a CUDA build
# of torch in a throwaway virtual environment outside the repository, exactly as a GPU machine would
# compile it, then imports it there and checks that the CUDA ops registered. Exits non-zero on any failure.
#
#   bash scripts/check_cuda_build.sh
#
# Needs nvcc (CUDA 13.x, matching torch's CUDA major version) and python3 >= 3.10. Settings:
#   LLAVAMED_FAST_CHECK_TORCH   torch release to build against (default 2.14.1, a CUDA 13.0 build, ~5.5 GB)
#   LLAVAMED_FAST_CUDA_ARCHS    GPU architectures (default "8.0;9.0", as setup.py)
#   LLAVAMED_FAST_CHECK_VENV    an existing environment to reuse (kept afterwards), instead of a new one
# The repository is left untouched: the tracked and not-ignored files are copied and built elsewhere.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
torch_version=${LLAVAMED_FAST_CHECK_TORCH:-2.14.1}
export LLAVAMED_FAST_CUDA_ARCHS=${LLAVAMED_FAST_CUDA_ARCHS:-8.0;9.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
unset LLAVAMED_FAST_SKIP_CUDA

start=$(date +%s)
step_start=
step() {  # step NAME: prints how long the previous step took, then the new step's name
  local now
  now=$(date +%s)
  [ -z "$step_start" ] || echo "check_cuda_build: ... took $((now - step_start)) s"
  step_start=$now
  echo "check_cuda_build: $*"
}
fail() {
  echo "check_cuda_build: FAILED: $*" >&2
  exit 1
}

work=$(mktemp -d "${TMPDIR:-/tmp}/llavamed-cuda-check.XXXXXX")
venv=${LLAVAMED_FAST_CHECK_VENV:-$work/venv}
cleanup() {
  rm -rf "$work"
  echo "check_cuda_build: removed $work; total $(($(date +%s) - start)) s"
}
trap cleanup EXIT

nvcc=$(command -v nvcc) || fail "nvcc not found on PATH; install the CUDA toolkit (13.x) or put its bin/ on PATH"
# CUDA_HOME: the toolkit where nvcc really lives, not the folder of a link or wrapper script to it (a wrong
# root fails only at link time: "cannot find -lcudart"). A wrapper hides it; nvcc -dryrun reports it.
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=$(cd "$(dirname "$(readlink -f "$nvcc")")/.." && pwd)
  if [ ! -f "$CUDA_HOME/include/cuda_runtime.h" ]; then
    here=$("$nvcc" -dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' || true)
    here=${here%%$'\n'*}
    CUDA_HOME=$(cd "${here:-/nonexistent}/.." 2>/dev/null && pwd) || CUDA_HOME=
  fi
fi
[ -n "$CUDA_HOME" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && [ -f "$CUDA_HOME/include/cuda_runtime.h" ] ||
  fail "cannot locate the CUDA toolkit of $nvcc (CUDA_HOME=${CUDA_HOME:-unset}); set CUDA_HOME to its root"
export CUDA_HOME
echo "check_cuda_build: nvcc $nvcc ($("$nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')), CUDA_HOME=$CUDA_HOME, archs $LLAVAMED_FAST_CUDA_ARCHS"

if [ -z "${LLAVAMED_FAST_CHECK_VENV:-}" ]; then
  step "creating $venv with torch==$torch_version"
  python3 -m venv "$venv"
  if ! "$venv/bin/python" -m pip install "torch==$torch_version" "setuptools>=70.1" wheel ninja pybind11 numpy \
    >"$work/install.log" 2>&1; then
    tail -n 30 "$work/install.log" >&2
    fail "could not install torch==$torch_version and the build requirements into $venv (log tail above)"
  fi
else
  step "reusing $venv"
fi
python=$venv/bin/python
"$python" -c 'import sys, torch; assert torch.version.cuda, "torch " + torch.__version__ + " has no CUDA"; print("check_cuda_build: torch", torch.__version__, "CUDA", torch.version.cuda, "python", sys.version.split()[0])' ||
  fail "$python has no CUDA build of torch"

step "copying the sources"
"$python" - "$repo" "$work/src" <<'PY'
import shutil, subprocess, sys
from pathlib import Path

repo, dest = Path(sys.argv[1]), Path(sys.argv[2])
# Tracked and untracked-but-not-ignored files: what a clean checkout of the working tree would hold.
listing = subprocess.run(
    ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
    capture_output=True, check=True,
).stdout.decode()
for name in filter(None, listing.split("\0")):
    source = repo / name
    if source.is_file():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / name)
PY

step "building the extension with CUDA (pip install --no-build-isolation --no-deps)"
log=$work/build.log
if ! (cd "$work/src" && "$python" -m pip install -v --no-build-isolation --no-deps . >"$log" 2>&1); then
  # The compiler's first errors, then pip's summary.
  grep -E -m 30 "(error|FAILED)[: ]" "$log" >&2 || true
  tail -n 15 "$log" >&2
  fail "the build failed (compiler errors and the end of the build log above)"
fi
grep -h "^ *llavamed_fast: " "$log" | sed "s/^ *//" | sort -u || true
grep -q "llavamed_fast: building CUDA sources" "$log" || fail "setup.py did not build the CUDA sources (see above)"

step "importing the extension and checking its CUDA ops"
(cd "$work" && "$python" - <<'PY') || fail "the CUDA build does not load or lacks its CUDA ops"
import importlib
import os
import sys

import torch

from llavamed_fast import _ext

# Extensions load with RTLD_NOW: the import itself proves that every symbol (cuBLASLt's included, which
# come through libtorch_cuda's own dependency on libcublasLt) resolves, not only those called so far.
assert sys.getdlopenflags() & os.RTLD_NOW, "python loads extensions lazily here: the import proves less"
_ext.load()
extension = importlib.import_module("llavamed_fast._C")
print("check_cuda_build: loaded", extension.__file__)
assert _ext.has_cuda(), "llavamed_fast._C reports built_with_cuda = False"
for name in ("projector_cuda_forward", "projector_cuda_backward"):
    assert hasattr(torch.ops.llavamed_fast, name), f"torch.ops.llavamed_fast.{name} is not registered"
    print("check_cuda_build:", getattr(torch.ops.llavamed_fast, name).default._schema)
PY
step "OK: the CUDA sources compile for archs $LLAVAMED_FAST_CUDA_ARCHS and register their ops"
