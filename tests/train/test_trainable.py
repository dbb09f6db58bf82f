"""What a stage trains: v0's <im_start>/<im_end> rows alone (also beside LoRA adapters, and with weight
decay on), nothing else of the embedding."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from llavamed_fast.data.dataset import LlavaJsonDataset
from llavamed_fast.data.packing import collate
from llavamed_fast.data.synthetic import make_dataset
from llavamed_fast.model import build
from llavamed_fast.train.config import LoraConfig, Trainable
from llavamed_fast.train.dist import Dist
from llavamed_fast.train.engine import PlainEngine, parameter_groups
from llavamed_fast.train.recipes import get_recipe
from llavamed_fast.train.trainable import StageParameters, image_token_ids


@pytest.mark.parametrize(
    ("lora", "weight_decay"), [(None, 0.0), (None, 0.1), (LoraConfig(r=4, alpha=8, dropout=0.0), 0.1)]
)
def test_image_tokens_train_their_two_rows_only(tmp_path, lora, weight_decay):
    model, processor = build("tiny-v0", seed=0)
    trainable = (Trainable.PROJECTOR, Trainable.IMAGE_TOKENS) + ((Trainable.LLM,) if lora else ())
    stage = replace(
        get_recipe("tiny-v0").stages[0], trainable=trainable, lora=lora, lr=1e-2, weight_decay=weight_decay
    )
    path = make_dataset(tmp_path / "data", task="captions", count=4, seed=0)
    dataset = LlavaJsonDataset(path, tmp_path / "data" / "images", processor)
    batch = collate([dataset[i] for i in range(4)])
    params = StageParameters(model, stage, processor)
    embedding = model.language_model.get_input_embeddings().weight
    before = embedding.detach().clone()
    engine = PlainEngine(
        model, params.parameters(), stage, 4, Dist(0, 1, 0, torch.device("cpu")), dtype=torch.float32
    )
    for _ in range(2):
        with engine.micro_batch(last=True):
            engine.backward(engine.forward(batch, reduction="sum").loss)
        assert engine.step().stepped
    moved = (embedding.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert moved == sorted(image_token_ids(processor))
    engine.close()
    params.close()


def test_weight_decay_skips_the_embedding_when_only_its_image_rows_train():
    model, _ = build("tiny-v0", seed=0)
    embedding = model.language_model.get_input_embeddings().weight
    projector = model.multi_modal_projector.linear_1.weight
    stage = replace(get_recipe("tiny-v0").stages[0], weight_decay=0.1)  # projector + image_tokens

    def decay_of(stage) -> dict[str, float]:
        groups = parameter_groups([embedding, projector], stage, model)
        return {
            name: next(g["weight_decay"] for g in groups if any(p is tensor for p in g["params"]))
            for name, tensor in (("embedding", embedding), ("projector", projector))
        }

    assert decay_of(stage) == {"embedding": 0.0, "projector": 0.1}
    # The whole LLM trains: the embedding is a matrix like any other.
    full = replace(stage, trainable=(Trainable.PROJECTOR, Trainable.LLM, Trainable.IMAGE_TOKENS))
    assert decay_of(full) == {"embedding": 0.1, "projector": 0.1}
