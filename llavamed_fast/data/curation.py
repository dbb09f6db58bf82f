"""``curate instruct``: figure records -> teacher -> cleaned instruction records, resumable. Pure Python.

The output is rebuilt from the ledger at the end of every run, in the order of the input: a run that was
killed leaves no partial output but keeps every reply it paid for, and the next run sends only what is
missing, then writes every record exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from llavamed_fast.data import instruct
from llavamed_fast.data.alignment import read_jsonl
from llavamed_fast.data.durable import write_atomic
from llavamed_fast.data.ledger import Ledger, request_key
from llavamed_fast.data.teacher import TeacherConfig, estimate_tokens, run_batch, run_jobs


def default_ledger(out: str | os.PathLike[str]) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".ledger.jsonl")


def curate_instruct(
    figures: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: TeacherConfig,
    *,
    ledger_path: str | os.PathLike[str] | None = None,
    use_context: bool = True,
    seed: int = 0,
    limit: int | None = None,
    dry_run: bool = False,
    progress: bool = True,
    batch: bool = False,
    poll_seconds: float = 30.0,
) -> dict[str, Any]:
    """Run the teacher over the figures and write the instruction records; returns the run's summary."""
    counts: Counter[str] = Counter()
    selected: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _number, figure in read_jsonl(figures):
        if not (figure.get("caption") or "").strip() or not figure.get("pair_id"):
            counts["no_caption"] += 1
            continue
        if figure["pair_id"] in seen:  # each figure once in the output
            counts["duplicate_pair_id"] += 1
            continue
        seen.add(figure["pair_id"])
        selected.append(figure)
        if limit is not None and len(selected) >= limit:
            break
    jobs = [(f["pair_id"], instruct.build_messages(f, use_context=use_context)) for f in selected]
    prices = config.prices()
    if dry_run:
        prompt = sum(estimate_tokens(m) for _, m in jobs)
        completion = config.max_tokens * len(jobs)
        estimate = None if prices is None else (prompt * prices[0] + completion * prices[1]) / 1e6
        if jobs:
            print(json.dumps(jobs[0][1], indent=1, ensure_ascii=False))
        return {
            "dry_run": True,
            "requests": len(jobs),
            "estimated_prompt_tokens": prompt,
            "max_completion_tokens": completion,
            "estimated_cost_usd_at_most": None if estimate is None else round(estimate, 6),
        }

    ledger = Ledger(ledger_path or default_ledger(out))
    bar = None
    if batch:
        stats = asyncio.run(
            run_batch(
                jobs,
                config,
                ledger,
                poll_seconds=poll_seconds,
                on_status=(lambda status: print(f"batch: {status}", file=sys.stderr)) if progress else None,
            )
        )
    elif progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="teacher", unit="req", file=sys.stderr)
    if not batch:
        try:
            stats = asyncio.run(
                run_jobs(jobs, config, ledger, on_reply=(lambda _job: bar.update(1)) if bar else None)
            )
        finally:
            if bar:
                bar.close()
    records = []
    params = config.params()
    for figure, (_, messages) in zip(selected, jobs, strict=True):
        entry = ledger.get(request_key(config.model, messages, params))
        if entry is None:
            counts["no_reply"] += 1
            continue
        try:
            turns = instruct.parse_conversation(entry["reply"])
        except instruct.ReplyError:
            counts["malformed_reply"] += 1
            continue
        kept = instruct.clean_conversation(turns, counts)
        if not kept:
            counts["nothing_left"] += 1
            continue
        records.append(
            instruct.conversation_record(
                figure, kept, teacher=config.model, use_context=use_context, seed=seed
            )
        )
    ledger.close()
    write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    summary = {
        "records": len(records),
        "figures": len(selected),
        "sent": stats.sent,
        "from_ledger": stats.cached,
        "retries": stats.retries,
        "failed": len(stats.failed),
        "failures": dict(list(stats.failed.items())[:20]),
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "cost_usd": None if prices is None else round(stats.cost(prices), 6),
        "seconds": round(stats.seconds, 2),
        "filters": dict(counts),
    }
    # Next to the output, for 'curate stats' (filter counts) and for the record of what the run cost.
    summary_path(out).write_text(json.dumps(summary, indent=1))
    return summary


def summary_path(out: str | os.PathLike[str]) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".summary.json")
