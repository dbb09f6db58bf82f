"""PackedBatch: the one batch type. A micro-batch is a single row of concatenated samples."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass(frozen=True)
class SkippedSample:
    """A sample left out of a batch under the dataset's skip policy, and why."""

    record: str
    path: str
    reason: str


@dataclass
class PackedBatch:
    """Samples concatenated into one row of ``T`` tokens.

    Attributes:
        input_ids: ``[T]`` int64 token ids; each image is ``P`` contiguous copies of the image token.
        labels: ``[T]`` int64, aligned with ``input_ids`` as in transformers: the token itself where it is
            supervised (predicted from the tokens before it in its sample; the model does the shift), ``-100``
            elsewhere (system prompt, user turns, image tokens, padding).
        position_ids: ``[T]`` int64, restarting at 0 at the start of every sample.
        cu_seqlens: ``[S + 1]`` int32 sample boundaries, strictly increasing from 0 to ``T``. When the row
            is padded to a multiple, the padding is the last segment (see ``num_samples``).
        max_seqlen: the longest segment, in tokens.
        image_offsets: ``[N]`` int64, the first row of each image's ``P`` tokens, in image order.
        pixel_values: ``[N, 3, H, W]`` float32 preprocessed images, or None when features are given.
        image_features: ``[N, P, C]`` cached vision-tower features, or None.
        sample_ids: the record id of each real sample, in row order.
        num_samples: the number of real samples (``S`` minus a trailing padding segment, if any).
        skipped: samples the dataset left out of this batch (skip policy), for the run's summary.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    image_offsets: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_features: torch.Tensor | None = None
    sample_ids: tuple[str, ...] = ()
    num_samples: int = 0
    skipped: tuple[SkippedSample, ...] = field(default_factory=tuple)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_images(self) -> int:
        return int(self.image_offsets.shape[0])

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> PackedBatch:
        """A copy with every tensor on ``device`` (pixel values/features keep their dtype)."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    def pin_memory(self) -> PackedBatch:
        pinned = {
            f.name: getattr(self, f.name).pin_memory()
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **pinned)
