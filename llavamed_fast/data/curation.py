"""``curate instruct``: figure records -> teacher -> cleaned instruction records, resumable. Pure Python.

The output is rebuilt from the ledger at the end of every run, in the order of the input: a run that was
killed leaves no partial output but keeps every reply it paid for, and the next run sends only what is
missing, then writes every record exactly once. The summary beside the output gives this run's numbers
and, under ``ledger_total``, those of every reply in the ledger (what the whole set cost), so a resumed
run does not hide what the earlier ones paid.
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
from llavamed_fast.data.alignment import unique_figures
from llavamed_fast.data.durable import write_atomic
from llavamed_fast.data.ledger import Ledger, request_key
from llavamed_fast.data.selection import FigurePolicy
from llavamed_fast.data.teacher import (
    TeacherConfig,
    batch_state_path,
    cost_usd,
    estimate_tokens,
    run_batch,
    run_jobs,
)

# How many figures the summary names under "failures" and "dropped": enough to look into, while a large
# run's summary stays readable (the counts under "failed" and "filters" are complete).
NAMED = 20


def default_ledger(out: str | os.PathLike[str]) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".ledger.jsonl")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during the teacher run: every reply received so far is in the ledger."""

    def __init__(self, replies: int, ledger: Path, batch_pending: bool) -> None:
        super().__init__(f"{replies} replies are saved in {ledger}")
        self.replies, self.ledger, self.batch_pending = replies, ledger, batch_pending


