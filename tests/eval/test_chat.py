"""The chat benchmark end to end: LLaVA-Med's 193 questions and its own answers, judged by a real HTTP server
on loopback (``fake_judge``), through the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_judge import API_KEY, SERVED_MODEL, FakeJudge, base_score

from llavamed_fast.eval import chat

QA = "llava-med-qa50/llava_med_eval_qa50_qa.jsonl"
ANSWERS = "llava-med-qa50/llava_med_qa50_instruct_caption_in_text_cleaned-60k-3epoch.json"
DOMAIN_ORDER = ("chest_xray", "mri", "histology", "gross", "ct_scan")


def run_cli(args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "JUDGE_KEY": API_KEY}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "llavamed_fast.cli", "eval", "chat", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def expected_numbers(data_dir: Path) -> dict:
    """The benchmark's numbers computed here from the raw files and the judge's rule, independently."""
    questions = [json.loads(line) for line in (data_dir / QA).read_text().splitlines() if line.strip()]
    answers = {
        str(a["question_id"]): a["text"]
        for a in map(json.loads, (data_dir / ANSWERS).read_text().splitlines())
    }
    rows = []
    for q in questions:
        ref = base_score(q["gpt4_answer"], q["fig_caption"])
        mod = base_score(answers[str(q["question_id"])], q["fig_caption"])
        domain = next(d for d in DOMAIN_ORDER if q["domain"][d])
        # Shown first, an answer gets one point more: averaged over both orders each gets half a point.
        rows.append(
            {"type": q["type"], "domain": domain, "ref": ref + 0.5, "mod": mod + 0.5, "mod1": mod / (ref + 1)}
        )

    def group(selected):
        return {
            "n": len(selected),
            "relative_score": round(100 * sum(r["mod"] / r["ref"] for r in selected) / len(selected), 2),
            "ratio_of_means": round(
                100 * sum(r["mod"] for r in selected) / sum(r["ref"] for r in selected), 2
            ),
            "relative_score_reference_first": round(
                100 * sum(r["mod1"] for r in selected) / len(selected), 2
            ),
        }

    out = {"overall": group(rows)}
    out["identical_answers"] = sum(q["gpt4_answer"] == answers[str(q["question_id"])] for q in questions)
    for kind in ("conversation", "detailed_description"):
        out[kind] = group([r for r in rows if r["type"] == kind])
    for domain in DOMAIN_ORDER:
        out[domain] = group([r for r in rows if r["domain"] == domain])
    return out


def test_chat_benchmark_end_to_end_with_llava_meds_answers(tmp_path, data_dir):
    out = tmp_path / "chat"
    args = [
        "--questions", data_dir / QA, "--answers", data_dir / ANSWERS, "--out", out,
        "--judge-model", "judge-test", "--api-key-env", "JUDGE_KEY", "--concurrency", "16",
    ]  # fmt: skip
    expected = expected_numbers(data_dir)
    with FakeJudge() as judge:
        done = run_cli([*args, "--base-url", judge.base_url], tmp_path)
        assert done.returncode == 0, done.stderr
        # Both orders of every question; where LLaVA-Med's answer is GPT-4's word for word, the two orders
        # are one request, sent once.
        assert sum(judge.requests.values()) == 2 * 193 - expected["identical_answers"]
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert summary["n"] == 193 and summary["failed"] == 0
        assert summary["relative_score"] == expected["overall"]["relative_score"]
        assert summary["ratio_of_means"] == expected["overall"]["ratio_of_means"]
        assert summary["position_bias"] == 1.0
        assert summary["judge_model"] == "judge-test" and summary["judge_served_models"] == [SERVED_MODEL]
        groups = json.loads((out / "chat_summary.json").read_text())["groups"]
        for name, numbers in expected.items():
            if name == "identical_answers":
                continue
            assert {k: groups[name][k] for k in numbers} == numbers, name
        assert (groups["conversation"]["n"], groups["detailed_description"]["n"]) == (143, 50)
        # Judging in one order only (the original protocol) would have carried the judge's bias.
        assert groups["overall"]["relative_score_reference_first"] < groups["overall"]["relative_score"]
        reviews = [json.loads(line) for line in (out / "chat_reviews.jsonl").read_text().splitlines()]
        assert len(reviews) == 193 and set(reviews[0]) >= {"reference_first", "model_first", "domain", "type"}
        report = (out / "chat_report.md").read_text()
        assert "| overall | 193 |" in report and SERVED_MODEL in report
        assert (out / "chat_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # The key reached the server and nothing else.
        assert judge.keys_seen == {f"Bearer {API_KEY}"}
        for path in out.iterdir():
            assert API_KEY not in path.read_bytes().decode("utf-8", "replace"), path
        assert API_KEY not in done.stdout + done.stderr

        # A second run is answered from the judge's ledger: nothing is sent, the numbers are the same.
        again = run_cli([*args, "--base-url", judge.base_url], tmp_path)
        assert again.returncode == 0, again.stderr
        assert sum(judge.requests.values()) == 2 * 193 - expected["identical_answers"]
        assert (
            json.loads(again.stdout.strip().splitlines()[-1])["relative_score"] == summary["relative_score"]
        )


def unique_question(data_dir: Path, skip: int = 0) -> dict:
    questions = [json.loads(line) for line in (data_dir / QA).read_text().splitlines() if line.strip()]
    texts = [" ".join(q["text"].replace("<image>", " ").split()) for q in questions]
    unique = [q for q, t in zip(questions, texts, strict=True) if texts.count(t) == 1]
    return {**unique[skip], "clean": " ".join(unique[skip]["text"].replace("<image>", " ").split())}


def test_failed_and_unusable_judgements_are_named_and_a_rerun_asks_only_for_them(tmp_path, data_dir):
    out = tmp_path / "chat"
    args = [
        "--questions", data_dir / QA, "--answers", data_dir / ANSWERS, "--out", out,
        "--judge-model", "judge-test", "--api-key-env", "JUDGE_KEY", "--limit", "40",
    ]  # fmt: skip
    refused, garbled = unique_question(data_dir, 0), unique_question(data_dir, 1)
    with FakeJudge() as judge:
        judge.fail[refused["clean"]] = [400]  # not worth retrying: that request fails, the others go on
        judge.malformed.add(garbled["clean"])
        done = run_cli([*args, "--base-url", judge.base_url], tmp_path)
        assert done.returncode == 1
        assert f"question {refused['question_id']} not scored" in done.stderr
        assert (
            f"question {garbled['question_id']} not scored" in done.stderr
            and "judge reply unusable" in done.stderr
        )
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert (summary["judged"], summary["failed"]) == (38, 2)
        sent = sum(judge.requests.values())
        assert sent == 80
        # The rerun sends the one refused request again; the unusable reply is in the ledger (paid for).
        rerun = run_cli([*args, "--base-url", judge.base_url], tmp_path)
        assert sum(judge.requests.values()) == sent + 1
        assert judge.requests[refused["clean"]] == 3
        assert rerun.returncode == 1
        assert json.loads(rerun.stdout.strip().splitlines()[-1])["judged"] == 39


def test_zero_and_wordy_score_lines_fail_their_question_and_the_report_is_still_written(tmp_path, data_dir):
    out = tmp_path / "chat"
    args = [
        "--questions", data_dir / QA, "--answers", data_dir / ANSWERS, "--out", out,
        "--judge-model", "judge-test", "--api-key-env", "JUDGE_KEY", "--limit", "12",
    ]  # fmt: skip
    questions = [json.loads(line) for line in (data_dir / QA).read_text().splitlines()[:12]]
    answers = {
        str(a["question_id"]): a["text"]
        for a in map(json.loads, (data_dir / ANSWERS).read_text().splitlines())
    }
    zero, *wordy = [unique_question(data_dir, skip) for skip in range(4)]
    assert {q["question_id"] for q in [zero, *wordy]} <= {q["question_id"] for q in questions}
    reference = zero["gpt4_answer"].strip()
    with FakeJudge() as judge:
        # The reference gets 0 only when shown first: its two-order mean is fine, its one-order ratio is not.
        judge.scripted[zero["clean"]] = lambda first, _: "0 5\nNo." if first == reference else "6 4\nYes."
        # Two numbers on the line, but not the two scores the prompt asks for.
        for q, line in zip(
            wordy, ["Assistant 1: 8\nAssistant 2: 6", "8 out of 10", "Score 1: 9"], strict=True
        ):
            judge.scripted[q["clean"]] = lambda *_, line=line: line
        for attempt in ("asked", "from the ledger"):
            done = run_cli([*args, "--base-url", judge.base_url], tmp_path)
            assert done.returncode == 1 and "Traceback" not in done.stderr, (attempt, done.stderr)
            for q in [zero, *wordy]:
                assert f"question {q['question_id']} not scored: reference_first: judge reply unusable" in (
                    done.stderr
                ), attempt
            summary = json.loads((out / "chat_summary.json").read_text())
            assert sorted(summary["failed_questions"]) == sorted(
                str(q["question_id"]) for q in [zero, *wordy]
            )
            assert (summary["judged"], summary["failed"]) == (8, 4)
            assert sum(judge.requests.values()) == 24  # the rerun sent nothing: the replies are in the ledger
            # The other questions' numbers, recomputed from the judge's rule.
            kept = [q for q in questions if str(q["question_id"]) not in summary["failed_questions"]]
            ratios = [
                (base_score(answers[str(q["question_id"])], q["fig_caption"]) + 0.5)
                / (base_score(q["gpt4_answer"], q["fig_caption"]) + 0.5)
                for q in kept
            ]
            assert summary["groups"]["overall"]["relative_score"] == round(100 * sum(ratios) / len(ratios), 2)
            assert "| overall | 8 |" in (out / "chat_report.md").read_text()
            assert len((out / "chat_reviews.jsonl").read_text().splitlines()) == 8


def test_a_wrong_key_stops_the_run_with_a_clear_error(tmp_path, data_dir):
    with FakeJudge() as judge:
        env_args = ["--questions", data_dir / QA, "--answers", data_dir / ANSWERS, "--out", tmp_path / "c"]
        done = subprocess.run(
            [sys.executable, "-m", "llavamed_fast.cli", "eval", "chat", *map(str, env_args),
             "--judge-model", "judge-test", "--base-url", judge.base_url, "--limit", "3"],
            env={**os.environ, "OPENAI_API_KEY": "wrong-key-value"},
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
    assert done.returncode == 2
    assert "stopping the run" in done.stderr and "wrong-key-value" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("reply", "scores"),
    [("8 6\nbecause", (8.0, 6.0)), ("\n 7, 9 \n", (7.0, 9.0)), ("8/10 6.5/10", (8.0, 6.5))],
)
def test_parse_scores(reply, scores):
    assert chat.parse_scores(reply) == scores


@pytest.mark.parametrize(
    "reply",
    [
        "Assistant 1 is better.",
        "8 6 7",
        "11 3",
        "",
        # Two numbers, but not the two scores: the prompt asks for a line of only the scores.
        "Assistant 1: 8\nAssistant 2: 6",
        "8 out of 10",
        "Score 1: 9",
        "Assistant 1: 8 Assistant 2: 6",
        # The prompt's scale is 1 to 10.
        "0 5",
    ],
)
def test_parse_scores_refuses_anything_else(reply):
    with pytest.raises(chat.ChatEvalError, match="exactly two scores"):
        chat.parse_scores(reply)


def test_question_and_answer_files_errors_name_the_line(tmp_path, data_dir):
    lines = (data_dir / QA).read_text().splitlines()
    broken = json.loads(lines[1])
    del broken["gpt4_answer"]
    (tmp_path / "q.jsonl").write_text(lines[0] + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(chat.ChatEvalError, match=r"q.jsonl: line 2: question has no 'gpt4_answer'"):
        chat.load_questions(tmp_path / "q.jsonl")
    questions = chat.load_questions(data_dir / QA)
    assert questions[0].domain == "histology"  # flagged histology and gross: the original's precedence
    (tmp_path / "a.jsonl").write_text(json.dumps({"question_id": "0", "text": "x"}) + "\n")
    with pytest.raises(chat.ChatEvalError, match="192 question\\(s\\) have no answer, first '1'"):
        chat.load_answers(tmp_path / "a.jsonl", questions)


def test_chat_answers_with_a_checkpoint_then_judges(tmp_path, data_dir):
    # The figures are not shipped with the questions: real VQA-RAD images stand in under their names.
    import shutil

    questions = chat.load_questions(data_dir / QA)[:4]
    folder = tmp_path / "figures"
    folder.mkdir()
    stand_ins = sorted((data_dir / "vqa-rad" / "images").glob("*.jpg"))
    for question, image in zip(questions, stand_ins, strict=False):
        shutil.copy(image, folder / question.image)
    subprocess.run(
        [sys.executable, "-m", "llavamed_fast.cli", "init", "--preset", "tiny-v1.5", "--out", tmp_path / "ckpt"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    with FakeJudge() as judge:
        args = [
            "--questions", data_dir / QA, "--model", tmp_path / "ckpt", "--image-folder", folder,
            "--max-new-tokens", "6", "--limit", "4", "--device", "cpu", "--out", tmp_path / "chat",
            "--judge-model", "judge-test", "--api-key-env", "JUDGE_KEY", "--base-url", judge.base_url,
        ]  # fmt: skip
        done = run_cli(args, tmp_path)
        assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in (tmp_path / "chat" / "answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [q.question_id for q in questions]
    assert [a["prompt"] for a in answers] == [q.prompt for q in questions]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["judged"] == 4 and summary["answers_file"].endswith("answers.jsonl")
    # Without the figures the run stops before answering anything, naming the missing file.
    (folder / questions[1].image).unlink()
    missing = run_cli(args, tmp_path)
    assert missing.returncode == 2 and questions[1].image in missing.stderr


@pytest.mark.parametrize(
    ("option", "value", "why"),
    [
        ("--concurrency", "0", "must be at least 1, got 0"),
        ("--max-retries", "-1", "must be at least 0, got -1"),
        ("--timeout", "0", "must be more than 0, got 0"),
        ("--timeout", "nan", "must be more than 0, got nan"),
        ("--temperature", "-0.5", "must be at least 0, got -0.5"),
        ("--max-tokens", "0", "must be at least 1, got 0"),
        ("--rpm", "0.5", "must be at least 1, got 0.5"),
        ("--batch-size", "0", "must be at least 1, got 0"),
        ("--max-new-tokens", "0", "must be at least 1, got 0"),
        ("--limit", "-1", "must be at least 0, got -1"),
        ("--concurrency", "two", "'two' is not an integer"),
    ],
)
def test_chat_numeric_options_are_checked_before_anything_runs(tmp_path, capsys, option, value, why):
    from llavamed_fast.cli import main

    with pytest.raises(SystemExit) as stop:
        main(
            [
                "eval",
                "chat",
                "--answers",
                "a.jsonl",
                "--out",
                str(tmp_path),
                "--judge-model",
                "j",
                option,
                value,
            ]
        )
    assert stop.value.code == 2 and f"argument {option}: {why}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_missing_default_question_file_names_the_variable(tmp_path, monkeypatch, capsys):
    from llavamed_fast.cli import main

    monkeypatch.setenv("LLAVAMED_SHARED_DATA", str(tmp_path))
    assert (
        main(["eval", "chat", "--answers", "a.jsonl", "--out", str(tmp_path / "c"), "--judge-model", "j"])
        == 2
    )
    err = capsys.readouterr().err
    assert f"{tmp_path.resolve() / QA}: no such file or folder" in err and "LLAVAMED_SHARED_DATA=" in err
    assert "--questions" in err
