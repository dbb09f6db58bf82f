"""Builds the torch extension ``llavamed_fast._C``; the package metadata lives in pyproject.toml.

C++ sources (``csrc/**/*.cpp``) are always built. CUDA sources (``csrc/**/*.cu``) are built too when
nvcc is found (``CUDA_HOME`` or ``PATH``), the installed torch has CUDA, and ``LLAVAMED_FAST_SKIP_CUDA``
is not set; ``LLAVAMED_FAST_CUDA_ARCHS`` (default "8.0;9.0") picks the GPU architectures.

Build against the torch that is already installed: ``pip install --no-build-isolation .`` (or ``-e .``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup

try:
    import torch
except ImportError as error:
    # An isolated build would install some other torch and compile against the wrong ABI.
    raise RuntimeError(
        "llavamed_fast compiles its C++ ops against the installed torch, but torch is not importable "
        f"from {sys.executable}. Install torch first, then build with `pip install --no-build-isolation .`"
    ) from error

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100, H100/H200


def _sources(pattern: str) -> list[str]:
    # Relative paths: setuptools rejects absolute ones in sdists and build records.
    return sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "csrc").rglob(pattern))


def _find_cuda_home() -> tuple[Path | None, str]:
    """The CUDA toolkit root, or None and why not."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            home = Path(os.environ[variable])
            if (home / "bin" / "nvcc").is_file():
                return home, f"{variable}={home}"
            return None, f"{variable}={home} has no bin/nvcc"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    # The toolkit is where nvcc really lives, not the folder of a link to it: torch links
    # against <CUDA_HOME>/lib64/libcudart, and a wrong root fails only at link time.
    home = Path(nvcc).resolve().parent.parent
    if (home / "include" / "cuda_runtime.h").is_file():
        return home, f"nvcc at {home / 'bin'}"
    # A wrapper script hides the toolkit; nvcc itself reports the folder it runs from.
    dryrun = subprocess.run(
        [nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
        capture_output=True,
        text=True,
        check=False,
    )
    here = re.search(r"^#\$ _HERE_=(.+)$", dryrun.stdout + dryrun.stderr, flags=re.MULTILINE)
    if here is None:
        return None, f"cannot locate the CUDA toolkit of {nvcc} (set CUDA_HOME)"
    home = Path(here.group(1).strip()).resolve().parent
    return home, f"nvcc at {home / 'bin'} (through {nvcc})"


def _cuda_decision() -> tuple[Path | None, str]:
    """The toolkit to build CUDA sources with (None: C++ only) and the reason, for the build log."""
    if os.environ.get("LLAVAMED_FAST_SKIP_CUDA", "").strip().lower() in {"1", "true", "yes", "on"}:
        return None, "LLAVAMED_FAST_SKIP_CUDA is set"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} has no CUDA"
    home, reason = _find_cuda_home()
    if home is None:
        return None, reason
    return home, f"{reason}, torch {torch.__version__} (CUDA {torch.version.cuda})"


def _math_library_includes(cuda_home: Path) -> list[str]:
    """-isystem flags for the CUDA math library headers (cusparse.h, cublas_v2.h, ...) that ATen's CUDA
    headers include, taken from the nvidia pip packages that came with torch when the toolkit has none
    (a compiler-only toolkit). -isystem folders come after every -I folder, so a toolkit header always
    wins over a pip one."""
    nvidia = importlib.util.find_spec("nvidia")
    if (cuda_home / "include" / "cusparse.h").is_file() or nvidia is None:
        return []
    folders = sorted(
        {
            str(path)
            for root in nvidia.submodule_search_locations or []
            for path in Path(root).glob("*/include")
        }
    )
    return [flag for folder in folders for flag in ("-isystem", folder)]


