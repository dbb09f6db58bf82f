"""Statistics of a curated set: how many records per modality, turns per conversation, lengths, and what
the filters did. A table on the terminal, ``stats.json`` and ``stats.png`` (matplotlib, no display).
Pure Python, no torch."""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from llavamed_fast.data.alignment import read_jsonl

DOMAINS = ("chest_xray", "ct_scan", "mri", "histology", "gross")


def load_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """LLaVA JSON records from a JSON list or JSONL file; a record that :func:`collect` cannot read is a
    ValueError naming the file and the record (JSON list: its index from 1) or line (JSONL)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}: not JSON: {error.msg} (line {error.lineno}, column {error.colno})"
            ) from None
        located = [(f"record {number}", record) for number, record in enumerate(records, start=1)]
    else:
        located = [(f"line {number}", record) for number, record in read_jsonl(path)]
    for where, record in located:
        try:
            _check(record)
        except ValueError as error:
            name = f" (id {record['id']!r:.60})" if isinstance(record, dict) and "id" in record else ""
            raise ValueError(f"{path}: {where}{name}: {error}") from None
    return [record for _, record in located]


def _check(record: Any) -> None:
    """The shape :func:`collect` reads: an object, ``conversations`` a list of objects, ``domain`` an
    object of flags (either may be missing)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    turns = record.get("conversations") or record.get("conversatons") or []
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        raise ValueError(f"'conversations' must be a list of turn objects, got {turns!r:.60}")
    domain = record.get("domain") or {}
    if not isinstance(domain, dict):
        raise ValueError(f"'domain' must be an object of flags, got {domain!r:.60}")


def _summary(values: list[int]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "max": 0.0}
    return {
        "mean": round(statistics.fmean(values), 1),
        "median": statistics.median(values),
        "max": max(values),
    }


def collect(records: list[dict[str, Any]], filters: dict[str, int] | None = None) -> dict[str, Any]:
    """The numbers: records, per modality (records with none are "other"), exchanges per conversation,
    words per question and per answer, and the filter counts of the run that made the set."""
    modalities: Counter[str] = Counter()
    exchanges, question_words, answer_words = [], [], []
    for record in records:
        turns = record.get("conversations") or record.get("conversatons") or []
        flags = record.get("domain") or {}
        named = [d for d in DOMAINS if flags.get(d)]
        modalities.update(named or ["other"])
        exchanges.append(sum(1 for t in turns if t.get("from") == "gpt"))
        for turn in turns:
            words = len(str(turn.get("value", "")).replace("<image>", "").split())
            (answer_words if turn.get("from") == "gpt" else question_words).append(words)
    return {
        "records": len(records),
        "modalities": {d: modalities.get(d, 0) for d in (*DOMAINS, "other")},
        "exchanges_per_record": dict(sorted(Counter(exchanges).items())),
        "question_words": _summary(question_words),
        "answer_words": _summary(answer_words),
        "filters": dict(filters or {}),
    }


def table(numbers: dict[str, Any]) -> str:
    lines = [f"records: {numbers['records']}", "modality:"]
    lines += [f"  {name:<12}{count:>8}" for name, count in numbers["modalities"].items()]
    lines.append(
        "exchanges per record: " + ", ".join(f"{k}: {v}" for k, v in numbers["exchanges_per_record"].items())
    )
    for kind in ("question_words", "answer_words"):
        s = numbers[kind]
        lines.append(f"{kind.replace('_', ' ')}: mean {s['mean']}, median {s['median']}, max {s['max']}")
    if numbers["filters"]:
        lines.append("filters: " + ", ".join(f"{k}: {v}" for k, v in sorted(numbers["filters"].items())))
    return "\n".join(lines)


def plot(numbers: dict[str, Any], out: str | os.PathLike[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    names = list(numbers["modalities"])
    axes[0].bar(names, [numbers["modalities"][n] for n in names], color="#4477aa")
    axes[0].set_title("records per modality")
    axes[0].tick_params(axis="x", rotation=30)
    exchanges = numbers["exchanges_per_record"]
    axes[1].bar([str(k) for k in exchanges], list(exchanges.values()), color="#228833")
    axes[1].set_title("exchanges per record")
    filters = numbers["filters"] or {"(none recorded)": 0}
    axes[2].barh(list(filters), list(filters.values()), color="#cc6677")
    axes[2].set_title("filter hits")
    figure.suptitle(f"{numbers['records']} records")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def write(
    records_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    summary_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Collect, print nothing, write ``stats.json`` and ``stats.png`` into ``out_dir``; returns the numbers."""
    filters = None
    if summary_path and Path(summary_path).exists():
        try:
            summary = json.loads(Path(summary_path).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{summary_path}: not JSON: {error.msg} (line {error.lineno})") from None
        filters = summary.get("filters") if isinstance(summary, dict) else None
    numbers = collect(load_records(records_path), filters)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").write_text(json.dumps(numbers, indent=1))
    plot(numbers, out / "stats.png")
    return numbers
