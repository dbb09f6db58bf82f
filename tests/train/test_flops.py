"""FLOP counts against hand counts from the configs, against torch's FlopCounterMode, and at 7B shapes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from llavamed_fast.data.packing import Sample, collate
from llavamed_fast.model import build
from llavamed_fast.model.config import get_preset
from llavamed_fast.model.llava_med import LlavaMed
from llavamed_fast.train.flops import batch_flops, flop_shape, peak_tflops, peak_tflops_for_name

# (length, first image token or None, first supervised position); sample 2 also labels its first token,
# which nothing predicts (the shift stays inside a sample), so it must not count.
LAYOUT = ((40, 5, 25), (23, None, 10), (30, 2, 0))


def make_samples(model: LlavaMed, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    samples = []
    for index, (length, image_at, supervised_from) in enumerate(LAYOUT):
        ids = rng.integers(5, 800, size=length).astype(np.int64)
        starts = np.array([] if image_at is None else [image_at], dtype=np.int64)
        if image_at is not None:
            ids[image_at : image_at + model.tokens_per_image] = model.image_token_id
        labels = np.full(length, -100, dtype=np.int64)
        labels[supervised_from:] = ids[supervised_from:]
        if image_at is not None:
            labels[image_at : image_at + model.tokens_per_image] = -100
        pixels = torch.randn(len(starts), 3, 64, 64, generator=torch.Generator().manual_seed(seed + index))
        samples.append(Sample(f"s{index}", ids, labels, starts, pixels))
    return samples


def hand_count(model: LlavaMed, samples: list[Sample], *, llm_trainable: bool, cached: bool) -> int:
    """The documented conventions, from config fields only (no module walk)."""
    text, vision = model.language_model.config, model.vision_tower.config
    h, heads, kv = text.hidden_size, text.num_attention_heads, text.num_key_value_heads
    d = h // heads
    layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * text.intermediate_size
    n_llm, head = text.num_hidden_layers * layer, text.vocab_size * h
    tokens = sum(len(s) for s in samples)
    supervised = sum(int((s.labels[1:] != -100).sum()) for s in samples)
    images = sum(len(s.image_starts) for s in samples)
    passes = 3 if llm_trainable else 2
    total = 2 * passes * (n_llm * tokens + head * supervised)
    total += 3 * sum(2 * len(s) * (len(s) + 1) * heads * d for s in samples) * text.num_hidden_layers

    c, p = vision.hidden_size, vision.patch_size
    p1 = c * h
    p2 = h * h if model.config.projector.value == "mlp2x_gelu" else 0
    total += (2 * (p1 + p2) + 2 * (p1 + p2) + 2 * p2) * model.tokens_per_image * images
    if not cached:
        t = (vision.image_size // p) ** 2 + 1
        n_vision = vision.num_hidden_layers * (4 * c * c + 2 * c * vision.intermediate_size)
        per_image = 2 * n_vision * t + 2 * (3 * p * p * c) * (t - 1)
        per_image += 4 * t * t * c * vision.num_hidden_layers
        total += per_image * images
    return total


@pytest.fixture(scope="module", params=["tiny-v0", "tiny-v1.5"])
def model(request) -> LlavaMed:
    return build(request.param, seed=0)[0]


def cached_features(model: LlavaMed, batch):
    with torch.no_grad():
        features = model.image_features(batch.pixel_values)
    return replace(batch, pixel_values=None, image_features=features)


@pytest.mark.parametrize("llm_trainable", [False, True])
def test_matches_hand_count(model, llm_trainable):
    samples = make_samples(model)
    batch = collate(samples, pad_to_multiple_of=64)
    assert batch.num_samples == 3 and len(batch.cu_seqlens) == 5  # a padding segment is there
    expected = hand_count(model, samples, llm_trainable=llm_trainable, cached=False)
    assert batch_flops(model, batch, llm_trainable=llm_trainable) == expected
    cached = cached_features(model, batch)
    expected = hand_count(model, samples, llm_trainable=llm_trainable, cached=True)
    assert batch_flops(model, cached, llm_trainable=llm_trainable) == expected


def test_stage2_adds_weight_gradients_of_the_llm(model):
    batch = collate(make_samples(model))
    shape = flop_shape(model)
    stage1 = batch_flops(model, batch, llm_trainable=False)
    stage2 = batch_flops(model, batch, llm_trainable=True)
    supervised = int((LlavaMed.shifted_labels(batch) != -100).sum())
    assert stage2 - stage1 == 2 * (
        shape.llm_matmul_params * batch.num_tokens + shape.head_params * supervised
    )


def test_padding_and_recompute_earn_nothing(model):
    samples = make_samples(model)
    plain = batch_flops(model, collate(samples), llm_trainable=True)
    padded = collate(samples, pad_to_multiple_of=128)
    assert padded.num_tokens == 128
    assert batch_flops(model, padded, llm_trainable=True) == plain
    assert batch_flops(model, padded, llm_trainable=True, recompute=True) == plain


def test_cached_features_drop_exactly_the_vision_forward(model):
    batch = collate(make_samples(model))
    vision = model.vision_tower.config
    t = (vision.image_size // vision.patch_size) ** 2 + 1
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.image_features(batch.pixel_values)
    # FlopCounterMode counts the Linear and patch-convolution matmuls; CPU attention is not in its table.
    attention = 4 * t * t * vision.hidden_size * vision.num_hidden_layers * batch.num_images
    full = batch_flops(model, batch, llm_trainable=False)
    cached = batch_flops(model, cached_features(model, batch), llm_trainable=False)
    assert full - cached == counter.get_total_flops() + attention


@pytest.mark.parametrize("llm_trainable", [False, True])
def test_llm_matmuls_match_what_autograd_runs(llm_trainable):
    """Decoder Linear FLOPs of a real forward + backward, counted by torch: 4·N·T frozen, 6·N·T trained
    (the head, attention and projector are custom ops, outside FlopCounterMode's table)."""
    model = build("tiny-v1.5", seed=0)[0].train()
    model.language_model.requires_grad_(llm_trainable)
    batch = cached_features(model, collate(make_samples(model)))
    with FlopCounterMode(display=False) as counter:
        model(batch).loss.backward()
    mm = counter.get_flop_counts()["Global"][torch.ops.aten.mm]
    passes = 3 if llm_trainable else 2
    assert mm == 2 * passes * flop_shape(model).llm_matmul_params * batch.num_tokens


def test_llama_7b_shapes_give_the_usual_6n():
    with torch.device("meta"):
        text = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
                vocab_size=32000,
                tie_word_embeddings=False,
            )
        )
        vision = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
                image_size=224,
                patch_size=14,
            )
        )
        model = LlavaMed(get_preset("llava-med-v0"), vision, text, image_token_id=0, tokens_per_image=256)
    shape = flop_shape(model)
    assert shape.llm_matmul_params == 32 * (4 * 4096**2 + 3 * 4096 * 11008)  # 6.48e9
    assert shape.head_params == 32000 * 4096  # 131M
    assert shape.vision_tokens == 257

    # 32 fully supervised samples of 64 tokens: attention is ~0.1% here, so FLOPs/token ≈ 6·N.
    samples = [
        Sample(f"s{i}", np.arange(64), np.arange(64), np.zeros(0, np.int64), torch.zeros(0, 3, 224, 224))
        for i in range(32)
    ]
    batch = collate(samples)
    per_token = batch_flops(model, batch, llm_trainable=True) / batch.num_tokens
    assert per_token == pytest.approx(6 * 6.7e9, rel=0.03)
    frozen = batch_flops(model, batch, llm_trainable=False) / batch.num_tokens
    assert frozen == pytest.approx(4 * 6.7e9, rel=0.03)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.4),
        ("NVIDIA GH200 480GB", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA A10G", 125.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.05),
        ("NVIDIA L40", 181.05),
        ("Tesla V100-SXM2-16GB", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_table(name, expected):
    assert peak_tflops_for_name(name) == expected
    assert peak_tflops_for_name(name, torch.float16) == expected


def test_no_invented_peaks():
    assert peak_tflops_for_name("NVIDIA H100 80GB HBM3", torch.float32) is None
    assert peak_tflops("cpu") is None
    assert peak_tflops(torch.device("cpu")) is None
