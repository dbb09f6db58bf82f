"""Loads the compiled extension ``llavamed_fast._C``, which registers the ``torch.ops.llavamed_fast`` ops."""

from __future__ import annotations

import functools
import importlib


@functools.cache
def load() -> None:
    """Registers the C++/CUDA ops; idempotent. Raises ImportError if the extension is not built."""
    # The extension links against libtorch without a path to it: torch must be loaded first.
    import torch  # noqa: F401

    try:
        importlib.import_module("llavamed_fast._C")
    except ImportError as error:
        raise ImportError(
            "llavamed_fast._C is not built: install with `pip install --no-build-isolation .` (or `-e .`) "
            "against the installed torch, which builds the C++ ops. If it was built, it may have been "
            f"built against another torch; rebuild it. ({error})"
        ) from error


def has_cuda() -> bool:
    """Whether the extension was built with its CUDA sources (it can still run its CPU ops without)."""
    load()
    return bool(importlib.import_module("llavamed_fast._C").built_with_cuda)
