"""The compiled CUDA implementations of the ops (``csrc/``), registered as backend ``cuda`` in ``backends.py``.

Each class follows its op's contract in ``_library.py`` and calls ``torch.ops.llavamed_fast.<op>_cuda_*``,
which exist only when the extension was built with CUDA (``llavamed_fast._ext.has_cuda()``).
"""

from __future__ import annotations

import torch

from llavamed_fast import _ext


def _cuda_op(name: str):
    _ext.load()
    if not _ext.has_cuda():
        raise RuntimeError(
            f"torch.ops.llavamed_fast.{name} is not available: llavamed_fast._C was built without CUDA "
            "(rebuild where nvcc and a CUDA torch are present: pip install --no-build-isolation .)"
        )
    return getattr(torch.ops.llavamed_fast, name)


class CudaProjector:
    """``csrc/projector``: cuBLASLt GEMMs with fused bias epilogues around an exact-GELU kernel; the last GEMM
    writes each image's tokens straight into its rows of ``embeds``.

    ``image_offsets`` may live on the CPU or on the GPU. The forward needs them on the host (the GEMMs'
    output pointers): on the GPU that is one small device-to-host copy that waits for the queued work; on
    the CPU it is free. The row moves (text rows of ``embeds``, image rows of the output gradient) are
    driven by a row map built on the GPU, so the backward never waits.
    """

    @staticmethod
    def forward(
        x: torch.Tensor,
        w1: torch.Tensor,
        b1: torch.Tensor | None,
        w2: torch.Tensor | None,
        b2: torch.Tensor | None,
        embeds: torch.Tensor | None,
        image_offsets: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y, activations = _cuda_op("projector_cuda_forward")(x, w1, b1, w2, b2, embeds, image_offsets)
        return y, activations

    @staticmethod
    def backward(
        dy: torch.Tensor,
        x: torch.Tensor,
        w1: torch.Tensor,
        b1: torch.Tensor | None,
        w2: torch.Tensor | None,
        b2: torch.Tensor | None,
        embeds: torch.Tensor | None,
        image_offsets: torch.Tensor | None,
        activations: torch.Tensor,
        needs: list[bool] | tuple[bool, ...],
    ) -> tuple[torch.Tensor | None, ...]:
        needs = [bool(need) for need in needs]
        grads = _cuda_op("projector_cuda_backward")(
            dy, x, w1, b1, w2, b2, embeds, image_offsets, activations, needs
        )
        inputs = (x, w1, b1, w2, b2, embeds)
        return tuple(
            grad if need and t is not None else None
            for grad, t, need in zip(grads, inputs, needs, strict=True)
        )
