"""Typed training configuration: a run is a model and a curriculum of stages, validated on construction.

A recipe (``recipes.py``) returns a full :class:`RunConfig`; the command line overrides single fields with
``--set path=value`` (``seed=1``, ``stages.1.lr=1e-4``, ``stages.instruct.epochs=1``,
``stages.*.zero_stage=2``). The resolved config is saved as ``config.json`` in the run directory, and a
resumed run must match it except in the fields of :data:`RESUMABLE_RUN_FIELDS`,
:data:`RESUMABLE_STAGE_FIELDS` and :data:`RESUMABLE_DATA_FIELDS`, which change neither the data plan nor
what a checkpoint holds.

Every field is checked on construction; an error names the field by its ``--set`` path
(``stages.instruct.lora.r: must be a positive integer, got 0``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A field with a value it cannot take; ``key`` is the field's dotted path (relative to the dataclass
    that raised it until :func:`_build` prefixes where that dataclass sits in the run's config)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


def _require(ok: bool, key: str, requirement: str, value: Any) -> None:
    if not ok:
        raise ConfigError(key, f"must be {requirement}, got {value!r}")


DTYPE_NAMES = ("bfloat16", "float16", "float32")


class Trainable(str, enum.Enum):
    """Parameter groups a stage can train; everything else is frozen for that stage."""

    PROJECTOR = "projector"  # multi_modal_projector
    IMAGE_TOKENS = "image_tokens"  # the <im_start>/<im_end> embedding rows (v0), nothing else of the LLM
    LLM = "llm"  # the whole language model (or its LoRA adapters when the stage uses LoRA)
    VISION = "vision"  # the vision tower (LLaVA-Med keeps it frozen)


class Schedule(str, enum.Enum):
    COSINE = "cosine"  # linear warmup, then cosine decay to 0 (LLaVA / LLaVA-Med)
    LINEAR = "linear"
    CONSTANT = "constant"


class DataKind(str, enum.Enum):
    LLAVA_JSON = "llava_json"  # a LLaVA JSON / JSONL file + an image folder
    SYNTHETIC = "synthetic"  # generated scans with captions/conversations (offline demo and tests)
    VQA_RAD = "vqa_rad"  # VQA-RAD's training questions (the public JSON's 1,797 freeform + para rows)


@dataclass
class DataConfig:
    kind: DataKind = DataKind.LLAVA_JSON
    path: str = ""  # LLaVA JSON(L) file, or the VQA-RAD folder (default $LLAVAMED_SHARED_DATA/vqa-rad)
    image_folder: str = ""
    synthetic_task: str = "conversations"  # synthetic: "captions", "conversations" or "side_questions"
    synthetic_count: int = 0
    synthetic_seed: int = 0
    max_samples: int = 0  # 0: all
    bad_images: str = "raise"  # or "skip": leave bad samples out, counted in the run summary

    def __post_init__(self) -> None:
        self.kind = DataKind(self.kind)
        if self.kind is DataKind.LLAVA_JSON and not self.path:
            raise ConfigError("path", "is required for llava_json data")
        count, synthetic = self.synthetic_count, self.kind is DataKind.SYNTHETIC
        # A file named for a kind that reads none would be ignored, and the stage would silently train on
        # something else (the recipe's synthetic data).
        ignored = (
            ("path", "image_folder")
            if synthetic
            else ("image_folder",)
            if self.kind is DataKind.VQA_RAD
            else ()
        )
        for key in ignored:
            if getattr(self, key):
                why = "generated data, no files" if synthetic else "its images are PATH/images"
                raise ConfigError(
                    key,
                    f"is set, but kind is {self.kind.value!r} ({why}), so it would be ignored; to train on a "
                    f"LLaVA JSON file also set this stage's data.kind=llava_json, else clear it ({key}=)",
                )
        _require(count > 0 or (count == 0 and not synthetic), "synthetic_count", "positive", count)
        _require(self.synthetic_seed >= 0, "synthetic_seed", ">= 0", self.synthetic_seed)
        _require(self.max_samples >= 0, "max_samples", ">= 0 (0: all)", self.max_samples)
        tasks = ("captions", "conversations", "side_questions")
        _require(self.synthetic_task in tasks, "synthetic_task", " or ".join(tasks), self.synthetic_task)
        _require(self.bad_images in ("raise", "skip"), "bad_images", "raise or skip", self.bad_images)


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )

    def __post_init__(self) -> None:
        _require(self.r > 0, "r", "a positive integer", self.r)
        _require(self.alpha > 0, "alpha", "a positive integer", self.alpha)
        _require(0 <= self.dropout < 1, "dropout", "in [0, 1)", self.dropout)
        _require(len(self.target_modules) > 0, "target_modules", "a non-empty list", self.target_modules)


@dataclass
class StageConfig:
    """One stage of the curriculum: what trains, on which data, for how long, at which rate."""

    name: str
    data: DataConfig
    trainable: tuple[Trainable, ...]
    lr: float
    global_batch_size: int  # samples per optimizer step (all ranks together; see batches.py for rounding)
    micro_batch_tokens: int  # token budget of one packed row (one micro-batch)
    epochs: float = 1.0
    max_steps: int = 0  # 0: as many as the epochs give
    warmup_ratio: float = 0.03
    schedule: Schedule = Schedule.COSINE
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    zero_stage: int = 0  # 0: plain data parallel; 2 or 3: DeepSpeed ZeRO
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        self.trainable = tuple(Trainable(t) for t in self.trainable)
        self.schedule = Schedule(self.schedule)
        if not self.trainable:
            raise ConfigError("trainable", "the stage trains nothing")
        if self.lora is not None and Trainable.LLM not in self.trainable:
            raise ConfigError("lora", "LoRA adapts the LLM, so the stage needs 'llm' in trainable")
        _require(self.lr > 0, "lr", "a positive number", self.lr)
        _require(
            self.global_batch_size > 0, "global_batch_size", "a positive integer", self.global_batch_size
        )
        _require(
            self.micro_batch_tokens > 0, "micro_batch_tokens", "a positive integer", self.micro_batch_tokens
        )
        # Epochs are planned first and max_steps cuts them short, so a stage needs epochs either way.
        _require(self.epochs > 0, "epochs", "a positive number", self.epochs)
        _require(self.max_steps >= 0, "max_steps", ">= 0 (0: as many as the epochs give)", self.max_steps)
        _require(0 <= self.warmup_ratio < 1, "warmup_ratio", "in [0, 1)", self.warmup_ratio)
        _require(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        _require(all(0 <= b < 1 for b in self.adam_betas), "adam_betas", "in [0, 1)", self.adam_betas)
        _require(self.adam_eps > 0, "adam_eps", "a positive number", self.adam_eps)
        # Both engines clip to it; the plain one would zero (0) or flip (< 0) the gradients.
        _require(self.max_grad_norm > 0, "max_grad_norm", "a positive number", self.max_grad_norm)
        _require(self.zero_stage in (0, 2, 3), "zero_stage", "0, 2 or 3", self.zero_stage)

    @property
    def trains_image_rows(self) -> bool:
        """``image_tokens`` trains the two embedding rows alone: the LLM is not trained in full (frozen, or
        only LoRA adapters, which do not reach the embedding)."""
        full_llm = Trainable.LLM in self.trainable and self.lora is None
        return Trainable.IMAGE_TOKENS in self.trainable and not full_llm


@dataclass
class RunConfig:
    """A whole training run: the model, the stages in order, and run-wide settings."""

    recipe: str
    model: str  # a model preset name or a checkpoint directory (HF LLaVA layout)
    stages: tuple[StageConfig, ...]
    seed: int = 0
    dtype: str = "bfloat16"  # compute dtype on GPUs; CPUs run float32
    checkpoint_every: int = 500  # optimizer steps
    keep_last: int = 2  # checkpoints kept (stage-boundary checkpoints are kept too)
    log_every: int = 1
    peak_tflops: float = 0.0  # dense bf16 peak per device for MFU; 0: looked up from the device name
    feature_cache: bool = False  # precompute the frozen vision tower's features once (memory-mapped)
    nan_limit: int = 5  # consecutive skipped (non-finite) steps before the run stops
    num_workers: int = 0  # data loader workers per rank
    rows_multiple: int = (
        0  # rows per step are a multiple of this (0: the number of processes); see batches.py
    )
    inject_nan_at: tuple[int, ...] = ()  # fault injection: make the loss NaN at these global steps (1-based)
    tensorboard: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        if not names:
            raise ConfigError("stages", f"recipe {self.recipe!r} has no stages")
        if len(set(names)) != len(names):
            raise ConfigError("stages", f"stage names must be unique, got {names}")
        _require(self.dtype in DTYPE_NAMES, "dtype", " or ".join(DTYPE_NAMES), self.dtype)
        _require(self.seed >= 0, "seed", ">= 0", self.seed)
        for key in ("checkpoint_every", "keep_last", "log_every", "nan_limit"):
            _require(getattr(self, key) > 0, key, "a positive integer", getattr(self, key))
        _require(self.peak_tflops >= 0, "peak_tflops", ">= 0 (0: looked up)", self.peak_tflops)
        _require(self.num_workers >= 0, "num_workers", ">= 0 (0: no worker processes)", self.num_workers)
        _require(
            self.rows_multiple >= 0, "rows_multiple", ">= 0 (0: the number of processes)", self.rows_multiple
        )
        _require(all(s > 0 for s in self.inject_nan_at), "inject_nan_at", "steps >= 1", self.inject_nan_at)

    def stage_index(self, name: str) -> int:
        for index, stage in enumerate(self.stages):
            if stage.name == name:
                return index
        raise KeyError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        return _build(cls, data, "")


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {k: _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _build(cls: type, data: Any, where: str) -> Any:
    """Construct dataclass ``cls`` from plain data, checking field names and types; ``where`` is its dotted
    path in the run's config ("" for the root), which prefixes every error."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or 'config'}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"{where or 'config'}: unknown fields {sorted(unknown)}")
    values = {name: _coerce(hints[name], value, _join(where, name)) for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(_join(where, error.key), error.problem) from None


def _element(where: str, index: int, value: Any) -> str:
    """A list element's path: stages by name (as ``--set`` addresses them), anything else by index."""
    if isinstance(value, Mapping) and isinstance(value.get("name"), str):
        return _join(where, value["name"])
    return f"{where}[{index}]"


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _coerce(options[0], value, where)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else _build(hint, value, where)
    if origin is tuple:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ValueError(
                f'{where}: expected a list (on the command line JSON: [12, 13], ["llm"]), got {value!r}'
            )
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, _element(where, i, v)) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ValueError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError as error:
            raise ValueError(f"{where}: {value!r} is not one of {[m.value for m in hint]}") from error
    if hint is float:
        # --set parses values as JSON: "abc" stays a string, true a bool, Infinity and NaN floats.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if (hint in (int, str) and not isinstance(value, hint)) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# What a resumed run may change

