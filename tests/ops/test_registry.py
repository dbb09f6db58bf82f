"""Backend selection: environment variables, per-op overrides, and clear errors, never silent fallbacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llavamed_fast import ops
from llavamed_fast.ops.registry import BackendUnavailableError, Implementation, OpRegistry, use_backend


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("LLAVAMED_FAST_BACKEND"):
            monkeypatch.delenv(name)


def test_default_on_cpu_is_the_reference_and_packing_uses_the_extension():
    assert ops.backend_for("varlen_attention", "cpu") == "torch"
    assert ops.backend_for("linear_cross_entropy", "cpu") == "torch"
    assert ops.backend_for("packing", "cpu") == "cuda"  # the compiled C++ packer


def test_backends_command_says_the_packer_is_cpp_on_the_cpu(tmp_path):
    # "packing": "cuda" alone read as a GPU op on a machine without one; the packer is the extension's C++.
    out = subprocess.run(
        [sys.executable, "-m", "llavamed_fast", "backends", "--device", "cpu"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,  # the installed package, not the checkout's sources (whose extension may not be built)
    ).stdout
    table = json.loads(out)
    assert table["packing"] == "cuda (the extension's C++ packer, on the CPU)"
    assert table["varlen_attention"] == "torch"  # no note where the name says it all
    assert ops.backend_for("packing", "cpu") == "cuda"  # the backend's name, for selection, is unchanged


def test_global_backend_skips_ops_without_that_implementation(monkeypatch):
    monkeypatch.setenv("LLAVAMED_FAST_BACKEND", "cuda")
    # No compiled attention exists yet, so attention keeps its default; the packer is compiled.
    assert ops.backend_for("varlen_attention", "cpu") == "torch"
    assert ops.backend_for("packing", "cpu") == "cuda"


def test_global_backend_applies_only_to_ops_that_have_it(monkeypatch):
    registry = OpRegistry()
    registry.define("a", {"cpu": ("torch",)})
    registry.define("b", {"cpu": ("torch",)})
    registry.register("a", Implementation("torch", frozenset({"cpu"}), lambda: None))
    registry.register("a", Implementation("triton", frozenset({"cpu"}), lambda: None))
    registry.register("b", Implementation("torch", frozenset({"cpu"}), lambda: None))
    monkeypatch.setenv("LLAVAMED_FAST_BACKEND", "triton")
    assert registry.resolve("a", "cpu") == "triton"
    assert registry.resolve("b", "cpu") == "torch"  # b has no Triton kernel at all
    assert registry.describe("cpu") == {"a": "triton", "b": "torch"}
    # An op that has the backend but cannot run it here is an error, not a fallback.
    registry.register("b", Implementation("triton", frozenset({"cuda"}), lambda: None))
    with pytest.raises(BackendUnavailableError, match=r"LLAVAMED_FAST_BACKEND=triton: op 'b'.*not cpu"):
        registry.resolve("b", "cpu")


def test_unavailable_backend_says_why(monkeypatch):
    registry = OpRegistry()
    registry.define("a", {"cpu": ("torch",)})
    registry.register("a", Implementation("torch", frozenset({"cpu"}), lambda: None))
    registry.register("a", Implementation("triton", frozenset({"cuda"}), lambda: None))
    registry.register(
        "a",
        Implementation("cuda", frozenset({"cpu"}), lambda: None, unavailable=lambda: "built without CUDA"),
    )
    monkeypatch.setenv("LLAVAMED_FAST_BACKEND_A", "triton")
    with pytest.raises(BackendUnavailableError, match=r"runs on cuda tensors, not cpu.*TRITON_INTERPRET"):
        registry.resolve("a", "cpu")
    monkeypatch.setenv("LLAVAMED_FAST_BACKEND_A", "cuda")
    with pytest.raises(BackendUnavailableError, match="built without CUDA"):
        registry.resolve("a", "cpu")
    monkeypatch.setenv("LLAVAMED_FAST_BACKEND_A", "tpu")
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        registry.resolve("a", "cpu")


def test_per_op_environment_beats_global(monkeypatch):
    monkeypatch.setenv("LLAVAMED_FAST_BACKEND", "cuda")
    monkeypatch.setenv("LLAVAMED_FAST_BACKEND_VARLEN_ATTENTION", "torch")
    assert ops.backend_for("varlen_attention", "cpu") == "torch"


def test_use_backend_overrides_and_restores(monkeypatch):
    monkeypatch.setenv("LLAVAMED_FAST_BACKEND_PACKING", "cuda")
    with use_backend(packing="torch"):
        assert ops.backend_for("packing", "cpu") == "torch"
        with (
            use_backend(projector="triton"),
            pytest.raises(BackendUnavailableError, match="no triton"),
        ):
            ops.backend_for("projector", "cpu")
    assert ops.backend_for("packing", "cpu") == "cuda"
    with pytest.raises(KeyError, match="unknown op"):
        with use_backend(flash="torch"):
            pass
    with pytest.raises(ValueError, match="unknown backend"):
        with use_backend(packing="rocm"):
            pass


def test_public_op_raises_for_requested_missing_backend():
    q = torch.randn(4, 2, 8)
    with (
        use_backend(varlen_attention="cuda"),
        pytest.raises(BackendUnavailableError, match="varlen_attention"),
    ):
        ops.varlen_attention(q, q, q, torch.tensor([0, 4], dtype=torch.int32), 4)


def test_torch_packing_backend_matches_extension():
    lengths = [5, 9, 2, 7, 7, 1, 8]
    with use_backend(packing="torch"):
        reference = ops.packing(lengths, 10)
    torch.testing.assert_close(ops.packing(lengths, 10), reference)
