"""The collator and the packing sampler: PackedBatch invariants on random samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llavamed_fast.data.packing import PackedBatchSampler, Sample, collate, pack

IMAGE = 9


def random_sample(rng, index, tokens_per_image=4):
    """A sample with 0-2 images at random places, random supervised spans."""
    length = int(rng.integers(8, 60))
    ids = rng.integers(10, 100, size=length).astype(np.int64)
    labels = np.where(rng.random(length) < 0.4, ids, -100).astype(np.int64)
    n_images = int(rng.integers(0, 3))
    starts = np.sort(
        rng.choice(np.arange(0, length - tokens_per_image, tokens_per_image), n_images, replace=False)
    )
    for s in starts:
        ids[s : s + tokens_per_image] = IMAGE
        labels[s : s + tokens_per_image] = -100
    pixels = torch.randn(n_images, 3, 8, 8)
    return Sample(f"s{index}", ids, labels, starts.astype(np.int64), pixels)


@pytest.mark.parametrize("pad", [1, 16])
def test_collate_invariants(pad):
    rng = np.random.default_rng(pad)
    samples = [random_sample(rng, i) for i in range(7)]
    batch = collate(samples, pad_to_multiple_of=pad, pad_token_id=0)
    lengths = [len(s) for s in samples]
    cu = batch.cu_seqlens
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == batch.num_tokens
    assert (cu[1:] > cu[:-1]).all(), "cu_seqlens must be strictly increasing"
    assert batch.num_tokens % pad == 0 and batch.num_samples == 7
    assert len(cu) - 1 == 7 + (1 if sum(lengths) % pad else 0)
    assert batch.max_seqlen == int((cu[1:] - cu[:-1]).max())
    for i, sample in enumerate(samples):
        start, end = int(cu[i]), int(cu[i + 1])
        assert end - start == len(sample)
        assert batch.position_ids[start:end].tolist() == list(range(len(sample)))
        assert batch.input_ids[start:end].tolist() == sample.input_ids.tolist()
        assert batch.labels[start:end].tolist() == sample.labels.tolist()
    # Every image's tokens are contiguous image tokens in its own sample, in order with the pixels.
    assert batch.num_images == sum(len(s.image_starts) for s in samples)
    torch.testing.assert_close(batch.pixel_values, torch.cat([s.pixel_values for s in samples]))
    for offset in batch.image_offsets.tolist():
        assert (batch.input_ids[offset : offset + 4] == IMAGE).all()
    image_rows = (batch.input_ids == IMAGE).sum().item()
    assert image_rows == 4 * batch.num_images
    tail = batch.labels[sum(lengths) :]
    assert (tail == -100).all() and (batch.position_ids[sum(lengths) :] == torch.arange(len(tail))).all()


@pytest.mark.parametrize("window", [None, 16])
def test_sampler_places_every_sample_once_under_budget(window):
    rng = np.random.default_rng(0)
    lengths = np.minimum(256 + rng.lognormal(4.5, 0.6, size=300).astype(int), 1024)
    sampler = PackedBatchSampler(lengths, budget=2048, seed=1, window=window)
    rows = list(sampler)
    flat = [i for row in rows for i in row]
    assert sorted(flat) == list(range(300))
    assert all(lengths[row].sum() <= 2048 for row in rows)
    assert len(sampler) == len(rows)
    again = PackedBatchSampler(lengths, budget=2048, seed=1, window=window)
    assert list(again) == rows  # deterministic for a seed
    sampler.set_epoch(1)
    assert list(sampler) != rows  # and reshuffled per epoch


def test_sampler_refuses_samples_longer_than_the_budget():
    with pytest.raises(ValueError, match="index 2: 300 tokens"):
        PackedBatchSampler([10, 20, 300], budget=256)


def test_pack_groups_bins_in_index_order():
    assert pack([5, 9, 2, 7, 1], budget=10) == [[1, 4], [2, 3], [0]]
    assert pack([], budget=10) == []
