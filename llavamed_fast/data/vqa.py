"""VQA sets as LLaVA-JSON conversations (VQA-RAD for now; the evaluation loaders build on this)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path


def shared_data_dir() -> Path:
    """Where the real datasets live: ``$LLAVAMED_SHARED_DATA``, else ``../shared/data`` from here."""
    return Path(os.environ.get("LLAVAMED_SHARED_DATA", Path.cwd().parent / "shared" / "data")).resolve()


def vqa_rad_conversations(root: str | os.PathLike, *, split: str = "train", turns: int = 4) -> list[dict]:
    """VQA-RAD questions grouped by image into multi-turn LLaVA records (``<image>`` in the first turn).

    ``root`` holds ``trainset.json`` / ``testset.json`` (the ``data_RAD`` split) and ``images/``. Records
    follow the file's order; each image's questions are cut into conversations of up to ``turns`` turns.
    """
    root = Path(root)
    rows = json.loads((root / f"{split}set.json").read_text())
    by_image: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_image[row["image_name"]].append(row)
    records = []
    for image, questions in by_image.items():
        for start in range(0, len(questions), turns):
            conversation = []
            for i, row in enumerate(questions[start : start + turns]):
                text = f"<image>\n{row['question']}" if i == 0 else row["question"]
                conversation += [
                    {"from": "human", "value": text},
                    {"from": "gpt", "value": str(row["answer"])},
                ]
            records.append(
                {
                    "id": f"vqa-rad-{split}-{image}-{start // turns}",
                    "image": image,
                    "conversations": conversation,
                }
            )
    return records
