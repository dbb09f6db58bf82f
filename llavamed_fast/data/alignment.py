"""Stage-1 alignment records from figure records: "describe this image" -> the caption. Pure Python.

For each figure one human turn (an instruction and ``<image>``) and one gpt turn (the caption), in the
LLaVA JSON format of the released data, with the figure's ``domain`` flags as the instruction records
carry them. As LLaVA-Med's stage 1 did, the instruction asks for a concise description when the caption
is under 30 words and for a detailed one otherwise; the wording is drawn from a pool, and ``<image>``
goes before or after it. Every choice comes from a generator seeded by the run's seed and the figure's
``pair_id``, so a record is the same whatever order or subset it is made in.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from llavamed_fast.data.durable import write_atomic

CONCISE_WORDS = 30  # captions under this many words get a "concise" instruction

CONCISE = (
    "Describe the image concisely.",
    "Give a short description of this figure.",
    "Summarize what the image shows in a sentence.",
    "What does this image show? Answer briefly.",
    "Write a brief caption for this image.",
    "In a few words, what is shown here?",
    "Provide a one-line description of the picture.",
    "Briefly state the content of the image.",
)
DETAILED = (
    "Describe the image in detail.",
    "Give a thorough description of this figure.",
    "Explain what is shown in the image, covering each part of it.",
    "What does this image show? Describe it fully.",
    "Write a detailed caption for this biomedical image.",
    "Walk through the contents of this figure in detail.",
    "Provide a comprehensive description of the picture and its findings.",
    "Describe everything visible in this image, with specifics.",
)


def image_file_name(pair_id: str) -> str:
    """The image file of a figure, as ``curate images`` saves it and the records name it: the pair id made
    safe for a file system, ``.jpg`` (Pillow reads images by their content, whatever the suffix)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", pair_id).strip("._")
    if not safe:
        raise ValueError(f"pair id {pair_id!r} gives no file name")
    return safe + ".jpg"


def image_name_of(figure: Mapping[str, Any], template: str | None) -> str:
    """The record's ``image``: ``template`` formatted with the figure's string fields, or
    :func:`image_file_name`. A field the template names and the figure lacks is a ValueError naming both."""
    if template is None:
        return image_file_name(figure["pair_id"])
    fields = {k: v for k, v in figure.items() if isinstance(v, str)}
    try:
        return template.format(**fields)
    except KeyError as missing:
        raise ValueError(
            f"image name template {template!r}: the record has no string field {missing}; "
            f"it has {', '.join(sorted(fields)) or 'none'}"
        ) from None
    except (IndexError, ValueError) as error:  # "{0}", "{", "{x:q}": the template itself is wrong
        raise ValueError(f"image name template {template!r}: {error}") from None


# The types the curation steps rely on, for the fields they read (None is allowed for each: "not given").
FIGURE_FIELDS: dict[str, tuple[type, ...]] = {
    "pair_id": (str,),
    "caption": (str,),
    "mentions": (list, str),
    "licence": (dict,),
    "domain": (dict,),
    "compound": (bool,),
    "pmc_tar_url": (str,),
    "image_file_path": (str,),
}
_JSON_NAMES = {str: "a string", list: "a list", dict: "an object", bool: "true or false"}


def check_figure(figure: Mapping[str, Any]) -> None:
    """A ValueError naming the first field of ``figure`` whose value has the wrong type (records written
    by hand: ``"licence": "CC BY"`` where ``{"code", "commercial_use"}`` belongs)."""
    for name, types in FIGURE_FIELDS.items():
        value = figure.get(name)
        if value is not None and not isinstance(value, types):
            expected = " or ".join(_JSON_NAMES[t] for t in types)
            raise ValueError(
                f"field {name!r} must be {expected} (or null), got {type(value).__name__} {value!r:.60}"
            )


# The order of LLaVA-Med's released instruction data; the training reader ignores keys it does not use.
RECORD_DOMAINS = ("chest_xray", "mri", "ct_scan", "histology", "gross")


def domain_flags(figure: Mapping[str, Any]) -> dict[str, bool]:
    """A training record's ``domain``: the figure's modality flags, each domain present, so that
    ``curate stats`` counts alignment and instruction records alike (no flag set: "other")."""
    domain = figure.get("domain") or {}
    return {name: bool(domain.get(name)) for name in RECORD_DOMAINS}


def instruction_pool(caption: str) -> tuple[str, ...]:
    return CONCISE if len(caption.split()) < CONCISE_WORDS else DETAILED


def alignment_record(
    figure: Mapping[str, Any], *, seed: int = 0, image_name: str | None = None
) -> dict[str, Any]:
    """The stage-1 record of one figure record (needs ``pair_id`` and a non-empty ``caption``)."""
    pair_id, caption = figure.get("pair_id"), (figure.get("caption") or "").strip()
    if not pair_id:
        raise ValueError(f"figure record without a pair_id: {dict(figure)!r:.200}")
    if not caption:
        raise ValueError(f"figure {pair_id} has no caption to align with")
    rng = random.Random(f"{seed}:{pair_id}")
    instruction = rng.choice(instruction_pool(caption))
    human = f"<image>\n{instruction}" if rng.random() < 0.5 else f"{instruction}\n<image>"
    return {
        "id": pair_id,
        "image": image_name_of(figure, image_name),
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": caption}],
        "domain": domain_flags(figure),
    }


def json_objects(lines: Iterable[str], path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for each non-empty line of ``path``'s ``lines``; a line that is not a JSON
    object is an error naming the file and line."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number}: not JSON: {error.msg}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def read_jsonl(path: str | os.PathLike[str]) -> Iterable[tuple[int, dict[str, Any]]]:
    """:func:`json_objects` of a JSONL file."""
    with open(path, encoding="utf-8") as handle:
        yield from json_objects(handle, path)


def unique_figures(
    path: str | os.PathLike[str], *, invalid: Callable[[str], None], repeat: Callable[[str], None]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, figure)`` for each valid figure record of a JSONL file, the first one of each
    ``pair_id`` only. An invalid record goes to ``invalid`` and a repeated one to ``repeat``, each as a
    message naming the file and line; both are left out and the lines after them still count."""
    first_line: dict[str, int] = {}  # pair id -> the line it was first seen on
    for number, figure in read_jsonl(path):
        try:
            check_figure(figure)
        except ValueError as error:
            invalid(f"{path}: line {number}: {error}")
            continue
        pair_id = figure.get("pair_id")
        if pair_id in first_line:
            repeat(f"{path}: line {number}: pair_id {pair_id!r} repeats line {first_line[pair_id]}; left out")
            continue
        if pair_id:
            first_line[pair_id] = number
        yield number, figure


def write_json(records: list[dict[str, Any]], out: str | os.PathLike[str]) -> None:
    """A JSON list, written atomically (temporary file, fsync, rename)."""
    write_atomic(out, json.dumps(records, ensure_ascii=False, indent=1))
