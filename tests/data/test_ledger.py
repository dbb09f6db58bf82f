"""The teacher-reply ledger: keys, durability across reopening, a cut last line, and SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from llavamed_fast.data.ledger import Ledger, request_key

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Figure Caption:\nA CT."}]


def test_keys_follow_the_request_not_how_it_was_built():
    key = request_key("gpt-4o", MESSAGES, {"temperature": 0.7, "max_tokens": 512})
    assert key == request_key(
        "gpt-4o", [dict(reversed(m.items())) for m in MESSAGES], {"max_tokens": 512, "temperature": 0.7}
    )
    assert len(key) == 64 and int(key, 16) >= 0
    others = {
        request_key("gpt-4o-mini", MESSAGES, {"temperature": 0.7, "max_tokens": 512}),
        request_key("gpt-4o", MESSAGES[:1], {"temperature": 0.7, "max_tokens": 512}),
        request_key("gpt-4o", MESSAGES, {"temperature": 0.0, "max_tokens": 512}),
    }
    assert key not in others and len(others) == 3


def test_replies_survive_reopening_and_usage_adds_up(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        ledger.record(
            "a" * 64,
            "User: Hi?\nAssistant: Hello.",
            model="m",
            usage={"prompt_tokens": 10, "completion_tokens": 5},
        )
        ledger.record("b" * 64, "second", model="m", usage={"prompt_tokens": 7, "completion_tokens": 3})
    with Ledger(path) as again:
        assert len(again) == 2 and "a" * 64 in again and "c" * 64 not in again
        assert again.get("a" * 64)["reply"] == "User: Hi?\nAssistant: Hello."
        assert again.usage() == {"prompt_tokens": 17, "completion_tokens": 8}
        assert again.recovered_bytes == 0


def test_a_cut_last_line_is_dropped_and_appending_goes_on(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        ledger.record("a" * 64, "kept", model="m")
    cut = '{"key": "' + "b" * 30  # a crash in the middle of a write
    with open(path, "a") as handle:
        handle.write(cut)
    with Ledger(path) as ledger:
        assert len(ledger) == 1 and ledger.recovered_bytes == len(cut)
        ledger.record("c" * 64, "after", model="m")
    lines = path.read_text().splitlines()
    assert [json.loads(line)["reply"] for line in lines] == ["kept", "after"]


def test_a_corrupt_complete_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"key": "a", "reply": "x"}\nnot json\n')
    with pytest.raises(ValueError, match=r"ledger\.jsonl: line 2: not a ledger entry"):
        Ledger(path)


WRITER = """
import sys, time
from llavamed_fast.data.ledger import Ledger
ledger = Ledger(sys.argv[1])
for i in range(100000):
    ledger.record(f"{i:064d}", "reply " + "x" * 2000, model="m", usage={"completion_tokens": 1})
    print(i, flush=True)
"""


def test_every_acknowledged_reply_survives_sigkill(tmp_path):
    path = tmp_path / "ledger.jsonl"
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    acknowledged = -1
    deadline = time.monotonic() + 60
    while acknowledged < 200 and time.monotonic() < deadline:
        acknowledged = int(child.stdout.readline())
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert acknowledged >= 200, "the writer did not get going"
    with Ledger(path) as ledger:
        # Every reply the writer returned from record() for is there, each once, none corrupt.
        assert all(f"{i:064d}" in ledger for i in range(acknowledged + 1))
        assert len(path.read_text().splitlines()) == len(ledger)


def test_line_separators_inside_a_reply_are_not_line_ends(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        ledger.record("a" * 64, "A CT\u2028scan\u0085and\x1cmore", model="m")
    with Ledger(path) as again:
        assert again.get("a" * 64)["reply"] == "A CT\u2028scan\u0085and\x1cmore"
