"""Synthetic scans: deterministic and balanced, and the text says what the pixels show.

The checks are layered so that none trusts the generator's own text functions: the test parses captions
and answers itself and compares them with the findings, the findings with the drawn lesions' geometry,
and the findings with what a simple blob detector sees in the pixels.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from llavamed_fast.data import synthetic
from llavamed_fast.data.dataset import LlavaJsonDataset
from llavamed_fast.data.packing import Sample, collate
from llavamed_fast.data.synthetic import (
    BRIGHTNESS,
    LARGE_RADIUS,
    PLAN_BLOCK,
    SIDES,
    SIZES,
    SMALL_RADIUS,
    Findings,
    dataset_scan,
    eval_item,
    make_dataset,
    make_eval_set,
    noise_like,
    planned_findings,
    reply_answer,
)
from llavamed_fast.model import build

WORDS = {"none": 0, "one": 1, "two": 2, "three": 3}
CAPTION = re.compile(
    r"A scan with (?:no lesion|(one|two|three) (large|small) (bright|dark) lesions? on the (left|right) side)\."
)


def parse_caption(text: str) -> Findings:
    match = CAPTION.fullmatch(text)
    assert match, f"caption {text!r} does not state the findings in the expected form"
    if match[1] is None:
        return Findings(0)
    assert (match[1] == "one") == text.endswith("lesion on the " + match[4] + " side.")  # singular for one
    return Findings(WORDS[match[1]], side=match[4], size=match[2], brightness=match[3])


def expected_answer(question: str, findings: Findings) -> str:
    """The answer to a question about ``findings``, written independently of the generator."""
    yes_no = lambda flag: "Yes." if flag else "No."  # noqa: E731
    if question == "Is there a lesion?":
        return yes_no(findings.count > 0)
    if question == "How many lesions are there?":
        return {v: k for k, v in WORDS.items()}[findings.count].capitalize() + "."
    if question == "Describe the findings.":
        return "caption"
    assert findings.count > 0, f"{question!r} asked about a scan without a lesion"
    side = re.fullmatch(r"Is the lesion on the (left|right) side\?", question)
    if side:
        return yes_no(side[1] == findings.side)
    attribute = {
        "Which side is the lesion on?": findings.side,
        "Is the lesion large or small?": findings.size,
        "Is the lesion bright or dark?": findings.brightness,
    }[question]
    return attribute.capitalize() + "."


def check_turns(turns: list[tuple[str, str]], findings: Findings) -> None:
    for question, answer in turns:
        expected = expected_answer(question, findings)
        if expected == "caption":
            assert parse_caption(answer) == findings, (question, answer, findings)
        else:
            assert answer == expected, (question, answer, findings)


def qa_pairs(record: dict) -> list[tuple[str, str]]:
    turns = record["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    assert turns[0]["value"].startswith("<image>\n")
    assert sum(t["value"].count("<image>") for t in turns) == 1
    questions = [turns[0]["value"].removeprefix("<image>\n")] + [t["value"] for t in turns[2::2]]
    return list(zip(questions, [t["value"] for t in turns[1::2]], strict=True))


def files_digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.*"))}


def pixel_digest(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()


def test_findings_are_balanced_in_blocks_and_prefixes():
    findings = [planned_findings("conversations", 7, i) for i in range(10 * PLAN_BLOCK)]
    with_lesions = [f for f in findings if f.present]
    assert len(with_lesions) == len(findings) // 2
    for name, values in (("side", SIDES), ("size", SIZES), ("brightness", BRIGHTNESS)):
        assert Counter(getattr(f, name) for f in with_lesions) == {v: len(with_lesions) // 2 for v in values}
    assert Counter(f.count for f in with_lesions) == {c: len(with_lesions) // 3 for c in (1, 2, 3)}
    # Any prefix is off by at most one partial block.
    for n in (30, 100, 250):
        present = sum(f.present for f in findings[:n])
        assert abs(present - n / 2) <= PLAN_BLOCK / 2, (n, present)
    # Each (task, seed) has its own order.
    assert [planned_findings("conversations", 8, i) for i in range(PLAN_BLOCK)] != findings[:PLAN_BLOCK]


def test_make_dataset_is_deterministic_reused_and_prefix_stable(tmp_path):
    a = make_dataset(tmp_path / "a", task="conversations", count=60, seed=1)
    b = make_dataset(tmp_path / "b", task="conversations", count=60, seed=1)
    assert a.name == "conversations_60_1.json"
    assert a.read_bytes() == b.read_bytes()
    assert files_digest(tmp_path / "a") == files_digest(tmp_path / "b")

    # A matching manifest means reuse: nothing is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*.*")}
    assert make_dataset(tmp_path / "a", task="conversations", count=60, seed=1) == a
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*.*")} == stamps
    # A missing image or an edited file is noticed and the set is rebuilt, identical to before.
    first = json.loads(a.read_text())[0]
    (tmp_path / "a" / "images" / first["image"]).unlink()
    a.write_text(a.read_text().replace("Yes.", "No."))
    make_dataset(tmp_path / "a", task="conversations", count=60, seed=1)
    assert files_digest(tmp_path / "a") == files_digest(tmp_path / "b")

    # A smaller set is a prefix of a larger one (same ids, pixels and text), so sets never disagree.
    small = json.loads(make_dataset(tmp_path / "a", task="conversations", count=20, seed=1).read_text())
    assert small == json.loads(a.read_text())[:20]


def test_text_agrees_with_findings(tmp_path):
    seed, count = 2, 2 * PLAN_BLOCK
    for task in ("captions", "conversations"):
        records = json.loads(make_dataset(tmp_path, task=task, count=count, seed=seed).read_text())
        assert len(records) == count and len({r["id"] for r in records}) == count
        instructions, turns_per_record, kinds = Counter(), Counter(), Counter()
        for index, record in enumerate(records):
            scan = dataset_scan(task, seed, index)
            assert record["image"] == f"{record['id']}.png"
            written = Image.open(tmp_path / "images" / record["image"])
            assert written.mode == "RGB" and written.size == (64, 64)
            assert pixel_digest(written) == pixel_digest(scan.image)
            pairs = qa_pairs(record)
            if task == "captions":
                assert len(pairs) == 1
                instructions[pairs[0][0]] += 1
                assert parse_caption(pairs[0][1]) == scan.findings
            else:
                assert 2 <= len(pairs) <= 4
                assert len({q for q, _ in pairs}) == len(pairs)  # no question twice in one record
                check_turns(pairs, scan.findings)
                turns_per_record[len(pairs)] += 1
                for question, answer in pairs:
                    side = re.fullmatch(r"Is the lesion on the (left|right) side\?", question)
                    kinds[(side[1] if side else question, answer)] += 1
        if task == "captions":
            assert set(instructions) <= set(synthetic.CAPTION_INSTRUCTIONS) and len(instructions) >= 4
    assert set(turns_per_record) == {2, 3, 4}
    # Yes and no come about equally often for both yes/no questions.
    for question in ("Is there a lesion?", "left", "right"):
        yes, no = kinds[(question, "Yes.")], kinds[(question, "No.")]
        assert 0.35 <= yes / (yes + no) <= 0.65, (question, yes, no)


def test_side_questions_ask_one_side_question_per_lesion_scan(tmp_path):
    seed, count = 3, 4 * (PLAN_BLOCK // 2)
    records = json.loads(make_dataset(tmp_path, task="side_questions", count=count, seed=seed).read_text())
    assert len(records) == count
    combinations, kinds = Counter(), Counter()
    for index, record in enumerate(records):
        scan = dataset_scan("side_questions", seed, index)
        assert pixel_digest(Image.open(tmp_path / "images" / record["image"])) == pixel_digest(scan.image)
        assert scan.findings.count > 0 and len(scan.lesions) == scan.findings.count
        pairs = qa_pairs(record)
        assert len(pairs) == 1
        check_turns(pairs, scan.findings)
        question, answer = pairs[0]
        assert question.startswith(("Which side", "Is the lesion on the"))
        kinds[(question.split()[0], answer)] += 1
        f = scan.findings
        combinations[(f.count, f.side, f.size, f.brightness)] += 1
    # Every lesion combination equally often (4 whole blocks), both forms equally often, answers balanced.
    assert len(combinations) == PLAN_BLOCK // 2 and set(combinations.values()) == {4}
    assert kinds[("Which", "Left.")] == kinds[("Which", "Right.")] == count // 4
    yes, no = kinds[("Is", "Yes.")], kinds[("Is", "No.")]
    assert yes + no == count // 2 and 0.35 <= yes / (yes + no) <= 0.65, (yes, no)


def test_findings_agree_with_geometry_and_pixels():
    size = 64
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    seen = Counter()
    for index in range(4 * PLAN_BLOCK):
        scan = dataset_scan("captions", 3, index, size)
        f = scan.findings
        assert len(scan.lesions) == f.count
        # Geometry: each lesion wholly in its half and inside the body, radius in its class, apart.
        for i, lesion in enumerate(scan.lesions):
            low, high = LARGE_RADIUS if f.size == "large" else SMALL_RADIUS
            assert low * size <= lesion.radius <= high * size
            edge = lesion.x + lesion.radius if f.side == "left" else size - (lesion.x - lesion.radius)
            assert edge <= size / 2
            assert (lesion.contrast > 0) == (f.brightness == "bright")
            for other in scan.lesions[:i]:
                assert np.hypot(lesion.x - other.x, lesion.y - other.y) > lesion.radius + other.radius + 2
        # Pixels: blobs that stand out from the body (3x3 blur, 25 grey levels off its median).
        grey = np.asarray(scan.image, dtype=np.float64)
        assert (grey == grey[:, :, :1]).all()  # grey in all three channels
        grey = grey[:, :, 0]
        cx, cy, ax, ay = scan.body
        interior = np.hypot((xs - cx) / (ax - 2), (ys - cy) / (ay - 2)) < 1
        padded = np.pad(grey, 1, mode="edge")
        blurred = sum(padded[i : i + size, j : j + size] for i in range(3) for j in range(3)) / 9
        deviation = blurred - np.median(grey[interior])
        blobs = interior & (np.abs(deviation) > 25)
        if not f.present:
            assert not blobs.any(), f"scan {index} has no lesion but {blobs.sum()} outstanding pixels"
            continue
        half = slice(0, size // 2) if f.side == "left" else slice(size // 2, size)
        assert blobs[:, half].sum() == blobs.sum() > 0, f"scan {index}: blobs outside the {f.side} half"
        assert np.sign(deviation[blobs].mean()) == (1 if f.brightness == "bright" else -1)
        per_lesion = blobs.sum() / f.count  # measured: small 11-38 pixels, large 83-155
        assert (per_lesion > 60) == (f.size == "large"), (index, f, per_lesion)
        assert count_blobs(blobs) == f.count, (index, f)
        seen[f.count] += 1
    assert set(seen) == {1, 2, 3}


def count_blobs(mask: np.ndarray) -> int:
    """4-connected components of at least 3 pixels."""
    labels, count = np.zeros(mask.shape, dtype=bool), 0
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        stack, pixels = [start], 0
        labels[start] = True
        while stack:
            y, x = stack.pop()
            pixels += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if (
                    0 <= ny < mask.shape[0]
                    and 0 <= nx < mask.shape[1]
                    and mask[ny, nx]
                    and not labels[ny, nx]
                ):
                    labels[ny, nx] = True
                    stack.append((ny, nx))
        count += pixels >= 3
    return count


def test_hardest_layouts_fit_at_every_size():
    # Three large lesions in one half of a small, off-centre body need the most retries.
    for size in (32, 64, 224):
        for i in range(40):
            findings = Findings(3, SIDES[i % 2], "large", "dark")
            scan = synthetic.draw_scan(findings, np.random.default_rng(i), size)
            assert len(scan.lesions) == 3 and scan.image.size == (size, size)


@pytest.mark.parametrize("preset", ["tiny-v1.5", "tiny-v0"])
def test_records_load_with_the_dataset(tmp_path, preset):
    model_processor = build(preset, seed=0)[1]
    for task in synthetic.TASKS:
        path = make_dataset(tmp_path, task=task, count=24, seed=0)
        dataset = LlavaJsonDataset(path, tmp_path / "images", model_processor)
        assert len(dataset) == 24 and not dataset.stats.truncated and not dataset.stats.unsupervised
        samples = [dataset[i] for i in range(len(dataset))]
        tokens = model_processor.image_tokens
        for sample in samples:
            assert isinstance(sample, Sample) and sample.pixel_values.shape == (1, 3, 64, 64)
            assert len(sample.image_starts) == 1
            start = int(sample.image_starts[0])
            assert (sample.input_ids[start : start + tokens.count] == tokens.token_id).all()
            assert (sample.input_ids == tokens.token_id).sum() == tokens.count
        batch = collate(samples)
        assert batch.num_images == 24 and batch.num_samples == 24
        # What is supervised is exactly the answers (plus the template's end-of-turn marker).
        first = samples[0]
        supervised = model_processor.tokenizer.decode(first.input_ids[first.labels != -100])
        record = json.loads(path.read_text())[0]
        for turn in record["conversations"][1::2]:
            assert turn["value"] in supervised


def test_eval_set_is_balanced_correct_and_held_out(tmp_path):
    count, seed = 4 * 14, 0
    path = make_eval_set(tmp_path / "eval", count=count, seed=seed)
    assert path.name == f"eval_{count}_{seed}.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == count
    answers = Counter()
    for index, line in enumerate(lines):
        assert set(line) == {"question_id", "image", "question", "answer", "answer_type"}
        scan, _ = eval_item(seed, index)
        expected = expected_answer(line["question"], scan.findings)
        assert line["answer"] == expected.rstrip(".").lower(), (line, scan.findings)
        assert line["answer_type"] == ("OPEN" if line["question"].startswith("How many") else "CLOSED")
        written = Image.open(tmp_path / "eval" / "images" / line["image"])
        assert pixel_digest(written) == pixel_digest(scan.image)
        answers[(line["question"], line["answer"])] += 1
    closed_questions = {q for q, _ in answers} - {"How many lesions are there?"}
    assert len(closed_questions) == 6  # presence, left?, right?, which side, size, brightness
    for pair in (("yes", "no"), ("left", "right"), ("large", "small"), ("bright", "dark")):
        counts = [sum(n for (q, a), n in answers.items() if a == word) for word in pair]
        assert counts[0] == counts[1] > 0, (pair, counts)
    assert {a for (q, a) in answers if q.startswith("How many")} == set(WORDS)
    assert make_eval_set(tmp_path / "eval", count=count, seed=seed).read_bytes() == path.read_bytes()

    # No image in common (by name or by pixels) with training sets of any seed, this one included.
    eval_pixels = {
        hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "eval" / "images").iterdir()
    }
    for task in synthetic.TASKS:
        for train_seed in (0, 1):
            make_dataset(tmp_path / "train", task=task, count=count, seed=train_seed)
    train_images = list((tmp_path / "train" / "images").iterdir())
    assert len(train_images) == 2 * len(synthetic.TASKS) * count
    assert not {p.name for p in train_images} & {line["image"] for line in lines}
    assert not {hashlib.sha256(p.read_bytes()).hexdigest() for p in train_images} & eval_pixels


def test_noise_like_keeps_size_and_mode_and_nothing_else():
    scan = dataset_scan("conversations", 0, 2, 96)
    noise = noise_like(scan.image, seed=5)
    assert noise.size == scan.image.size and noise.mode == scan.image.mode
    assert pixel_digest(noise) == pixel_digest(noise_like(scan.image, seed=5))
    assert pixel_digest(noise) != pixel_digest(noise_like(scan.image, seed=6))
    # Independent of the image: any image of that size gives the same noise.
    assert pixel_digest(noise) == pixel_digest(noise_like(Image.new("RGB", (96, 96)), seed=5))
    assert noise_like(Image.new("L", (40, 30)), seed=0).size == (40, 30)


def test_bad_arguments_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic task 'vqa'"):
        make_dataset(tmp_path, task="vqa", count=4, seed=0)
    with pytest.raises(ValueError, match="count must be an integer >= 1"):
        make_dataset(tmp_path, task="captions", count=0, seed=0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        make_eval_set(tmp_path, count=4, seed=-1)
    with pytest.raises(ValueError, match="image_size must be an integer >= 32"):
        make_dataset(tmp_path, task="captions", count=4, seed=0, image_size=16)
    with pytest.raises(ValueError, match="presupposes a lesion"):
        synthetic.question_answer("size", Findings(0))
    with pytest.raises(ValueError, match="no side, size or brightness"):
        Findings(0, side="left")


def test_a_reply_is_judged_by_its_first_word():
    # Every held-out answer is one word; what follows it (a run-on, a comma clause) does not change it.
    assert reply_answer("Left.") == "left"
    assert reply_answer(" Dark Yes Yes Yes") == "dark"
    assert reply_answer("Yes, on the left side.") == "yes"
    assert reply_answer("Three lesions.") == "three"
    # No word at all is no answer, never a match for any expected answer.
    assert reply_answer("") == reply_answer("...") == ""
