"""VQA loaders on the real files: the split conventions, ids, types, images, and errors that name the record."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from llavamed_fast.eval import datasets
from llavamed_fast.eval.datasets import DatasetError


def test_vqa_rad_public_splits_match_llava_med(data_dir):
    root = data_dir / "vqa-rad"
    test = datasets.vqa_rad(root, "test")
    train = datasets.vqa_rad(root, "train")
    assert len(test) == 451 and Counter(r.answer_type for r in test) == {"CLOSED": 272, "OPEN": 179}
    assert len(train) == 1797
    public = json.loads((root / "VQA_RAD Dataset Public.json").read_text())
    # The id is the public JSON's qid (its row index), the question and image are that row's.
    for record in test[:20] + train[-20:]:
        row = public[int(record.question_id)]
        assert str(row["qid"]) == record.question_id
        assert record.question == row["question"].strip()
        assert Path(record.image) == (root / "images" / row["image_name"]).resolve()
    assert not {r.question_id for r in test} & {r.question_id for r in train}
    # The data_RAD test file is the same 451 questions in the same order, under its own ids.
    data_rad = datasets.vqa_rad(root, "test", source="data_rad")
    assert [(r.question, r.image) for r in data_rad] == [(r.question, r.image) for r in test]
    assert data_rad[1].question_id == "13" and test[1].question_id == "12"
    assert len(datasets.vqa_rad(root, "train", source="data_rad")) == 3064
    datasets.check_images(test)


def test_two_public_rows_with_a_trailing_space_in_the_type_are_closed(data_dir):
    public = json.loads((data_dir / "vqa-rad" / "VQA_RAD Dataset Public.json").read_text())
    odd = {str(r["qid"]) for r in public if r["answer_type"] == "CLOSED "}
    assert len(odd) == 2
    everything = datasets.vqa_rad(data_dir / "vqa-rad", "test") + datasets.vqa_rad(
        data_dir / "vqa-rad", "train"
    )
    types = {r.question_id: r.answer_type for r in everything}
    assert {types[q] for q in odd if q in types} <= {"CLOSED"}


def test_slake_english_rows(data_dir):
    test = datasets.slake(data_dir / "slake", "test")
    assert len(test) == 1061 and Counter(r.answer_type for r in test) == {"OPEN": 645, "CLOSED": 416}
    # One English training row has an empty answer: left out, with a warning that names it.
    with pytest.warns(UserWarning, match=r"train.json: record \d+ \(question 1622\): empty answer; left out"):
        assert len(datasets.slake(data_dir / "slake", "train")) == 4918
    assert len(datasets.slake(data_dir / "slake", "validate")) == 1053
    # CLOSED answers are not all yes/no.
    assert {r.answer.lower() for r in test if r.answer_type == "CLOSED"} - {"yes", "no"}
    datasets.check_images(test)


def test_pathvqa_sample_and_the_yes_no_rule(data_dir, tmp_path):
    sample = datasets.load("pathvqa", "test", data_dir / "pathvqa-sample" / "test_sample.jsonl")
    assert len(sample) == 87 and Counter(r.answer_type for r in sample) == {"CLOSED": 43, "OPEN": 44}
    assert all((r.answer_type == "CLOSED") == (r.answer.lower() in ("yes", "no")) for r in sample)
    datasets.check_images(sample)
    # Without an answer_type column the type comes from the answer.
    (tmp_path / "images").mkdir()
    rows = [
        {"qid": 1, "image": "a.jpg", "question": "Is it?", "answer": "Yes"},
        {"qid": 2, "image": "a.jpg", "question": "What?", "answer": "liver"},
    ]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r.answer_type for r in datasets.load("pathvqa", "test", tmp_path)] == ["CLOSED", "OPEN"]


def test_a_pathvqa_file_named_for_another_split_is_refused(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("LLAVAMED_SHARED_DATA", str(data_dir))
    assert len(datasets.load("pathvqa", "test")) == 87  # the shared sample, test_sample.jsonl
    # Its rows do not say their split: asked for another, it must not hand back the test questions.
    for split in ("train", "validate"):
        with pytest.raises(
            DatasetError, match=rf"test_sample.jsonl: holds the test split by its name, not '{split}'"
        ):
            datasets.load("pathvqa", split)
    with pytest.raises(DatasetError, match=r"train.jsonl: no such file"):
        datasets.load("pathvqa", "train", data_dir / "pathvqa-sample")
    # A file whose name says no split is taken as the split asked for.
    rows = [{"qid": 1, "image": "a.jpg", "question": "Is it?", "answer": "yes"}]
    (tmp_path / "pvqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r.question_id for r in datasets.load("pathvqa", "train", tmp_path / "pvqa.jsonl")] == ["1"]


def test_a_missing_default_root_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVAMED_SHARED_DATA", str(tmp_path))
    root, variable = re.escape(str(tmp_path.resolve())), re.escape(str(tmp_path))
    with pytest.raises(DatasetError, match=rf"{root}/slake: .*LLAVAMED_SHARED_DATA={variable}.*--root"):
        datasets.load("slake", "test")
    monkeypatch.delenv("LLAVAMED_SHARED_DATA")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=r"LLAVAMED_SHARED_DATA is not set, so ../shared/data"):
        datasets.load("vqa-rad", "test")


def test_a_question_file_with_a_repeated_id_is_refused(tmp_path, data_dir):
    records = datasets.vqa_rad(data_dir / "vqa-rad", "test")[:3]
    path = datasets.write_jsonl([*records, records[1]], tmp_path / "q.jsonl")
    with pytest.raises(
        DatasetError, match=rf"q.jsonl: line 4: question_id '{records[1].question_id}' appears twice"
    ):
        datasets.read_records(path)


def test_errors_name_the_file_and_record(tmp_path, data_dir):
    bad = tmp_path / "test.jsonl"
    bad.write_text(
        '{"qid": 1, "image": "a.jpg", "question": "Q?", "answer": "yes"}\n{"qid": 2, "image": "b.jpg"\n'
    )
    with pytest.raises(DatasetError, match=r"test.jsonl: line 2: not JSON"):
        datasets.pathvqa(bad)
    bad.write_text('{"image": "a.jpg", "question": "Q?", "answer": "yes"}\n')
    with pytest.raises(DatasetError, match=r"test.jsonl: line 1: record has no 'qid'"):
        datasets.pathvqa(bad)
    bad.write_text(
        '{"qid": 7, "image": "a.jpg", "question": "Q?"}\n{"qid": 8, "image": "a.jpg", "question": "R?", "answer": "no"}\n'
    )
    with pytest.warns(UserWarning, match=r"test.jsonl: line 1 \(question 7\): empty answer; left out"):
        assert [r.question_id for r in datasets.pathvqa(bad)] == ["8"]
    bad.write_text('{"qid": 1, "image": "a.jpg", "question": "Q?", "answer": "x", "answer_type": "MAYBE"}\n')
    with pytest.raises(DatasetError, match=r"line 1: answer_type 'MAYBE' is not OPEN or CLOSED"):
        datasets.pathvqa(bad)
    with pytest.raises(DatasetError, match="no such file"):
        datasets.slake(tmp_path, "test")
    with pytest.raises(DatasetError, match="splits train and test"):
        datasets.vqa_rad(data_dir / "vqa-rad", "validate")
    records = datasets.vqa_rad(data_dir / "vqa-rad", "test")[:3]
    missing = datasets.VQARecord(**{**records[1].to_json(), "image": str(tmp_path / "gone.jpg")})
    with pytest.raises(
        DatasetError, match=rf"question {records[1].question_id}: image .*gone.jpg does not exist"
    ):
        datasets.check_images([records[0], missing])


def test_canonical_jsonl_round_trip_and_llava_records(tmp_path, data_dir):
    records = datasets.vqa_rad(data_dir / "vqa-rad", "train")[:5]
    path = datasets.write_jsonl(records, tmp_path / "out.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == [r.to_json() for r in records]
    assert datasets.read_records(path) == records
    llava = datasets.to_llava(records, prefix="vqa-rad")
    assert llava[0]["id"] == f"vqa-rad-{records[0].question_id}"
    assert llava[0]["conversations"] == [
        {"from": "human", "value": f"<image>\n{records[0].question}"},
        {"from": "gpt", "value": records[0].answer},
    ]


def test_from_hub_reads_a_saved_copy(tmp_path, data_dir):
    hf = pytest.importorskip("datasets", reason="the optional 'datasets' package is not installed")
    from PIL import Image

    source = datasets.pathvqa(data_dir / "pathvqa-sample" / "test_sample.jsonl")[:4]
    table = hf.Dataset.from_dict(
        {
            "image": [Image.open(r.image).convert("RGB") for r in source],
            "question": [r.question for r in source],
            "answer": [r.answer for r in source],
        },
        features=hf.Features(
            {"image": hf.Image(), "question": hf.Value("string"), "answer": hf.Value("string")}
        ),
    )
    hf.DatasetDict({"test": table}).save_to_disk(str(tmp_path / "copy"))
    records = datasets.from_hub(str(tmp_path / "copy"), "test", tmp_path / "images")
    assert [(r.question_id, r.question, r.answer, r.answer_type) for r in records] == [
        (str(i), s.question, s.answer, s.answer_type) for i, s in enumerate(source)
    ]
    for record, original in zip(records, source, strict=True):
        assert Image.open(record.image).size == Image.open(original.image).size
    # The same through the command, into canonical JSONL.
    from llavamed_fast.cli import main

    out = tmp_path / "pathvqa.jsonl"
    assert (
        main(["eval", "export", "--dataset", "pathvqa", "--hub", str(tmp_path / "copy"), "--out", str(out)])
        == 0
    )
    assert [(r.question_id, r.answer) for r in datasets.read_records(out)] == [
        (r.question_id, r.answer) for r in records
    ]
    assert (tmp_path / "pathvqa_images" / "test_000003.png").is_file()
    with pytest.raises(DatasetError, match=r"copy: no split 'train'; this copy has 'test'"):
        datasets.from_hub(str(tmp_path / "copy"), "train", tmp_path / "images")


def test_the_vqa_finetune_stage_trains_on_llava_meds_1797_questions(tmp_path, data_dir):
    import torch

    from llavamed_fast.model import build
    from llavamed_fast.train.config import DataConfig, DataKind
    from llavamed_fast.train.data import stage_dataset
    from llavamed_fast.train.dist import Dist

    _, processor = build("tiny-v1.5", seed=0)
    data = DataConfig(kind=DataKind.VQA_RAD, path=str(data_dir / "vqa-rad"))
    dataset = stage_dataset(data, processor, tmp_path, Dist(0, 1, 0, torch.device("cpu")))
    assert len(dataset) == 1797
    records = json.loads((tmp_path / "data" / "vqa_rad_train.json").read_text())
    train = datasets.vqa_rad(data_dir / "vqa-rad", "train")
    assert [r["conversations"][1]["value"] for r in records] == [r.answer for r in train]
    sample = dataset[0]
    assert len(sample.image_starts) == 1 and (sample.labels != -100).any()


def test_the_vqa_finetune_recipe_finds_the_shared_vqa_rad_by_default(tmp_path, data_dir, monkeypatch):
    import torch

    from llavamed_fast.model import build
    from llavamed_fast.train.data import stage_dataset
    from llavamed_fast.train.dist import Dist
    from llavamed_fast.train.recipes import get_recipe

    _, processor = build("tiny-v1.5", seed=0)
    data = get_recipe("vqa-finetune").stages[0].data
    dist = Dist(0, 1, 0, torch.device("cpu"))
    monkeypatch.setenv("LLAVAMED_SHARED_DATA", str(data_dir))
    assert len(stage_dataset(data, processor, tmp_path / "a", dist)) == 1797
    monkeypatch.setenv("LLAVAMED_SHARED_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(
        DatasetError, match=r"elsewhere/vqa-rad: no such .* pass --set stages\.\*\.data\.path"
    ):
        stage_dataset(data, processor, tmp_path / "b", dist)