# Fields that ``--resume`` accepts changed: they decide neither which samples make each step nor what a
# checkpoint holds, so the steps already done stay valid. A stage's new ``lr`` is the schedule's peak from
# the resumed step on (the schedule keeps its position); the others take effect at once.
RESUMABLE_RUN_FIELDS = frozenset(
    {
        "checkpoint_every",
        "keep_last",
        "log_every",
        "nan_limit",
        "num_workers",
        "peak_tflops",
        "plots",
        "tensorboard",
    }
)
RESUMABLE_STAGE_FIELDS = frozenset({"lr", "max_grad_norm"})
# Skipping a bad image happens in the collator, after the plan: switching a stopped run to "skip" (or
# back) keeps every step where it was.
RESUMABLE_DATA_FIELDS = frozenset({"bad_images"})


def config_changes(saved: Mapping[str, Any], config: RunConfig) -> list[tuple[str, Any, Any]]:
    """``(path, saved value, new value)`` for each field where ``config`` differs from ``saved`` (a run's
    ``config.json``), paths as ``--set`` writes them (stages by name)."""
    changes: list[tuple[str, Any, Any]] = []

    def walk(old: Any, new: Any, path: str) -> None:
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            for key in sorted(set(old) | set(new)):
                walk(old.get(key), new.get(key), _join(path, key))
        elif path == "stages" and [s.get("name") for s in old] == [s.get("name") for s in new]:
            for a, b in zip(old, new, strict=True):
                walk(a, b, _join(path, a["name"]))
        elif old != new:
            changes.append((path, old, new))

    walk(saved, config.to_dict(), "")
    return changes


