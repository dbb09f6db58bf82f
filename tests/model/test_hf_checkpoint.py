"""Checkpoints in the transformers LLaVA layout: transformers' own Llava loads them and agrees with us."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llavamed_fast.data.packing import Sample, collate
from llavamed_fast.data.templates import Message
from llavamed_fast.model import build, load_pretrained, save_pretrained
from llavamed_fast.model.checkpoint import CheckpointError

QUESTION = "Is there evidence of a pneumothorax?"
ANSWER = "No, the lungs are fully expanded."


def our_batch(processor, images, turns):
    messages = []
    for i, (question, answer) in enumerate(turns):
        prefix = "<image>\n" * len(images) if i == 0 else ""
        messages += [Message("user", prefix + question), Message("assistant", answer)]
    encoded = processor.encode(messages, num_images=len(images))
    pixels = processor.preprocess_images(images)
    return collate([Sample("x", encoded.input_ids, encoded.labels, encoded.image_starts, pixels)])


def hf_messages(num_images, turns):
    messages = []
    for i, (question, answer) in enumerate(turns):
        parts = [{"type": "image"}] * num_images if i == 0 else []
        messages.append({"role": "user", "content": [*parts, {"type": "text", "text": question}]})
        messages.append({"role": "assistant", "content": answer})
    return messages


@pytest.mark.parametrize("preset", ["tiny-v1.5", "tiny-v0"])
def test_transformers_llava_loads_checkpoint_and_gives_our_logits(preset, tmp_path, vqa_rad_images):
    model, processor = build(preset, seed=3)
    model.eval()
    directory = save_pretrained(model, processor, tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and config["model_type"] == "llava"
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert "llavamed" not in json.dumps(config)  # our attention implementation must not leak into the config

    hf = LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    hf_processor = AutoProcessor.from_pretrained(directory)
    # Real radiology images of different shapes, two of them in one conversation, two turns.
    images = [Image.open(p).convert("RGB") for p in (vqa_rad_images[3], vqa_rad_images[40])]
    assert images[0].size != images[1].size or images[0].size[0] != images[0].size[1]
    turns = [(QUESTION, ANSWER), ("Which side is the tube on?", "The right side.")]
    batch = our_batch(processor, images, turns)

    text = hf_processor.apply_chat_template(hf_messages(2, turns), tokenize=False)
    inputs = hf_processor(text=text, images=images, return_tensors="pt", add_special_tokens=False)
    # Same token ids and pixels from transformers' processor as from ours...
    assert inputs["input_ids"][0].tolist() == batch.input_ids.tolist()
    torch.testing.assert_close(inputs["pixel_values"], batch.pixel_values, atol=0, rtol=0)
    # ...and the same logits from transformers' model as from ours.
    with torch.no_grad():
        theirs = hf(**inputs).logits[0]
        ours = model.logits(batch)
    assert (theirs - ours).abs().max().item() <= 1e-4


def test_checkpoint_round_trip_is_exact(tmp_path, vqa_rad_images):
    model, processor = build("tiny-v1.5", seed=4)
    save_pretrained(model, processor, tmp_path / "a")
    loaded, loaded_processor = load_pretrained(tmp_path / "a")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.config == model.config
    batch = our_batch(loaded_processor, [Image.open(vqa_rad_images[0]).convert("RGB")], [(QUESTION, ANSWER)])
    torch.testing.assert_close(
        batch.input_ids,
        our_batch(processor, [Image.open(vqa_rad_images[0]).convert("RGB")], [(QUESTION, ANSWER)]).input_ids,
    )
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(batch), model.logits(batch), atol=0, rtol=0)


def test_sharded_checkpoint_and_bf16(tmp_path):
    model, processor = build("tiny-v0", seed=5, dtype=torch.bfloat16)
    directory = save_pretrained(model, processor, tmp_path / "s", max_shard_size=200_000)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded, _ = load_pretrained(directory)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_existing_directory_is_not_overwritten_silently(tmp_path):
    model, processor = build("tiny-v1.5", seed=6)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        save_pretrained(model, processor, tmp_path / "c")
    assert (tmp_path / "c" / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no staging directory left behind


def test_v0_linear_projector_must_stay_identity(tmp_path):
    from safetensors.torch import load_file, save_file

    model, processor = build("tiny-v0", seed=7)
    directory = save_pretrained(model, processor, tmp_path / "v0")
    weights = load_file(directory / "model.safetensors")
    assert torch.equal(weights["model.multi_modal_projector.linear_2.weight"], torch.eye(128))
    weights["model.multi_modal_projector.linear_2.weight"] += 0.01 * torch.randn(128, 128)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="must be the identity"):
        load_pretrained(directory)


def test_plain_transformers_checkpoint_needs_a_named_template(tmp_path):
    model, processor = build("tiny-v1.5", seed=8)
    directory = save_pretrained(model, processor, tmp_path / "hf")
    (directory / "llavamed_fast.json").unlink()
    with pytest.raises(CheckpointError, match=r"name its chat template \(--template .* one of v0, vicuna_v1"):
        load_pretrained(directory)
    with pytest.raises(CheckpointError, match="unknown chat template 'mistral'; known: v0, "):
        load_pretrained(directory, template="mistral")
    loaded, loaded_processor = load_pretrained(directory, template="mistral_instruct")
    assert loaded_processor.template.name == "mistral_instruct"
    x = torch.randn(1, 16, 64)
    torch.testing.assert_close(loaded.multi_modal_projector(x), model.multi_modal_projector(x))


def test_build_from_local_pretrained_parts_adds_image_tokens(tmp_path):
    """The hub-id path, exercised offline with local directories: a tokenizer without image tokens,
    a pretrained LLM whose embeddings must grow, and a pretrained CLIP tower."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    from llavamed_fast.model.config import get_preset

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    raw.train_from_iterator(["a chest radiograph of the lungs"] * 10, trainer=trainer)
    plain = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    plain.save_pretrained(tmp_path / "llm")
    assert "<image>" not in plain.get_vocab()
    torch.manual_seed(0)
    llm = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=len(plain),
        )
    )
    llm.save_pretrained(tmp_path / "llm")
    clip = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    CLIPVisionModel(clip).save_pretrained(tmp_path / "clip")
    config = get_preset("tiny-v0").replace(
        vision=str(tmp_path / "clip"), text=str(tmp_path / "llm"), tokenizer=str(tmp_path / "llm")
    )
    model, processor = build(config)
    assert processor.image_tokens.count == 16
    embeddings = model.language_model.get_input_embeddings().weight
    assert embeddings.shape[0] % 64 == 0 and embeddings.shape[0] >= len(processor.tokenizer)
    # The original rows are the pretrained ones.
    torch.testing.assert_close(embeddings[: len(plain)], llm.get_input_embeddings().weight)
    assert processor.tokenizer.pad_token is not None
    ids = processor.tokenizer.convert_tokens_to_ids(["<image>", "<im_start>", "<im_end>"])
    assert all(isinstance(i, int) and i < embeddings.shape[0] for i in ids)
    x = np.zeros((40, 50, 3), dtype=np.uint8) + 120
    assert processor.preprocess_images([Image.fromarray(x)]).shape == (1, 3, 32, 32)


