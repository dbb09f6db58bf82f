"""Build a LlavaMed model and its processor from a preset or a ModelConfig."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, PreTrainedModel

from llavamed_fast.model.config import ModelConfig, get_preset
from llavamed_fast.model.llava_med import LlavaMed
from llavamed_fast.model.processor import LlavaMedProcessor, load_tokenizer

VOCAB_MULTIPLE = 64
"""Embedding rows are padded to a multiple of 64: GEMMs over the vocabulary tile evenly on GPUs."""


def padded_vocab(count: int) -> int:
    """Embedding rows for ``count`` tokens: the next multiple of :data:`VOCAB_MULTIPLE`."""
    return -(-count // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _vision_tower(config: ModelConfig, dtype: torch.dtype | None) -> CLIPVisionModel:
    if isinstance(config.vision, str):
        return CLIPVisionModel.from_pretrained(config.vision, dtype=dtype)
    return CLIPVisionModel(CLIPVisionConfig(**config.vision)).to(dtype)


def _language_model(config: ModelConfig, tokenizer, dtype: torch.dtype | None) -> PreTrainedModel:
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if isinstance(config.text, str):
        model = AutoModelForCausalLM.from_pretrained(config.text, dtype=dtype)
        # New rows (image tokens, <im_start>/<im_end>) start at the mean of the existing embeddings.
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=VOCAB_MULTIPLE, mean_resizing=True)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model
    fields: Mapping = dict(config.text)
    vocab = padded_vocab(len(tokenizer))
    text_config = AutoConfig.for_model(**{**fields, **special, "vocab_size": vocab})
    return AutoModelForCausalLM.from_config(text_config, dtype=dtype or torch.float32)


def build(
    config: ModelConfig | str, *, dtype: torch.dtype | None = None, seed: int | None = None
) -> tuple[LlavaMed, LlavaMedProcessor]:
    """The model and its processor. Pretrained parts load from hub ids or local paths; mapping parts are
    random-init from config (``seed`` makes that reproducible without touching the global RNG)."""
    config = get_preset(config) if isinstance(config, str) else config
    tokenizer = load_tokenizer(config)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        vision = _vision_tower(config, dtype)
        text = _language_model(config, tokenizer, dtype)
        processor = LlavaMedProcessor.from_config(
            config,
            image_size=vision.config.image_size,
            patch_size=vision.config.patch_size,
            tokenizer=tokenizer,
        )
        model = LlavaMed(
            config,
            vision,
            text,
            image_token_id=processor.image_tokens.token_id,
            tokens_per_image=processor.image_tokens.count,
        )
    if dtype is not None:
        model.to(dtype)
    return model, processor
