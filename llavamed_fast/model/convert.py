"""Checkpoints in LLaVA's original layout (the released LLaVA-Med v1.5) converted to ours.

LLaVA's own code (and LLaVA-Med's, which the released ``microsoft/llava-med-v1.5-mistral-7b`` needs) saves a
causal LM with the vision parts attached: ``config.json`` of ``model_type`` ``llava_mistral`` or
``llava_llama`` whose ``mm_*`` fields describe the vision tower and projector, and weights named
``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``, ``model.mm_projector.{0,2}`` (or
``model.mm_projector`` for a single linear layer) and, when the vision tower was saved with it,
``model.vision_tower.vision_tower.vision_model.*``. The image sits in the text as one placeholder id
(-200), which is not in the vocabulary. Its config.json is transformers 4.x's (``rope_theta`` at the top).

:func:`convert_llava` writes the same model as a checkpoint of ours (transformers'
``LlavaForConditionalGeneration`` layout plus ``llavamed_fast.json``), file by file, so memory holds one
source file's weights at a time:

- the tokenizer gains ``<image>`` (and a pad token, the unknown token, when it has none); the embedding and
  the LM head gain rows up to the next multiple of 64, set to the mean of the existing rows (they are
  never read for ``<image>``: image positions take the projected features instead);
- the projector, the vision tower and the LLM keep their values and dtypes under transformers' names; a
  single linear projector gets an identity second layer, as our v0 checkpoints do;
- the vision tower's config and weights come from ``--vision`` (a CLIP checkpoint folder) when given, as
  LLaVA-Med's own loader takes them from ``mm_vision_tower``; else the weights from the checkpoint and the
  config from ``mm_vision_tower`` when it is a local folder or one of the two OpenAI CLIP ViT-L/14 towers
  LLaVA uses;
- ``image_aspect_ratio`` ``pad`` becomes pad-to-square preprocessing and ``square`` (or none) CLIP's
  resize and centre crop; the chat template is ``mistral_instruct`` for ``llava_mistral`` (the released
  LLaVA-Med v1.5's) and must be named for other models.

LLaVA-Med v0 (``mm_use_im_start_end``: the image between ``<im_start>`` and ``<im_end>``, a linear
projector, template ``v0``) was released as deltas over LLaMA-7B: ``--base`` names the base LLM, whose
weights are added to the delta's LLM weights (the embedding's and LM head's first rows only), as LLaVA's
``apply_delta`` does; its ``<im_patch>`` token stays in the vocabulary, unused, since ``<image>`` takes its
place.

Every weight's name and shape (and the base's, with ``--base``) is checked against transformers' model of
the converted config before anything is written. Refused, each with the file and field that say so: a
vision feature other than the patches, tiled images (LLaVA-NeXT's ``anyres``), projectors other than
``linear`` and ``mlp2x_gelu``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel, LlavaForConditionalGeneration
from transformers.utils import logging as hf_logging

from llavamed_fast.data.templates import TEMPLATES, Message
from llavamed_fast.model.build import padded_vocab
from llavamed_fast.model.checkpoint import (
    check_target,
    llava_config,
    staged_directory,
    write_metadata,
)
from llavamed_fast.model.config import ImageResize, ModelConfig, ProjectorType
from llavamed_fast.model.llava_weights import (
    LLM_PREFIXES,
    VISION_PREFIX,
    BaseWeights,
    ConversionError,
    WeightNames,
    check_delta,
    converted_shards,
    planned_shapes,
    source_shapes,
    weight_files,
    write_weights,
)
from llavamed_fast.model.processor import LlavaMedProcessor, load_tokenizer

# The towers LLaVA and LLaVA-Med name in mm_vision_tower (the public configs of OpenAI's CLIP ViT-L/14),
# so that a checkpoint which stores the tower's weights converts offline.
_CLIP_L14 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
KNOWN_VISION_TOWERS: Mapping[str, Mapping[str, Any]] = {
    "openai/clip-vit-large-patch14-336": {**_CLIP_L14, "image_size": 336},
    "openai/clip-vit-large-patch14": {**_CLIP_L14, "image_size": 224},
}

# model_type of LLaVA's config -> (transformers' model_type of the LLM, the chat template when known)
_TEXT_TYPES: Mapping[str, tuple[str, str | None]] = {
    "llava_mistral": ("mistral", "mistral_instruct"),
    "llava_llama": ("llama", None),
    "llava": ("llama", None),
}


class _NotThatConfigWarning(logging.Filter):
    """Drops transformers' warning that a ``llava_mistral`` config.json is no tokenizer's model type (the
    tokenizer loader reads it); the tokenizer's own warnings, which say why a conversion failed, pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "You are using a model of type" not in record.getMessage()


