"""The teacher client and ``curate instruct`` against a real HTTP server on loopback, through the ``openai``
SDK: rate limits with retry-after, server errors, slow and malformed replies, a wrong key, a bad request,
and a run killed with SIGKILL then started again (no request paid for twice, every record once)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import default_sigint
from fake_teacher import API_KEY, FakeTeacher, figures

from llavamed_fast.data import instruct
from llavamed_fast.data.curation import curate_instruct, default_ledger
from llavamed_fast.data.ledger import Ledger
from llavamed_fast.data.teacher import (
    TeacherConfig,
    TeacherError,
    batch_state_path,
    redact,
    retry_after,
    run_batch,
    run_jobs,
)


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)


def _input(tmp_path, rows):
    path = tmp_path / "figures.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(server, **overrides):
    settings = {"model": "teacher-test", "concurrency": 4, "backoff_base": 0.05, "backoff_max": 0.5}
    return TeacherConfig(base_url=server.base_url, **{**settings, **overrides})


def test_a_run_survives_rate_limits_errors_slow_and_malformed_replies(tmp_path, key):
    with FakeTeacher(slow_seconds=0.4, retry_after=0.3) as server:
        server.script = {
            "f0": ["429", "429"],
            "f1": ["500", "502", "500"],
            "f2": ["slow"],
            "f3": ["malformed"],
        }
        source, out = _input(tmp_path, figures(8)), tmp_path / "conversations.jsonl"
        started = time.monotonic()
        summary = curate_instruct(source, out, _config(server, price_per_million=(2.0, 8.0)), progress=False)
        elapsed = time.monotonic() - started
        assert summary["sent"] == 8 and summary["failed"] == 0 and summary["retries"] == 5
        assert elapsed >= 2 * 0.3  # two retry-after waits of 0.3 s for f0, one after the other
        assert summary["filters"] == {"malformed_reply": 1}  # f3's reply holds no conversation
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["id"] for r in records] == [f"1_f{i}" for i in range(8) if i != 3]
        assert records[0]["conversations"][1] == {"from": "gpt", "value": "It shows finding f0."}
        assert records[0]["provenance"]["teacher"] == "teacher-test" and records[0]["domain"]["ct_scan"]
        assert (summary["prompt_tokens"], summary["completion_tokens"]) == (800, 160)
        assert summary["cost_usd"] == pytest.approx((800 * 2.0 + 160 * 8.0) / 1e6)
        assert all(server.replies[f"f{i}"] == 1 for i in range(8))
        # Again: everything comes from the ledger, nothing is sent.
        attempts = sum(server.attempts.values())
        again = curate_instruct(source, out, _config(server), progress=False)
        assert (again["sent"], again["from_ledger"], again["records"]) == (0, 8, 7)
        assert sum(server.attempts.values()) == attempts
        assert out.read_text().splitlines() == [json.dumps(r, ensure_ascii=False) for r in records]


def test_bad_requests_fail_alone_and_out_of_retries_is_reported(tmp_path, key):
    with FakeTeacher() as server:
        server.script = {"f1": ["400"], "f2": ["500"] * 10}
        summary = curate_instruct(
            _input(tmp_path, figures(4)),
            tmp_path / "out.jsonl",
            _config(server, max_retries=2),
            progress=False,
        )
        assert summary["records"] == 2 and summary["failed"] == 2
        assert summary["failures"]["1_f1"].startswith("HTTP 400")
        assert summary["failures"]["1_f2"].startswith("HTTP 500") and server.attempts["f2"] == 3


def test_a_wrong_key_stops_the_run_without_showing_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-and-secret")
    with FakeTeacher() as server:
        with pytest.raises(TeacherError) as caught:
            curate_instruct(
                _input(tmp_path, figures(3)), tmp_path / "out.jsonl", _config(server), progress=False
            )
    assert "HTTP 401" in str(caught.value) and "sk-wrong-and-secret" not in str(caught.value)
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(TeacherError, match="set the environment variable OPENAI_API_KEY"):
        curate_instruct(_input(tmp_path, figures(1)), tmp_path / "out.jsonl", _config(server), progress=False)


def test_curation_never_imports_torch():
    modules = [
        "pmc",
        "selection",
        "alignment",
        "instruct",
        "ledger",
        "teacher",
        "curation",
        "fetch",
        "stats",
        "durable",
    ]
    script = "import sys\n" + "".join(f"import llavamed_fast.data.{m}\n" for m in modules)
    script += "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_retry_after_headers():
    class Response:
        def __init__(self, headers):
            self.headers = headers

    class Error(Exception):
        def __init__(self, headers):
            self.response = Response(headers)

    assert retry_after(Error({"retry-after": "2"})) == 2.0
    assert retry_after(Error({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < retry_after(Error({"retry-after": later})) <= 31
    assert retry_after(Error({})) is None and retry_after(ValueError()) is None


def test_dry_run_sends_nothing(tmp_path, key, capsys):
    with FakeTeacher() as server:
        summary = curate_instruct(
            _input(tmp_path, figures(5)),
            tmp_path / "out.jsonl",
            _config(server, model="gpt-4o"),
            dry_run=True,
        )
        assert sum(server.attempts.values()) == 0
    assert summary["requests"] == 5 and summary["estimated_cost_usd_at_most"] > 0
    assert "Figure Caption:\\nAxial CT of case 0" in capsys.readouterr().out
    assert not (tmp_path / "out.jsonl").exists()


def _slow_instruct_run(tmp_path, server, count: int, replies_before: int, **popen):
    """A `curate instruct` child over ``count`` slow figures, returned once ``replies_before`` replies are
    in its ledger: (child, command, env, out, ledger)."""
    server.script = {f"f{i}": ["slow"] for i in range(count)}
    source, out = _input(tmp_path, figures(count)), tmp_path / "conversations.jsonl"
    ledger = default_ledger(out)
    command = [
        sys.executable, "-m", "llavamed_fast.cli", "curate", "instruct", "--input", str(source), "--out", str(out),
        "--base-url", server.base_url, "--model", "teacher-test", "--concurrency", "2", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OPENAI_API_KEY": API_KEY}
    child = subprocess.Popen(
        command,
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=default_sigint,
        **popen,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
        not ledger.exists() or len(ledger.read_text().splitlines()) < replies_before
    ):
        time.sleep(0.05)
    return child, command, env, out, ledger


def test_sigkill_half_way_then_rerun_pays_for_nothing_twice(tmp_path):
    with FakeTeacher(slow_seconds=0.15) as server:
        count = 24
        child, command, env, out, ledger = _slow_instruct_run(tmp_path, server, count, 6)
        child.send_signal(signal.SIGKILL)
        child.wait()
        recorded = len(ledger.read_text().splitlines())
        assert 6 <= recorded < count, "the run should be killed half-way"
        assert not out.exists()  # no partial output
        attempts = sum(server.attempts.values())
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout.splitlines()[-1])
        # Every reply in the ledger is reused; only the others are asked for, each once.
        assert (summary["from_ledger"], summary["sent"]) == (recorded, count - recorded)
        assert sum(server.attempts.values()) - attempts == count - recorded
        ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
        assert ids == [f"1_f{i}" for i in range(count)]


def test_batch_api_round_trip_and_resume(tmp_path, key):
    with FakeTeacher() as server:
        server.script = {"f2": ["malformed"], "f4": ["500"]}
        source, out = _input(tmp_path, figures(6)), tmp_path / "conversations.jsonl"
        statuses = []
        config = _config(server)
        # A run stopped while the batch is processed (here: after the first poll) keeps the batch's id...
        ledger = Ledger(default_ledger(out))
        jobs = [(f["pair_id"], instruct.build_messages(f)) for f in figures(6)]

        async def stop(_seconds):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            asyncio.run(
                run_batch(jobs, config, ledger, poll_seconds=0, sleep=stop, on_status=statuses.append)
            )
        ledger.close()
        assert statuses == ["validating"] and server.batches_created == 1
        assert batch_state_path(ledger).exists() and len(ledger) == 0
        # ...and the next run picks the same batch up, collects it, and submits only what it did not answer
        # (f4, a 500 in the first batch) as a second batch.
        summary = curate_instruct(source, out, config, batch=True, poll_seconds=0, progress=False)
        assert server.batches_created == 2 and not batch_state_path(ledger).exists()
        assert (summary["sent"], summary["failed"], summary["records"]) == (
            6,
            0,
            5,
        )  # f2's reply is malformed
        assert summary["filters"] == {"malformed_reply": 1}
        ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
        assert ids == ["1_f0", "1_f1", "1_f3", "1_f4", "1_f5"]
        # Again: everything is in the ledger, no batch is made.
        again = curate_instruct(source, out, config, batch=True, poll_seconds=0, progress=False)
        assert server.batches_created == 2 and (again["from_ledger"], again["sent"], again["records"]) == (
            6,
            0,
            5,
        )
        assert sum(server.replies.values()) == 6


def test_a_resumed_batch_keeps_answers_beyond_this_runs_jobs_and_of_an_expired_batch(tmp_path, key):
    # A batch for four figures, stopped; the next run asks for two of them only. All four answers are kept
    # (they were paid for), even though the batch then ended as expired.
    with FakeTeacher() as server:
        config = _config(server)
        ledger = Ledger(tmp_path / "ledger.jsonl")
        jobs = [(f["pair_id"], instruct.build_messages(f)) for f in figures(4)]

        async def stop(_seconds):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            asyncio.run(run_batch(jobs, config, ledger, poll_seconds=0, sleep=stop))
        batch = next(iter(server.batches.values()))
        server._advance(batch)  # in_progress
        server._advance(batch)  # answered...
        batch["status"] = "expired"  # ...and then expired, keeping its output file
        stats = asyncio.run(run_batch(jobs[:2], config, ledger, poll_seconds=0))
        assert (stats.sent, stats.failed, server.batches_created) == (4, {}, 1)
        assert len(ledger) == 4 and not batch_state_path(ledger).exists()
        ledger.close()


def test_identical_requests_are_sent_once(tmp_path, key):
    with FakeTeacher() as server:
        rows = figures(3)
        rows.append(dict(rows[0]))  # the same figure twice in the input
        ledger = Ledger(tmp_path / "ledger.jsonl")
        jobs = [(f"job{i}", instruct.build_messages(f)) for i, f in enumerate(rows)]
        stats = asyncio.run(run_jobs(jobs, _config(server), ledger))
        assert (stats.sent, stats.cached, server.replies["f0"], len(ledger)) == (3, 1, 1, 3)
        summary = curate_instruct(
            _input(tmp_path, rows), tmp_path / "out.jsonl", _config(server), progress=False
        )
        ids = [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert ids == ["1_f0", "1_f1", "1_f2"] and summary["filters"]["duplicate_pair_id"] == 1
        ledger.close()


def test_stats_of_a_curated_set(tmp_path, key):
    from PIL import Image

    with FakeTeacher() as server:
        server.script = {"f1": ["malformed"]}
        rows = figures(5)
        rows[3]["domain"] = {"mri": True}
        rows[4]["domain"] = {}
        out = tmp_path / "conversations.jsonl"
        curate_instruct(_input(tmp_path, rows), out, _config(server), progress=False)
    args = ["curate", "stats", "--input", str(out), "--out", str(tmp_path / "stats")]
    script = "import sys; from llavamed_fast.cli import main; code = main(sys.argv[1:]); "
    script += "assert 'torch' not in sys.modules; sys.exit(code)"
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "records: 4" in done.stdout and "filters: malformed_reply: 1" in done.stdout
    numbers = json.loads((tmp_path / "stats" / "stats.json").read_text())
    assert numbers["modalities"] == {
        "chest_xray": 0,
        "ct_scan": 2,
        "mri": 1,
        "histology": 0,
        "gross": 0,
        "other": 1,
    }
    assert numbers["exchanges_per_record"] == {"2": 4}
    # "It shows finding fN." and "On the left of image fN." : 4 and 6 words
    assert numbers["answer_words"] == {"mean": 5.0, "median": 5.0, "max": 6}
    with Image.open(tmp_path / "stats" / "stats.png") as image:
        assert image.size == (1300, 360)


@pytest.mark.parametrize(("requests", "tokens"), [(3, None), (None, 3000)])
def test_request_and_token_budgets_hold_per_window(monkeypatch, requests, tokens):
    from llavamed_fast.data import teacher

    monkeypatch.setattr(teacher._Budget, "window", 0.4)  # a 0.4 s "minute"
    budget = teacher._Budget(requests, tokens)
    times = []

    async def go():
        for _ in range(7):
            await budget.take(1000)
            times.append(time.monotonic())

    asyncio.run(go())
    # At most 3 requests (or 3000 tokens) in any window: the 4th and 7th wait for the 1st and 4th to age out.
    assert times[3] - times[0] >= 0.4 - 0.01 and times[6] - times[3] >= 0.4 - 0.01
    assert times[2] - times[0] < 0.2


def test_secrets_never_reach_files(tmp_path, key):
    with FakeTeacher() as server:
        out = tmp_path / "conversations.jsonl"
        curate_instruct(_input(tmp_path, figures(3)), out, _config(server), progress=False)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) >= 3  # input, output, ledger, summary
    assert not any(API_KEY in p.read_text(errors="replace") for p in written)


def test_a_gateways_bad_body_is_retried_then_fails_that_figure_alone(tmp_path, key):
    # A 200 whose body is cut-off JSON or an HTML page is a fault of whatever sits in between: retried like
    # a 5xx; out of retries, it fails its own figure (named, with what came back) and the others go on.
    with FakeTeacher() as server:
        server.script = {"f1": ["badjson"], "f2": ["html"], "f3": ["badjson"] * 5, "f4": ["html"] * 5}
        summary = curate_instruct(
            _input(tmp_path, figures(6)),
            tmp_path / "out.jsonl",
            _config(server, max_retries=2),
            progress=False,
        )
        assert (summary["records"], summary["sent"], summary["retries"]) == (4, 4, 2 + 2 + 2)
        assert sorted(summary["failures"]) == ["1_f3", "1_f4"] and server.attempts["f3"] == 3
    cut, page = summary["failures"]["1_f3"], summary["failures"]["1_f4"]
    assert "content type application/json" in cut and "not JSON" in cut and '{"id": "chatcmpl-cut"' in cut
    assert "content type text/html" in page and "<html><body>Bad gateway</body></html>" in page
    assert API_KEY not in json.dumps(summary)


def test_server_error_text_that_repeats_the_key_is_redacted(tmp_path, monkeypatch):
    secret = "sk-proj-Very5ecretKey0123456789"
    source = _input(tmp_path, figures(2))
    with FakeTeacher(echo_key=True) as server:  # its 401 says "Incorrect API key provided: <the key>"
        command = [sys.executable, "-m", "llavamed_fast.cli", "curate", "instruct", "--input", str(source),
                   "--out", str(tmp_path / "out.jsonl"), "--base-url", server.base_url, "--model", "m",
                   "--no-progress"]  # fmt: skip
        done = subprocess.run(
            command, env={**os.environ, "OPENAI_API_KEY": secret}, capture_output=True, text=True
        )
        # A key that does not look like one is redacted too: it is the configured key.
        monkeypatch.setenv("OPENAI_API_KEY", "plain-looking-but-secret")
        with pytest.raises(TeacherError) as caught:
            curate_instruct(source, tmp_path / "plain.jsonl", _config(server), progress=False)
    assert done.returncode == 2 and "HTTP 401" in done.stderr and "provided: [redacted]" in done.stderr
    assert secret not in done.stderr and "Very5ecret" not in done.stderr
    assert "plain-looking-but-secret" not in str(caught.value) and "provided: [redacted]" in str(caught.value)
    assert redact("key sk-abc123DEF456 and sk-x", "other") == "key [redacted] and sk-x"


def test_a_batch_line_that_cannot_be_read_fails_its_request_only(tmp_path, key):
    # Four figures: f1's request fails (its line is in the error file), f2's result line is cut short. The
    # other two are kept, and each failure says why, naming the batch, the file and the line.
    with FakeTeacher() as server:
        server.script = {"f1": ["400"]}
        server.garble = {"f2"}
        config = _config(server)
        ledger = Ledger(tmp_path / "ledger.jsonl")
        jobs = [(f["pair_id"], instruct.build_messages(f)) for f in figures(4)]
        stats = asyncio.run(run_batch(jobs, config, ledger, poll_seconds=0))
        batch = next(iter(server.batches))
        assert stats.sent == 2 and len(ledger) == 2
        assert set(stats.failed) == {"1_f1", "1_f2"}
        assert stats.failed["1_f1"] == f"batch {batch} (completed): HTTP 400: scripted 400"
        assert stats.failed["1_f2"].startswith(
            f"batch {batch} (completed): no answer; batch {batch} output file line 2 unreadable ("
        )
        assert not batch_state_path(ledger).exists()
        # The next run sends the two again, as a second batch, and keeps the first two.
        server.garble = set()
        again = asyncio.run(run_batch(jobs, config, ledger, poll_seconds=0))
        assert (again.sent, again.cached, again.failed, server.batches_created) == (2, 2, {}, 2)
        ledger.close()


def test_batch_replies_cost_half(tmp_path, key, capsys):
    # Four replies of 100 prompt and 20 completion tokens at 2 and 8 USD per million tokens: 0.00144 USD at
    # the list price, 0.00072 through the Batch API.
    source, out = _input(tmp_path, figures(4)), tmp_path / "conversations.jsonl"
    with FakeTeacher() as server:
        config = _config(server, price_per_million=(2.0, 8.0), max_tokens=100)
        summary = curate_instruct(source, out, config, batch=True, poll_seconds=0, progress=False)
        assert summary["cost_usd"] == pytest.approx(0.00072)
        assert summary["ledger_total"]["cost_usd"] == pytest.approx(0.00072)
        full = curate_instruct(source, out, config, dry_run=True)
        half = curate_instruct(source, out, config, dry_run=True, batch=True)
    assert half["estimated_cost_usd_at_most"] == pytest.approx(full["estimated_cost_usd_at_most"] / 2)
    prompt = full["estimated_prompt_tokens"]
    assert full["estimated_cost_usd_at_most"] == pytest.approx((prompt * 2.0 + 400 * 8.0) / 1e6, abs=1e-6)


def test_a_resumed_run_keeps_the_cost_of_the_whole_set(tmp_path, key):
    source, out = _input(tmp_path, figures(4)), tmp_path / "conversations.jsonl"
    with FakeTeacher() as server:
        config = _config(server, price_per_million=(2.0, 8.0), max_retries=0)
        # Two figures through the Batch API (half price), then the rest with one failure, then the resume.
        curate_instruct(source, out, config, batch=True, poll_seconds=0, progress=False, limit=2)
        server.script = {"f3": ["500"]}
        curate_instruct(source, out, config, progress=False)
        summary = curate_instruct(source, out, config, progress=False)
    assert (summary["sent"], summary["from_ledger"], summary["records"]) == (1, 3, 4)
    assert summary["cost_usd"] == pytest.approx((100 * 2.0 + 20 * 8.0) / 1e6)  # this run: f3 only
    one = (100 * 2.0 + 20 * 8.0) / 1e6
    assert summary["ledger_total"] == {
        "replies": 4, "prompt_tokens": 400, "completion_tokens": 80, "batch_prompt_tokens": 200,
        "batch_completion_tokens": 40, "cost_usd": pytest.approx(2 * one / 2 + 2 * one),
    }  # fmt: skip
    assert (
        json.loads((tmp_path / "conversations.jsonl.summary.json").read_text())["ledger_total"]["replies"]
        == 4
    )


def test_ctrl_c_says_where_the_replies_are_and_exits_130(tmp_path):
    with FakeTeacher(slow_seconds=0.2) as server:
        count = 20
        child, command, env, _out, ledger = _slow_instruct_run(tmp_path, server, count, 3, text=True)
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=60)
        saved = len(ledger.read_text().splitlines())
        assert child.returncode == 130 and stdout == "" and saved < count
        assert stderr == (
            f"curate instruct: interrupted; {saved} replies are saved in {ledger}, "
            "run the same command again to continue\n"
        )
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.splitlines()[-1])["from_ledger"] == saved


def test_records_with_fields_of_the_wrong_type_are_skipped_by_line(tmp_path, key, capsys):
    rows = figures(3)
    rows[1]["caption"] = 123
    rows[2]["domain"] = ["ct_scan"]
    source = _input(tmp_path, [*rows, figures(1, prefix="g")[0]])
    with FakeTeacher() as server:
        summary = curate_instruct(source, tmp_path / "out.jsonl", _config(server), progress=False)
    assert summary["records"] == 2 and summary["filters"] == {"invalid_record": 2}
    assert capsys.readouterr().err.splitlines() == [
        f"curate instruct: skipped {source}: line 2: field 'caption' must be a string (or null), got int 123",
        f"curate instruct: skipped {source}: line 3: field 'domain' must be an object (or null), got list ['ct_scan']",
    ]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--concurrency", "0"], "argument --concurrency: must be at least 1, got 0"),
        (["--max-retries", "-1"], "argument --max-retries: must be at least 0, got -1"),
        (["--timeout", "0"], "argument --timeout: must be more than 0, got 0"),
        (["--rpm", "0.5"], "argument --rpm: must be at least 1, got 0.5"),
        (["--max-tokens", "many"], "argument --max-tokens: 'many' is not an integer"),
        (["--temperature", "nan"], "argument --temperature: must be at least 0, got nan"),
    ],
)
def test_option_values_that_cannot_work_are_usage_errors(tmp_path, capsys, option, message):
    from llavamed_fast.cli import main

    with pytest.raises(SystemExit) as caught:
        main(["curate", "instruct", "--input", "f.jsonl", "--out", "o.jsonl", "--model", "m", *option])
    assert caught.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(message)
    with pytest.raises(SystemExit):
        main(["curate", "images", "--input", "f.jsonl", "--out", "img", "--retries", "-1"])
    assert "argument --retries: must be at least 0, got -1" in capsys.readouterr().err
