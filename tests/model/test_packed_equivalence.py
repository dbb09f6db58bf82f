"""A packed row must train exactly like its samples one at a time: same per-sample loss, same gradients."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace

import pytest
import torch

from llavamed_fast.data.dataset import LlavaJsonDataset
from llavamed_fast.data.packing import collate
from llavamed_fast.model import build


def vqa_rad_conversations(data_dir, count: int, turns: int) -> list[dict]:
    """LLaVA JSON records from real VQA-RAD questions: several QA turns about one image each."""
    rows = json.loads((data_dir / "vqa-rad" / "trainset.json").read_text())
    by_image = defaultdict(list)
    for row in rows:
        by_image[row["image_name"]].append(row)
    records = []
    for image, qas in sorted(by_image.items()):
        if len(qas) < turns:
            continue
        conversation = []
        for i, qa in enumerate(qas[:turns]):
            question = f"<image>\n{qa['question']}" if i == 0 else qa["question"]
            conversation += [
                {"from": "human", "value": question},
                {"from": "gpt", "value": str(qa["answer"])},
            ]
        records.append({"id": f"vqarad-{image}", "image": image, "conversations": conversation})
        if len(records) == count:
            break
    return records


def per_sample(batch, index):
    """The batch with only sample ``index`` supervised."""
    start, end = batch.cu_seqlens[index].item(), batch.cu_seqlens[index + 1].item()
    labels = torch.full_like(batch.labels, -100)
    labels[start:end] = batch.labels[start:end]
    return replace(batch, labels=labels)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    output = model(batch, reduction="sum")
    output.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return output.loss.detach() / output.num_supervised, grads


@pytest.mark.parametrize("preset", ["tiny-v0", "tiny-v1.5"])
def test_packed_row_equals_samples_alone(preset, data_dir, tmp_path):
    torch.manual_seed(0)
    model, processor = build(preset, seed=1)
    records = vqa_rad_conversations(data_dir, count=3, turns=3)
    # A record with two images, the second placeholder after the question text.
    two = vqa_rad_conversations(data_dir, count=5, turns=2)[-1]
    two = {**two, "id": "two-images", "image": [two["image"], records[0]["image"]]}
    two["conversations"][2]["value"] += "\n<image>"
    records.append(two)
    (tmp_path / "data.json").write_text(json.dumps(records))
    dataset = LlavaJsonDataset(tmp_path / "data.json", data_dir / "vqa-rad" / "images", processor)
    samples = [dataset[i] for i in range(len(dataset))]
    packed = collate(samples, pad_to_multiple_of=64, pad_token_id=processor.tokenizer.pad_token_id)
    assert (
        packed.num_samples == 4 and packed.num_images == 5 and len(packed.cu_seqlens) == 6
    )  # + a pad segment

    model.train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("vision_tower") for n in trainable)
    for index, sample in enumerate(samples):
        alone_loss, alone_grads = loss_and_grads(model, collate([sample]))
        packed_loss, packed_grads = loss_and_grads(model, per_sample(packed, index))
        torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-5)
        for name in trainable:
            torch.testing.assert_close(
                packed_grads[name], alone_grads[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
            )
    # And the row's mean loss is the token-weighted mean of the samples' losses.
    total = model(packed).loss
    sums = [model(per_sample(packed, i), reduction="sum") for i in range(4)]
    expected = sum(o.loss for o in sums) / sum(o.num_supervised for o in sums)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)


def test_padding_segment_changes_nothing(data_dir, tmp_path):
    model, processor = build("tiny-v1.5", seed=2)
    (tmp_path / "data.json").write_text(json.dumps(vqa_rad_conversations(data_dir, count=2, turns=2)))
    dataset = LlavaJsonDataset(tmp_path / "data.json", data_dir / "vqa-rad" / "images", processor)
    samples = [dataset[0], dataset[1]]
    plain = collate(samples)
    padded = collate(samples, pad_to_multiple_of=128, pad_token_id=processor.tokenizer.pad_token_id)
    assert padded.num_tokens % 128 == 0 and padded.num_tokens > plain.num_tokens
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(padded).loss, model(plain).loss, rtol=1e-6, atol=1e-6)
        logits = model.logits(padded)[: plain.num_tokens]
        torch.testing.assert_close(logits, model.logits(plain), rtol=1e-5, atol=1e-5)


def test_attention_goes_through_the_op_registry(data_dir, tmp_path):
    from llavamed_fast.ops import BackendUnavailableError, use_backend

    model, processor = build("tiny-v0", seed=3)
    (tmp_path / "data.json").write_text(json.dumps(vqa_rad_conversations(data_dir, count=1, turns=1)))
    batch = collate([LlavaJsonDataset(tmp_path / "data.json", data_dir / "vqa-rad" / "images", processor)[0]])
    with (
        use_backend(varlen_attention="cuda"),
        pytest.raises(BackendUnavailableError, match="varlen_attention"),
    ):
        model(batch)
    with use_backend(projector="cuda"), pytest.raises(BackendUnavailableError, match="projector"):
        model(batch)
    with (
        use_backend(linear_cross_entropy="cuda"),
        pytest.raises(BackendUnavailableError, match="linear_cross"),
    ):
        model(batch)


@pytest.mark.parametrize("preset", ["tiny-v0", "tiny-v1.5"])
def test_float32_weights_train_under_autocast(preset, data_dir, tmp_path):
    # The plain engine on a GPU: float32 weights, autocast to bf16. transformers then hands attention
    # float32 q/k (rotated with float32 cos/sin) and a bf16 v; the loss's head runs in bf16.
    model, processor = build(preset, seed=4)
    (tmp_path / "data.json").write_text(json.dumps(vqa_rad_conversations(data_dir, count=2, turns=2)))
    dataset = LlavaJsonDataset(tmp_path / "data.json", data_dir / "vqa-rad" / "images", processor)
    batch = collate([dataset[0], dataset[1]])
    model.train()
    full_loss, full_grads = loss_and_grads(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_loss, low_grads = loss_and_grads(model, batch)
    assert low_loss.dtype == torch.float32
    torch.testing.assert_close(low_loss, full_loss, rtol=2e-2, atol=0)
    for name, grad in low_grads.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        # bf16 matmuls: each gradient points the same way as the float32 one.
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), full_grads[name].flatten(), dim=0)
        assert cosine > 0.95, (name, cosine.item())
