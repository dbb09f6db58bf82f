"""Scoring: every normalisation rule and metric edge case, worked by hand."""

from __future__ import annotations

import pytest

from llavamed_fast.eval.normalize import strict_normalize, vqa_normalize
from llavamed_fast.eval.scoring import (
    Pair,
    ScoringError,
    join,
    llava_med_open_recall,
    llava_med_scores,
    score,
    strict_scores,
    token_f1,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A mark with no space beside it anywhere becomes a space.
        ("left-sided", "left sided"),
        ("left/right", "left right"),
        ("yes?", "yes"),
        ("t1;t2", "t1 t2"),
        ('"quoted"', "quoted"),
        ("[a]b{c}d(e)f=g+h\\i_j>k<l@m`n!", "b c d e f g h i j k l m n"),  # "a" alone is an article
        # A mark next to a space anywhere in the original is deleted everywhere, even where it joins words.
        ("left, right", "left right"),
        ("a-b - c", "ab c"),
        ("x-ray (left)", "x ray left"),  # "-" becomes a space, " (" deletes "(", ")" alone becomes a space
        # A digit-comma-digit group anywhere deletes every mark, so hyphenated words fuse.
        ("1,000 cm-long", "1000 cmlong"),
        # Periods: deleted unless a digit follows; at most 32 of them per pass.
        ("3.5 cm.", "3.5 cm"),
        ("e.g. this", "eg this"),
        ("lung" + "." * 40, "lung" + "." * 8),
        # Number words (none..ten) become digits; others stay words.
        ("two lesions", "2 lesions"),
        ("none", "0"),
        ("ten eleven", "10 eleven"),
        # Articles go.
        ("the left lung", "left lung"),
        ("an a the", ""),
        # The contraction table, its reversed entry included.
        ("isnt it", "isn't it"),
        ("dont know", "don't know"),
        ("somebody'd", "somebodyd"),
        # Whitespace collapses.
        ("  many \t spaces\n", "many spaces"),
    ],
)
def test_vqa_normalize(text, expected):
    assert vqa_normalize(text) == expected


def test_vqa_normalize_checks_the_original_string_for_each_mark():
    # "," has a space beside it only once "-" has become a space, so "," is still replaced by a space, not
    # deleted ("pq r"): the condition looks at the original string, not the string as rewritten so far.
    assert vqa_normalize("p,q-,r") == "p q r"


@pytest.mark.parametrize(
    ("prediction", "reference", "recall"),
    [
        ("the left lung, left lobe", "left lung", 1.0),  # tp counts the prediction's words: 3 / (3 + 0)
        ("right lung", "left lung", 0.5),  # tp 1 (lung), fn 1 (left)
        ("lung lung lung", "left lung", 0.75),  # tp 3 from the prediction's counts, fn 1: not 0.5
        ("", "left lung", 0.0),
        ("left lung", "", 0.0),
        ("heart", "left lung", 0.0),
        # Normalised once by the caller and once more inside: the second pass removes the last 8 periods.
        ("lung" + "." * 40, "lung", 1.0),
    ],
)
def test_llava_med_open_recall(prediction, reference, recall):
    assert llava_med_scores(prediction, reference, "OPEN") == {"open_recall": recall}


def test_open_recall_normalises_once_more_inside():
    once = vqa_normalize("lung" + "." * 40)
    assert once == "lung........"
    assert llava_med_open_recall(once, "lung") == 1.0


@pytest.mark.parametrize(
    ("prediction", "reference", "hit"),
    [
        ("Yes", "yes", 1.0),
        ("No, it is not.", "no", 1.0),
        ("normal", "no", 1.0),  # "no" inside "normal"
        ("I am not sure", "no", 1.0),  # inside "not"
        ("yes and no", "yes", 1.0),
        ("yes and no", "no", 1.0),  # both are right
        ("no", "yes", 0.0),
        ("The left lung.", "Left", 1.0),  # non-yes/no closed answers: a substring too
        ("", "yes", 0.0),
    ],
)
def test_llava_med_closed(prediction, reference, hit):
    assert llava_med_scores(prediction, reference, "CLOSED") == {"closed_accuracy": hit}


@pytest.mark.parametrize(
    ("prediction", "reference", "hit"),
    [
        ("Yes", "yes", 1.0),
        ("No, it is not.", "no", 1.0),
        ("normal", "no", 0.0),  # no yes/no word at all
        ("I am not sure", "no", 0.0),
        ("yes and no", "yes", 1.0),  # the first yes/no word decides
        ("yes and no", "no", 0.0),
        ("Noted: yes.", "yes", 1.0),  # word boundaries: "Noted" is not "no"
        ("The lung.", "Lung", 1.0),  # non-yes/no closed answers: whole normalised strings
        ("lung and liver", "Lung", 0.0),
    ],
)
def test_strict_closed(prediction, reference, hit):
    assert strict_scores(prediction, reference, "CLOSED") == {"closed_accuracy": hit}


def test_strict_open_exact_and_f1():
    assert strict_scores("The left lung.", "left lung", "OPEN") == {
        "open_recall": 1.0,
        "open_f1": 1.0,
        "open_exact": 1.0,
    }
    assert strict_scores("right lung", "left lung", "OPEN") == {
        "open_recall": 0.5,
        "open_f1": 0.5,
        "open_exact": 0.0,
    }
    # Repeats match once per occurrence in both: common 1, precision 1/3, recall 1/2 -> F1 0.4.
    assert token_f1("lung lung lung", "left lung") == pytest.approx((0.4, 1 / 3, 0.5))
    assert token_f1("", "lung") == (0.0, 0.0, 0.0)


