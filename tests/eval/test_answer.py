"""Batched, cached greedy decoding against the one-conversation reference; answer files that resume."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import force_token
from PIL import Image

from llavamed_fast.data.templates import Message
from llavamed_fast.eval import datasets
from llavamed_fast.eval.answer import (
    AnswerConfig,
    AnswerFileError,
    answer_questions,
    generate_batch,
    vqa_questions,
)
from llavamed_fast.eval.prompts import YES_NO_OPTIONS
from llavamed_fast.model import build, save_pretrained
from llavamed_fast.model.generate import greedy_generate

NEW_TOKENS = 10


def conversations(records):
    # Prompts of different lengths (so the batch is left-padded), the image before or after the text.
    out = []
    for i, r in enumerate(records):
        text = f"<image>\n{r.question}" if i % 2 else f"{r.question} Answer briefly, please.\n<image>"
        out.append(([Message("user", text)], [Image.open(r.image).convert("RGB")]))
    return out


@pytest.mark.parametrize(("preset", "stop"), [("tiny-v0", "###"), ("tiny-v1.5", "eos")])
def test_batched_generation_equals_the_reference_token_for_token(preset, stop, data_dir):
    model, processor = build(preset, seed=3)
    records = datasets.vqa_rad(data_dir / "vqa-rad", "test")[:6]
    convs = conversations(records)
    free = [greedy_generate(model, processor, m, im, max_new_tokens=NEW_TOKENS) for m, im in convs]
    # Make some replies end early: a token that some replies generate (after their start) becomes the
    # stop token, so rows finish at different steps and the finished ones are padded while others go on.
    stopper = (
        processor.tokenizer.eos_token_id
        if stop == "eos"
        else processor.tokenizer.convert_tokens_to_ids("###")
    )
    common = free[0].token_ids[3]
    force_token(model, stopper, common)
    reference = [greedy_generate(model, processor, m, im, max_new_tokens=NEW_TOKENS) for m, im in convs]
    ended = [len(r.token_ids) < NEW_TOKENS or r.token_ids[-1] == stopper for r in reference]
    assert any(ended) and not all(len(r.token_ids) == len(reference[0].token_ids) for r in reference)
    batched = generate_batch(model, processor, convs, max_new_tokens=NEW_TOKENS)
    for ours, theirs in zip(batched, reference, strict=True):
        assert ours.token_ids == theirs.token_ids
        assert ours.text == theirs.text
    # Order and batch composition do not change a reply.
    alone = generate_batch(model, processor, convs[3:4], max_new_tokens=NEW_TOKENS)
    assert alone[0].token_ids == reference[3].token_ids


def test_prompt_styles(data_dir):
    records = datasets.vqa_rad(data_dir / "vqa-rad", "test")
    closed = next(r for r in records if r.answer_type == "CLOSED" and r.answer.lower() in ("yes", "no"))
    opened = next(r for r in records if r.answer_type == "OPEN")
    (_, turn, images), (_, open_turn, _) = vqa_questions([closed, opened], "llava-med")
    assert turn == f"{closed.question}{YES_NO_OPTIONS}\n<image>" and images == [closed.image]
    assert open_turn == f"{opened.question}\n<image>"
    assert vqa_questions([closed], "plain")[0][1] == f"<image>\n{closed.question}"
    with pytest.raises(ValueError, match="unknown prompt style 'fancy'"):
        AnswerConfig(prompt_style="fancy")


def test_answer_file_resumes_and_a_bad_image_skips_only_its_question(tmp_path, data_dir):
    model, processor = build("tiny-v1.5", seed=0)
    records = datasets.vqa_rad(data_dir / "vqa-rad", "test")[:7]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Image.open(records[2].image).tobytes()[:500])  # not an image file at all
    records[2] = datasets.VQARecord(**{**records[2].to_json(), "image": str(broken)})
    config = AnswerConfig(batch_size=3, max_new_tokens=4, model_id="tiny")
    out = tmp_path / "answers.jsonl"
    first = answer_questions(model, processor, vqa_questions(records[:5], "llava-med"), out, config)
    assert first["answered"] == 4 and list(first["failed"]) == [records[2].question_id]
    assert "broken.jpg" in first["failed"][records[2].question_id]
    # A crash mid-write leaves a cut line; the next run cuts it off and answers only what is missing.
    with open(out, "a") as handle:
        handle.write('{"question_id": "cut')
    second = answer_questions(model, processor, vqa_questions(records, "llava-med"), out, config)
    assert second["skipped_done"] == 4 and second["answered"] == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [r.question_id for r in records if r.image != str(broken)]
    assert set(rows[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert rows[0]["metadata"] == {"prompt_style": "llava-med", "noise_images": False, "max_new_tokens": 4}
    # The same questions answered again from scratch give the same file (greedy, deterministic).
    again = tmp_path / "again.jsonl"
    answer_questions(model, processor, vqa_questions(records, "llava-med"), again, config)
    assert again.read_text() == out.read_text()


def test_noise_images_replace_every_image_deterministically(tmp_path, data_dir):
    model, processor = build("tiny-v1.5", seed=1)
    records = datasets.vqa_rad(data_dir / "vqa-rad", "test")[:4]
    items = vqa_questions(records, "plain")
    real = answer_questions(model, processor, items, tmp_path / "real.jsonl", AnswerConfig(max_new_tokens=6))
    noise_config = AnswerConfig(max_new_tokens=6, noise_images=True)
    answer_questions(model, processor, items, tmp_path / "noise1.jsonl", noise_config)
    answer_questions(model, processor, items[::-1], tmp_path / "noise2.jsonl", noise_config)
    assert real["answered"] == 4

    def texts(name):
        return {
            json.loads(line)["question_id"]: json.loads(line)["text"]
            for line in (tmp_path / name).read_text().splitlines()
        }

    assert texts("noise1.jsonl") == texts("noise2.jsonl")  # noise drawn per question, not per position
    assert texts("noise1.jsonl") != texts("real.jsonl")


def test_a_resumed_answer_file_must_have_been_made_with_the_same_settings(tmp_path, data_dir):
    model, processor = build("tiny-v1.5", seed=0)
    records = datasets.vqa_rad(data_dir / "vqa-rad", "test")[:3]
    config = AnswerConfig(max_new_tokens=3, model_id="tiny")
    out = tmp_path / "answers.jsonl"
    answer_questions(model, processor, vqa_questions(records[:2], "llava-med"), out, config)
    before = out.read_text()
    first = records[0].question_id
    changes = [
        ("model_id", "tiny", "other"),
        ("prompt_style", "llava-med", "plain"),
        ("max_new_tokens", 3, 4),
        ("noise_images", False, True),
    ]
    for name, old, new in changes:
        changed = replace(config, **{name: new})
        items = vqa_questions(records, changed.prompt_style)
        with pytest.raises(
            AnswerFileError,
            match=rf"answers.jsonl: line 1: question {first} was answered with {name} {old!r}, this run asks "
            rf"for {new!r}; answer into another --out"
            + (
                rf" or pass --model-id {old!r} if it is the same model, \(or"
                if name == "model_id"
                else r" \(or"
            ),
        ):
            answer_questions(model, processor, items, out, changed)
        assert out.read_text() == before, name  # nothing answered, nothing lost
    # The same id asked differently (another question file) is not the same question.
    reworded = [datasets.VQARecord(**{**records[0].to_json(), "question": "Reworded?"}), *records[1:]]
    with pytest.raises(AnswerFileError, match=rf"line 1: question {first} was answered with the prompt"):
        answer_questions(model, processor, vqa_questions(reworded, "llava-med"), out, config)
    # The same settings resume: only the missing question is answered.
    done = answer_questions(model, processor, vqa_questions(records, "llava-med"), out, config)
    assert (done["answered"], done["skipped_done"]) == (1, 2)


def test_answer_command_refuses_what_it_cannot_do_before_loading_a_model(tmp_path, data_dir, capsys):
    from llavamed_fast.cli import main

    questions = datasets.write_jsonl(datasets.vqa_rad(data_dir / "vqa-rad", "test")[:2], tmp_path / "q.jsonl")
    out = tmp_path / "answers.jsonl"
    base = ["eval", "answer", "--questions", str(questions), "--out", str(out), "--device", "cpu"]
    missing = tmp_path / "no_such_checkpoint"
    assert main([*base, "--model", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    for option in ("--batch-size", "--max-new-tokens"):
        with pytest.raises(SystemExit) as stop:
            main([*base, "--model", str(missing), option, "0"])
        assert (
            stop.value.code == 2
            and f"argument {option}: must be at least 1, got 0" in capsys.readouterr().err
        )
    # An answer file that cannot be resumed is named before the (here missing) model would be loaded.
    settings = AnswerConfig().recorded()  # the command's defaults
    row = {"question_id": "x", "prompt": "p", "text": "t", "model_id": missing.name, "metadata": settings}
    out.write_text(json.dumps(row) + "\nnot json\n")
    assert main([*base, "--model", str(missing)]) == 2
    assert "answers.jsonl: line 2: not an answer record" in capsys.readouterr().err
    out.write_text(json.dumps({**row, "metadata": {**settings, "prompt_style": "plain"}}) + "\n")
    assert main([*base, "--model", str(missing)]) == 2
    assert "line 1: question x was answered with prompt_style 'plain'" in capsys.readouterr().err


def test_a_plain_transformers_checkpoint_answers_with_a_named_template(tmp_path, data_dir, capsys):
    from llavamed_fast.cli import main

    model, processor = build("tiny-v1.5", seed=0)
    plain = save_pretrained(model, processor, tmp_path / "plain")
    (plain / "llavamed_fast.json").unlink()  # as a checkpoint from another LLaVA trainer
    questions = datasets.write_jsonl(datasets.vqa_rad(data_dir / "vqa-rad", "test")[:2], tmp_path / "q.jsonl")
    base = ["eval", "answer", "--questions", str(questions), "--model", str(plain), "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "a.jsonl")]) == 2
    assert "name its chat template (--template" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b.jsonl"), "--template", "mistral_instruct"]) == 0
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 2
