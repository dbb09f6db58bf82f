"""The seams between the curation steps, through the real commands on real files: what ``curate images``
decided, and the licence and modality policy, are what ``curate align`` and ``curate instruct`` keep; what
instruct drops is named; alignment records carry what ``curate stats`` and the training reader read.

Images come from ``file://`` sources, so ``curate images`` runs its real download, decode and manifest
code without a server: a missing source file is an ``error`` (file URLs have no 404), a text file
``corrupt``."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from fake_teacher import API_KEY, FakeTeacher, figures
from PIL import Image

from llavamed_fast.cli import main
from llavamed_fast.data import instruct
from llavamed_fast.data.curation import curate_instruct, default_ledger, summary_path
from llavamed_fast.data.ledger import Ledger, request_key
from llavamed_fast.data.teacher import TeacherConfig

CC_BY = {"code": "CC BY", "commercial_use": True}
CC_BY_NC = {"code": "CC BY-NC", "commercial_use": False}
UNKNOWN = {"code": "unknown", "commercial_use": None}


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)


def _figure(name: str, graphic: str, licence: dict | None, **fields) -> dict:
    # "[fig:NAME]" is how the fake teacher knows which figure a request is about.
    return {
        "pair_id": f"1_{name}",
        "caption": f"Axial CT of case {name} [fig:{name}].",
        "graphic": graphic,
        "licence": licence,
        "domain": {"ct_scan": True},
        **fields,
    }


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _images(source, folder, sources, *options):
    return main(
        ["curate", "images", "--input", str(source), "--out", str(folder), "--retries", "0",
         "--url-template", sources.as_uri() + "/{graphic}.jpg", *options]
    )  # fmt: skip


@pytest.fixture
def fetched(tmp_path, capsys):
    """``(figures.jsonl, image folder)``: every manifest outcome once. 1_a fetched; 1_b a text file
    (corrupt); 1_c no source (error); 1_d CC BY-NC under ``--licence commercial`` (licence_excluded);
    1_e never given to ``curate images`` (no manifest line); 1_f fetched, then its file deleted."""
    sources = tmp_path / "sources"
    sources.mkdir()
    for name, colour in (("a", (200, 40, 40)), ("f", (40, 200, 40))):
        Image.new("RGB", (32, 24), colour).save(sources / f"{name}.jpg", format="JPEG")
    (sources / "b.jpg").write_text("<html>not an image</html>")
    rows = [
        _figure("a", "a", CC_BY),
        _figure("b", "b", CC_BY),
        _figure("c", "c", CC_BY),
        _figure("d", "a", CC_BY_NC),
        _figure("e", "a", CC_BY),
        _figure("f", "f", CC_BY),
    ]
    source = _write_jsonl(tmp_path / "figures.jsonl", rows)
    to_fetch = _write_jsonl(tmp_path / "fetch.jsonl", [r for r in rows if r["pair_id"] != "1_e"])
    folder = tmp_path / "images"
    assert _images(to_fetch, folder, sources, "--licence", "commercial") == 1  # corrupt and error fail
    (folder / "1_f.jpg").unlink()
    capsys.readouterr()
    return source, folder


IMAGE_REASONS = {
    "image_corrupt": 1,
    "image_error": 1,
    "image_licence_excluded": 1,
    "image_missing": 1,
    "image_file_missing": 1,
}


def test_align_keeps_only_figures_whose_image_was_fetched(tmp_path, fetched, capsys):
    source, folder = fetched
    out = tmp_path / "align.json"
    align = ["curate", "align", "--input", str(source), "--out", str(out), "--images", str(folder)]
    assert main(align) == 0
    assert capsys.readouterr().out == (
        f"1 alignment records -> {out}; left out: 1 image corrupt, 1 image error, 1 image file_missing, "
        "1 image licence_excluded, 1 image missing\n"
    )
    assert [r["id"] for r in json.loads(out.read_text())] == ["1_a"]
    # A second 'curate images' skips 1_a (done: its earlier "ok" line stays the manifest's word on it)
    # and fetches the deleted 1_f again: both are kept now.
    to_fetch = tmp_path / "fetch.jsonl"
    assert _images(to_fetch, folder, tmp_path / "sources", "--licence", "commercial") == 1
    assert json.loads(capsys.readouterr().out)["skipped"] == 1
    assert main(align) == 0
    assert [r["id"] for r in json.loads(out.read_text())] == ["1_a", "1_f"]
    # Records name the fetched files: another name (--image-name) would point at files nobody checked.
    assert main([*align, "--image-name", "{graphic}.jpg"]) == 2
    assert "--image-name cannot go with --images" in capsys.readouterr().err


def test_instruct_asks_the_teacher_only_about_figures_with_an_image(tmp_path, fetched, key, capsys):
    source, folder = fetched
    out = tmp_path / "conversations.jsonl"
    with FakeTeacher() as server:
        code = main(
            ["curate", "instruct", "--input", str(source), "--out", str(out), "--model", "teacher-test",
             "--base-url", server.base_url, "--no-progress", "--images", str(folder)]
        )  # fmt: skip
        assert code == 0, capsys.readouterr().err
        assert server.attempts == Counter({"a": 1})  # nothing paid for the figures without an image
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["filters"] == IMAGE_REASONS and summary["figures"] == 1
    assert json.loads(summary_path(out).read_text())["filters"] == IMAGE_REASONS
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["1_a"]


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (None, "{path}: no image manifest; run 'curate images --out {folder}' first, or give the folder it wrote"),
        ('{"pair_id": "1_a", "status": "ok", "file": "1_a.jpg"}\n{"pair_id": "1_b", "sta\n',
         "{path}: line 2: not JSON: Unterminated string starting at"),
        ('["1_a", "ok"]\n', "{path}: line 1: expected a JSON object, got list"),
        ('{"pair_id": "1_a"}\n', "{path}: line 1: 'status' must be a non-empty string, got None"),
        ('{"pair_id": "1_a", "status": "ok"}\n', "{path}: line 1: an 'ok' line without its 'file'"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("step", [["align"], ["instruct", "--model", "teacher-test"]])
def test_a_missing_or_malformed_manifest_is_an_error_naming_it(
    tmp_path, capsys, key, manifest, message, step
):
    source = _write_jsonl(tmp_path / "figures.jsonl", [_figure("a", "a", CC_BY)])
    folder = tmp_path / "images"
    folder.mkdir()
    path = folder / "manifest.jsonl"
    if manifest is not None:
        path.write_text(manifest)
    out = tmp_path / "out.json"
    code = main(
        ["curate", *step[:1], "--input", str(source), "--out", str(out), *step[1:], "--images", str(folder)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"curate {step[0]}: " + message.format(path=path, folder=folder)), err
    assert not out.exists() and not default_ledger(out).exists()  # nothing written, nothing sent


def test_a_manifest_line_cut_by_a_crash_counts_as_not_fetched(tmp_path, capsys):
    # 'curate images' killed while writing a line: that line decided nothing (the images step drops it on
    # its next run), so its figure is "image missing", not a broken manifest.
    Image.new("RGB", (8, 8)).save(tmp_path / "1_a.jpg", format="JPEG")
    size = (tmp_path / "1_a.jpg").stat().st_size
    (tmp_path / "manifest.jsonl").write_text(
        json.dumps({"pair_id": "1_a", "status": "ok", "file": "1_a.jpg", "bytes": size})
        + '\n{"pair_id": "1_b", "st'
    )
    source = _write_jsonl(tmp_path / "figures.jsonl", [_figure("a", "a", CC_BY), _figure("b", "b", CC_BY)])
    out = tmp_path / "align.json"
    assert (
        main(["curate", "align", "--input", str(source), "--out", str(out), "--images", str(tmp_path)]) == 0
    )
    assert capsys.readouterr().out.endswith("left out: 1 image missing\n")
    assert [r["id"] for r in json.loads(out.read_text())] == ["1_a"]


SELECTION = [
    _figure("k", "k", CC_BY),  # kept by every policy below
    _figure("n", "n", CC_BY_NC, domain={"mri": True}),
    _figure("u", "u", UNKNOWN),
    _figure("m", "m", None),  # no licence at all (LLaVA-Med's URL list)
    _figure("p", "p", CC_BY, compound=True, domain={"histology": True}),
    _figure("o", "o", CC_BY, domain={}),
]


def _instruct(source, out, options, capsys) -> tuple[Counter, dict]:
    """``curate instruct`` with ``options`` against a fake teacher: the teacher's attempts per figure and
    the run's summary."""
    with FakeTeacher() as server:
        code = main(
            ["curate", "instruct", "--input", str(source), "--out", str(out), "--model", "teacher-test",
             "--base-url", server.base_url, "--no-progress", *options]
        )  # fmt: skip
        assert code == 0, capsys.readouterr().err
        attempts = Counter(server.attempts)
    return attempts, json.loads(capsys.readouterr().out.splitlines()[-1])


