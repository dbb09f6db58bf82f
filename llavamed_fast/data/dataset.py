"""LLaVA-JSON datasets: records -> tokenized samples with lazily loaded, preprocessed images.

Records are ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}, ...]}`` in a JSON list
or a JSONL file (``conversatons``, a misspelling in some released files, is accepted; ``image`` may be a
list, or absent for text-only records). ``<image>`` may sit anywhere in the first human turn; it stays
where the record puts it. Every record is tokenized once at construction (labels from token spans, see
``templates.py``), which gives the lengths the packer needs; images are read only when a sample is fetched.

A malformed record is an error naming the file, the line or index and the record id. A missing or bad
image is an :class:`~llavamed_fast.data.images.ImageError` naming the file and record, or, with
``bad_images="skip"``, a :class:`SkippedSample` that the collator leaves out and lists in the batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from llavamed_fast.data.batch import SkippedSample
from llavamed_fast.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from llavamed_fast.data.packing import Sample
from llavamed_fast.data.templates import ConversationError, Encoded, LabelAlignmentError, Message

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class RecordError(ValueError):
    """A record that is not valid LLaVA JSON, or that the chat template cannot encode."""


@dataclass(frozen=True)
class Record:
    id: str
    images: tuple[str, ...]
    messages: tuple[Message, ...]
    where: str  # "file.jsonl line 12 (id 32432162_F1)", for error messages


def _where(path: Path, position: str, record_id: object) -> str:
    return f"{path} {position}" + (f" (id {record_id})" if record_id is not None else "")


def _parse(raw: Any, path: Path, position: str) -> Record:
    record_id = raw.get("id") if isinstance(raw, dict) else None
    where = _where(path, position, record_id)
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    if record_id is None or not isinstance(record_id, (str, int)):
        raise RecordError(f"{where}: missing or invalid 'id'")
    turns = raw.get("conversations", raw.get("conversatons"))
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"{where}: 'conversations' must be a non-empty list")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RecordError(f"{where}: turn {index} must be an object with a string 'value'")
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise RecordError(f"{where}: turn {index} has unknown 'from' {turn.get('from')!r} (human/gpt)")
        messages.append(Message(role, turn["value"]))
    image = raw.get("image")
    images = (image,) if isinstance(image, str) else tuple(image) if isinstance(image, list) else ()
    if image is not None and (not images or not all(isinstance(i, str) and i for i in images)):
        raise RecordError(f"{where}: 'image' must be a file name or a list of file names")
    return Record(str(record_id), images, tuple(messages), where)


def read_records(path: str | os.PathLike) -> list[Record]:
    """Records of a JSON list or JSONL file (by content, not extension)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise RecordError(
                f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
            ) from error
        return [_parse(item, path, f"record {i}") for i, item in enumerate(raw)]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as error:
            raise RecordError(f"{path} line {number}: invalid JSON: {error.msg}") from error
        records.append(_parse(raw, path, f"line {number}"))
    return records


@dataclass
class DatasetStats:
    records: int = 0
    truncated: list[str] = field(default_factory=list)
    unsupervised: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.records} records; {len(self.truncated)} truncated to the context length; "
            f"{len(self.unsupervised)} with no supervised token left"
        )


class LlavaJsonDataset(Dataset):
    """A map-style dataset of :class:`Sample` (or :class:`SkippedSample` under the skip policy).

    Args:
        path: LLaVA JSON or JSONL file.
        image_folder: where the records' image paths are relative to.
        processor: the model's :class:`~llavamed_fast.model.LlavaMedProcessor`.
        bad_images: ``"raise"`` (default) or ``"skip"`` (leave the sample out, listed in the batch).
        max_length: token limit per sample (default: the model's context). Longer samples lose their
            tail; a sample whose image tokens would be cut is an error.
        max_image_pixels: images larger than this are refused as decompression bombs.
        max_records: read only the first N records (0: all).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_folder: str | os.PathLike,
        processor,
        *,
        bad_images: str = "raise",
        max_length: int | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        max_records: int = 0,
    ) -> None:
        if bad_images not in ("raise", "skip"):
            raise ValueError(f"bad_images must be 'raise' or 'skip', got {bad_images!r}")
        self.path = Path(path)
        self.image_folder = Path(image_folder)
        self.processor = processor
        self.bad_images = bad_images
        self.max_length = max_length or processor.max_length
        self.max_image_pixels = max_image_pixels
        self.records = read_records(self.path)
        if max_records:
            self.records = self.records[:max_records]
        self.stats = DatasetStats(records=len(self.records))
        self._encoded = [self._encode(record) for record in self.records]
        self.lengths = np.array([len(e.input_ids) for e in self._encoded], dtype=np.int64)

    def _encode(self, record: Record) -> Encoded:
        try:
            encoded = self.processor.encode(
                record.messages, num_images=len(record.images), where=f"{record.where}: "
            )
        except (ConversationError, LabelAlignmentError) as error:
            raise RecordError(
                str(error) if record.where in str(error) else f"{record.where}: {error}"
            ) from error
        if len(encoded.input_ids) > self.max_length:
            count = self.processor.image_tokens.count
            if len(encoded.image_starts) and int(encoded.image_starts.max()) + count > self.max_length:
                raise RecordError(f"{record.where}: cutting at {self.max_length} tokens would cut an image")
            encoded = Encoded(
                encoded.input_ids[: self.max_length], encoded.labels[: self.max_length], encoded.image_starts
            )
            self.stats.truncated.append(record.id)
        if not (encoded.labels != -100).any():
            self.stats.unsupervised.append(record.id)
        return encoded

    def __len__(self) -> int:
        return len(self.records)

    def image_paths(self, index: int) -> list[Path]:
        return [self.image_folder / name for name in self.records[index].images]

    def missing_images(self) -> list[tuple[str, Path]]:
        """``(record id, path)`` of every image file that does not exist: one ``stat`` per image, so that a
        run can name them all before it starts rather than stop at the first one hours in."""
        return [
            (record.id, path)
            for index, record in enumerate(self.records)
            for path in self.image_paths(index)
            if not path.is_file()
        ]

    def load_images(self, index: int) -> list[Image.Image] | SkippedSample:
        """The record's decoded images, or (skip policy) why they cannot be used."""
        record = self.records[index]
        images = []
        for path in self.image_paths(index):
            try:
                images.append(load_image(path, record=record.id, max_pixels=self.max_image_pixels))
            except ImageError as error:
                if self.bad_images == "raise":
                    raise
                return SkippedSample(record.id, str(path), error.reason)
        return images

    def sample(
        self,
        index: int,
        *,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> Sample:
        encoded = self._encoded[index]
        return Sample(
            id=self.records[index].id,
            input_ids=encoded.input_ids,
            labels=encoded.labels,
            image_starts=encoded.image_starts,
            pixel_values=pixel_values,
            image_features=image_features,
        )

    def __getitem__(self, index: int) -> Sample | SkippedSample:
        images = self.load_images(index)
        if isinstance(images, SkippedSample):
            return images
        return self.sample(index, pixel_values=self.processor.preprocess_images(images))


def skipped_summary(skipped: Sequence[SkippedSample]) -> str:
    """The samples left out under the skip policy, for a stage's summary: how many, and the first 20."""
    if not skipped:
        return "no samples skipped"
    lines = [f"{len(skipped)} sample(s) skipped for bad images:"]
    lines += [f"  {s.record}: {s.path}: {s.reason}" for s in skipped[:20]]
    if len(skipped) > 20:
        lines.append(f"  ... and {len(skipped) - 20} more")
    return "\n".join(lines)
