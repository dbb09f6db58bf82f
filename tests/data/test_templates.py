"""Chat templates: golden renderings, labels from token spans, and Jinja exports equal to our renderer."""

from __future__ import annotations

import jinja2
import numpy as np
import pytest

from llavamed_fast.data.templates import (
    TEMPLATES,
    ConversationError,
    ImageTokens,
    LabelAlignmentError,
    Message,
    chat_template,
    encode,
    get_template,
    render,
    supervised_tokens,
)
from llavamed_fast.model.processor import tiny_tokenizer

CONVERSATION = [
    Message("user", "<image>\nWhat does the scan show?"),
    Message("assistant", "A chest X-ray with a left effusion."),
    Message("user", "Is the heart enlarged?"),
    Message("assistant", "No."),
]

V0_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# Written out by hand from the released formats (docs: FORMATS.md), not produced by the code under test.
GOLDEN = {
    "v0": (
        "<s>" + V0_SYSTEM + "\n\n"
        "### Human: <image>\nWhat does the scan show?\n"
        "### Assistant: A chest X-ray with a left effusion.\n"
        "### Human: Is the heart enlarged?\n"
        "### Assistant: No.\n"
        "### ",
        [" A chest X-ray with a left effusion.\n###", " No.\n###"],
    ),
    "vicuna_v1": (
        "<s>" + VICUNA_SYSTEM + " USER: <image>\nWhat does the scan show? "
        "ASSISTANT: A chest X-ray with a left effusion.</s>"
        "USER: Is the heart enlarged? ASSISTANT: No.</s>",
        [" A chest X-ray with a left effusion.</s>", " No.</s>"],
    ),
    "mistral_instruct": (
        "<s>[INST] <image>\nWhat does the scan show? [/INST] A chest X-ray with a left effusion. </s>"
        "[INST] Is the heart enlarged? [/INST] No. </s>",
        [" A chest X-ray with a left effusion. </s>", " No. </s>"],
    ),
    "llama3": (
        "<s><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat does the scan show?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA chest X-ray with a left effusion.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nIs the heart enlarged?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nNo.<|eot_id|>",
        ["A chest X-ray with a left effusion.<|eot_id|>", "No.<|eot_id|>"],
    ),
}

GENERATION_PROMPTS = {
    "v0": "<s>" + V0_SYSTEM + "\n\n### Human: <image>\nWhat does the scan show?\n### Assistant:",
    "vicuna_v1": "<s>" + VICUNA_SYSTEM + " USER: <image>\nWhat does the scan show? ASSISTANT:",
    "mistral_instruct": "<s>[INST] <image>\nWhat does the scan show? [/INST]",
    "llama3": "<s><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat does the scan show?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
}


def test_every_template_has_a_golden_example():
    assert set(GOLDEN) == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_rendering(name):
    text, supervised = GOLDEN[name]
    rendered = render(get_template(name), CONVERSATION, bos_token="<s>")
    assert rendered.text == text
    assert rendered.supervised_text() == supervised


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_generation_prompt(name):
    rendered = render(get_template(name), CONVERSATION[:1], bos_token="<s>", add_generation_prompt=True)
    assert rendered.text == GENERATION_PROMPTS[name]
    assert rendered.supervised == ()


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_labels_supervise_exactly_the_replies(name):
    tokenizer = tiny_tokenizer()
    rendered = render(get_template(name), CONVERSATION, bos_token="<s>")
    image = ImageTokens(tokenizer.convert_tokens_to_ids("<image>"), 5)
    encoded = encode(rendered, tokenizer, image, num_images=1)
    supervised_ids = encoded.labels[encoded.labels != -100]
    assert tokenizer.decode(supervised_ids) == "".join(GOLDEN[name][1])
    # The image placeholder became 5 unsupervised copies of the image token.
    start = int(encoded.image_starts[0])
    assert (encoded.input_ids[start : start + 5] == image.token_id).all()
    assert (encoded.labels[start : start + 5] == -100).all()
    assert (encoded.input_ids == image.token_id).sum() == 5
    # Dropping the images gives back the tokenizer's own encoding of the full text.
    plain = tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
    keep = np.ones(len(encoded.input_ids), dtype=bool)
    keep[start + 1 : start + 5] = False
    assert encoded.input_ids[keep].tolist() == plain


