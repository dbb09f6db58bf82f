"""Serving a saved checkpoint with transformers' own processor: which calls give our exact prompt tokens.

Our saved chat template starts with BOS, as Mistral-Instruct's and LLaMA-2-chat's templates do, because
serving engines (vLLM's chat API) and ``tokenizer.apply_chat_template`` tokenize the rendered text without
adding special tokens. transformers' processor then needs ``add_special_tokens=False`` when the rendered
text is tokenized as a second step (docs/SERVING.md); its one-step ``apply_chat_template(tokenize=True)``
sees the leading BOS and does that itself.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from llavamed_fast.data.templates import Message
from llavamed_fast.model import build, save_pretrained

OURS = [
    Message("user", "<image>\nWhat does this scan show?"),
    Message("assistant", "A chest X-ray."),
    Message("user", "Is the heart enlarged?"),
]


def theirs(image: Image.Image | None) -> list[dict]:
    """``OURS`` as transformers' messages; ``image`` travels in the part for the one-step call."""
    first = {"type": "image", **({"image": image} if image is not None else {})}
    return [
        {"role": "user", "content": [first, {"type": "text", "text": "What does this scan show?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A chest X-ray."}]},
        {"role": "user", "content": [{"type": "text", "text": "Is the heart enlarged?"}]},
    ]


@pytest.mark.parametrize("preset", ["tiny-v1.5", "tiny-v0"])
def test_transformers_processor_calls_give_our_prompt_tokens(preset, tmp_path, vqa_rad_images):
    model, processor = build(preset, seed=2)
    hf = AutoProcessor.from_pretrained(save_pretrained(model, processor, tmp_path / "ckpt"))
    image = Image.open(vqa_rad_images[7]).convert("RGB")
    ours = processor.encode(OURS, num_images=1, add_generation_prompt=True).input_ids.tolist()
    pixels = processor.preprocess_images([image])

    # Two steps, as documented: render, then tokenize without adding BOS a second time.
    text = hf.apply_chat_template(theirs(None), add_generation_prompt=True)
    two_step = hf(text=text, images=[image], add_special_tokens=False, return_tensors="pt")
    assert two_step["input_ids"][0].tolist() == ours
    torch.testing.assert_close(two_step["pixel_values"], pixels, atol=0, rtol=0)
    # One step: transformers sees the template's BOS and adds none.
    one_step = hf.apply_chat_template(
        theirs(image), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert one_step["input_ids"][0].tolist() == ours
    torch.testing.assert_close(one_step["pixel_values"], pixels, atol=0, rtol=0)
    # The tokenizer's own template call (what text-only engines use) never adds special tokens: the BOS in
    # the template is the only one, which is why the template keeps it.
    text_only = [Message("user", "Is the heart enlarged?")]
    assert (
        hf.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Is the heart enlarged?"}], add_generation_prompt=True, tokenize=True
        )["input_ids"]
        == processor.encode(text_only, num_images=0, add_generation_prompt=True).input_ids.tolist()
    )
    # The pitfall the docs warn about: tokenizing the rendered text with the defaults adds a second BOS.
    doubled = hf(text=text, images=[image])["input_ids"][0]
    assert list(doubled) == [hf.tokenizer.bos_token_id, *ours]
