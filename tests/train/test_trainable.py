"""What a stage trains: v0's <im_start>/<im_end> rows alone (also beside LoRA adapters), nothing else of
the embedding, and no weight decay that would move the frozen rows."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from llavamed_fast.data.dataset import LlavaJsonDataset
from llavamed_fast.data.packing import collate
from llavamed_fast.data.synthetic import make_dataset
from llavamed_fast.model import build
from llavamed_fast.train.config import ConfigError, LoraConfig, Trainable
from llavamed_fast.train.dist import Dist
from llavamed_fast.train.engine import PlainEngine
from llavamed_fast.train.recipes import get_recipe
from llavamed_fast.train.trainable import StageParameters, image_token_ids


@pytest.mark.parametrize("lora", [None, LoraConfig(r=4, alpha=8, dropout=0.0)])
def test_image_tokens_train_their_two_rows_only(tmp_path, lora):
    model, processor = build("tiny-v0", seed=0)
    trainable = (Trainable.PROJECTOR, Trainable.IMAGE_TOKENS) + ((Trainable.LLM,) if lora else ())
    stage = replace(get_recipe("tiny-v0").stages[0], trainable=trainable, lora=lora, lr=1e-2)
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


def test_image_tokens_refuse_weight_decay():
    stage = get_recipe("tiny-v0").stages[0]
    with pytest.raises(ConfigError, match="weight_decay: must be 0 when image_tokens trains only"):
        replace(stage, trainable=(Trainable.IMAGE_TOKENS,), weight_decay=0.1)
    full = replace(stage, trainable=(Trainable.LLM, Trainable.IMAGE_TOKENS), weight_decay=0.1)
    assert not full.trains_image_rows  # the whole LLM trains: decay is the user's choice
