"""Biomedical VQA sets as canonical records, and their training splits as LLaVA JSON.

Every loader returns :class:`VQARecord` s, ``{question_id, image, question, answer, answer_type}`` with
``image`` an absolute path and ``answer_type`` ``OPEN`` or ``CLOSED``; ``llavamed-fast eval export``
writes them as JSONL, the format that generation and scoring read.

Conventions (the ones LLaVA-Med's numbers rest on):

- **VQA-RAD**, ``source="public"`` (default): the dataset's public JSON. ``test`` is the 451
  ``test_freeform`` + ``test_para`` rows (272 CLOSED / 179 OPEN), ``train`` the 1,797 ``freeform`` +
  ``para`` rows (LLaVA-Med's fine-tuning set; no "frame" rows). ``question_id`` is the JSON's ``qid``, its
  row index, as in LLaVA-Med's answer files. ``source="data_rad"``: the widely used ``trainset.json``
  (3,064) / ``testset.json`` (451) split, with that file's own ``qid`` numbering (not the public one; the
  451 test questions are the same, in the same order). Two public rows spell the type ``"CLOSED "``;
  types are stripped.
- **SLAKE**: English rows (``q_lang == "en"``) of ``train/validate/test.json``; ``question_id`` is ``qid``.
  One English training row has an empty answer (qid 1622); it is left out with a warning.
  CLOSED answers are not all yes/no (e.g. "Lung" for "Which is bigger, ...?").
- **PathVQA**: JSONL rows ``{qid, image, question, answer[, answer_type]}`` with images in ``images/``;
  without a type, CLOSED exactly when the answer is yes/no (LLaVA-Med's convention). The rows do not say
  their split, so a file whose name says another split than the one asked for is refused.
- Hugging Face copies (:func:`from_hub`) when the ``datasets`` package and a copy are at hand.

A row without a question or an answer is left out with a warning that names it (the published files
have such rows); a row that is not JSON, has no id or an unknown type is an error. Pure Python.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llavamed_fast.data.durable import write_atomic

ANSWER_TYPES = ("OPEN", "CLOSED")


class DatasetError(ValueError):
    """A dataset file or record that cannot be read; the message names the file and the record."""


@dataclass(frozen=True)
class VQARecord:
    question_id: str
    image: str
    question: str
    answer: str
    answer_type: str

    def __post_init__(self) -> None:
        if self.answer_type not in ANSWER_TYPES:
            raise DatasetError(
                f"question {self.question_id}: answer_type {self.answer_type!r} is not OPEN/CLOSED"
            )

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def shared_data_dir() -> Path:
    """Where the real datasets live for tests and examples: ``$LLAVAMED_SHARED_DATA``, else
    ``../shared/data`` from the current directory."""
    return Path(os.environ.get("LLAVAMED_SHARED_DATA", Path.cwd().parent / "shared" / "data")).resolve()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: not JSON ({error})") from None


def _answer_type(value: Any, where: str) -> str:
    kind = str(value or "").strip().upper()
    if kind not in ANSWER_TYPES:
        raise DatasetError(f"{where}: answer_type {value!r} is not OPEN or CLOSED")
    return kind


def _record(row: dict, where: str, *, image: str, kind: Any) -> VQARecord | None:
    """A canonical record from a row with ``qid``, ``question`` and ``answer`` fields (None: left out)."""
    if row.get("qid") in (None, ""):
        raise DatasetError(f"{where}: record has no 'qid'")
    for name in ("question", "answer"):
        if str(row.get(name) or "").strip() == "":
            warnings.warn(f"{where} (question {row['qid']}): empty {name}; left out", stacklevel=3)
            return None
    return VQARecord(
        question_id=str(row["qid"]),
        image=image,
        question=str(row["question"]).strip(),
        answer=str(row["answer"]).strip(),
        answer_type=_answer_type(kind, where),
    )


def _json_records(path: Path, rows: list[tuple[int, dict]], images: Path, image_key: str) -> list[VQARecord]:
    """Canonical records of ``(record number, row)`` pairs of a JSON file; rows left out return None."""
    records = (
        _record(
            row,
            f"{path}: record {number}",
            image=str((images / str(row.get(image_key, ""))).resolve()),
            kind=row.get("answer_type"),
        )
        for number, row in rows
    )
    return [r for r in records if r is not None]


def vqa_rad(root: str | os.PathLike[str], split: str = "test", *, source: str = "public") -> list[VQARecord]:
    """VQA-RAD ``train`` or ``test`` from ``root`` (the public JSON, ``trainset/testset.json``, ``images/``)."""
    root = Path(root)
    if split not in ("train", "test"):
        raise DatasetError(f"VQA-RAD has splits train and test, not {split!r}")
    if source == "public":
        path = root / "VQA_RAD Dataset Public.json"
        phrases = {"train": ("freeform", "para"), "test": ("test_freeform", "test_para")}[split]
        rows = [(n, r) for n, r in enumerate(_read_json(path)) if r.get("phrase_type") in phrases]
    elif source == "data_rad":
        path = root / f"{split}set.json"
        rows = list(enumerate(_read_json(path)))
    else:
        raise DatasetError(f"VQA-RAD source must be 'public' or 'data_rad', not {source!r}")
    return _json_records(path, rows, root / "images", "image_name")


def slake(root: str | os.PathLike[str], split: str = "test") -> list[VQARecord]:
    """SLAKE's English questions of ``train``, ``validate`` or ``test`` (``root`` holds the JSON and ``imgs/``)."""
    root = Path(root)
    if split not in ("train", "validate", "test"):
        raise DatasetError(f"SLAKE has splits train, validate and test, not {split!r}")
    path = root / f"{split}.json"
    rows = [(n, r) for n, r in enumerate(_read_json(path)) if r.get("q_lang") == "en"]
    return _json_records(path, rows, root / "imgs", "img_name")


