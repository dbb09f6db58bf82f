"""The installed package has its extension, and kernels/ only as llavamed_fast.kernels."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llavamed_fast
from llavamed_fast import _ext

REPO = Path(__file__).resolve().parents[1]


def test_extension_loads_and_registers_its_ops() -> None:
    _ext.load()
    extension = importlib.import_module("llavamed_fast._C")
    assert isinstance(extension.built_with_cuda, bool)
    assert hasattr(torch.ops.llavamed_fast, "packing")


@pytest.mark.skipif(shutil.which("nm") is None, reason="binutils' nm is not installed")
def test_extension_uses_the_shared_cxx_runtime() -> None:
    # A statically linked libstdc++ (setup.py's _shared_cxx_runtime) gives the extension its own locale
    # machinery, and the first error message with a number in it crashes the process. The stream insertion
    # every TORCH_CHECK message uses must then be imported from libstdc++.so.6, not defined inside _C.
    _ext.load()
    library = importlib.import_module("llavamed_fast._C").__file__
    symbols = subprocess.run(["nm", "-D", "-C", library], capture_output=True, text=True, check=True).stdout
    insertions = [line for line in symbols.splitlines() if "std::ostream::_M_insert<long>" in line]
    assert insertions, f"{library} does not import std::ostream's integer insertion from libstdc++"
    assert all(line.split()[0] == "U" for line in insertions), (
        f"{library} holds its own libstdc++: {insertions}"
    )


def test_has_cuda_only_with_a_cuda_torch() -> None:
    if torch.version.cuda is None:
        assert not _ext.has_cuda()
    else:
        assert isinstance(_ext.has_cuda(), bool)


def test_kernels_is_a_subpackage() -> None:
    package_dir = Path(llavamed_fast.__file__).resolve().parent
    if importlib.util.find_spec("llavamed_fast.kernels") is None:
        # The source tree alone has no llavamed_fast/kernels: only an install maps kernels/ there.
        pytest.fail(
            f"llavamed_fast.kernels not found; llavamed_fast was imported from {package_dir}, a source tree "
            "that shadows the installed package (`python -m pytest` puts the working directory on sys.path)"
        )
    location = Path(importlib.import_module("llavamed_fast.kernels").__file__).resolve()
    # Installed: inside the package. Editable: the repository's kernels/ folder.
    assert location.is_relative_to(package_dir) or location == REPO / "kernels" / "__init__.py", location


def test_no_top_level_kernels_module(tmp_path: Path) -> None:
    # A fresh interpreter away from the repository: pytest and `python -m` may put the repository root on
    # sys.path, where the kernels/ folder itself is importable.
    code = (
        "import importlib.util, llavamed_fast.kernels\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec and (spec.origin or list(spec.submodule_search_locations)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "None", f"`import kernels` finds {result.stdout.strip()}"


def test_distribution_installs_no_top_level_kernels() -> None:
    try:
        files = importlib.metadata.files("llavamed_fast")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llavamed_fast is not installed (imported from a source tree)")
    top_level = {file.parts[0] for file in files or []}
    assert "kernels" not in top_level, sorted(top_level)
