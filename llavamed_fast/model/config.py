"""Typed model configuration and the presets of the published recipes.

A :class:`ModelConfig` says what to build: the vision tower, the LLM and the tokenizer (hub ids or local
paths, or config dictionaries for random init), the projector, the image preprocessing, the chat
template and how image tokens sit in the text. It is saved with every checkpoint (``llavamed_fast.json``),
so nothing is ever inferred from folder names.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from llavamed_fast.data.templates import TEMPLATES

TINY_TOKENIZER = "tiny"
"""Tokenizer name of the tiny presets: the byte-level BPE shipped with the package (works offline)."""


class ProjectorType(str, enum.Enum):
    LINEAR = "linear"  # LLaVA-Med v0: one Linear(vision -> text)
    MLP2X_GELU = "mlp2x_gelu"  # LLaVA-1.5 / LLaVA-Med v1.5: Linear -> GELU -> Linear


class ImageResize(str, enum.Enum):
    CENTER_CROP = "center_crop"  # resize the short side, crop the centre (CLIP's own preprocessing)
    PAD_TO_SQUARE = "pad_to_square"  # pad with the CLIP mean colour to a square first, so nothing is cut


@dataclass(frozen=True)
class ModelConfig:
    """What :func:`llavamed_fast.model.build` builds. Validated on construction.

    ``vision`` / ``text``: a hub id or local path (pretrained weights), or a mapping of config fields
    for a random-init model (``text`` needs ``model_type``, e.g. ``"llama"`` or ``"mistral"``).
    """

    name: str
    vision: str | Mapping[str, Any]
    text: str | Mapping[str, Any]
    tokenizer: str
    projector: ProjectorType
    image_resize: ImageResize
    template: str
    image_start_end: bool
    max_length: int
    vision_feature_layer: int = -2
    freeze_vision: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "projector", ProjectorType(self.projector))
        object.__setattr__(self, "image_resize", ImageResize(self.image_resize))
        if self.template not in TEMPLATES:
            raise ValueError(
                f"model {self.name!r}: unknown template {self.template!r}; known: {', '.join(TEMPLATES)}"
            )
        if self.max_length <= 0:
            raise ValueError(f"model {self.name!r}: max_length must be positive, got {self.max_length}")
        if not isinstance(self.text, str) and "model_type" not in self.text:
            raise ValueError(
                f"model {self.name!r}: a text config mapping needs 'model_type' (llama, mistral, ...)"
            )
        if self.vision_feature_layer >= 0:
            raise ValueError("vision_feature_layer counts from the end (-2 = penultimate layer)")

    @property
    def random_init(self) -> bool:
        return not isinstance(self.vision, str) or not isinstance(self.text, str)

    @property
    def image_placeholder(self) -> str:
        """What ``<image>`` becomes in rendered text, before the image token is repeated."""
        return "<im_start><image><im_end>" if self.image_start_end else "<image>"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["projector"] = self.projector.value
        data["image_resize"] = self.image_resize.value
        for key in ("vision", "text", "extra"):
            if isinstance(data[key], Mapping):
                data[key] = dict(data[key])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


_TINY_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 16,  # 4 x 4 = 16 image tokens
    "projection_dim": 64,
}
_TINY_TEXT = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}

_TINY_V15 = ModelConfig(
    name="tiny-v1.5",
    vision=dict(_TINY_VISION),
    text={
        **_TINY_TEXT,
        "model_type": "mistral",
        "num_key_value_heads": 2,
        "sliding_window": None,
    },
    tokenizer=TINY_TOKENIZER,
    projector=ProjectorType.MLP2X_GELU,
    image_resize=ImageResize.PAD_TO_SQUARE,
    template="mistral_instruct",
    image_start_end=False,
    max_length=2048,
)

PRESETS: Mapping[str, ModelConfig] = MappingProxyType(
    {
        c.name: c
        for c in (
            ModelConfig(
                name="llava-med-v0",
                vision="openai/clip-vit-large-patch14",
                # LLaVA-Med v0 started from LLaVA-7B-v0 (Vicuna v0, released only as deltas on LLaMA-7B);
                # point `text` and `tokenizer` at a local merge of those to reproduce the paper exactly.
                text="lmsys/vicuna-7b-v1.3",
                tokenizer="lmsys/vicuna-7b-v1.3",
                projector=ProjectorType.LINEAR,
                image_resize=ImageResize.CENTER_CROP,
                template="v0",
                image_start_end=True,
                max_length=2048,
            ),
            ModelConfig(
                name="llava-med-v1.5",
                vision="openai/clip-vit-large-patch14-336",
                text="mistralai/Mistral-7B-Instruct-v0.2",
                tokenizer="mistralai/Mistral-7B-Instruct-v0.2",
                projector=ProjectorType.MLP2X_GELU,
                image_resize=ImageResize.PAD_TO_SQUARE,
                template="mistral_instruct",
                image_start_end=False,
                # LLaVA-1.5's training scripts (which LLaVA-Med v1.5 followed) cut sequences at 2048 tokens.
                max_length=2048,
            ),
            ModelConfig(
                name="tiny-v0",
                vision=dict(_TINY_VISION),
                text={**_TINY_TEXT, "model_type": "llama", "num_key_value_heads": 4},
                tokenizer=TINY_TOKENIZER,
                projector=ProjectorType.LINEAR,
                image_resize=ImageResize.CENTER_CROP,
                template="v0",
                image_start_end=True,
                max_length=2048,
            ),
            _TINY_V15,
            # The offline demo's model: 48-pixel images in 8-pixel patches (36 image tokens instead of 16),
            # so a lesion fills much of a patch instead of a sliver of one (docs/TRAINING.md has what it
            # changed; 64-pixel images in 8-pixel patches learned as well at 1.2x the cost).
            _TINY_V15.replace(
                name="tiny-v1.5-demo", vision={**_TINY_VISION, "image_size": 48, "patch_size": 8}
            ),
        )
    }
)


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