def _yes_no_type(answer: Any) -> str:
    return "CLOSED" if str(answer).strip().lower() in ("yes", "no") else "OPEN"


def pathvqa(path: str | os.PathLike[str]) -> list[VQARecord]:
    """PathVQA rows from a JSONL file (``{qid, image, question, answer[, answer_type]}``) whose images are in
    ``images/`` beside it."""
    path = Path(path)
    records = []
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}: line {number}: not JSON ({error})") from None
        image = str((path.parent / "images" / str(row.get("image", ""))).resolve())
        kind = row.get("answer_type") or _yes_no_type(row.get("answer", ""))
        records.append(
            _record(
                row,
                f"{path}: line {number}",
                image=image,
                kind=kind,
            )
        )
    return [r for r in records if r is not None]


def _lines(path: Path) -> list[str]:
    try:
        # Split on "\n" only: str.splitlines would also break inside a value at U+2028, U+0085 ...
        return path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None


def from_hub(
    name: str,
    split: str,
    images_dir: str | os.PathLike[str],
    *,
    english_only: bool = True,
) -> list[VQARecord]:
    """A Hugging Face copy (hub id or a ``save_to_disk`` folder) with ``image``, ``question`` and ``answer``
    columns (PathVQA's and SLAKE's usual layout). Images are written once to ``images_dir`` as PNG named by
    row; the question id is the row's ``qid`` or ``question_id`` column if there is one, else the row index;
    the type is the row's ``answer_type`` if any, else CLOSED exactly for yes/no answers."""
    import datasets  # optional: pip install datasets

    source = Path(name)
    if source.is_dir():
        loaded = datasets.load_from_disk(str(source))
        if isinstance(loaded, datasets.DatasetDict) and split not in loaded:
            raise DatasetError(f"{name}: no split {split!r}; this copy has {', '.join(map(repr, loaded))}")
        table = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        table = datasets.load_dataset(name, split=split)
    images = Path(images_dir)
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for index, row in enumerate(table):
        where = f"{name} [{split}] row {index}"
        if english_only and row.get("q_lang", "en") != "en":
            continue
        qid = row.get("qid", row.get("question_id", index))
        target = images / f"{split}_{index:06d}.png"
        if not target.exists():
            picture = row.get("image")
            if picture is None or not hasattr(picture, "save"):
                raise DatasetError(f"{where}: no decoded image in column 'image'")
            staging = target.with_name(target.name + ".tmp")
            picture.convert("RGB").save(staging, format="PNG")
            os.replace(staging, target)  # a crash leaves no half-written image under the final name
        kind = row.get("answer_type") or _yes_no_type(row.get("answer", ""))
        fields = {"qid": qid, "question": row.get("question"), "answer": row.get("answer")}
        records.append(
            _record(
                fields,
                where,
                image=str(target.resolve()),
                kind=kind,
            )
        )
    return [r for r in records if r is not None]


LOADERS: dict[str, Callable[..., list[VQARecord]]] = {"vqa-rad": vqa_rad, "slake": slake, "pathvqa": pathvqa}
DEFAULT_FOLDERS = {"vqa-rad": "vqa-rad", "slake": "slake", "pathvqa": "pathvqa-sample/test_sample.jsonl"}


