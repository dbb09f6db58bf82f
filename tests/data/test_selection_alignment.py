"""Figure selection (modality, compound, licence) and stage-1 alignment records.

The modality rules are checked against LLaVA-Med's own labels of its 50 evaluation figures (the
``llava-med-qa50`` captions, filed by domain) and against hand-written captions, positive and negative."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llavamed_fast.data import alignment, selection
from llavamed_fast.data.dataset import read_records


def test_modalities_agree_with_llava_med_labels(data_dir):
    figures = json.loads(
        (data_dir / "llava-med-qa50" / "llava_med_eval_qa50_fig_captions.json").read_text(encoding="utf-8")
    )
    found = extra = total = 0
    for domain, records in figures.items():
        for record in records:
            mentions = [m["tokens"] for m in record.get("in_text_mention") or []]
            flags = selection.modalities(record["fig_caption"], mentions)
            total += 1
            found += flags[domain]
            extra += sum(flags.values()) - flags[domain]
    assert total == 50
    # Measured: 50 of 50 found; 3 extra flags, each for a caption that names a second modality.
    assert found >= 48 and extra <= 5, (found, extra)


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("PA chest radiograph showing a right pleural effusion.", {"chest_xray"}),
        ("Axial contrast-enhanced CT of the abdomen.", {"ct_scan"}),
        ("HRCT shows ground-glass opacities.", {"ct_scan"}),
        ("Sagittal T2-weighted image of the lumbar spine.", {"mri"}),
        ("Brain MRI (FLAIR) with periventricular lesions.", {"mri"}),
        ("Tumour cells (H&E, original magnification ×400).", {"histology"}),
        ("Immunohistochemistry for CD20 in the lymph node.", {"histology"}),
        ("Cut surface of the resected specimen, showing a yellow nodule.", {"gross"}),
        ("CT (left) and the corresponding histology (right).", {"ct_scan", "histology"}),
        ("Western blot of lysates; ΦX174 phage titres over 2 x 3 cm plates.", set()),
        ("Kaplan-Meier curves of overall survival.", set()),
        ("A computed tomography scan of the chest.", {"ct_scan"}),
    ],
)
def test_modality_rules(caption, expected):
    assert {d for d, on in selection.modalities(caption).items() if on} == expected


def test_mentions_decide_only_when_the_caption_names_no_modality():
    mentions = ["The MRI of the brain was normal (Figure 2)."]
    assert selection.modalities("Patient 2 at follow-up.", mentions)["mri"]
    assert not selection.modalities("Axial CT at follow-up.", mentions)["mri"]
    # A learned classifier plugs in as any callable from text to flags.
    assert selection.modalities("x", tagger=lambda text: {"gross": True}) == {
        "chest_xray": False, "ct_scan": False, "mri": False, "histology": False, "gross": True,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("caption", "compound"),
    [
        ("Exposure depressed T4 in males and females (A), but not T3 in males (B).", True),
        ("Chemical structures of A, THL and B, MmPPOX.", True),
        ("(a) Axial and (b) coronal CT images.", True),
        ("Histology of the lesion (A-D).", True),
        ("Ultrasound image (left) with the corresponding MR image (right).", True),
        ("A computed tomography scan shows a mass. B cells were absent.", False),
        ("Chest X-ray showing dilated cardiomyopathy.", False),
        ("Vitamin A levels by group (A).", False),
    ],
)
def test_compound_figures(caption, compound):
    assert selection.is_compound(caption) is compound


def test_licence_policies():
    cc_by, nc = {"code": "CC BY", "commercial_use": True}, {"code": "CC BY-NC", "commercial_use": False}
    unknown = {"code": "unknown", "commercial_use": None}
    assert [selection.licence_allows(x, "commercial") for x in (cc_by, nc, unknown)] == [True, False, False]
    assert [selection.licence_allows(x, "any") for x in (cc_by, nc, unknown, None)] == [
        True,
        True,
        False,
        False,
    ]
    assert selection.licence_allows(unknown, "any-including-unknown")
    with pytest.raises(ValueError, match="licence policy must be one of"):
        selection.licence_allows(cc_by, "open")


def _figure(pair_id, words):
    return {"pair_id": pair_id, "caption": " ".join(["word"] * words), "pmid": "1"}


def test_alignment_records_are_deterministic_per_figure():
    short, long = _figure("1_F1", 29), _figure("1_F2", 30)
    record = alignment.alignment_record(short, seed=3)
    assert record["id"] == "1_F1" and record["image"] == "1_F1.jpg"
    human, gpt = record["conversations"]
    assert human["from"] == "human" and gpt == {"from": "gpt", "value": short["caption"]}
    assert human["value"].count("<image>") == 1
    instruction = human["value"].replace("<image>", "").strip()
    assert instruction in alignment.CONCISE  # under 30 words: concise
    long_instruction = alignment.alignment_record(long)["conversations"][0]["value"].replace("<image>", "")
    assert long_instruction.strip() in alignment.DETAILED
    # The same figure gives the same record alone or among others, and another seed may differ.
    assert alignment.alignment_record(short, seed=3) == record
    figures = [_figure(f"1_F{i}", 10) for i in range(200)]
    by_seed = [
        [alignment.alignment_record(f, seed=s)["conversations"][0]["value"] for f in figures] for s in (0, 1)
    ]
    assert by_seed[0] != by_seed[1]
    assert len(set(by_seed[0])) == 2 * len(alignment.CONCISE)  # every wording, <image> first and last
    with pytest.raises(ValueError, match="figure 1_F9 has no caption"):
        alignment.alignment_record({"pair_id": "1_F9", "caption": " "})


def test_align_cli_filters_and_writes_llava_json(tmp_path):
    figures = [
        {
            **_figure("1_F1", 12),
            "licence": {"code": "CC BY", "commercial_use": True},
            "domain": {"ct_scan": True},
        },
        {
            **_figure("1_F2", 40),
            "licence": {"code": "CC BY-NC", "commercial_use": False},
            "domain": {"mri": True},
        },
        {**_figure("1_F3", 5), "licence": {"code": "CC BY", "commercial_use": True}, "compound": True},
        {"pair_id": "1_F4", "caption": "", "licence": {"code": "CC0", "commercial_use": True}},
    ]
    source = tmp_path / "figures.jsonl"
    source.write_text("".join(json.dumps(f) + "\n" for f in figures) + "\n")
    out = tmp_path / "align.json"

    def run(*flags):
        args = ["curate", "align", "--input", str(source), "--out", str(out), *flags]
        script = "import sys; from llavamed_fast.cli import main; code = main(sys.argv[1:]); "
        script += "assert 'torch' not in sys.modules; sys.exit(code)"
        return subprocess.run(
            [sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=tmp_path
        )

    done = run("--licence", "commercial", "--skip-compound")
    assert done.returncode == 0, done.stderr
    assert "1 alignment records" in done.stdout and "1 licence, 1 compound, 1 no caption" in done.stdout
    assert [r["id"] for r in json.loads(out.read_text())] == ["1_F1"]
    assert run("--domain", "mri").returncode == 0
    records = read_records(out)  # the training data reader takes them as they are
    assert [r.id for r in records] == ["1_F2"]
    source.write_text(source.read_text() + "{not json\n")
    done = run()
    assert done.returncode == 2 and f"{source}: line 6: not JSON" in done.stderr


def test_align_skips_hand_made_records_of_the_wrong_shape_by_line(tmp_path):
    cc_by = {"code": "CC BY", "commercial_use": True}
    figures = [
        {**_figure("1_F1", 5), "licence": cc_by},
        {**_figure("1_F2", 5), "licence": "CC BY"},  # a string where the object belongs
        {**_figure("1_F3", 5), "licence": cc_by, "caption": 123},
        {**_figure("1_F1", 7), "licence": cc_by},  # a repeated pair id: the first line's record stays
        {**_figure("1_F4", 5), "licence": cc_by, "graphic": "g4"},
    ]
    source = tmp_path / "figures.jsonl"
    source.write_text("".join(json.dumps(f) + "\n" for f in figures))
    out = tmp_path / "align.json"
    args = ["curate", "align", "--input", str(source), "--out", str(out)]
    done = subprocess.run([sys.executable, "-m", "llavamed_fast.cli", *args], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"curate align: {source}: line 4: pair_id '1_F1' repeats line 1; left out",
        f"curate align: skipped {source}: line 2: field 'licence' must be an object (or null), got str 'CC BY'",
        f"curate align: skipped {source}: line 3: field 'caption' must be a string (or null), got int 123",
    ]
    records = json.loads(out.read_text())
    assert [r["id"] for r in records] == ["1_F1", "1_F4"] and records[0]["conversations"][1]["value"] == (
        "word word word word word"
    )
    # An image name from a field that a record lacks names the field and the ones it has.
    done = subprocess.run(
        [sys.executable, "-m", "llavamed_fast.cli", *args, "--image-name", "{graphic}.jpg"],
        capture_output=True,
        text=True,
    )
    assert (
        f"curate align: skipped {source}: line 1: image name template '{{graphic}}.jpg': the record has no "
        "string field 'graphic'; it has caption, pair_id, pmid" in done.stderr.splitlines()
    )
    assert [r["image"] for r in json.loads(out.read_text())] == ["g4.jpg"]


def test_a_licence_of_the_wrong_type_is_a_clear_error():
    with pytest.raises(ValueError, match="licence must be an object with code and commercial_use, got str"):
        selection.licence_allows("CC BY", "any")
