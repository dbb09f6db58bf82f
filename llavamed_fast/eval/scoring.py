"""VQA scoring: LLaVA-Med's protocol exactly, and a strict one beside it.

``llava-med`` (the paper's tables): both strings lower-cased and VQA-normalised
(:func:`~llavamed_fast.eval.normalize.vqa_normalize`). OPEN questions score the token *recall* of the
reference in the prediction (the original normalises once more inside that step); CLOSED questions score
1 when the normalised reference is a character substring of the normalised prediction. So "no" is found
inside "normal" or "not sure", and a reply that says both "yes" and "no" is right whatever the truth.

``strict``: CLOSED yes/no questions take the prediction's first "yes" or "no" word; other CLOSED
questions and OPEN exact match need the whole normalised strings to be equal; OPEN also gets token F1.

Pure Python; predictions and references join on ``question_id`` (a missing or repeated id is an error that
names it).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llavamed_fast.eval.normalize import strict_normalize, vqa_normalize

PROTOCOLS = ("llava-med", "strict")


class ScoringError(ValueError):
    """Predictions and references do not line up (a missing, repeated or malformed record)."""


# ---------------------------------------------------------------------------------------------- llava-med
def llava_med_open_recall(prediction: str, reference: str) -> float:
    """Token recall of ``reference`` in ``prediction`` (both already lower-cased and normalised once).

    tp = the prediction's count of each word that is in both; fn = the reference's count of each word not
    in the prediction; recall = tp / (tp + fn), and 0 when either side has no words or tp is 0.
    """
    pred = Counter(vqa_normalize(prediction).split())
    ref = Counter(vqa_normalize(reference).split())
    if not pred or not ref:
        return 0.0
    tp = sum(count for word, count in pred.items() if word in ref)
    fn = sum(count for word, count in ref.items() if word not in pred)
    return tp / (tp + fn) if tp else 0.0


def llava_med_closed_hit(prediction: str, reference: str) -> float:
    """1 when the normalised reference occurs anywhere in the normalised prediction, as characters."""
    return 1.0 if reference in prediction else 0.0


def llava_med_scores(prediction: str, reference: str, answer_type: str) -> dict[str, float]:
    pred, ref = vqa_normalize(prediction.lower()), vqa_normalize(reference.lower())
    if answer_type == "OPEN":
        return {"open_recall": llava_med_open_recall(pred, ref)}
    return {"closed_accuracy": llava_med_closed_hit(pred, ref)}


# ------------------------------------------------------------------------------------------------- strict
_YES_NO = re.compile(r"\b(yes|no)\b")


def token_f1(prediction: str, reference: str) -> tuple[float, float, float]:
    """(F1, precision, recall) of the words of two normalised strings, counting repeats once per match."""
    pred, ref = prediction.split(), reference.split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return 0.0, 0.0, 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall), precision, recall


def strict_scores(prediction: str, reference: str, answer_type: str) -> dict[str, float]:
    pred, ref = strict_normalize(prediction), strict_normalize(reference)
    if answer_type == "OPEN":
        f1, _, recall = token_f1(pred, ref)
        return {"open_recall": recall, "open_f1": f1, "open_exact": float(pred == ref)}
    if ref in ("yes", "no"):
        first = _YES_NO.search(pred)
        return {"closed_accuracy": float(first is not None and first.group(1) == ref)}
    return {"closed_accuracy": float(pred == ref)}


SCORERS = {"llava-med": llava_med_scores, "strict": strict_scores}
METRICS = {
    "llava-med": ("open_recall", "closed_accuracy"),
    "strict": ("open_recall", "open_f1", "open_exact", "closed_accuracy"),
}


# ------------------------------------------------------------------------------------------------ joining
@dataclass(frozen=True)
class Pair:
    question_id: str
    prediction: str
    reference: str
    answer_type: str  # OPEN | CLOSED
    record: Mapping[str, Any]


def _by_id(
    rows: Iterable[tuple[str, Mapping[str, Any]]], what: str
) -> dict[str, tuple[str, Mapping[str, Any]]]:
    """``{question_id: (where, record)}``, ``where`` kept so that later errors can name the file and line."""
    seen: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for where, row in rows:
        if "question_id" not in row:
            raise ScoringError(f"{where}: {what} record has no question_id")
        key = str(row["question_id"])
        if key in seen:
            raise ScoringError(f"{where}: question_id {key!r} appears twice in the {what}")
        seen[key] = (where, row)
    return seen


def join(
    predictions: Iterable[tuple[str, Mapping[str, Any]]],
    references: Iterable[tuple[str, Mapping[str, Any]]],
) -> list[Pair]:
    """Pairs in reference order. Each input yields ``(where, record)``, ``where`` naming file and line."""
    # References first: a question file with a repeated id gets answered twice, and the error must name the
    # question file, not the answers that followed it.
    refs = _by_id(references, "references")
    if not refs:
        raise ScoringError("the references hold no questions")
    preds = _by_id(predictions, "predictions")
    missing = [key for key in refs if key not in preds]
    extra = [key for key in preds if key not in refs]
    if missing:
        raise ScoringError(
            f"{len(missing)} reference question(s) have no prediction, first {missing[0]!r}"
            + (f" (and {', '.join(map(repr, missing[1:4]))}…)" if len(missing) > 1 else "")
            # A partial answer file: an unfinished run, or one with --limit scored against the whole split.
            + (
                "; finish the answer run (it resumes), or, to score part of a split, export the references "
                "with the same --limit"
                if preds
                else ""
            )
        )
    if extra:
        raise ScoringError(f"{len(extra)} prediction(s) answer no reference question, first {extra[0]!r}")
    pairs = []
    for key, (ref_where, ref) in refs.items():
        pred_where, pred = preds[key]
        kind = str(ref.get("answer_type", "")).strip().upper()
        if kind not in ("OPEN", "CLOSED"):
            raise ScoringError(
                f"{ref_where}: reference {key!r}: answer_type must be OPEN or CLOSED, got {ref.get('answer_type')!r}"
            )
        if "answer" not in ref:
            raise ScoringError(f"{ref_where}: reference {key!r} has no 'answer'")
        if not isinstance(pred.get("text"), str):
            raise ScoringError(f"{pred_where}: prediction {key!r} has no 'text' string")
        pairs.append(Pair(key, pred["text"], str(ref["answer"]), kind, ref))
    return pairs


# ---------------------------------------------------------------------------------------------- summaries
def score_pairs(pairs: Sequence[Pair], protocol: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, per-question rows) under ``protocol``. Percentages, as in the paper's tables."""
    if protocol not in SCORERS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    rows = []
    totals: dict[str, list[float]] = {}
    for pair in pairs:
        scores = SCORERS[protocol](pair.prediction, pair.reference, pair.answer_type)
        rows.append({"question_id": pair.question_id, "answer_type": pair.answer_type, **scores})
        for name, value in scores.items():
            totals.setdefault(name, []).append(value)
    n_open = sum(p.answer_type == "OPEN" for p in pairs)
    summary: dict[str, Any] = {"protocol": protocol, "n_open": n_open, "n_closed": len(pairs) - n_open}
    for name in METRICS[protocol]:
        values = totals.get(name, [])
        summary[name] = round(100 * sum(values) / len(values), 2) if values else None
    return summary, rows


def score(
    pairs: Sequence[Pair], protocols: Sequence[str] = PROTOCOLS
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The first protocol's numbers at the top level, every protocol's under ``by_protocol``."""
    by_protocol, rows = {}, {}
    for protocol in protocols:
        by_protocol[protocol], rows[protocol] = score_pairs(pairs, protocol)
    return {**by_protocol[protocols[0]], "by_protocol": by_protocol}, rows