def ledger_total(ledger: Ledger, prices: tuple[float, float] | None) -> dict[str, Any]:
    """Every reply in ``ledger`` (all runs that used it): count, tokens, and cost at ``prices`` (replies
    that came through the Batch API at its price)."""
    usage = ledger.usage()
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    batch_prompt = usage.get("batch_prompt_tokens", 0)  # the part of the tokens billed at the batch price
    batch_completion = usage.get("batch_completion_tokens", 0)
    cost = None
    if prices is not None:
        cost = cost_usd(prompt - batch_prompt, completion - batch_completion, prices)
        cost += cost_usd(batch_prompt, batch_completion, prices, batch=True)
        cost = round(cost, 6)
    return {
        "replies": len(ledger),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "batch_prompt_tokens": batch_prompt,
        "batch_completion_tokens": batch_completion,
        "cost_usd": cost,
    }


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
    policy: FigurePolicy | None = None,
) -> dict[str, Any]:
    """Run the teacher over the figures and write the instruction records; returns the run's summary.
    A figure record with a field of the wrong type is skipped with a message on stderr naming its line
    (counted as ``invalid_record``). ``policy`` (default: :class:`FigurePolicy`'s, the command's defaults)
    leaves figures out before any request is made, each counted under its reason (``licence``,
    ``domain``, ``compound``, ``image_...``); ``limit`` counts the figures kept. A figure that was sent but
    gives no record is named in the summary's ``dropped`` (first :data:`NAMED` of them) with its reason.
    Ctrl-C raises :class:`Interrupted` once the ledger is closed."""
    policy = policy if policy is not None else FigurePolicy()
    counts: Counter[str] = Counter()
    selected: list[dict[str, Any]] = []

    def invalid(text: str) -> None:
        print(f"curate instruct: skipped {text}", file=sys.stderr)
        counts["invalid_record"] += 1

    def repeat(text: str) -> None:
        counts["duplicate_pair_id"] += 1

    # The order align uses (first record of a pair id, the figure policy, then the caption), so that both
    # keep the same figures and count each left-out one under the same reason.
    for _, figure in unique_figures(figures, invalid=invalid, repeat=repeat):
        # Before paying the teacher: a figure align would leave out (licence, modality, no image) is not
        # asked about.
        left_out = policy.reason(figure)
        if left_out is None and not (figure.get("caption") or "").strip():
            left_out = "no_caption"
        if left_out is None and not figure.get("pair_id"):
            left_out = "no_pair_id"  # the ledger and the output need it
        if left_out is not None:
            counts[left_out] += 1
            continue
        selected.append(figure)
        if limit is not None and len(selected) >= limit:
            break
    jobs = [(f["pair_id"], instruct.build_messages(f, use_context=use_context)) for f in selected]
    prices = config.prices()
    if dry_run:
        prompt = sum(estimate_tokens(m) for _, m in jobs)
        completion = config.max_tokens * len(jobs)
        estimate = cost_usd(prompt, completion, prices, batch=batch)
        if jobs:
            print(json.dumps(jobs[0][1], indent=1, ensure_ascii=False))
        return {
            "dry_run": True,
            "requests": len(jobs),
            "estimated_prompt_tokens": prompt,
            "max_completion_tokens": completion,
            "estimated_cost_usd_at_most": None if estimate is None else round(estimate, 6),
            "filters": dict(counts),
        }

    ledger = Ledger(ledger_path or default_ledger(out))
    bar = None
    try:
        if batch:
            stats = asyncio.run(
                run_batch(
                    jobs,
                    config,
                    ledger,
                    poll_seconds=poll_seconds,
                    on_status=(lambda status: print(f"batch: {status}", file=sys.stderr))
                    if progress
                    else None,
                )
            )
        else:
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(jobs), desc="teacher", unit="req", file=sys.stderr)
            stats = asyncio.run(
                run_jobs(jobs, config, ledger, on_reply=(lambda _job: bar.update(1)) if bar else None)
            )
    except KeyboardInterrupt:
        # asyncio.run has cancelled the requests in flight; what was received is already durable.
        ledger.close()
        raise Interrupted(len(ledger), ledger.path, batch_state_path(ledger).exists()) from None
    finally:
        if bar:
            bar.close()
    records = []
    dropped: dict[str, str] = {}  # pair id -> why a figure that was asked about has no record
    params = config.params()
    for figure, (_, messages) in zip(selected, jobs, strict=True):
        entry = ledger.get(request_key(config.model, messages, params))
        if entry is None:
            counts["no_reply"] += 1
            dropped[figure["pair_id"]] = "no_reply"  # the error is in "failures"
            continue
        try:
            turns = instruct.parse_conversation(entry["reply"])
        except instruct.ReplyError:
            counts["malformed_reply"] += 1
            dropped[figure["pair_id"]] = "malformed_reply"
            continue
        hits: Counter[str] = Counter()  # this figure's filter hits, to say which ones emptied it
        kept = instruct.clean_conversation(turns, hits)
        counts.update(hits)
        if not kept:
            counts["nothing_left"] += 1
            removed = ", ".join(f"{name} {hits[name]}" for name in ("refusal", "caption_leak") if hits[name])
            dropped[figure["pair_id"]] = f"nothing_left: {removed}" if removed else "nothing_left"
            continue
        records.append(
            instruct.conversation_record(
                figure, kept, teacher=config.model, use_context=use_context, seed=seed
            )
        )
    write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    summary = {
        "records": len(records),
        "figures": len(selected),
        "sent": stats.sent,
        "from_ledger": stats.cached,
        "retries": stats.retries,
        "failed": len(stats.failed),
        "failures": dict(list(stats.failed.items())[:NAMED]),
        "dropped": dict(list(dropped.items())[:NAMED]),  # all of them are counted under "filters"
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "cost_usd": None if prices is None else round(stats.cost(prices), 6),
        "seconds": round(stats.seconds, 2),
        "filters": dict(counts),
        # The fields above are this run's; a resumed run sends (and pays for) only what was missing.
        "ledger_total": ledger_total(ledger, prices),
    }
    ledger.close()
    # Next to the output, for 'curate stats' (filter counts) and for the record of what the run cost.
    summary_path(out).write_text(json.dumps(summary, indent=1))
    return summary


def summary_path(out: str | os.PathLike[str]) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".summary.json")