def test_loaded_model_keeps_vision_frozen(tmp_path):
    model, processor = build("tiny-v1.5", seed=9)
    loaded, _ = load_pretrained(save_pretrained(model, processor, tmp_path / "f"))
    assert not any(p.requires_grad for p in loaded.vision_tower.parameters())
    assert all(p.requires_grad for p in loaded.language_model.parameters())


def test_checkpoint_names_tell_runs_apart(tmp_path, monkeypatch):
    from llavamed_fast.model.checkpoint import checkpoint_name

    run = tmp_path / "v15-rad"
    (run / "stages" / "instruct").mkdir(parents=True)
    (run / "model").mkdir()
    assert checkpoint_name(run / "model") == "model"  # not a run folder (yet): the folder's own name
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    assert checkpoint_name(run / "model") == "v15-rad"
    assert checkpoint_name(f"{run / 'model'}/") == "v15-rad"
    assert checkpoint_name(run / "stages" / "instruct") == "v15-rad-instruct"
    assert checkpoint_name(tmp_path / "ckpt") == "ckpt"
    monkeypatch.chdir(run)  # relative paths from inside the run folder
    assert (checkpoint_name("model"), checkpoint_name("./model")) == ("v15-rad", "v15-rad")
    assert checkpoint_name("stages/instruct") == "v15-rad-instruct"
    monkeypatch.chdir(run / "model")
    assert checkpoint_name(".") == "v15-rad"
    assert checkpoint_name("microsoft/llava-med-v1.5-mistral-7b") == "llava-med-v1.5-mistral-7b"