def load(
    dataset: str, split: str, root: str | os.PathLike[str] | None = None, **options: Any
) -> list[VQARecord]:
    """Records of a named dataset; ``root`` defaults to its folder under :func:`shared_data_dir`. For
    PathVQA ``root`` is the JSONL file or a folder holding ``{split}.jsonl``."""
    if dataset not in LOADERS:
        raise DatasetError(f"unknown dataset {dataset!r}; known: {', '.join(LOADERS)}")
    where = Path(root) if root is not None else default_path(DEFAULT_FOLDERS[dataset], "--root")
    if dataset == "pathvqa":
        if where.is_dir():
            where = where / f"{split}.jsonl"
        else:
            _check_named_split(where, split)
        return pathvqa(where)
    return LOADERS[dataset](where, split, **options)


_SPLIT_NAMES = {"train": {"train"}, "test": {"test"}, "validate": {"val", "valid", "validate", "validation"}}


def _check_named_split(path: Path, split: str) -> None:
    """A PathVQA file holds one split and its rows do not say which; when its name says another split (the
    shared sample, ``test_sample.jsonl``, asked for ``train``), refuse rather than export the wrong one."""
    words = set(re.split(r"[^a-z]+", path.stem.lower()))
    wanted = next((names for names in _SPLIT_NAMES.values() if split.lower() in names), {split.lower()})
    named = {s for s, names in _SPLIT_NAMES.items() if words & names}
    if named and not words & wanted:
        raise DatasetError(
            f"{path}: holds the {'/'.join(sorted(named))} split by its name, not {split!r}; pass --root "
            f"with the {split} JSONL or a folder holding {split}.jsonl"
        )


def default_path(relative: str, option: str) -> Path:
    """``relative`` under :func:`shared_data_dir`, or an error saying how to point at the shared data (the
    variable, or the command's ``option``) when it is not there."""
    path = shared_data_dir() / relative
    if not path.exists():
        where = (
            f"LLAVAMED_SHARED_DATA={os.environ['LLAVAMED_SHARED_DATA']}"
            if "LLAVAMED_SHARED_DATA" in os.environ
            else "LLAVAMED_SHARED_DATA is not set, so ../shared/data from the current folder is used"
        )
        raise DatasetError(
            f"{path}: no such file or folder (the default, $LLAVAMED_SHARED_DATA/{relative}; {where}); "
            f"set LLAVAMED_SHARED_DATA to the shared data folder or pass {option}"
        )
    return path


def check_images(records: Iterable[VQARecord]) -> None:
    """Every record's image file exists (an error names the first missing one and its question)."""
    for record in records:
        if not Path(record.image).is_file():
            raise DatasetError(f"question {record.question_id}: image {record.image} does not exist")


def write_jsonl(records: Sequence[VQARecord], path: str | os.PathLike[str]) -> Path:
    """Write canonical records as JSONL, atomically."""
    write_atomic(path, "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records))
    return Path(path)


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for each non-empty line of a JSONL file; ``where`` is ``"FILE: line N"``."""
    path = Path(path)
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{where}: not JSON ({error})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: not a JSON object")
        yield where, row


def read_records(path: str | os.PathLike[str]) -> list[VQARecord]:
    """Canonical records back from JSONL (relative image paths are taken from the file's folder)."""
    records, seen = [], set()
    for where, row in read_jsonl(path):
        try:
            record = VQARecord(**{name: str(row[name]) for name in VQARecord.__dataclass_fields__})
        except KeyError as error:
            raise DatasetError(f"{where}: record has no {error.args[0]!r}") from None
        except DatasetError as error:  # an unknown answer_type: say where it is
            raise DatasetError(f"{where}: {error}") from None
        # Answers and scores join on the id: a repeated one would be answered twice and scored once.
        if record.question_id in seen:
            raise DatasetError(f"{where}: question_id {record.question_id!r} appears twice")
        seen.add(record.question_id)
        if not Path(record.image).is_absolute():
            record = VQARecord(
                **{**record.to_json(), "image": str((Path(path).parent / record.image).resolve())}
            )
        records.append(record)
    return records


def to_llava(records: Sequence[VQARecord], *, prefix: str) -> list[dict[str, Any]]:
    """LLaVA JSON training records, one question each (as LLaVA-Med fine-tuned): ``<image>`` before the
    question, the reference answer as the reply, ``id`` = ``{prefix}-{question_id}``."""
    return [
        {
            "id": f"{prefix}-{r.question_id}",
            "image": r.image,
            "answer_type": r.answer_type,
            "conversations": [
                {"from": "human", "value": f"<image>\n{r.question}"},
                {"from": "gpt", "value": r.answer},
            ],
        }
        for r in records
    ]
