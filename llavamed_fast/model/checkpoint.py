"""Checkpoints in the Hugging Face ``LlavaForConditionalGeneration`` layout.

A checkpoint directory holds ``config.json`` (``model_type: llava``), safetensors weights (sharded with an
index when large), the processor (``processor_config.json``, ``preprocessor_config.json``, tokenizer files,
``chat_template.jinja``), ``generation_config.json`` and ``llavamed_fast.json`` (our :class:`ModelConfig`:
template, projector type, image preprocessing), so ``transformers`` and serving engines load it unchanged.

Weight names: ours ``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.<decoder>.*``,
``language_model.lm_head.*`` map to ``model.vision_tower.*``, ``model.multi_modal_projector.*``,
``model.language_model.*`` and ``lm_head.*`` (transformers >= 4.52 names; older names load too).

v0 layout: LLaVA-Med v0 wraps the image in ``<im_start>`` + 256 x ``<im_patch>`` + ``<im_end>``. Here
``<im_patch>`` is transformers' image token (``<image>``, ``image_token_index``) and ``<im_start>`` /
``<im_end>`` are ordinary added tokens whose embedding rows live in the LLM's embedding matrix (and are
trained in stage 1); the chat template renders ``<im_start><image><im_end>`` and the processor expands
``<image>`` to ``image_seq_length`` copies. v0's single linear projector is exported as
``linear_1`` + ``projector_hidden_act: "linear"`` + an identity ``linear_2`` with zero bias, which computes
exactly the same function, so ``LlavaForConditionalGeneration`` loads v0 checkpoints too; loading it back
here checks that ``linear_2`` is still the identity and drops it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    GenerationConfig,
    LlavaConfig,
    PretrainedConfig,
)
from transformers.initialization import no_init_weights
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from llavamed_fast.data.durable import fsync_path, seal_tree
from llavamed_fast.data.templates import IMAGE_TOKEN, TEMPLATES, ImageTokens, get_template
from llavamed_fast.model.config import ModelConfig, ProjectorType
from llavamed_fast.model.llava_med import LlavaMed
from llavamed_fast.model.processor import LlavaMedProcessor

OUR_CONFIG = "llavamed_fast.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be written or read as asked."""


def _hf_names(model: LlavaMed) -> list[tuple[str, str]]:
    decoder = model.language_model.base_model_prefix
    return [
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        (f"language_model.{decoder}.", "model.language_model."),
        ("language_model.", ""),  # lm_head and anything else outside the decoder
    ]


def _legacy_names(model: LlavaMed) -> list[tuple[str, str]]:
    # transformers < 4.52 layout: vision_tower.*, multi_modal_projector.*, language_model.model.*, language_model.lm_head.*
    decoder = model.language_model.base_model_prefix
    return [
        ("vision_tower.", "vision_tower."),
        ("multi_modal_projector.", "multi_modal_projector."),
        (f"language_model.{decoder}.", f"language_model.{decoder}."),
        ("language_model.", "language_model."),
    ]


def _rename(name: str, table: list[tuple[str, str]], *, forward: bool) -> str | None:
    for ours, theirs in table:
        src, dst = (ours, theirs) if forward else (theirs, ours)
        if name.startswith(src):  # the last row's empty prefix catches the rest
            return dst + name[len(src) :]
    return None


def llava_config(
    config: ModelConfig,
    vision: PretrainedConfig,
    text: PretrainedConfig,
    *,
    image_token_id: int,
    tokens_per_image: int,
    dtype: torch.dtype,
) -> LlavaConfig:
    """transformers' config for a model of ``config`` with these vision and text sub-configs."""
    text_fields = text.to_dict()
    linear = config.projector is ProjectorType.LINEAR
    hf = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text_fields,
        image_token_index=image_token_id,
        image_seq_length=tokens_per_image,
        projector_hidden_act="linear" if linear else "gelu",
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(text_fields.get("tie_word_embeddings", False)),
    )
    hf.architectures = ["LlavaForConditionalGeneration"]
    hf.dtype = dtype
    return hf


def hf_config(model: LlavaMed) -> LlavaConfig:
    return llava_config(
        model.config,
        model.vision_tower.config,
        model.language_model.config,
        image_token_id=model.image_token_id,
        tokens_per_image=model.tokens_per_image,
        dtype=next(model.parameters()).dtype,
    )