@pytest.mark.parametrize(
    ("options", "kept", "left_out"),
    [
        ([], ["1_k", "1_n", "1_u", "1_m", "1_p", "1_o"], {}),  # the default, as 'curate images': all
        (["--licence", "any"], ["1_k", "1_n", "1_p", "1_o"], {"licence": 2}),  # every classified licence
        (["--licence", "commercial"], ["1_k", "1_p", "1_o"], {"licence": 3}),
        (["--licence", "any-including-unknown", "--skip-compound"], ["1_k", "1_n", "1_u", "1_m", "1_o"],
         {"compound": 1}),
        (["--licence", "any", "--domain", "mri", "histology"], ["1_n", "1_p"], {"licence": 2, "domain": 2}),
    ],
)  # fmt: skip
def test_instruct_selects_the_figures_align_selects(tmp_path, key, capsys, options, kept, left_out):
    source = _write_jsonl(tmp_path / "figures.jsonl", SELECTION)
    align_out, out = tmp_path / "align.json", tmp_path / "conversations.jsonl"
    assert main(["curate", "align", "--input", str(source), "--out", str(align_out), *options]) == 0
    assert [r["id"] for r in json.loads(align_out.read_text())] == kept
    reasons = ", ".join(f"{count} {why}" for why, count in left_out.items())
    assert capsys.readouterr().out.endswith(f"; left out: {reasons}\n" if left_out else f"{align_out}\n")
    attempts, summary = _instruct(source, out, options, capsys)
    assert sorted(attempts) == sorted(pair_id[2:] for pair_id in kept)  # only these were paid for
    assert summary["filters"] == left_out
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == kept


