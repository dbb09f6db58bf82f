"""Greedy generation: token for token what transformers' Llava generates, stopping where it stops."""

from __future__ import annotations

import pytest
import torch
from conftest import force_token
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llavamed_fast.data.templates import Message
from llavamed_fast.model import build, save_pretrained
from llavamed_fast.model.generate import GenerationResult, greedy_generate

NEW_TOKENS = 12
TURNS = [("Is there a lesion?", "Yes, in the right lung."), ("Which side is it on?", None)]


def our_messages() -> list[Message]:
    messages = [Message("user", "<image>\n" + TURNS[0][0]), Message("assistant", TURNS[0][1])]
    return [*messages, Message("user", TURNS[1][0])]


def hf_messages() -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TURNS[0][0]}]},
        {"role": "assistant", "content": TURNS[0][1]},
        {"role": "user", "content": TURNS[1][0]},
    ]


@pytest.mark.parametrize(
    ("preset", "stop"),
    [
        ("tiny-v0", "length"),
        ("tiny-v0", "eos"),
        ("tiny-v0", "stop_string"),  # "###"
        ("tiny-v1.5", "length"),
        ("tiny-v1.5", "eos"),  # "</s>" is both EOS and the template's stop string
    ],
)
def test_same_tokens_as_transformers_generate(preset, stop, tmp_path, vqa_rad_images):
    model, processor = build(preset, seed=11)
    image = Image.open(vqa_rad_images[3]).convert("RGB")
    free = greedy_generate(model, processor, our_messages(), [image], max_new_tokens=NEW_TOKENS)
    assert len(free.token_ids) == NEW_TOKENS  # the random model never stops by itself
    # Where it is made to stop: the first token, after two, that it has not generated before.
    at = next(i for i in range(2, NEW_TOKENS - 1) if free.token_ids[i] not in free.token_ids[:i])
    if stop != "length":
        # The token it generates there becomes EOS / "###".
        stopper = (
            processor.tokenizer.eos_token_id
            if stop == "eos"
            else processor.tokenizer.convert_tokens_to_ids("###")
        )
        assert stopper not in free.token_ids
        force_token(model, stopper, free.token_ids[at])

    ours = greedy_generate(model, processor, our_messages(), [image], max_new_tokens=NEW_TOKENS)
    directory = save_pretrained(model, processor, tmp_path / "ckpt")
    hf = LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    hf_processor = AutoProcessor.from_pretrained(directory)
    text = hf_processor.apply_chat_template(hf_messages(), add_generation_prompt=True, tokenize=False)
    inputs = hf_processor(text=text, images=[image], return_tensors="pt", add_special_tokens=False)
    assert (
        inputs["input_ids"][0].tolist()
        == processor.encode(our_messages(), num_images=1, add_generation_prompt=True).input_ids.tolist()
    )
    # EOS comes from the checkpoint's generation config; the stop string is the template's, as a
    # server would pass it. Both engines then stop at the same token, whatever the reason.
    output = hf.generate(
        **inputs,
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        stop_strings=processor.template.stop,
        tokenizer=hf_processor.tokenizer,
    )
    theirs = output[0, inputs["input_ids"].shape[1] :].tolist()
    assert ours.token_ids == theirs, (ours.token_ids, theirs)

    if stop == "length":
        assert ours.token_ids == free.token_ids
    else:
        assert ours.token_ids == [*free.token_ids[:at], stopper]
        expected = processor.tokenizer.decode(free.token_ids[:at]).strip()
        assert ours.text == expected and processor.template.stop not in ours.text


class ScriptedLogits:
    """Stands in for ``model.logits``: emits ``script`` one token per step, and records what it saw."""

    def __init__(self, model, prompt_length: int, script: list[int]) -> None:
        self.model, self.prompt_length, self.script = model, prompt_length, script
        self.vocab = model.language_model.get_output_embeddings().weight.shape[0]
        self.batches, self.modes = [], []

    def __call__(self, batch):
        self.batches.append(batch)
        self.modes.append(self.model.training)
        step = batch.num_tokens - self.prompt_length
        logits = torch.zeros(batch.num_tokens, self.vocab)
        logits[-1, self.script[step]] = 1.0
        return logits


