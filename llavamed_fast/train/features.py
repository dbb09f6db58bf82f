"""Frozen-vision feature cache: run the vision tower once per image, train from memory-mapped features.

While the vision tower is frozen its output for an image never changes, yet a 3-epoch stage would run it
three times per image. With ``feature_cache`` on, a stage first computes every distinct image's features
(the tower's ``vision_feature_layer`` without CLS, exactly what :meth:`LlavaMed.image_features` returns)
into ``<run>/features/<key>/features.bin``, a raw array ``[images, P, C]`` in the features' dtype, and
then serves samples with ``image_features`` instead of pixels. The key hashes the vision weights, the
image processor, the image list and the precision (dtype, autocast), so a changed model, dataset or
precision never reads stale features.

Ranks split the images, write disjoint slices of the same file, and meet at a barrier; a ``COMPLETE``
marker makes a half-written cache invisible. Images that cannot be read are left out and their samples
follow the dataset's skip policy (the error is raised while building when the policy is ``raise``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from llavamed_fast.data.batch import SkippedSample
from llavamed_fast.data.dataset import LlavaJsonDataset
from llavamed_fast.data.packing import Sample

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}  # bf16 as raw bits


def _key(model, dataset: LlavaJsonDataset, paths: list[str], precision: str) -> str:
    digest = hashlib.sha256(precision.encode())  # features made under autocast differ from float32 ones
    for name, tensor in model.vision_tower.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(
        json.dumps(dataset.processor.image_processor.to_dict(), sort_keys=True, default=str).encode()
    )
    digest.update(str(model.config.vision_feature_layer).encode())
    digest.update("\n".join(paths).encode())
    return digest.hexdigest()[:20]


class FeatureCache(Dataset):
    """A dataset that yields the wrapped dataset's samples with cached features in place of pixels."""

    def __init__(
        self, dataset: LlavaJsonDataset, folder: Path, rows: dict[str, int], shape: tuple, dtype
    ) -> None:
        self.dataset = dataset
        self.rows = rows
        self.dtype = dtype
        self.features = np.memmap(folder / "features.bin", dtype=_NUMPY[dtype], mode="r", shape=shape)
        self.lengths = dataset.lengths

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample | SkippedSample:
        paths = [str(p) for p in self.dataset.image_paths(index)]
        missing = [p for p in paths if self.rows.get(p, -1) < 0]
        if missing:
            record = self.dataset.records[index].id
            return SkippedSample(record, missing[0], "the image could not be read when caching features")
        array = np.stack([self.features[self.rows[p]] for p in paths]) if paths else None
        features = None if array is None else torch.from_numpy(np.ascontiguousarray(array)).view(self.dtype)
        return self.dataset.sample(index, image_features=features)


@torch.no_grad()
def build(
    model,
    dataset: LlavaJsonDataset,
    root: Path,
    dist,
    *,
    autocast: torch.dtype | None = None,
    batch_size: int = 32,
) -> FeatureCache:
    """The stage's feature cache, computed unless a complete one with the same key exists. ``autocast``:
    the dtype training runs the tower under on CUDA (None: as is), so cached features equal live ones."""
    if autocast is not None:
        with torch.autocast("cuda", dtype=autocast):
            return build(model, dataset, root, dist, batch_size=batch_size)
    paths = sorted({str(p) for i in range(len(dataset)) for p in dataset.image_paths(i)})
    index = {path: i for i, path in enumerate(paths)}
    device = next(model.parameters()).device
    probe = model.image_features(
        torch.zeros(
            1,
            3,
            *[dataset.processor.image_processor.crop_size[k] for k in ("height", "width")],
            device=device,
        )
    )
    shape, dtype = (len(paths), *probe.shape[1:]), probe.dtype
    # Under autocast the tower's matmuls run in lower precision, whatever dtype its output has.
    precision = str(torch.get_autocast_dtype(device.type)) if torch.is_autocast_enabled(device.type) else ""
    folder = root / _key(model, dataset, paths, f"{dtype} {precision}")
    if not (folder / "COMPLETE").exists():
        if dist.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            np.memmap(folder / "features.bin", dtype=_NUMPY[dtype], mode="w+", shape=shape).flush()
        dist.barrier()
        failed = _compute(
            model, dataset, paths[dist.rank :: dist.world_size], index, folder, shape, dtype, batch_size
        )
        (folder / f"failed-{dist.rank}.json").write_text(json.dumps(failed))
        dist.barrier()
        if dist.is_main:
            bad = [
                p
                for r in range(dist.world_size)
                for p in json.loads((folder / f"failed-{r}.json").read_text())
            ]
            (folder / "rows.json").write_text(
                json.dumps({p: (-1 if p in set(bad) else index[p]) for p in paths})
            )
            with open(folder / "COMPLETE", "w") as handle:
                handle.write(f"{len(paths)} images, {len(bad)} unreadable\n")
                handle.flush()
                os.fsync(handle.fileno())
        dist.barrier()
    rows = json.loads((folder / "rows.json").read_text())
    return FeatureCache(dataset, folder, rows, shape, dtype)


def _compute(model, dataset, paths, index, folder, shape, dtype, batch_size) -> list[str]:
    """Features of ``paths`` written into their rows; returns the paths that could not be read."""
    from llavamed_fast.data.images import ImageError, load_image

    out = np.memmap(folder / "features.bin", dtype=_NUMPY[dtype], mode="r+", shape=shape)
    device = next(model.parameters()).device
    failed = []
    for start in range(0, len(paths), batch_size):
        chunk, images = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(load_image(path, max_pixels=dataset.max_image_pixels))
                chunk.append(path)
            except ImageError:
                if dataset.bad_images == "raise":
                    raise
                failed.append(path)
        if not chunk:
            continue
        features = model.image_features(dataset.processor.preprocess_images(images).to(device))
        array = features.cpu().contiguous()
        array = array.view(torch.uint16) if dtype == torch.bfloat16 else array
        for path, row in zip(chunk, array.numpy(), strict=True):
            out[index[path]] = row
    out.flush()
    return failed
