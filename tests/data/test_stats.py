"""``curate stats`` on broken input: the error names the file and the record, and nothing is written."""

from __future__ import annotations

import json

import pytest

from llavamed_fast.cli import main


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("broken.json", '[{"id": "a",}]', "not JSON: Expecting property name enclosed in double quotes (line 1, column 13)"),
        ("turns.json", json.dumps([{"id": "a", "conversations": []}, {"id": "b", "conversations": "oops"}]),
         "record 2 (id 'b'): 'conversations' must be a list of turn objects, got 'oops'"),
        ("domain.jsonl", json.dumps({"id": "a"}) + "\n" + json.dumps({"id": "c", "domain": ["mri"]}) + "\n",
         "line 2 (id 'c'): 'domain' must be an object of flags, got ['mri']"),
        ("items.json", json.dumps([{"id": "d", "conversations": ["hi"]}]),
         "record 1 (id 'd'): 'conversations' must be a list of turn objects, got ['hi']"),
    ],
)  # fmt: skip
def test_broken_records_name_the_file_and_record(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    assert main(["curate", "stats", "--input", str(path), "--out", str(tmp_path / "stats")]) == 2
    assert capsys.readouterr().err == f"curate stats: {path}: {message}\n"
    assert not (tmp_path / "stats").exists()