@contextlib.contextmanager
def _without_config_warning() -> Iterator[None]:
    handler_filter = _NotThatConfigWarning()
    logger = hf_logging.get_logger("transformers.configuration_utils")
    logger.addFilter(handler_filter)
    try:
        yield
    finally:
        logger.removeFilter(handler_filter)


def _source_config(source: Path) -> dict[str, Any]:
    path = source / "config.json"
    if not path.is_file():
        raise ConversionError(f"{source} has no config.json: not a checkpoint folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path}: cannot read it: {error}") from error
    kind = config.get("model_type")
    if kind not in _TEXT_TYPES:
        raise ConversionError(
            f"{path}: model_type {kind!r} is not a LLaVA original-layout model "
            f"(known: {', '.join(_TEXT_TYPES)}); a transformers LLaVA checkpoint loads as it is"
        )
    refusals = {
        "mm_vision_select_feature": ("patch", "only the patch features (CLS dropped) are supported"),
        "mm_patch_merge_type": ("flat", "tiled images are not supported"),
    }
    for field, (wanted, why) in refusals.items():
        if config.get(field, wanted) != wanted:
            raise ConversionError(f"{path}: {field} is {config[field]!r}; {why}")
    aspect = config.get("image_aspect_ratio") or "square"
    if aspect not in ("pad", "square"):
        raise ConversionError(f"{path}: image_aspect_ratio {aspect!r} is not supported (pad or square)")
    projector = config.get("mm_projector_type", "linear")
    if projector not in {p.value for p in ProjectorType}:
        raise ConversionError(
            f"{path}: mm_projector_type {projector!r} is not supported "
            f"({', '.join(p.value for p in ProjectorType)})"
        )
    return config


def _vision_config(config: Mapping[str, Any], source: Path, vision: Path | None) -> CLIPVisionConfig:
    if vision is not None:
        if not (vision / "config.json").is_file():
            raise ConversionError(f"--vision {vision}: not a CLIP checkpoint folder (no config.json)")
        return CLIPVisionConfig.from_pretrained(vision)
    name = config.get("mm_vision_tower") or config.get("vision_tower")
    if name and Path(name).is_dir():
        return CLIPVisionConfig.from_pretrained(name)
    if name in KNOWN_VISION_TOWERS:
        return CLIPVisionConfig(**KNOWN_VISION_TOWERS[name])
    raise ConversionError(
        f"{source / 'config.json'}: mm_vision_tower {name!r} is neither a local folder nor a known tower "
        f"({', '.join(KNOWN_VISION_TOWERS)}); give --vision, a CLIP checkpoint folder"
    )


