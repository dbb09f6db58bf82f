"""LLaVA-JSON datasets on real VQA-RAD images: records, errors that name the place, bad-image policies."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from llavamed_fast.data.batch import SkippedSample
from llavamed_fast.data.dataset import LlavaJsonDataset, RecordError, read_records, skipped_summary
from llavamed_fast.data.images import ImageError
from llavamed_fast.data.packing import PackedBatchSampler, Sample, collate
from llavamed_fast.model import build


@pytest.fixture(scope="module")
def processor():
    return build("tiny-v1.5", seed=0)[1]


@pytest.fixture
def image_folder(tmp_path, vqa_rad_images):
    folder = tmp_path / "images"
    folder.mkdir()
    for path in vqa_rad_images[:4]:
        shutil.copy(path, folder / path.name)
    return folder


def record(rid, image, question="What is shown?", answer="A CT scan of the abdomen."):
    return {
        "id": rid,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
    }


def test_json_and_jsonl_give_the_same_samples(tmp_path, image_folder, processor):
    names = sorted(p.name for p in image_folder.iterdir())
    records = [record(f"r{i}", name) for i, name in enumerate(names)]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    a = LlavaJsonDataset(tmp_path / "a.json", image_folder, processor)
    b = LlavaJsonDataset(tmp_path / "a.jsonl", image_folder, processor)
    assert len(a) == len(b) == 4
    np.testing.assert_array_equal(a.lengths, b.lengths)
    sample = a[2]
    assert isinstance(sample, Sample) and sample.id == "r2"
    assert sample.pixel_values.shape == (1, 3, 64, 64)
    assert len(sample) == a.lengths[2] and (sample.labels != -100).any()
    torch.testing.assert_close(sample.pixel_values, b[2].pixel_values)


def test_misspelled_conversations_key_and_text_only_records(tmp_path, image_folder, processor):
    misspelled = record("m", sorted(p.name for p in image_folder.iterdir())[0])
    misspelled["conversatons"] = misspelled.pop("conversations")
    text_only = {
        "id": 7,
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
    }
    (tmp_path / "d.json").write_text(json.dumps([misspelled, text_only]))
    dataset = LlavaJsonDataset(tmp_path / "d.json", image_folder, processor)
    assert dataset[0].pixel_values.shape[0] == 1
    assert dataset[1].id == "7" and dataset[1].pixel_values.shape[0] == 0


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"id": "x1", "image": "a.jpg"}', r"line 2 \(id x1\): 'conversations' must be a non-empty list"),
        (
            '{"id": "x2", "conversations": [{"from": "bot", "value": "hi"}]}',
            r"line 2 \(id x2\): turn 0 has unknown 'from'",
        ),
        ('{"id": "x3", "conversations": [{"from": "human"}]}', r"line 2 \(id x3\): turn 0 must be an object"),
        ('{"conversations": []}', r"line 2: missing or invalid 'id'"),
        ('{"id": "x4", "conversations": [', r"line 2: invalid JSON"),
        ('["not", "an", "object"]', r"line 2: a record must be a JSON object"),
        (
            '{"id": "x5", "conversations": [{"from": "gpt", "value": "hi"}]}',
            r"line 2 \(id x5\): turn 0 has role 'assistant', expected 'user'",
        ),
        (
            '{"id": "x6", "image": "a.jpg", "conversations": [{"from": "human", "value": "no placeholder"}, '
            '{"from": "gpt", "value": "ok"}]}',
            r"line 2 \(id x6\): the text has 0 image placeholder\(s\) but the record has 1 image",
        ),
    ],
)
def test_malformed_records_name_file_line_and_id(tmp_path, image_folder, processor, line, match):
    good = json.dumps(record("ok", "whatever.jpg"))
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(RecordError, match=match) as info:
        LlavaJsonDataset(path, image_folder, processor)
    assert str(path) in str(info.value)


def test_json_list_errors_name_the_index(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([record("a", "x.jpg"), {"id": "b", "conversations": "nope"}]))
    with pytest.raises(RecordError, match=r"bad.json record 1 \(id b\)"):
        read_records(path)


def make_bad_images(folder):
    good = sorted(folder.iterdir())[0]
    data = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    return good.name


def test_bad_images_raise_with_file_and_record(tmp_path, image_folder, processor):
    good = make_bad_images(image_folder)
    records = [
        record("good", good),
        record("trunc", "truncated.jpg"),
        record("junk", "garbage.jpg"),
        record("gone", "missing.jpg"),
    ]
    (tmp_path / "d.json").write_text(json.dumps(records))
    dataset = LlavaJsonDataset(tmp_path / "d.json", image_folder, processor)
    assert isinstance(dataset[0], Sample)
    for index, (rid, name) in enumerate(
        [("trunc", "truncated.jpg"), ("junk", "garbage.jpg"), ("gone", "missing.jpg")], 1
    ):
        with pytest.raises(ImageError, match=f"record {rid}: image .*{name}"):
            dataset[index]


def test_bad_images_skip_and_count(tmp_path, image_folder, processor):
    good = make_bad_images(image_folder)
    records = [record("good", good), record("trunc", "truncated.jpg"), record("gone", "missing.jpg")]
    (tmp_path / "d.json").write_text(json.dumps(records))
    dataset = LlavaJsonDataset(tmp_path / "d.json", image_folder, processor, bad_images="skip")
    items = [dataset[i] for i in range(3)]
    assert [type(i) for i in items] == [Sample, SkippedSample, SkippedSample]
    batch = collate(items)
    assert batch.sample_ids == ("good",) and batch.num_samples == 1
    assert [s.record for s in batch.skipped] == ["trunc", "gone"]
    summary = skipped_summary(batch.skipped)
    assert summary.startswith("2 sample(s) skipped for bad images:\n  trunc: ") and "gone: " in summary
    assert "missing.jpg" in summary
    empty = collate(items[1:])
    assert empty.num_samples == 0 and empty.num_tokens == 0 and len(empty.skipped) == 2


def test_decompression_bomb_is_refused(tmp_path, image_folder, processor):
    good = sorted(image_folder.iterdir())[0].name
    (tmp_path / "d.json").write_text(json.dumps([record("big", good)]))
    dataset = LlavaJsonDataset(tmp_path / "d.json", image_folder, processor, max_image_pixels=1000)
    with pytest.raises(ImageError, match=r"record big: .*too many pixels"):
        dataset[0]


def test_long_samples_are_truncated_and_counted(tmp_path, image_folder, processor):
    good = sorted(image_folder.iterdir())[0].name
    long_answer = " ".join(["effusion"] * 200)
    (tmp_path / "d.json").write_text(
        json.dumps([record("long", good, answer=long_answer), record("short", good)])
    )
    dataset = LlavaJsonDataset(tmp_path / "d.json", image_folder, processor, max_length=60)
    assert dataset.lengths[0] == 60 and dataset.stats.truncated == ["long"]
    assert "1 truncated" in dataset.stats.summary()
    with pytest.raises(RecordError, match="would cut an image"):
        LlavaJsonDataset(tmp_path / "d.json", image_folder, processor, max_length=10)


def test_dataset_through_sampler_and_dataloader(tmp_path, image_folder, processor):
    names = sorted(p.name for p in image_folder.iterdir())
    rng = np.random.default_rng(0)
    records = [
        record(f"r{i}", names[i % len(names)], answer=" ".join(["lesion"] * int(rng.integers(1, 40))))
        for i in range(30)
    ]
    (tmp_path / "d.json").write_text(json.dumps(records))
    dataset = LlavaJsonDataset(tmp_path / "d.json", image_folder, processor)
    sampler = PackedBatchSampler(dataset.lengths, budget=256, seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=0)
    seen = []
    for batch in loader:
        assert batch.num_tokens <= 256
        assert torch.equal(
            batch.input_ids[batch.image_offsets],
            torch.full((batch.num_images,), processor.image_tokens.token_id),
        )
        seen.extend(batch.sample_ids)
    assert sorted(seen) == sorted(f"r{i}" for i in range(30))


def test_v15_pads_to_square_and_v0_crops(vqa_rad_images):
    from PIL import Image

    wide = next(p for p in vqa_rad_images if (lambda s: s[0] > 1.2 * s[1])(Image.open(p).size))
    image = Image.open(wide).convert("RGB")
    padded = build("tiny-v1.5", seed=0)[1].preprocess_images([image])[0]
    cropped = build("tiny-v0", seed=0)[1].preprocess_images([image])[0]
    # Padding is the CLIP mean colour, which normalises to ~0 in every channel: the top rows of a wide
    # image padded to a square are (almost) exactly zero; a centre crop has image content there.
    assert padded[:, :2, :].abs().max() < 0.02
    assert cropped[:, :2, :].abs().max() > 0.1