def hf_state_dict(model: LlavaMed) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names (v0's projector completed with an identity ``linear_2``)."""
    table = _hf_names(model)
    state = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        # Tied weights share storage; safetensors stores each tensor once and transformers re-ties on load.
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[_rename(name, table, forward=True)] = tensor.detach().contiguous()
    if model.config.projector is ProjectorType.LINEAR:
        weight = model.multi_modal_projector.linear_1.weight
        width = weight.shape[0]
        state["model.multi_modal_projector.linear_2.weight"] = torch.eye(width, dtype=weight.dtype)
        state["model.multi_modal_projector.linear_2.bias"] = torch.zeros(width, dtype=weight.dtype)
    return state


def check_target(directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """``directory`` as a Path, refused when it holds something and ``overwrite`` is not set."""
    target = Path(directory)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise CheckpointError(f"{target} exists and is not empty (pass overwrite=True to replace it)")
    return target


@contextlib.contextmanager
def staged_directory(directory: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """A checkpoint directory written in a temporary sibling and renamed into place when the block ends
    without an error (sealed: readable by others and on disk first), so a crash never leaves a
    half-written checkpoint under ``directory``; on an error the sibling is removed."""
    target = check_target(directory, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its directories are 0700, and the staging directory becomes the checkpoint.
    # mkdir gives the permissions any new directory gets (0777 less the umask).
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    try:
        yield staging
        seal_tree(staging)  # readable by others (safetensors writes 0600) and on disk before the rename
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        fsync_path(target.parent)  # the rename itself
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    """``model.safetensors.index.json`` of a sharded checkpoint."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_metadata(
    directory: Path, hf: LlavaConfig, processor: LlavaMedProcessor, config: ModelConfig
) -> None:
    """Everything but the weights: transformers' config, generation config, processor and ours."""
    hf.save_pretrained(directory)
    tokenizer = processor.tokenizer
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(directory)
    processor.save_pretrained(directory)
    ours = {"format_version": FORMAT_VERSION, "model": config.to_dict()}
    (directory / OUR_CONFIG).write_text(json.dumps(ours, indent=2) + "\n")


def save_pretrained(
    model: LlavaMed,
    processor: LlavaMedProcessor,
    directory: str | os.PathLike,
    *,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write a complete checkpoint (through :func:`staged_directory`: all of it or nothing)."""
    with staged_directory(directory, overwrite=overwrite) as staging:
        state = {name: tensor.cpu() for name, tensor in hf_state_dict(model).items()}
        split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
        for filename, names in split.filename_to_tensors.items():
            save_file({n: state[n] for n in names}, staging / filename, metadata={"format": "pt"})
        if split.is_sharded:
            total = sum(t.numel() * t.element_size() for t in state.values())
            write_index(staging, split.tensor_to_filename, total)
        write_metadata(staging, hf_config(model), processor, model.config)
    return Path(directory)


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    state = {}
    for filename in files:
        path = directory / filename
        if not path.exists():
            raise CheckpointError(f"{directory}: weight file {filename} is missing")
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                state[name] = handle.get_tensor(name)
    return state


def load_pretrained(
    directory: str | os.PathLike,
    *,
    template: str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[LlavaMed, LlavaMedProcessor]:
    """Load a checkpoint written by :func:`save_pretrained`, or a plain transformers LLaVA checkpoint
    (then ``template`` must name its chat template: it is never guessed). Weights keep their stored dtype
    unless ``dtype`` is given."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory} has no config.json: not a checkpoint directory")
    if template is not None and template not in TEMPLATES:
        raise CheckpointError(f"unknown chat template {template!r}; known: {', '.join(TEMPLATES)}")
    hf = LlavaConfig.from_pretrained(directory)
    image_processor = LlavaImageProcessorPil.from_pretrained(directory)
    if (directory / OUR_CONFIG).exists():
        config = ModelConfig.from_dict(json.loads((directory / OUR_CONFIG).read_text())["model"])
        if template is not None:
            config = config.replace(template=template)
    else:
        if template is None:
            raise CheckpointError(
                f"{directory} has no {OUR_CONFIG} (a plain transformers checkpoint): name its chat template "
                f"(--template on the command line, template= in Python), one of {', '.join(TEMPLATES)}"
            )
        config = ModelConfig(
            name=directory.name,
            vision=hf.vision_config.to_dict(),
            text=hf.text_config.to_dict(),
            tokenizer=str(directory),
            projector=ProjectorType.LINEAR
            if hf.projector_hidden_act == "linear"
            else ProjectorType.MLP2X_GELU,
            # Informational here: the checkpoint's own image processor (loaded below) does the preprocessing.
            image_resize="pad_to_square" if image_processor.do_pad else "center_crop",
            template=template,
            image_start_end=False,
            max_length=hf.text_config.max_position_embeddings,
        )
    # The checkpoint's own sub-configs describe the architecture; weights come from its files.
    with no_init_weights():
        vision = CLIPVisionModel(hf.vision_config)
        text = AutoModelForCausalLM.from_config(hf.text_config)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    count = hf.image_seq_length
    processor = LlavaMedProcessor(
        tokenizer=tokenizer,
        image_processor=image_processor,
        template=get_template(config.template),
        image_tokens=ImageTokens(hf.image_token_index, count),
        image_placeholder=config.image_placeholder,
        max_length=config.max_length,
        patch_size=hf.vision_config.patch_size,
    )
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != hf.image_token_index:
        raise CheckpointError(f"{directory}: the tokenizer's {IMAGE_TOKEN} id differs from image_token_index")
    with no_init_weights():
        model = LlavaMed(config, vision, text, image_token_id=hf.image_token_index, tokens_per_image=count)
    _load_weights(model, _read_weights(directory), directory)
    if dtype is not None:
        model.to(dtype)
    return model, processor


def _load_weights(model: LlavaMed, state: dict[str, torch.Tensor], directory: Path) -> None:
    if model.config.projector is ProjectorType.LINEAR:
        weight = state.pop("model.multi_modal_projector.linear_2.weight", None)
        bias = state.pop("model.multi_modal_projector.linear_2.bias", None)
        identity = weight is None or torch.equal(weight, torch.eye(weight.shape[0], dtype=weight.dtype))
        if not identity or (bias is not None and bias.any()):
            raise CheckpointError(
                f"{directory}: a linear projector's linear_2 must be the identity with zero bias"
            )
    table = _hf_names(model) if any(n.startswith("model.") for n in state) else _legacy_names(model)
    ours = {}
    for name, tensor in state.items():
        ours[_rename(name, table, forward=False)] = tensor
    expected = set(model.state_dict())
    # With tied embeddings the checkpoint stores the shared matrix once; tie_weights() restores the other name.
    tied = {"language_model.lm_head.weight"} if model.language_model.config.tie_word_embeddings else set()
    missing = sorted(expected - set(ours) - tied)
    unexpected = sorted(set(ours) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory}: missing weights {missing[:5]}, unexpected weights {unexpected[:5]}"
        )
    # assign=True: the model takes the stored tensors as they are (their dtype too, like dtype='auto').
    model.load_state_dict(ours, strict=not tied, assign=True)
    if tied:
        model.language_model.tie_weights()


def load_for_inference(
    directory: str | os.PathLike,
    *,
    template: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> tuple[LlavaMed, LlavaMedProcessor]:
    """:func:`load_pretrained` in eval mode on ``device`` (default: CUDA when there is one, else the CPU),
    ``dtype`` by name ("bfloat16", ...; default: as stored). For the answering, chat and serving commands."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_pretrained(
        directory, template=template, dtype=getattr(torch, dtype) if dtype else None
    )
    return model.to(device).eval(), processor


def checkpoint_name(path: str | os.PathLike) -> str:
    """A short name for a checkpoint, for answer files and the served model's id: its folder's name, except
    for a training run's exports, whose folder names repeat in every run (``RUN/model`` is ``RUN``,
    ``RUN/stages/NAME`` is ``RUN-NAME``), so that two runs' answers never share a model id."""
    given = Path(path)
    path = given.absolute()  # "model" from inside the run folder names the run too
    run = path.parent.parent if path.parent.name == "stages" else path.parent
    is_run = (run / "config.json").is_file() and (run / "metrics.jsonl").is_file()
    if is_run and path.parent.name == "stages":
        return f"{run.name}-{path.name}"
    if is_run and path.name == "model":
        return run.name
    return path.name or given.name
