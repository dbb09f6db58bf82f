"""Packing: which samples share a row (the sampler) and how a row is assembled (the collator).

The sampler asks the C++ packer (``ops.packing``, first-fit-decreasing) to place samples into rows under
a token budget, so a micro-batch is as full as the lengths allow; the collator concatenates a row's
samples into one :class:`PackedBatch` with ``cu_seqlens`` and ``position_ids`` restarting per sample.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Sampler

from llavamed_fast import ops
from llavamed_fast.data.batch import PackedBatch, SkippedSample
from llavamed_fast.data.templates import IGNORE_INDEX


@dataclass(frozen=True)
class Sample:
    """One tokenized sample with its images, as a dataset returns it."""

    id: str
    input_ids: np.ndarray  # [L] int64
    labels: np.ndarray  # [L] int64
    image_starts: np.ndarray  # [n] int64, first token of each image within the sample
    pixel_values: torch.Tensor | None  # [n, 3, H, W] float32, or None with image_features
    image_features: torch.Tensor | None = None  # [n, P, C] cached vision-tower features

    def __len__(self) -> int:
        return len(self.input_ids)


def pack(lengths: Sequence[int] | np.ndarray, budget: int) -> list[list[int]]:
    """Indices of the items in each row, rows in order of opening, items in index order within a row."""
    bins = ops.packing(torch.as_tensor(np.asarray(lengths, dtype=np.int64)), budget).numpy()
    if bins.size == 0:
        return []
    order = np.argsort(bins, kind="stable")  # stable: index order within each bin
    splits = np.flatnonzero(np.diff(bins[order])) + 1
    return [chunk.tolist() for chunk in np.split(order, splits)]


def collate(
    samples: Sequence[Sample | SkippedSample], *, pad_to_multiple_of: int = 1, pad_token_id: int = 0
) -> PackedBatch:
    """Concatenate samples into one row. Skipped samples are left out and listed in ``batch.skipped``.

    With ``pad_to_multiple_of > 1`` the row is padded to a multiple of it by a trailing segment of
    ``pad_token_id`` (unsupervised, its own sample in ``cu_seqlens``, so it attends only to itself).
    A row whose every sample was skipped has no tokens and ``num_samples == 0``.
    """
    real = [s for s in samples if isinstance(s, Sample)]
    skipped = tuple(s for s in samples if isinstance(s, SkippedSample))
    lengths = [len(s) for s in real]
    total = sum(lengths)
    pad = (-total) % pad_to_multiple_of if total else 0
    segments = lengths + ([pad] if pad else [])
    offsets = np.concatenate([[0], np.cumsum(segments)]).astype(np.int64)

    input_ids = np.concatenate([s.input_ids for s in real] + [np.full(pad, pad_token_id, dtype=np.int64)])
    labels = np.concatenate([s.labels for s in real] + [np.full(pad, IGNORE_INDEX, dtype=np.int64)])
    position_ids = np.concatenate([np.arange(n, dtype=np.int64) for n in segments] or [np.zeros(0, np.int64)])
    image_offsets = np.concatenate(
        [s.image_starts + offsets[i] for i, s in enumerate(real)] or [np.zeros(0, np.int64)]
    )
    cached = [s.image_features is not None for s in real if len(s.image_starts)]
    if any(cached) and not all(cached):
        raise ValueError("a row mixes samples with pixel values and samples with cached features")
    features = [s.image_features for s in real if len(s.image_starts)] if any(cached) else []
    with_images = [] if features else [s.pixel_values for s in real if len(s.image_starts)]
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids.astype(np.int64, copy=False)),
        labels=torch.from_numpy(labels.astype(np.int64, copy=False)),
        position_ids=torch.from_numpy(position_ids),
        cu_seqlens=torch.from_numpy(offsets.astype(np.int32)),
        max_seqlen=max(segments, default=0),
        image_offsets=torch.from_numpy(image_offsets.astype(np.int64, copy=False)),
        pixel_values=torch.cat(with_images) if with_images else None,
        image_features=torch.cat(features) if features else None,
        sample_ids=tuple(s.id for s in real),
        num_samples=len(real),
        skipped=skipped,
    )


class PackedBatchSampler(Sampler[list[int]]):
    """Yields the dataset indices of one packed row at a time.

    Each epoch the samples are shuffled (seeded by ``seed`` and the epoch), cut into windows of
    ``window`` samples (all at once by default), each window packed under ``budget`` tokens, and the
    rows shuffled. Smaller windows keep rows closer to random mixes; larger ones pack tighter.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        budget: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        window: int | None = None,
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        too_long = np.flatnonzero(self.lengths > budget)
        if too_long.size:
            i = int(too_long[0])
            raise ValueError(
                f"{too_long.size} sample(s) are longer than the {budget}-token budget (e.g. index {i}: "
                f"{int(self.lengths[i])} tokens); raise the budget or lower the dataset's max_length"
            )
        self.budget = budget
        self.shuffle = shuffle
        self.seed = seed
        self.window = window or max(len(self.lengths), 1)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        rows = []
        for start in range(0, len(order), self.window):
            chunk = order[start : start + self.window]
            rows.extend([chunk[i] for i in row] for row in pack(self.lengths[chunk], self.budget))
        if self.shuffle:
            rows = [rows[i] for i in rng.permutation(len(rows))]
        self._rows = [[int(i) for i in row] for row in rows]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)