@pytest.fixture(scope="module")
def tiny_v0():
    return build("tiny-v0", seed=1)


def scripted(monkeypatch, model, processor, text: str, extra: list[int] = ()) -> ScriptedLogits:
    prompt = processor.encode(our_messages(), num_images=1, add_generation_prompt=True)
    script = processor.tokenizer(text, add_special_tokens=False)["input_ids"] + list(extra)
    fake = ScriptedLogits(model, len(prompt.input_ids), script)
    monkeypatch.setattr(model, "logits", fake)
    return fake


def image() -> Image.Image:
    return Image.new("RGB", (50, 40), (90, 90, 90))


def test_stop_string_ends_the_reply_and_is_cut(monkeypatch, tiny_v0):
    model, processor = tiny_v0
    script = processor.tokenizer(" Yes.\n### junk after", add_special_tokens=False)["input_ids"]
    assert processor.tokenizer.convert_ids_to_tokens(script[3]) == "###"
    scripted(monkeypatch, model, processor, " Yes.\n### junk after")
    result = greedy_generate(model, processor, our_messages(), [image()])
    assert result == GenerationResult("Yes.", script[:4])


def test_stop_string_spread_over_tokens(monkeypatch, tiny_v0):
    model, processor = tiny_v0
    tokenizer = processor.tokenizer
    pieces = [tokenizer.convert_tokens_to_ids(t) for t in ("ĠNo", ".", "#", "##", "Ġthe")]
    assert tokenizer.unk_token_id not in pieces
    fake = scripted(monkeypatch, model, processor, "", pieces)
    assert greedy_generate(model, processor, our_messages(), [image()]) == GenerationResult("No.", pieces[:4])
    assert len(fake.batches) == 4


def test_eos_ends_the_reply(monkeypatch, tiny_v0):
    model, processor = tiny_v0
    eos = processor.tokenizer.eos_token_id
    scripted(monkeypatch, model, processor, " Left.", [eos, 5, 6])
    result = greedy_generate(model, processor, our_messages(), [image()])
    assert result.text == "Left." and result.token_ids[-1] == eos and len(result.token_ids) == 3


def test_length_limit_features_once_and_mode_restored(monkeypatch, tiny_v0):
    model, processor = tiny_v0
    fake = scripted(monkeypatch, model, processor, " a b c d e f g h")
    calls = []
    image_features = model.image_features
    monkeypatch.setattr(
        model, "image_features", lambda pixels: calls.append(pixels) or image_features(pixels)
    )
    model.train()
    result = greedy_generate(model, processor, our_messages(), [image()], max_new_tokens=5)
    assert result.text == "a b c d e" and len(result.token_ids) == 5
    assert len(calls) == 1 and len(fake.batches) == 5
    # Each step reruns the LLM only: features, no pixels, and the prompt plus what came before.
    assert all(b.pixel_values is None and b.image_features is not None for b in fake.batches)
    assert [b.num_tokens for b in fake.batches] == [fake.prompt_length + i for i in range(5)]
    assert fake.modes == [False] * 5
    assert model.training and not model.vision_tower.training  # frozen tower stays in eval mode
    model.eval()
    greedy_generate(model, processor, our_messages(), [image()], max_new_tokens=2)
    assert not model.training


def test_pixel_values_and_images_give_the_same_reply(vqa_rad_images):
    model, processor = build("tiny-v1.5", seed=2)
    images = [Image.open(vqa_rad_images[0]).convert("RGB")]
    from_images = greedy_generate(model, processor, our_messages(), images, max_new_tokens=6)
    pixels = processor.preprocess_images(images)
    assert greedy_generate(model, processor, our_messages(), pixels, max_new_tokens=6) == from_images
    text_only = greedy_generate(model, processor, [Message("user", "Hello")], [], max_new_tokens=3)
    assert len(text_only.token_ids) == 3
    with pytest.raises(ValueError, match=r"pixel values must be \[N, 3, H, W\]"):
        greedy_generate(model, processor, our_messages(), pixels[0], max_new_tokens=6)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        greedy_generate(model, processor, our_messages(), images, max_new_tokens=0)