def test_align_and_instruct_leave_out_the_same_figures_for_the_same_reasons(tmp_path, key, capsys):
    """The first record of a pair id counts, whatever comes after it; the policy goes before the caption."""
    rows = [
        _figure("r", "r", CC_BY, caption=""),  # the first 1_r: no caption, so 1_r is left out...
        _figure("r", "r", CC_BY),  # ...and this repeat does not bring it back
        _figure("x", "x", CC_BY_NC, caption=""),  # counted under its licence, the first reason
        _figure("k", "k", CC_BY),
    ]
    source, align_out = _write_jsonl(tmp_path / "figures.jsonl", rows), tmp_path / "align.json"
    options = ["--licence", "commercial"]
    assert main(["curate", "align", "--input", str(source), "--out", str(align_out), *options]) == 0
    assert capsys.readouterr().out.endswith("; left out: 1 licence, 1 no caption\n")
    assert [r["id"] for r in json.loads(align_out.read_text())] == ["1_k"]
    out = tmp_path / "conversations.jsonl"
    attempts, summary = _instruct(source, out, options, capsys)
    assert sorted(attempts) == ["k"]
    assert summary["filters"] == {"duplicate_pair_id": 1, "licence": 1, "no_caption": 1}


def test_dropped_figures_are_named_with_their_reason(tmp_path, key):
    rows = figures(24)
    source, out = _write_jsonl(tmp_path / "figures.jsonl", rows), tmp_path / "conversations.jsonl"
    with FakeTeacher() as server:
        config = TeacherConfig(model="teacher-test", base_url=server.base_url, concurrency=4)
        # Replies the filters empty, put in the ledger as an earlier run would have left them.
        ledger = Ledger(default_ledger(out))
        for row, reply in (
            (rows[3], "User: What is it?\nAssistant: As an AI, I cannot see images."),
            (rows[4], "User: What does the caption say?\nAssistant: A CT.\n"
                      "User: Any more?\nAssistant: I'm sorry, I cannot see it."),
        ):  # fmt: skip
            ledger.record(
                request_key(config.model, instruct.build_messages(row), config.params()), reply, model="t"
            )
        ledger.close()
        server.script = {"f1": ["malformed"], "f2": ["400"], **{f"f{i}": ["malformed"] for i in range(5, 24)}}
        summary = curate_instruct(source, out, config, progress=False)
    expected = {
        "1_f1": "malformed_reply",
        "1_f2": "no_reply",
        "1_f3": "nothing_left: refusal 1",
        "1_f4": "nothing_left: refusal 1, caption_leak 1",
        **{f"1_f{i}": "malformed_reply" for i in range(5, 21)},
    }
    # Named up to 20 (input order), like "failures"; every one is counted under "filters".
    assert summary["dropped"] == expected
    assert summary["filters"] == {
        "malformed_reply": 20, "no_reply": 1, "nothing_left": 2, "refusal": 2, "caption_leak": 1,
    }  # fmt: skip
    assert json.loads(summary_path(out).read_text())["dropped"] == expected
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["1_f0"]


def test_alignment_records_carry_the_domain_stats_and_training_read(tmp_path, fetched, capsys):
    source, folder = fetched
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    rows[0]["domain"] = {"ct_scan": True, "histology": True}
    _write_jsonl(source, rows)
    out = tmp_path / "align.json"
    assert main(["curate", "align", "--input", str(source), "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    assert len(records) == 6 and records[0]["domain"] == {
        "chest_xray": False, "mri": False, "ct_scan": True, "histology": True, "gross": False,
    }  # fmt: skip
    assert main(["curate", "stats", "--input", str(out), "--out", str(tmp_path / "stats")]) == 0
    numbers = json.loads((tmp_path / "stats" / "stats.json").read_text())
    assert numbers["modalities"] == {
        "chest_xray": 0, "ct_scan": 6, "mri": 0, "histology": 1, "gross": 0, "other": 0,
    }  # fmt: skip
    # The training reader takes the extra key, and the image 'curate images' saved under the record's name.
    from llavamed_fast.data.dataset import LlavaJsonDataset
    from llavamed_fast.model import build

    dataset = LlavaJsonDataset(out, folder, build("tiny-v1.5", seed=0)[1])
    assert len(dataset) == 6
    sample = dataset[0]
    assert sample.id == "1_a" and sample.pixel_values.shape[0] == 1 and (sample.labels != -100).any()