def test_strict_normalize():
    assert strict_normalize("The left-side, 2.5 cm.") == "left side 2.5 cm"
    assert strict_normalize("T2_FLAIR (axial)!") == "t2 flair axial"
    assert strict_normalize("Two.") == "2"
    assert strict_normalize("ｙｅｓ") == "yes"  # NFKC folds full-width letters


def rows(*records):
    return [(f"file: line {i + 1}", r) for i, r in enumerate(records)]


def test_join_names_missing_duplicate_and_extra_ids():
    refs = rows(
        {"question_id": "1", "answer": "yes", "answer_type": "CLOSED"},
        {"question_id": "2", "answer": "lung", "answer_type": "OPEN"},
    )
    with pytest.raises(
        ScoringError,
        match="no prediction, first '2'; finish the answer run \\(it resumes\\), or, to score part of a split, export the references with the same --limit",
    ):
        join(rows({"question_id": "1", "text": "yes"}), refs)
    with pytest.raises(ScoringError, match=r"file: line 2: question_id '1' appears twice in the predictions"):
        join(rows({"question_id": "1", "text": "yes"}, {"question_id": 1, "text": "no"}), refs)
    with pytest.raises(ScoringError, match="answer no reference question, first '9'"):
        join(
            rows(
                {"question_id": 1, "text": "a"},
                {"question_id": 2, "text": "b"},
                {"question_id": 9, "text": "c"},
            ),
            refs,
        )
    with pytest.raises(ScoringError, match="file: line 1: predictions record has no question_id"):
        join(rows({"text": "yes"}), refs)
    pairs = join(rows({"question_id": 2, "text": "the lung"}, {"question_id": "1", "text": "no"}), refs)
    assert [(p.question_id, p.prediction, p.answer_type) for p in pairs] == [
        ("1", "no", "CLOSED"),
        ("2", "the lung", "OPEN"),
    ]


def test_join_names_the_file_and_line_of_a_bad_record_and_blames_repeated_references():
    refs = rows(
        {"question_id": "1", "answer": "yes", "answer_type": "CLOSED"},
        {"question_id": "2", "answer": "lung", "answer_type": "OPEN"},
    )
    with pytest.raises(ScoringError, match=r"file: line 2: prediction '2' has no 'text' string"):
        join(rows({"question_id": "1", "text": "yes"}, {"question_id": "2", "text": None}), refs)
    with pytest.raises(ScoringError, match=r"file: line 1: reference '1' has no 'answer'"):
        join(rows({"question_id": "1", "text": "yes"}), rows({"question_id": "1", "answer_type": "OPEN"}))
    # A question file with a repeated id got that question answered twice: the question file is at fault.
    twice = rows(
        {"question_id": "1", "answer": "yes", "answer_type": "CLOSED"},
        {"question_id": "2", "answer": "lung", "answer_type": "OPEN"},
        {"question_id": "1", "answer": "yes", "answer_type": "CLOSED"},
    )
    answered_twice = rows(
        {"question_id": "1", "text": "a"},
        {"question_id": "2", "text": "b"},
        {"question_id": "1", "text": "a"},
    )
    with pytest.raises(ScoringError, match=r"file: line 3: question_id '1' appears twice in the references"):
        join(answered_twice, twice)
    with pytest.raises(ScoringError, match="the references hold no questions"):
        join(rows({"question_id": "1", "text": "yes"}), [])


def test_score_command_refuses_an_empty_reference_file(tmp_path, capsys):
    from llavamed_fast.cli import main

    preds, refs = tmp_path / "preds.jsonl", tmp_path / "refs.jsonl"
    refs.write_text("\n")
    preds.write_text('{"question_id": "1", "text": "yes"}\n')
    assert main(["eval", "score", "--predictions", str(preds), "--references", str(refs)]) == 2
    assert f"{refs}: no reference questions" in capsys.readouterr().err
    assert not list(tmp_path.glob("preds.jsonl.scores*"))


def test_answer_type_with_trailing_space_is_closed():
    pairs = join(
        rows({"question_id": 1, "text": "yes"}),
        rows({"question_id": 1, "answer": "yes", "answer_type": "CLOSED "}),
    )
    assert pairs[0].answer_type == "CLOSED"


def test_summary_averages_per_type_as_percentages():
    pairs = [
        Pair("1", "yes", "yes", "CLOSED", {}),
        Pair("2", "normal", "no", "CLOSED", {}),
        Pair("3", "no", "yes", "CLOSED", {}),
        Pair("4", "right lung", "left lung", "OPEN", {}),
    ]
    summary, per_question = score(pairs)
    assert summary["protocol"] == "llava-med"
    assert (summary["n_closed"], summary["n_open"]) == (3, 1)
    assert summary["closed_accuracy"] == pytest.approx(66.67)  # yes, "no" in "normal"
    assert summary["open_recall"] == 50.0
    strict = summary["by_protocol"]["strict"]
    assert strict["closed_accuracy"] == pytest.approx(33.33)
    assert (strict["open_f1"], strict["open_exact"]) == (50.0, 0.0)
    assert [r["closed_accuracy"] for r in per_question["strict"][:3]] == [1.0, 0.0, 0.0]


def test_no_open_questions_gives_none_not_zero():
    summary, _ = score([Pair("1", "yes", "yes", "CLOSED", {})])
    assert summary["open_recall"] is None and summary["closed_accuracy"] == 100.0
