"""The feature cache is keyed by precision too: a tower run under bf16 autocast (as training runs it on
GPUs) never reads the float32 cache of the same images, whose numbers differ."""

from __future__ import annotations

import torch

from llavamed_fast.data.dataset import LlavaJsonDataset
from llavamed_fast.data.synthetic import make_dataset
from llavamed_fast.model import build
from llavamed_fast.train import features
from llavamed_fast.train.dist import Dist


def test_caches_of_two_dtypes_are_kept_apart(tmp_path):
    model, processor = build("tiny-v1.5", seed=0)
    path = make_dataset(tmp_path / "data", task="captions", count=3, seed=0)
    dataset = LlavaJsonDataset(path, tmp_path / "data" / "images", processor)
    dist = Dist(0, 1, 0, torch.device("cpu"))
    root = tmp_path / "features"
    full = features.build(model, dataset, root, dist)
    # The same weights under bf16 autocast, as training runs the tower on GPUs (here the CPU's autocast).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = features.build(model, dataset, root, dist)
        pixels = processor.preprocess_images([dataset.load_images(0)[0]])
        expected = model.image_features(pixels)[0]
    assert len(list(root.glob("*/COMPLETE"))) == 2
    torch.testing.assert_close(half[0].image_features[0], expected, rtol=0, atol=0)
    assert not torch.equal(full[0].image_features[0], expected)  # float32 features are other numbers
