"""A stage's dataset, from its DataConfig: LLaVA JSON files, synthetic scans, or VQA-RAD."""

from __future__ import annotations

import json
from pathlib import Path

from llavamed_fast.data.dataset import LlavaJsonDataset, RecordError
from llavamed_fast.train.config import DataConfig, DataKind
from llavamed_fast.train.dist import Dist


def stage_dataset(data: DataConfig, processor, run_dir: Path, dist: Dist) -> LlavaJsonDataset:
    """Generated files (synthetic data, converted VQA sets) go to ``<run>/data``, written by the main
    rank while the others wait; every rank then reads the same files."""
    folder = run_dir / "data"
    if dist.is_main:
        path, images = _materialise(data, folder)
    dist.barrier()
    if not dist.is_main:
        path, images = _materialise(data, folder)  # files exist now: this only computes the paths
    dataset = LlavaJsonDataset(
        path, images, processor, bad_images=data.bad_images, max_records=data.max_samples
    )
    if data.bad_images == "raise":
        missing = dataset.missing_images()
        if missing:
            shown = "; ".join(f"record {record}: {file.relative_to(images)}" for record, file in missing[:5])
            manifest = images / "manifest.jsonl"
            raise RecordError(
                f"{len(missing)} image(s) that {path} names are not in {images} ({shown}"
                + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
                + ")"
                + (f"; {manifest} says why each could not be fetched" if manifest.is_file() else "")
                + "; provide them, or set this stage's data.bad_images=skip to train without those samples"
            )
    return dataset


def _materialise(data: DataConfig, folder: Path) -> tuple[Path, Path]:
    if data.kind is DataKind.LLAVA_JSON:
        path = Path(data.path)
        return path, Path(data.image_folder) if data.image_folder else path.parent
    if data.kind is DataKind.SYNTHETIC:
        from llavamed_fast.data.synthetic import make_dataset

        out = folder / "synthetic"
        path = make_dataset(
            out, task=data.synthetic_task, count=data.synthetic_count, seed=data.synthetic_seed
        )
        return path, out / "images"
    from llavamed_fast.eval.datasets import DEFAULT_FOLDERS, default_path, to_llava, vqa_rad

    # No path: the shared copy, where the evaluation commands find it too.
    root = (
        Path(data.path) if data.path else default_path(DEFAULT_FOLDERS["vqa-rad"], "--set stages.*.data.path")
    )
    path = folder / "vqa_rad_train.json"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        # LLaVA-Med's fine-tuning set: the 1,797 freeform + para rows of the public JSON, one question per
        # record (images as absolute paths).
        records = to_llava(vqa_rad(root, "train"), prefix="vqa-rad-train")
        staging = path.with_suffix(".tmp")
        staging.write_text(json.dumps(records))
        staging.replace(path)
    return path, root / "images"