def resumable(path: str) -> bool:
    """Whether a resumed run may change the field at ``path`` (see :data:`RESUMABLE_RUN_FIELDS`)."""
    keys = path.split(".")
    if len(keys) == 1:
        return keys[0] in RESUMABLE_RUN_FIELDS
    if len(keys) == 4 and keys[0] == "stages" and keys[2] == "data":
        return keys[3] in RESUMABLE_DATA_FIELDS
    return len(keys) == 3 and keys[0] == "stages" and keys[2] in RESUMABLE_STAGE_FIELDS


# ---------------------------------------------------------------------------------------------------------------
# --set path=value


def _parse_value(text: str) -> Any:
    """JSON when it parses (numbers, true/false, null, lists, objects), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """A new config with each ``path=value`` applied; paths are dotted field names, stage names or
    indices, and ``*`` for every stage."""
    data = config.to_dict()
    for override in overrides:
        path, sep, text = override.partition("=")
        if not sep or not path:
            raise ValueError(f"--set expects path=value, got {override!r}")
        _assign(data, path.split("."), _parse_value(text), override)
    return RunConfig.from_dict(data)


def _assign(node: Any, keys: list[str], value: Any, override: str, *, new: bool = False) -> None:
    """Set ``value`` at ``keys`` in plain config data. ``new``: ``node`` was None (an optional section such
    as ``lora``) and is being created, so its fields are not known here; building the config checks them."""
    key, rest = keys[0], keys[1:]
    if isinstance(node, list):
        if key == "*":
            targets = node
        elif key.isdigit() and int(key) < len(node):
            targets = [node[int(key)]]
        else:
            targets = [s for s in node if isinstance(s, dict) and s.get("name") == key]
        if not targets:
            raise ValueError(f"--set {override}: no element {key!r}")
        if not rest:
            raise ValueError(f"--set {override}: cannot replace a whole list element")
        for target in targets:
            _assign(target, rest, value, override)
        return
    if not isinstance(node, dict) or (key not in node and not new):
        raise ValueError(f"--set {override}: unknown field {key!r}")
    if not rest:
        node[key] = value
        return
    created = node.get(key) is None
    if created:
        node[key] = {}
    _assign(node[key], rest, value, override, new=created)


__all__ = [
    "RESUMABLE_DATA_FIELDS",
    "RESUMABLE_RUN_FIELDS",
    "RESUMABLE_STAGE_FIELDS",
    "ConfigError",
    "DataConfig",
    "DataKind",
    "LoraConfig",
    "RunConfig",
    "Schedule",
    "StageConfig",
    "Trainable",
    "apply_overrides",
    "config_changes",
    "resumable",
]