def _shared_cxx_runtime() -> list[str]:
    """Link flags that keep the C++ runtime shared with torch's.

    Where the compiler finds no ``libstdc++.so`` development link (a trimmed image with only the runtime
    ``libstdc++.so.6`` and the static ``libstdc++.a``), ``g++ -shared`` silently links libstdc++ statically.
    The extension then holds its own copy of the locale machinery, and the first error message that formats
    a number (``TORCH_CHECK(..., offset)``) crashes the process inside std::ostream instead of raising.
    Naming the shared runtime by its path links it dynamically, as torch is.
    """
    if not sys.platform.startswith("linux"):
        return []
    compiler = os.environ.get("CXX", "c++")

    def find(name: str) -> str | None:
        try:
            found = subprocess.run(
                [compiler, f"-print-file-name={name}"], capture_output=True, text=True, check=False
            ).stdout.strip()
        except OSError:
            return None
        return found if os.path.isabs(found) and os.path.exists(found) else None

    if find("libstdc++.so") is not None:
        return []
    runtime = find("libstdc++.so.6")
    if runtime is None:
        return []
    print(
        f"llavamed_fast: {compiler} has no libstdc++.so link; linking {runtime} explicitly", file=sys.stderr
    )
    return [runtime]


def _ensure_ninja_on_path() -> None:
    # pip does not activate the environment it builds in, so the `ninja` it installed (a build
    # requirement) may be off PATH; torch would then fall back to compiling one file at a time.
    if shutil.which("ninja") is not None:
        return
    folders = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    if importlib.util.find_spec("ninja") is not None:
        folders.append(importlib.import_module("ninja").BIN_DIR)
    os.environ["PATH"] = os.pathsep.join([*folders, os.environ.get("PATH", "")])


def _extension_and_build_command() -> tuple[Extension, type]:
    cuda_home, reason = _cuda_decision()
    cu_sources = _sources("*.cu")
    if cuda_home is not None:
        archs = os.environ.get("LLAVAMED_FAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        # torch reads both when cpp_extension is imported (below) and raises an IndexError while
        # building if it finds no arch list and no GPU.
        os.environ["CUDA_HOME"] = str(cuda_home)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        print(f"llavamed_fast: building CUDA sources for archs {archs}: {reason}", file=sys.stderr)
    else:
        skipped = f" ({len(cu_sources)} .cu files left out)" if cu_sources else ""
        print(f"llavamed_fast: C++ only, CUDA skipped: {reason}{skipped}", file=sys.stderr)
    _ensure_ninja_on_path()

    from torch.utils import cpp_extension

    options = {
        "name": "llavamed_fast._C",
        "sources": _sources("*.cpp"),
        "depends": _sources("*.h") + _sources("*.cuh"),
        "include_dirs": [str(ROOT / "csrc")],
        # -g0 undoes the -g of Python's default flags: a smaller library and a faster link.
        "extra_compile_args": {"cxx": ["-O3", "-g0"], "nvcc": ["-O3"]},
        "extra_link_args": _shared_cxx_runtime(),
        # module.cpp uses only the limited C API: one build serves every CPython >= 3.10.
        "py_limited_api": True,
    }
    if cuda_home is None:
        extension = cpp_extension.CppExtension(**options)
    else:
        # cpp_extension fixed CUDA_HOME at import; a caller may have imported it before us.
        cpp_extension.CUDA_HOME = str(cuda_home)
        options["sources"] += cu_sources
        options["define_macros"] = [("LLAVAMED_FAST_WITH_CUDA", None)]
        for flags in options["extra_compile_args"].values():
            flags += _math_library_includes(cuda_home)
        extension = cpp_extension.CUDAExtension(**options)
    return extension, cpp_extension.BuildExtension


def _packages() -> tuple[list[str], dict[str, str]]:
    # kernels/ sits at the top of the repository but installs as llavamed_fast.kernels only: a top-level
    # `kernels` module belongs to another PyPI package.
    kernels = ["llavamed_fast.kernels"] + [
        f"llavamed_fast.kernels.{name}" for name in find_packages(where=str(ROOT / "kernels"))
    ]
    packages = find_packages(where=str(ROOT), include=["llavamed_fast", "llavamed_fast.*"])
    if "llavamed_fast" not in packages:
        raise RuntimeError(f"{ROOT / 'llavamed_fast' / '__init__.py'} is missing: nothing to install")
    return packages + kernels, {"llavamed_fast.kernels": "kernels"}


extension, build_ext = _extension_and_build_command()
packages, package_dir = _packages()

setup(
    packages=packages,
    package_dir=package_dir,
    # Tokenizers and chat templates that ship inside the package (e.g. llavamed_fast/model/*.json).
    package_data={"llavamed_fast": ["**/*.json", "**/*.jinja", "serve/static/*"]},
    ext_modules=[extension],
    cmdclass={"build_ext": build_ext},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
