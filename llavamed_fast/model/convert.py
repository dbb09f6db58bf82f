"""Checkpoints in LLaVA's original layout (the released LLaVA-Med v1.5) converted to ours.

LLaVA's own code (and LLaVA-Med's, which the released ``microsoft/llava-med-v1.5-mistral-7b`` needs) saves a
causal LM with the vision parts attached: ``config.json`` of ``model_type`` ``llava_mistral`` or
``llava_llama`` whose ``mm_*`` fields describe the vision tower and projector, and weights named
``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``, ``model.mm_projector.{0,2}`` (or
``model.mm_projector`` for a single linear layer) and, when the vision tower was saved with it,
``model.vision_tower.vision_tower.vision_model.*``. The image sits in the text as one placeholder id
(-200), which is not in the vocabulary.

:func:`convert_llava` writes the same model as a checkpoint of ours (transformers'
``LlavaForConditionalGeneration`` layout plus ``llavamed_fast.json``), shard by shard, so memory holds one
source shard at a time:

- the tokenizer gains ``<image>`` (and a pad token, the unknown token, when it has none); the embedding and
  the LM head gain rows up to the next multiple of 64, set to the mean of the existing rows (they are
  never read for ``<image>``: image positions take the projected features instead);
- the projector, the vision tower and the LLM keep their values and dtypes under transformers' names;
- the vision config comes from ``--vision`` (a CLIP checkpoint folder), else from ``mm_vision_tower``
  when it is a local folder or one of the two OpenAI CLIP ViT-L/14 towers LLaVA uses; its weights from
  the checkpoint, else from ``--vision``;
- ``image_aspect_ratio: pad`` becomes pad-to-square preprocessing, anything else LLaVA calls square
  CLIP's resize and centre crop; the chat template is ``mistral_instruct`` for ``llava_mistral`` (the
  released LLaVA-Med v1.5's) and must be named for other models.

Refused, each with the field that says so: ``<im_start>``/``<im_end>`` or patch tokens (LLaVA-Med v0's
layout, released as deltas over LLaMA), a vision feature other than the patches, tiled images (LLaVA-NeXT's
``anyres``), projectors other than ``linear`` and ``mlp2x_gelu``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel, LlavaForConditionalGeneration
from transformers.utils import logging as hf_logging

from llavamed_fast.data.templates import TEMPLATES
from llavamed_fast.model.build import VOCAB_MULTIPLE
from llavamed_fast.model.checkpoint import (
    CheckpointError,
    check_target,
    llava_config,
    staged_directory,
    write_index,
    write_metadata,
)
from llavamed_fast.model.config import ImageResize, ModelConfig, ProjectorType
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
# Buffers that older transformers saved and current ones recompute.
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", "position_ids")
_VISION_PREFIX = "model.vision_tower.vision_tower."


class ConversionError(CheckpointError):
    """A source checkpoint that cannot be converted as asked (names the file and field)."""


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
    for field in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if config.get(field):
            raise ConversionError(
                f"{path}: {field} is true (LLaVA-Med v0's image tokens); only the v1.5 layout converts"
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
    known = set(AutoConfig.for_model(kind).to_dict())
    ignored = {"architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype"}
    fields = {k: v for k, v in config.items() if k in known and k not in ignored}
    fields.update(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoConfig.for_model(kind, **fields)


def _weight_files(source: Path) -> list[Path]:
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = source / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [source / name for name in names]
        if (source / single).is_file():
            return [source / single]
    raise ConversionError(
        f"{source}: no weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])"
    )


def _read_shard(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConversionError(f"{path}: weight file is missing")
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _hf_name(name: str, projector: ProjectorType) -> str | None:
    """transformers' name of a weight of LLaVA's layout; None for a buffer that is not stored."""
    if name.endswith(_SKIPPED_SUFFIXES):
        return None
    if name.startswith(_VISION_PREFIX):
        return "model.vision_tower." + name[len(_VISION_PREFIX) :]
    if name.startswith("model.mm_projector."):
        rest = name[len("model.mm_projector.") :]
        if projector is ProjectorType.LINEAR:
            return "model.multi_modal_projector.linear_1." + rest
        layer, _, param = rest.partition(".")
        linear = {"0": "linear_1", "2": "linear_2"}.get(layer)
        return f"model.multi_modal_projector.{linear}.{param}" if linear else name
    if name.startswith("model."):
        return "model.language_model." + name[len("model.") :]
    return name  # lm_head.weight


def _grown(rows: torch.Tensor, count: int) -> torch.Tensor:
    """``rows`` with ``count`` rows more, each the mean of the existing ones."""
    if count == 0:
        return rows
    mean = rows.float().mean(dim=0, keepdim=True).to(rows.dtype)
    return torch.cat([rows, mean.expand(count, -1)])


def _converted_shards(
    files: list[Path], projector: ProjectorType, vocab_size: int, keep
) -> Iterator[dict[str, torch.Tensor]]:
    """Each source file's weights that ``keep`` accepts, under transformers' names, the vocabulary grown."""
    for path in files:
        out: dict[str, torch.Tensor] = {}
        for name, tensor in _read_shard(path).items():
            target = _hf_name(name, projector)
            if target is None or not keep(name):
                continue
            if target in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
                if tensor.shape[0] > vocab_size:
                    raise ConversionError(
                        f"{path}: {name} has {tensor.shape[0]} rows, more than the tokenizer"
                    )
                tensor = _grown(tensor, vocab_size - tensor.shape[0])
            out[target] = tensor.contiguous()
        yield out


def _expected_names(hf_config) -> set[str]:
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(hf_config)
    names = set(model.state_dict())
    if hf_config.tie_word_embeddings:
        names.discard("lm_head.weight")
    return names


def _model_config(
    config: Mapping[str, Any], source: Path, vision: CLIPVisionConfig, template: str | None, tokenizer: str
) -> ModelConfig:
    """Ours, with ``text`` holding only the LLM's type until the vocabulary's size is known."""
    text_type, known_template = _TEXT_TYPES[config["model_type"]]
    template = template or known_template
    if template is None:
        raise ConversionError(
            f"{source / 'config.json'}: model_type {config['model_type']!r} has no known chat template; "
            f"name it (--template: {', '.join(TEMPLATES)})"
        )
    layer = int(config.get("mm_vision_select_layer", -2))
    if layer >= 0:  # hidden_states[k] from the front: the embeddings are index 0
        layer -= vision.num_hidden_layers + 1
    pad = config.get("image_aspect_ratio") == "pad"
    return ModelConfig(
        name=source.name,
        vision=vision.to_dict(),
        text={"model_type": text_type},
        tokenizer=tokenizer,
        projector=ProjectorType(config.get("mm_projector_type", "linear")),
        image_resize=ImageResize.PAD_TO_SQUARE if pad else ImageResize.CENTER_CROP,
        template=template,
        image_start_end=False,
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
    except (OSError, ValueError, ImportError) as error:
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
    overwrite: bool = False,
) -> Path:
    """Write ``source`` (LLaVA's original layout) to ``out`` as a checkpoint of ours; see the module doc.
    ``vision``: a CLIP checkpoint folder for the tower's config and weights (replacing stored ones);
    ``tokenizer``: where the tokenizer comes from when not from ``source`` (a folder or hub id).
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
    vision_config = _vision_config(config, source, vision)
    model_config = _model_config(config, source, vision_config, template, tokenizer or str(source))
    tok = _load_tokenizer(model_config)
    vocab_size = -(-len(tok) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    text_config = _text_config(config, tok, vocab_size)
    model_config = model_config.replace(text=text_config.to_dict())
    processor = LlavaMedProcessor.from_config(
        model_config, image_size=vision_config.image_size, patch_size=vision_config.patch_size, tokenizer=tok
    )
    dtype = _dtype(config, source)
    hf = llava_config(
        model_config,
        vision_config,
        text_config,
        image_token_id=processor.image_tokens.token_id,
        tokens_per_image=processor.image_tokens.count,
        dtype=dtype,
    )
    files = _weight_files(source)
    source_names = _source_names(files)
    if vision is None and not any(name.startswith(_VISION_PREFIX) for name in source_names):
        raise ConversionError(
            f"{source}: the checkpoint holds no vision tower weights ({_VISION_PREFIX}*); give --vision, "
            f"the CLIP checkpoint folder it was trained with"
        )
    tower: dict[str, torch.Tensor] = {}
    if vision is not None:  # the given tower replaces a stored one, as LLaVA-Med's own loader does
        clip = CLIPVisionModel.from_pretrained(vision, dtype=dtype)
        tower = {"model.vision_tower." + k: v.contiguous() for k, v in clip.state_dict().items()}

    def keep(name: str) -> bool:
        if vision is not None and name.startswith(_VISION_PREFIX):
            return False
        return not (name == "lm_head.weight" and text_config.tie_word_embeddings)

    projector = model_config.projector
    converted = {_hf_name(n, projector) for n in source_names if keep(n)} - {None} | set(tower)
    expected = _expected_names(hf)
    missing, unexpected = sorted(expected - converted), sorted(converted - expected)
    if missing or unexpected:
        raise ConversionError(
            f"{source}: the weights do not make a LLaVA model of its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (as transformers names them)"
        )
    with staged_directory(out, overwrite=overwrite) as staging:
        _write_weights(staging, _converted_shards(files, projector, vocab_size, keep), len(files), tower)
        write_metadata(staging, hf, processor, model_config)
    return Path(out)


def _write_weights(
    directory: Path, shards: Iterator[dict[str, torch.Tensor]], count: int, tower: dict[str, torch.Tensor]
) -> None:
    """One output file per source file (and one for a tower given apart), with an index when several."""
    count += bool(tower)
    weight_map: dict[str, str] = {}
    total = 0
    # chain, not a list: one source file's tensors in memory at a time
    for number, tensors in enumerate(itertools.chain(shards, [tower] if tower else []), 1):
        name = "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
        save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if count > 1:
        write_index(directory, weight_map, total)


def _source_names(files: list[Path]) -> set[str]:
    names: set[str] = set()
    for path in files:
        if path.suffix == ".safetensors" and path.is_file():
            with safe_open(path, framework="pt") as handle:
                names.update(handle.keys())
        else:
            names.update(_read_shard(path))
    return names


__all__ = ["KNOWN_VISION_TOWERS", "ConversionError", "convert_llava"]