@pytest.mark.parametrize("name", sorted(GOLDEN))
@pytest.mark.parametrize("placeholder", ["<image>", "<im_start><image><im_end>"])
def test_jinja_export_renders_the_same(name, placeholder):
    template = get_template(name)
    jinja = jinja2.Environment().from_string(chat_template(template, placeholder))
    as_parts = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What does the scan show?"}],
        },
        {"role": "assistant", "content": "A chest X-ray with a left effusion."},
        {"role": "user", "content": [{"type": "text", "text": "Is the heart enlarged?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
    ]
    expected = render(template, CONVERSATION, bos_token="<s>", image_placeholder=placeholder).text
    assert jinja.render(messages=as_parts, bos_token="<s>", add_generation_prompt=False) == expected
    as_strings = [{"role": m.role, "content": m.content} for m in CONVERSATION]
    assert jinja.render(messages=as_strings, bos_token="<s>", add_generation_prompt=False) == expected
    prompt = render(
        template, CONVERSATION[:3], bos_token="<s>", image_placeholder=placeholder, add_generation_prompt=True
    )
    assert jinja.render(messages=as_parts[:3], bos_token="<s>", add_generation_prompt=True) == prompt.text
    system = [{"role": "system", "content": "Be brief."}, *as_strings]
    with_system = render(
        template,
        [Message("system", "Be brief."), *CONVERSATION],
        bos_token="<s>",
        image_placeholder=placeholder,
    )
    assert jinja.render(messages=system, bos_token="<s>", add_generation_prompt=False) == with_system.text


def test_system_message_placement():
    system = Message("system", "You are a radiology assistant.")
    v0 = render(get_template("v0"), [system, *CONVERSATION[:2]])
    assert v0.text.startswith("You are a radiology assistant.\n\n### Human: ")
    mistral = render(get_template("mistral_instruct"), [system, *CONVERSATION[:2]])
    assert mistral.text.startswith("[INST] You are a radiology assistant.\n\n<image>\nWhat does")


def test_image_placement_is_kept():
    after = [Message("user", "What does the scan show?\n<image>"), Message("assistant", "A scan.")]
    rendered = render(get_template("mistral_instruct"), after)
    assert rendered.text == "[INST] What does the scan show?\n<image> [/INST] A scan. </s>"


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "at least one user turn"),
        ([Message("assistant", "Hi")], "expected 'user'"),
        ([Message("user", "a"), Message("user", "b")], "expected 'assistant'"),
        ([Message("system", "s"), Message("user", "bad \ud800 text")], "message 1 holds a lone surrogate"),
    ],
)
def test_bad_conversations_are_errors(messages, match):
    with pytest.raises(ConversationError, match=match):
        render(get_template("v0"), messages)


def test_image_count_must_match():
    tokenizer = tiny_tokenizer()
    rendered = render(get_template("mistral_instruct"), CONVERSATION, bos_token="<s>")
    image = ImageTokens(tokenizer.convert_tokens_to_ids("<image>"), 3)
    with pytest.raises(ConversationError, match="rec 7: the text has 1 image placeholder"):
        encode(rendered, tokenizer, image, num_images=2, where="rec 7: ")


def test_straddling_token_is_an_error_not_a_silent_shift():
    text = "USER: hi ASSISTANT:yes"
    supervised = [(text.index("yes"), len(text))]
    offsets = [(0, 5), (5, 8), (8, 18), (18, 22)]  # the last token, ":yes", crosses into the reply
    with pytest.raises(LabelAlignmentError, match="rec 3: token 3 covers ':yes'"):
        supervised_tokens(text, supervised, offsets, where="rec 3: ")


def test_whitespace_does_not_decide_supervision():
    text = "A: x\nB: y"
    spans = [(3, 5)]  # "x\n"
    # "\n" alone is supervised (inside the span); " x" is supervised (its only solid char is); "B" is not.
    offsets = [(0, 2), (2, 4), (4, 5), (5, 6), (6, 9)]
    assert supervised_tokens(text, spans, offsets).tolist() == [False, True, True, False, False]
    assert supervised_tokens(text, [], [(0, 0)]).tolist() == [False]  # zero-width tokens are never supervised