def _text_config(config: Mapping[str, Any], tokenizer, vocab_size: int):
    kind = _TEXT_TYPES[config["model_type"]][0]
    # rope_theta and rope_scaling: top-level fields of the transformers 4.x that LLaVA saved with, which the
    # current config classes still take and fold into rope_parameters.
    known = set(AutoConfig.for_model(kind).to_dict()) | {"rope_theta", "rope_scaling"}
    ignored = {"architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype"}
    fields = {k: v for k, v in config.items() if k in known and k not in ignored}
    fields.update(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoConfig.for_model(kind, **fields)


def _expected_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """Every weight transformers' LLaVA of this config has, with its shape (built on the meta device)."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(hf_config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if hf_config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _check_weights(
    source: Path, planned: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> None:
    missing = sorted(set(expected) - set(planned))
    unexpected = sorted(set(planned) - set(expected))
    if missing or unexpected:
        raise ConversionError(
            f"{source}: the weights do not make a LLaVA model of its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (as transformers names them)"
        )
    wrong = [
        f"{n} {planned[n]} (config: {expected[n]})" for n in sorted(planned) if planned[n] != expected[n]
    ]
    if wrong:
        raise ConversionError(
            f"{source}: weight shapes disagree with its config.json: {'; '.join(wrong[:3])}"
            + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        )


def _feature_layer(config: Mapping[str, Any], source: Path, layers: int) -> int:
    """LLaVA's ``mm_vision_select_layer`` (an index into the tower's ``layers + 1`` hidden states, the
    embeddings first) counted from the end, as ours is."""
    value = config.get("mm_vision_select_layer", -2)
    count = layers + 1
    if not isinstance(value, int) or not -count <= value < count:
        raise ConversionError(
            f"{source / 'config.json'}: mm_vision_select_layer {value!r} is not a hidden state of the "
            f"vision tower ({count} of them: -{count} to {count - 1})"
        )
    return value - count if value >= 0 else value


def _model_config(
    config: Mapping[str, Any], source: Path, vision: CLIPVisionConfig, template: str | None, tokenizer: str
) -> ModelConfig:
    """Ours, with ``text`` holding only the LLM's type until the vocabulary's size is known."""
    text_type, known_template = _TEXT_TYPES[config["model_type"]]
    if template is not None and template not in TEMPLATES:
        raise ConversionError(f"--template {template!r} is not a chat template ({', '.join(TEMPLATES)})")
    template = template or known_template
    if template is None:
        raise ConversionError(
            f"{source / 'config.json'}: model_type {config['model_type']!r} has no known chat template; "
            f"name it (--template: {', '.join(TEMPLATES)})"
        )
    layer = _feature_layer(config, source, vision.num_hidden_layers)
    pad = config.get("image_aspect_ratio") == "pad"
    return ModelConfig(
        name=source.name,
        vision=vision.to_dict(),
        text={"model_type": text_type},
        tokenizer=tokenizer,
        projector=ProjectorType(config.get("mm_projector_type", "linear")),
        image_resize=ImageResize.PAD_TO_SQUARE if pad else ImageResize.CENTER_CROP,
        template=template,
        # LLaVA-Med v0: <im_start> + the image + <im_end>, the two rows trained like any other token's.
        image_start_end=bool(config.get("mm_use_im_start_end")),
        # LLaVA cuts training sequences at the tokenizer's length, which its config records.
        max_length=int(
            config.get("tokenizer_model_max_length") or config.get("max_position_embeddings", 2048)
        ),
        vision_feature_layer=layer,
    )


def _load_tokenizer(config: ModelConfig):
    try:
        with _without_config_warning():
            return load_tokenizer(config)
    except (OSError, ValueError, ImportError, KeyError, TypeError, AttributeError) as error:
        raise ConversionError(
            f"{config.tokenizer}: cannot load a fast tokenizer ({error}); install sentencepiece, or give "
            f"--tokenizer the base LLM's (for LLaVA-Med v1.5: mistralai/Mistral-7B-Instruct-v0.2)"
        ) from error


def _dtype(config: Mapping[str, Any], source: Path) -> torch.dtype:
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConversionError(f"{source / 'config.json'}: torch_dtype {name!r} is not a torch dtype")
    return dtype


def convert_llava(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    vision: str | os.PathLike | None = None,
    tokenizer: str | None = None,
    template: str | None = None,
    base: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Conversion:
    """Write ``source`` (LLaVA's original layout) to ``out`` as a checkpoint of ours; see the module doc.
    ``vision``: a CLIP checkpoint folder for the tower's config and weights (replacing stored ones);
    ``tokenizer``: where the tokenizer comes from when not from ``source`` (a folder or hub id);
    ``base``: the base LLM's folder when the checkpoint's LLM weights are deltas over it (LLaVA-Med v0).
    Everything is checked before anything is written; ``out`` appears complete or not at all."""
    source = Path(source)
    if not source.is_dir():
        raise ConversionError(
            f"{source} is not a folder; download the checkpoint first "
            f"(hf download ID --local-dir DIR) and give the folder"
        )
    check_target(out, overwrite=overwrite)
    vision = Path(vision) if vision is not None else None
    config = _source_config(source)
    dtype = _dtype(config, source)
    vision_config = _vision_config(config, source, vision)
    model_config = _model_config(config, source, vision_config, template, tokenizer or str(source))
    tok = _load_tokenizer(model_config)
    files = weight_files(source)
    stored = source_shapes(files)
    # Rows for every token, and never fewer than stored (a checkpoint may hold rows past its tokenizer).
    rows = stored.get("model.embed_tokens.weight", (0,))[0]
    vocab_size = padded_vocab(max(len(tok), rows))
    text_config = _text_config(config, tok, vocab_size)
    model_config = model_config.replace(text=text_config.to_dict())
    processor = LlavaMedProcessor.from_config(
        model_config, image_size=vision_config.image_size, patch_size=vision_config.patch_size, tokenizer=tok
    )
    hf = llava_config(
        model_config,
        vision_config,
        text_config,
        image_token_id=processor.image_tokens.token_id,
        tokens_per_image=processor.image_tokens.count,
        dtype=dtype,
    )
    if vision is None and not any(name.startswith(VISION_PREFIX) for name in stored):
        raise ConversionError(
            f"{source}: the checkpoint holds no vision tower weights ({VISION_PREFIX}*); give --vision, "
            f"the CLIP checkpoint folder it was trained with"
        )
    expected = _expected_shapes(hf)
    names = WeightNames(
        model_config.projector,
        tower_level=any(n.startswith("model.vision_tower.vision_model.") for n in expected),
    )
    tower: dict[str, torch.Tensor] = {}
    if vision is not None:  # the given tower replaces a stored one, as LLaVA-Med's own loader does
        clip = CLIPVisionModel.from_pretrained(vision, dtype=dtype)
        tower = {names.tower(k): v.contiguous() for k, v in clip.state_dict().items()}

    def keep(name: str) -> bool:
        if vision is not None and name.startswith(VISION_PREFIX):
            return False
        return not (name == "lm_head.weight" and text_config.tie_word_embeddings)

    planned = planned_shapes(stored, names, vocab_size, keep)
    planned.update({n: tuple(t.shape) for n, t in tower.items()})
    _check_weights(source, planned, expected)
    notes = _tokenization_notes(processor)
    check_delta(files, delta=base is not None)
    base_weights = None
    if base is not None:
        base_weights = BaseWeights(Path(base))
        base_weights.check(
            {n: shape for n, shape in stored.items() if keep(n) and (names(n) or "").startswith(LLM_PREFIXES)}
        )
    with staged_directory(out, overwrite=overwrite) as staging:
        shards = converted_shards(files, names, vocab_size, keep, base_weights)
        write_weights(staging, shards, len(files), tower)
        write_metadata(staging, hf, processor, model_config)
    return Conversion(Path(out), notes)


def _tokenization_notes(processor: LlavaMedProcessor) -> list[str]:
    """Whether our one-pass tokenization of a prompt gives the ids LLaVA trained the model with; a note
    when it does not. LLaVA-1.5 (the -200 placeholder) tokenizes the text on each side of the image on its
    own, BOS from the tokenizer, kept once: a SentencePiece tokenizer may then start the text after the
    image with a word-start piece that one pass leaves out. LLaVA v0 wrote the image's tokens into the text
    and tokenized it in one pass, but with a slow tokenizer that stripped the whitespace around them."""
    tok = processor.tokenizer
    image = processor.image_tokens.token_id
    if processor.image_placeholder != tok.convert_ids_to_tokens(image):
        return [
            "LLaVA v0 tokenized with a transformers release (< 4.34) whose slow tokenizers stripped the "
            "whitespace around added tokens such as <im_start> and <im_end>; here it is kept, as in our "
            "own v0 training (not checked against the released files)"
        ]
    messages = [Message("user", "<image>\nWhat is shown here?")]
    ours = processor.encode(messages, num_images=1, add_generation_prompt=True).input_ids.tolist()
    ours = [t for i, t in enumerate(ours) if t != image or i == 0 or ours[i - 1] != image]  # one per image
    text = processor.render(messages, add_generation_prompt=True).text.removeprefix(tok.bos_token or "")
    chunks = [tok(chunk).input_ids for chunk in text.split(processor.image_placeholder)]
    offset = int(bool(chunks[0]) and chunks[0][0] == tok.bos_token_id)  # LLaVA keeps the BOS once
    llava = [tok.bos_token_id] if offset else []
    for number, chunk in enumerate(chunks):
        llava += ([image] if number else []) + chunk[offset:]
    if ours == llava:
        return []
    first = next(
        (i for i, (a, b) in enumerate(zip(ours, llava, strict=False)) if a != b), min(len(ours), len(llava))
    )
    window = slice(max(first - 2, 0), first + 3)
    theirs, here = tok.convert_ids_to_tokens(llava[window]), tok.convert_ids_to_tokens(ours[window])
    word_start = any("\u2581" in piece for piece in theirs + here)  # SentencePiece's word-start mark
    hint = (
        '; a LLaMA/Mistral tokenizer_config.json with "legacy": true tokenizes text after special tokens '
        "(BOS, the image) as LLaVA does"
        if word_start
        else ""
    )
    return [
        f"the prompt's ids differ from LLaVA's own tokenization (the one the model was trained with) at "
        f"token {first}: LLaVA {theirs}, here {here}{hint}"
    ]


@dataclass(frozen=True)
class Conversion:
    """What :func:`convert_llava` wrote, and what the user should know about it."""

    path: Path
    notes: list[str]


__all__ = ["KNOWN_VISION_TOWERS", "Conversion", "ConversionError", "convert_llava"]
