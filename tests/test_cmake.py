"""CMakeLists.txt configures against the installed torch, builds, and its C++ unit tests pass."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


def _run(*command: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    build = tmp_path_factory.mktemp("cmake")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(
        "cmake",
        "-S",
        REPO,
        "-B",
        build,
        *generator,
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DPython_EXECUTABLE={sys.executable}",
    )
    return build


def test_cpp_unit_tests(build_dir: Path) -> None:
    # Only the torch-free test target: the extension takes ~15 s more (see the slow test below).
    _run("cmake", "--build", build_dir, "--target", "test_packing")
    output = _run("ctest", "--test-dir", build_dir, "--output-on-failure")
    assert "100% tests passed" in output, output


def test_compile_commands_cover_the_extension(build_dir: Path) -> None:
    commands = json.loads((build_dir / "compile_commands.json").read_text())
    compiled = {Path(entry["file"]).resolve() for entry in commands}
    assert set((REPO / "csrc").rglob("*.cpp")) <= compiled
    assert REPO / "tests" / "cpp" / "test_packing.cpp" in compiled


@pytest.mark.slow
def test_extension_builds_and_registers_ops(build_dir: Path, tmp_path: Path) -> None:
    _run("cmake", "--build", build_dir, "--target", "_C")
    (library,) = build_dir.glob("_C*.so")
    # A separate interpreter: this process may already hold the installed llavamed_fast._C, and loading a
    # second copy would register the same ops twice.
    code = (
        "import importlib.util, sys, torch\n"
        f"spec = importlib.util.spec_from_file_location('_C', {str(library)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(torch.ops.llavamed_fast.packing(torch.tensor([4, 7, 3, 5, 2]), 10).tolist())"
    )
    assert _run(sys.executable, "-c", code, cwd=tmp_path).strip() == "[1, 0, 0, 1, 2]"
