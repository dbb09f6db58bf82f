"""LLaVA-Med's chat benchmark: a text-only judge scores the reference answer and the model's, from the caption.

The set is LLaVA-Med's 193 questions on 50 PMC figures (``llava_med_eval_qa50_qa.jsonl``: the question,
GPT-4's reference answer written from the caption, the caption, the sentences citing the figure, the
domain flags and the type, ``conversation`` or ``detailed_description``). For each question a judge reads
the caption and the citing sentences (they stand in for the image), the question and two answers, and
rates each 1-10 on its first line.

What we do beyond the original:

- **Both orders.** The original showed the reference always as "Assistant 1"; judges favour a position, so
  we ask twice, reference first and model first, and average each answer's two scores. The reference-first
  numbers alone (the paper's protocol) and the measured position bias are reported too.
- **Two summaries.** The paper's *relative score* is the mean over questions of model score / reference
  score, × 100; the ratio of the mean scores is reported beside it (less swayed by a few low references).
- **Groups** as the paper's table: type, and domain, where a question flagged with several domains counts
  under the first of chest_xray, mri, histology, gross, ct_scan (the original's rule).
- **Cached and resumable.** Requests go through the curation teacher client (any OpenAI-compatible
  endpoint) and its ledger: a rerun pays only for what is not there. The judge model and the model name
  the server reported are in the report.

Pure Python.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavamed_fast.data.durable import write_atomic
from llavamed_fast.data.ledger import Ledger, request_key
from llavamed_fast.data.teacher import RunStats, TeacherConfig, run_jobs
from llavamed_fast.eval.datasets import DatasetError, read_jsonl

DOMAINS = ("chest_xray", "mri", "histology", "gross", "ct_scan")  # the original's order of precedence
TYPES = ("conversation", "detailed_description")
ORDERS = ("reference_first", "model_first")

JUDGE_SYSTEM = (
    "You are a careful, impartial reviewer of answers that AI assistants give about biomedical figures."
)

JUDGE_TASK = (
    "The user asked the question while looking at the figure; the caption and the sentences of the article "
    "that cite the figure stand in for the image here. Rate how helpful, relevant, accurate and detailed "
    "each assistant's answer is, on a scale of 1 to 10 (higher is better). On the first line write only the "
    "two scores, Assistant 1's first, separated by a space. Then explain the ratings in a few sentences; do "
    "not let the order in which the answers are shown sway you."
)


class ChatEvalError(ValueError):
    """A question, answer or judge reply that cannot be used; the message names it."""


@dataclass(frozen=True)
class ChatQuestion:
    question_id: str
    image: str
    question: str  # the user's text with any <image> placeholder removed
    prompt: str  # the user's text as the model sees it (with <image>)
    reference: str
    caption: str
    figure_label: str
    mentions: tuple[str, ...]
    type: str
    domain: str | None

    def meta(self) -> dict[str, Any]:
        return {"type": self.type, "domain": self.domain}


def _domain(flags: Any, where: str) -> str | None:
    if isinstance(flags, str):  # some copies store the dict as its Python repr
        try:
            flags = ast.literal_eval(flags)
        except (ValueError, SyntaxError):
            raise ChatEvalError(f"{where}: domain {flags!r} is not a mapping") from None
    if not isinstance(flags, Mapping):
        raise ChatEvalError(f"{where}: domain must be a mapping of flags, got {type(flags).__name__}")
    return next((d for d in DOMAINS if flags.get(d)), None)


def _mentions(value: Any, where: str) -> tuple[str, ...]:
    if value is None:  # some figures are never cited in the text
        return ()
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value) if value.strip().startswith("[") else [value]
        except (ValueError, SyntaxError):
            value = [value]
    if not isinstance(value, list):
        raise ChatEvalError(f"{where}: in_text_mention must be a list, got {type(value).__name__}")
    out = []
    for item in value:
        text = item.get("tokens") if isinstance(item, Mapping) else item
        if isinstance(text, str) and text.strip():
            out.append(" ".join(text.split()))
    return tuple(out)


def load_questions(path: str | os.PathLike[str]) -> list[ChatQuestion]:
    """The chat questions (``llava_med_eval_qa50_qa.jsonl`` layout); errors name the file and line."""
    questions, seen = [], set()
    for where, row in read_jsonl(path):
        try:
            qid = str(row["question_id"])
            text = str(row["text"])
            question = ChatQuestion(
                question_id=qid,
                image=str(row["image"]),
                question=" ".join(text.replace("<image>", " ").split()),
                prompt=text if "<image>" in text else f"{text}\n<image>",
                reference=str(row["gpt4_answer"]),
                caption=" ".join(str(row["fig_caption"]).split()),
                figure_label=str(row.get("fig_label") or "Figure"),
                mentions=_mentions(row.get("in_text_mention", []), where),
                type=str(row["type"]),
                domain=_domain(row.get("domain", {}), where),
            )
        except KeyError as error:
            raise ChatEvalError(f"{where}: question has no {error.args[0]!r}") from None
        if qid in seen:
            raise ChatEvalError(f"{where}: question_id {qid!r} appears twice")
        seen.add(qid)
        questions.append(question)
    return questions


def load_answers(path: str | os.PathLike[str], questions: Sequence[ChatQuestion]) -> dict[str, str]:
    """Model answers by question id from a LLaVA-style answer file; every question needs exactly one."""
    answers: dict[str, str] = {}
    for where, row in read_jsonl(path):
        if "question_id" not in row or not isinstance(row.get("text"), str):
            raise ChatEvalError(f"{where}: an answer needs question_id and a text string")
        qid = str(row["question_id"])
        if qid in answers:
            raise ChatEvalError(f"{where}: question_id {qid!r} is answered twice")
        answers[qid] = row["text"]
    missing = [q.question_id for q in questions if q.question_id not in answers]
    if missing:
        raise ChatEvalError(f"{path}: {len(missing)} question(s) have no answer, first {missing[0]!r}")
    return answers


def judge_messages(question: ChatQuestion, first: str, second: str) -> list[dict[str, str]]:
    """The judge's chat request for one question and two answers (Assistant 1 = ``first``)."""
    context = "\n".join(f"- {m}" for m in question.mentions) or "- (none)"
    user = (
        f"[Figure]\nCaption ({question.figure_label}): {question.caption}\n"
        f"Sentences that cite the figure:\n{context}\n\n"
        f"[Question]\n{question.question}\n\n"
        f"[Assistant 1]\n{first}\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{second}\n[End of Assistant 2]\n\n"
        f"[Task]\n{JUDGE_TASK}"
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


_SCORE = r"(\d+(?:\.\d+)?)(?:\s*/\s*10)?"
# The prompt asks for a first line of "only the two scores ... separated by a space"; a comma and "/10"
# after each score are tolerated. Anything else on the line ("Assistant 1: 8", "8 out of 10") makes the
# numbers ambiguous, so the reply is refused rather than guessed at.
_SCORES_LINE = re.compile(rf"\s*{_SCORE}\s*(?:,\s*|\s+){_SCORE}\s*")
LOWEST, HIGHEST = 1.0, 10.0  # the scale the judge prompt asks for


def parse_scores(reply: str) -> tuple[float, float]:
    """The two scores on the first non-empty line of a judge reply ("8 6", "8, 6", "8/10 6/10"), each on
    the prompt's scale of 1 to 10; a line with anything else on it is refused."""
    line = next((line for line in reply.splitlines() if line.strip()), "")
    match = _SCORES_LINE.fullmatch(line)
    numbers = [float(n) for n in match.groups()] if match else []
    if len(numbers) != 2 or not all(LOWEST <= n <= HIGHEST for n in numbers):
        raise ChatEvalError(
            f"the first line {line[:80]!r} is not exactly two scores from 1 to 10 (as in '8 6')"
        )
    return numbers[0], numbers[1]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _group(reviews: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    ref = [r["reference_score"] for r in reviews]
    mod = [r["model_score"] for r in reviews]
    ref1 = [r["reference_first"]["scores"][0] for r in reviews]
    mod1 = [r["reference_first"]["scores"][1] for r in reviews]
    mean_ref, mean_mod = _mean(ref), _mean(mod)

    def pct(value: float | None) -> float | None:
        return None if value is None else round(100 * value, 2)

    return {
        "n": len(reviews),
        "reference_score": None if mean_ref is None else round(mean_ref, 3),
        "model_score": None if mean_mod is None else round(mean_mod, 3),
        "relative_score": pct(_mean([m / r for m, r in zip(mod, ref, strict=True)])),
        "ratio_of_means": pct(mean_mod / mean_ref if mean_ref else None),
        # The original's protocol: reference always shown first, one judgement per question.
        "relative_score_reference_first": pct(_mean([m / r for m, r in zip(mod1, ref1, strict=True)])),
    }


def summarize(reviews: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Scores per group (overall, each type, each domain) and the judge's position bias."""
    groups: dict[str, Any] = {"overall": _group(reviews)}
    for kind in TYPES:
        groups[kind] = _group([r for r in reviews if r["type"] == kind])
    for domain in DOMAINS:
        groups[domain] = _group([r for r in reviews if r["domain"] == domain])
    # How much more an answer scores in position 1 than in position 2, averaged over both answers.
    shifts = [
        (
            r["reference_first"]["scores"][0]
            - r["model_first"]["scores"][1]
            + r["model_first"]["scores"][0]
            - r["reference_first"]["scores"][1]
        )
        / 2
        for r in reviews
    ]
    return {"groups": groups, "position_bias": None if not shifts else round(sum(shifts) / len(shifts), 3)}


@dataclass
class ChatResult:
    summary: dict[str, Any]
    reviews: list[dict[str, Any]]
    failed: dict[str, str]
    stats: RunStats


def judge(
    questions: Sequence[ChatQuestion],
    answers: Mapping[str, str],
    config: TeacherConfig,
    out_dir: str | os.PathLike[str],
    *,
    ledger_path: str | os.PathLike[str] | None = None,
    answers_file: str | None = None,
) -> ChatResult:
    """Judge every question in both orders, write ``chat_reviews.jsonl`` and ``chat_summary.json`` into
    ``out_dir``, and return the summary. Questions whose judging failed are listed, not scored."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for q in questions:
        jobs.append(
            (f"{q.question_id}:reference_first", judge_messages(q, q.reference, answers[q.question_id]))
        )
        jobs.append((f"{q.question_id}:model_first", judge_messages(q, answers[q.question_id], q.reference)))
    ledger = Ledger(ledger_path or out / "judge_ledger.jsonl")
    try:
        stats = asyncio.run(run_jobs(jobs, config, ledger))
        params = config.params()
        replies: dict[str, tuple[str, str | None]] = {}
        for job_id, messages in jobs:
            entry = ledger.get(request_key(config.model, messages, params))
            if entry is not None:
                replies[job_id] = (entry["reply"], entry.get("served_model"))
    finally:
        ledger.close()
    failed: dict[str, str] = {}
    reviews = []
    served: set[str] = set()
    for q in questions:
        review: dict[str, Any] = {"question_id": q.question_id, **q.meta()}
        for order in ORDERS:
            job = f"{q.question_id}:{order}"
            if job not in replies:
                failed.setdefault(q.question_id, f"{order}: {stats.failed.get(job, 'no reply')}")
                continue
            reply, model_name = replies[job]
            if model_name:
                served.add(model_name)
            try:
                review[order] = {"scores": list(parse_scores(reply)), "reply": reply}
            except ChatEvalError as error:
                failed.setdefault(q.question_id, f"{order}: judge reply unusable: {error}")
        if q.question_id in failed:
            continue
        # parse_scores holds every score to the prompt's 1-10, so no ratio below divides by zero: a 0 (which
        # LLaVA-Med's summary would divide by, and crash) is an unusable reply and fails the question above,
        # keeping every number of a group over the same questions, as the original's table.
        (ref_a, mod_a), (mod_b, ref_b) = review["reference_first"]["scores"], review["model_first"]["scores"]
        review["reference_score"] = (ref_a + ref_b) / 2
        review["model_score"] = (mod_a + mod_b) / 2
        reviews.append(review)
    summary = summarize(reviews)
    summary.update(
        {
            "judge_model": config.model,
            "judge_served_models": sorted(served),
            "judge_temperature": config.temperature,
            "questions": len(questions),
            "judged": len(reviews),
            "failed": len(failed),
            "answers_file": answers_file,
            "requests_sent": stats.sent,
            "requests_cached": stats.cached,
        }
    )
    write_atomic(
        out / "chat_reviews.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in reviews)
    )
    write_atomic(
        out / "chat_summary.json", json.dumps({**summary, "failed_questions": failed}, indent=2) + "\n"
    )
    return ChatResult(summary, reviews, failed, stats)


def check_images(questions: Sequence[ChatQuestion], image_folder: str | os.PathLike[str]) -> None:
    for q in questions:
        if not (Path(image_folder) / q.image).is_file():
            raise DatasetError(
                f"question {q.question_id}: image {Path(image_folder) / q.image} does not exist"
            )
