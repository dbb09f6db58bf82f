"""Text and image preprocessing for one model: tokenizer, image processor, chat template, image tokens.

The image processor is transformers' LLaVA image processor (PIL backend, so the result does not depend
on whether torchvision is installed): resize the short side + centre crop (v0), or pad to a square with
the CLIP mean colour first (v1.5). The same objects are saved into checkpoints as a Hugging Face
``LlavaProcessor``, so transformers and serving engines preprocess exactly as training did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, LlavaProcessor, PreTrainedTokenizerFast
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from llavamed_fast.data.templates import (
    IMAGE_TOKEN,
    ConversationTemplate,
    Encoded,
    ImageTokens,
    Message,
    chat_template,
    encode,
    get_template,
    render,
)
from llavamed_fast.model.config import TINY_TOKENIZER, ImageResize, ModelConfig

IMAGE_START, IMAGE_END = "<im_start>", "<im_end>"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer of the tiny presets, shipped with the package (no download)."""
    path = resources.files("llavamed_fast.model") / "tiny_tokenizer.json"
    with resources.as_file(path) as file:
        return PreTrainedTokenizerFast(
            tokenizer_file=str(file),
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            extra_special_tokens={"image_token": IMAGE_TOKEN},
        )


def load_tokenizer(config: ModelConfig):
    """The model's tokenizer with the image tokens it needs added as special tokens."""
    tokenizer = (
        tiny_tokenizer()
        if config.tokenizer == TINY_TOKENIZER
        else AutoTokenizer.from_pretrained(config.tokenizer)
    )
    if not tokenizer.is_fast:
        raise ValueError(
            f"tokenizer {config.tokenizer!r} is not a fast tokenizer; labels need offset mappings"
        )
    needed = [IMAGE_TOKEN] + ([IMAGE_START, IMAGE_END] if config.image_start_end else [])
    missing = [t for t in needed if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    if tokenizer.pad_token is None:
        # LLaMA-family tokenizers have no pad token; packing never pads text, but batched generation does.
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


def image_processor_for(config: ModelConfig, image_size: int) -> LlavaImageProcessorPil:
    return LlavaImageProcessorPil(
        do_pad=config.image_resize is ImageResize.PAD_TO_SQUARE,
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )


@dataclass
class LlavaMedProcessor:
    """Everything needed to turn a conversation with images into model inputs."""

    tokenizer: PreTrainedTokenizerFast
    image_processor: LlavaImageProcessorPil
    template: ConversationTemplate
    image_tokens: ImageTokens
    image_placeholder: str
    max_length: int
    patch_size: int

    @classmethod
    def from_config(
        cls, config: ModelConfig, *, image_size: int, patch_size: int, tokenizer=None
    ) -> LlavaMedProcessor:
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config)
        count = (image_size // patch_size) ** 2  # CLS dropped
        return cls(
            tokenizer=tokenizer,
            image_processor=image_processor_for(config, image_size),
            template=get_template(config.template),
            image_tokens=ImageTokens(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), count),
            image_placeholder=config.image_placeholder,
            max_length=config.max_length,
            patch_size=patch_size,
        )

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False):
        return render(
            self.template,
            messages,
            bos_token=self.tokenizer.bos_token or "",
            image_placeholder=self.image_placeholder,
            add_generation_prompt=add_generation_prompt,
        )

    def encode(
        self,
        messages: Sequence[Message],
        *,
        num_images: int,
        add_generation_prompt: bool = False,
        where: str = "",
    ) -> Encoded:
        """Token ids, labels and image token starts of a conversation (not truncated)."""
        rendered = self.render(messages, add_generation_prompt=add_generation_prompt)
        return encode(rendered, self.tokenizer, self.image_tokens, num_images=num_images, where=where)

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[N, 3, S, S]`` float32 pixel values."""
        if not images:
            size = self.image_processor.crop_size["height"]
            return torch.zeros(0, 3, size, size)
        out = self.image_processor(list(images), return_tensors="np")["pixel_values"]
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    def to_hf(self) -> LlavaProcessor:
        """The equivalent Hugging Face processor (with our chat template as Jinja)."""
        return LlavaProcessor(
            image_processor=self.image_processor,
            tokenizer=self.tokenizer,
            patch_size=self.patch_size,
            vision_feature_select_strategy="default",
            chat_template=chat_template(self.template, self.image_placeholder),
            image_token=IMAGE_TOKEN,
            num_additional_image_tokens=1,
        )

    def save_pretrained(self, directory: str | Path) -> None:
        self.to_hf().save_pretrained(str(directory))
