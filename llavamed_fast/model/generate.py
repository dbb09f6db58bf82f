"""Greedy decoding for one conversation: small and obviously correct, the reference for faster engines.

Every step reruns the LLM over the whole sequence (no KV cache), through the same packed path that training
uses (:meth:`LlavaMed.logits` on a one-sample :class:`PackedBatch`); the vision tower runs once and its
features ride along as ``image_features``. Generation stops at the tokenizer's EOS token, at the chat
template's stop string, or after ``max_new_tokens``, the way transformers' ``generate`` does with
``eos_token_id`` and ``stop_strings``; the tests hold the two token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from llavamed_fast.data.packing import Sample, collate
from llavamed_fast.data.templates import IGNORE_INDEX, Message
from llavamed_fast.model.llava_med import LlavaMed
from llavamed_fast.model.processor import LlavaMedProcessor


@torch.no_grad()
def left_padded_prompts(
    model: LlavaMed,
    processor: LlavaMedProcessor,
    prompts: Sequence[tuple[np.ndarray, np.ndarray, Sequence[Image.Image]]],
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Input embeddings of several encoded prompts for cached decoding: ``(embeds [B, W, D], mask [B, W],
    lengths)``, each prompt left-padded to the longest (``mask`` 1 on real tokens).

    ``prompts`` holds ``(input_ids, image_starts, images)`` per prompt. The vision tower runs once for all
    images; the prompts are embedded as one packed row (image features in their rows), then laid out.
    """
    device = next(model.parameters()).device
    pictures = [image for _, _, images in prompts for image in images]
    features = model.image_features(processor.preprocess_images(pictures).to(device)) if pictures else None
    samples, used = [], 0
    for number, (ids, image_starts, images) in enumerate(prompts):
        own = features[used : used + len(images)] if images else None
        used += len(images)
        ids = np.asarray(ids, dtype=np.int64)
        samples.append(Sample(str(number), ids, np.full_like(ids, IGNORE_INDEX), image_starts, None, own))
    embeds = model.embed(collate(samples).to(device))  # [T, D]
    lengths = [len(s) for s in samples]
    width = max(lengths)
    padded = embeds.new_zeros(len(samples), width, embeds.shape[-1])
    mask = torch.zeros(len(samples), width, dtype=torch.long, device=device)
    for row, (start, length) in enumerate(zip(np.cumsum([0, *lengths[:-1]]), lengths, strict=True)):
        padded[row, width - length :] = embeds[start : start + length]
        mask[row, width - length :] = 1
    return padded, mask, lengths


@dataclass(frozen=True)
class GenerationResult:
    text: str
    """The reply: decoded up to (not including) the EOS token or the stop string, stripped."""
    token_ids: list[int]
    """Every generated token, including the EOS token or the tokens that completed the stop string."""


@torch.no_grad()
def greedy_generate(
    model: LlavaMed,
    processor: LlavaMedProcessor,
    messages: Sequence[Message],
    images: Sequence[Image.Image] | torch.Tensor,
    *,
    max_new_tokens: int = 32,
) -> GenerationResult:
    """The greedy (argmax) reply to ``messages``, which end with a user turn.

    Args:
        model: the model; it is put in eval mode for the call and then back in its previous mode.
        processor: the model's processor (chat template, tokenizer, image preprocessing).
        messages: the conversation; ``<image>`` marks where each image goes.
        images: PIL images, or already preprocessed pixel values ``[N, 3, H, W]`` (float).
        max_new_tokens: the most tokens to generate.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"pixel values must be [N, 3, H, W], got {tuple(images.shape)}")
        pixels = images
    else:
        pixels = processor.preprocess_images(list(images))
    encoded = processor.encode(messages, num_images=pixels.shape[0], add_generation_prompt=True)
    tokenizer = processor.tokenizer
    stop, eos = processor.template.stop, tokenizer.eos_token_id
    device = next(model.parameters()).device

    was_training = model.training
    model.eval()
    try:
        # The images enter every step as these features, never again as pixels.
        features = model.image_features(pixels.to(device)) if pixels.shape[0] else None
        prompt = [int(i) for i in encoded.input_ids]
        generated: list[int] = []
        text = ""
        for _ in range(max_new_tokens):
            ids = np.asarray(prompt + generated, dtype=np.int64)
            labels = np.full_like(ids, IGNORE_INDEX)
            sample = Sample("generate", ids, labels, encoded.image_starts, None, image_features=features)
            batch = collate([sample]).to(device)
            generated.append(int(model.logits(batch)[-1].argmax()))
            if generated[-1] == eos:
                return GenerationResult(tokenizer.decode(generated[:-1]).strip(), generated)
            # Decoded anew each step: a stop string may span tokens, and a token may end in the middle of
            # a multi-byte character that only the next token completes.
            text = tokenizer.decode(generated)
            if stop and stop in text:
                return GenerationResult(text[: text.index(stop)].strip(), generated)
        return GenerationResult(text.strip(), generated)
    finally:
        model.train(was_training)
