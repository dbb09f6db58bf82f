"""Export VQA-RAD test -> answer with a tiny checkpoint on the real images -> score, all through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from llavamed_fast.eval import datasets, scoring


def cli(*args, cwd, data_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLAVAMED_SHARED_DATA": str(data_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "llavamed_fast.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_export_answer_score(tmp_path, data_dir):
    refs = tmp_path / "vqa_rad_test.jsonl"
    cli(
        "eval",
        "export",
        "--dataset",
        "vqa-rad",
        "--split",
        "test",
        "--out",
        refs,
        cwd=tmp_path,
        data_dir=data_dir,
    )
    records = datasets.read_records(refs)
    assert len(records) == 451 and records == datasets.vqa_rad(data_dir / "vqa-rad", "test")

    cli("init", "--preset", "tiny-v1.5", "--out", tmp_path / "ckpt", cwd=tmp_path, data_dir=data_dir)
    answers = tmp_path / "answers.jsonl"
    done = cli(
        "eval", "answer", "--questions", refs, "--model", tmp_path / "ckpt", "--out", answers,
        "--batch-size", "64", "--max-new-tokens", "4", "--device", "cpu",
        cwd=tmp_path, data_dir=data_dir,
    )  # fmt: skip
    assert json.loads(done.stdout.splitlines()[-1])["answered"] == 451
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [r.question_id for r in records]
    assert all(r["model_id"] == "ckpt" and r["prompt"].endswith("\n<image>") for r in rows)

    done = cli(
        "eval",
        "score",
        "--predictions",
        answers,
        "--references",
        refs,
        "--json",
        cwd=tmp_path,
        data_dir=data_dir,
    )
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["n_closed"], summary["n_open"]) == (272, 179)
    assert summary["protocol"] == "llava-med" and set(summary["by_protocol"]) == {"llava-med", "strict"}
    # The command's numbers are the library's on the same files.
    pairs = scoring.join(datasets.read_jsonl(answers), datasets.read_jsonl(refs))
    assert summary["by_protocol"] == scoring.score(pairs)[0]["by_protocol"]
    assert "| llava-med |" in done.stdout and "| strict |" in done.stdout
    assert (tmp_path / "answers.jsonl.scores.png").read_bytes()[:4] == b"\x89PNG"
    detail = json.loads((tmp_path / "answers.jsonl.scores.json").read_text())
    assert len(detail["questions"]["strict"]) == 451

    # The same run with noise for images answers the same questions, differently.
    noise = tmp_path / "noise.jsonl"
    cli(
        "eval", "answer", "--questions", refs, "--model", tmp_path / "ckpt", "--out", noise, "--limit", "40",
        "--batch-size", "40", "--max-new-tokens", "4", "--noise-images", "--device", "cpu",
        cwd=tmp_path, data_dir=data_dir,
    )  # fmt: skip
    noisy = [json.loads(line) for line in noise.read_text().splitlines()]
    assert [r["question_id"] for r in noisy] == [r["question_id"] for r in rows[:40]]
    assert all(r["metadata"]["noise_images"] for r in noisy)
    assert [r["text"] for r in noisy] != [r["text"] for r in rows[:40]]


def test_training_split_as_llava_json(tmp_path, data_dir):
    out = tmp_path / "train.json"
    cli("eval", "export", "--dataset", "vqa-rad", "--split", "train", "--format", "llava", "--out", out,
        cwd=tmp_path, data_dir=data_dir)  # fmt: skip
    records = json.loads(out.read_text())
    assert len(records) == 1797
    assert records[0]["conversations"][0]["value"].startswith("<image>\n")
    assert os.path.isabs(records[0]["image"]) and os.path.exists(records[0]["image"])


def test_export_names_what_is_wrong(tmp_path, data_dir):
    done = subprocess.run(
        [sys.executable, "-m", "llavamed_fast.cli", "eval", "export", "--dataset", "slake", "--split", "test",
         "--root", tmp_path, "--out", tmp_path / "x.jsonl"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "test.json: no such file" in done.stderr
