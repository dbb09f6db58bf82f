"""The weights of checkpoints in LLaVA's original layout, for ``convert.py``: reading them (safetensors or
PyTorch files, with or without an index), their names in transformers' LLaVA, deltas added to a base LLM,
and writing them out one source file at a time."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llavamed_fast.model.checkpoint import CheckpointError, write_index
from llavamed_fast.model.config import ProjectorType

# Buffers that older transformers saved and current ones recompute.
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", "position_ids")
VISION_PREFIX = "model.vision_tower.vision_tower."


class ConversionError(CheckpointError):
    """A source checkpoint that cannot be converted as asked (names the file and field)."""


def weight_files(source: Path) -> list[Path]:
    """The checkpoint's weight files, from its index when it has one."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = source / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                raise ConversionError(f"{index}: not an index with a weight_map ({error!r})") from error
            return [source / name for name in names]
        if (source / single).is_file():
            return [source / single]
    raise ConversionError(
        f"{source}: no weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])"
    )


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors or PyTorch weight file (the latter memory-mapped)."""
    if not path.is_file():
        raise ConversionError(f"{path}: weight file is missing")
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, ValueError, EOFError) as error:  # torch.load's pickle and zip errors
        raise ConversionError(f"{path}: cannot read it as PyTorch weights ({error})") from error


def read_tensor(path: Path, name: str) -> torch.Tensor | None:
    """One tensor of a weight file (only it, from safetensors), or None when the file has none so named."""
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as handle:
            return handle.get_tensor(name) if name in handle.keys() else None
    return read_weights_file(path).get(name)


@dataclass(frozen=True)
class WeightNames:
    """LLaVA's weight names to transformers' for one model: the projector's kind, and whether this
    transformers version keeps CLIP's ``vision_model.`` level inside the tower's names (5.x does not)."""

    projector: ProjectorType
    tower_level: bool

    def tower(self, rest: str) -> str:
        """A CLIP weight's name (with or without ``vision_model.``) inside the LLaVA model."""
        rest = rest.removeprefix("vision_model.")
        return "model.vision_tower." + ("vision_model." if self.tower_level else "") + rest

    def __call__(self, name: str) -> str | None:
        """transformers' name of a weight of LLaVA's layout; None for a buffer that is not stored."""
        if name.endswith(SKIPPED_SUFFIXES):
            return None
        if name.startswith(VISION_PREFIX):
            return self.tower(name[len(VISION_PREFIX) :])
        if name.startswith("model.mm_projector."):
            rest = name[len("model.mm_projector.") :]
            if self.projector is ProjectorType.LINEAR:
                return "model.multi_modal_projector.linear_1." + rest
            layer, _, param = rest.partition(".")
            linear = {"0": "linear_1", "2": "linear_2"}.get(layer)
            return f"model.multi_modal_projector.{linear}.{param}" if linear else name
        if name.startswith("model."):
            return "model.language_model." + name[len("model.") :]
        return name  # lm_head.weight


VOCAB_ROWS = ("model.language_model.embed_tokens.weight", "lm_head.weight")
LLM_PREFIXES = ("model.language_model.", "lm_head.")  # transformers' names of the LLM's weights
_IDENTITY = "model.multi_modal_projector.linear_2."


def _grown(rows: torch.Tensor, count: int) -> torch.Tensor:
    """``rows`` with ``count`` rows more, each the mean of the existing ones."""
    if count == 0:
        return rows
    mean = rows.float().mean(dim=0, keepdim=True).to(rows.dtype)
    return torch.cat([rows, mean.expand(count, -1)])


def _identity_linear_2(linear_1: torch.Tensor) -> dict[str, torch.Tensor]:
    """A single linear projector is written as transformers' two layers with an identity second one
    (the same function; ``checkpoint.py`` reads it back as one layer)."""
    width = linear_1.shape[0]
    return {
        _IDENTITY + "weight": torch.eye(width, dtype=linear_1.dtype),
        _IDENTITY + "bias": torch.zeros(width, dtype=linear_1.dtype),
    }


class BaseWeights:
    """The base LLM that a checkpoint's LLM weights are deltas over (LLaVA-Med v0's releases): each delta
    weight plus the base's weight of the same name, in float32, back in the delta's dtype. The embedding and
    the LM head add the base to their first rows only (the delta has rows for the tokens LLaVA added);
    the projector and the vision tower are not deltas."""

    def __init__(self, directory: Path) -> None:
        if not (directory / "config.json").is_file():
            raise ConversionError(f"--base {directory}: not a checkpoint folder (no config.json)")
        self.directory = directory
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        try:
            files = weight_files(directory)
        except ConversionError as error:
            raise ConversionError(f"--base {error}") from error
        for path in files:
            for name, shape in source_shapes([path]).items():
                self.where[name], self.shapes[name] = path, shape
        self.stored = {name: name for name in self.shapes}  # the name each weight is read under
        tied = "model.embed_tokens.weight"
        if "lm_head.weight" not in self.shapes and tied in self.shapes:  # a base with tied embeddings
            self.where["lm_head.weight"], self.shapes["lm_head.weight"] = self.where[tied], self.shapes[tied]
            self.stored["lm_head.weight"] = tied
        self._loaded: tuple[Path, dict[str, torch.Tensor]] | None = None  # one .bin file at a time

    def check(self, deltas: Mapping[str, tuple[int, ...]]) -> None:
        """Every delta (name -> shape) has a base weight it can be added to; before anything is written."""
        for name, shape in deltas.items():
            if name not in self.shapes:
                raise ConversionError(f"--base {self.directory}: has no {name}, which the delta weights hold")
            base = self.shapes[name]
            vocab_rows = name in ("model.embed_tokens.weight", "lm_head.weight")
            fits = base[1:] == shape[1:] and base[0] <= shape[0] if vocab_rows else base == shape
            if not fits:
                raise ConversionError(f"--base {self.directory}: {name} is {base}, the delta's {shape}")

    def added(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        path = self.where[name]
        stored = self.stored[name]
        if path.suffix == ".safetensors":
            base = read_tensor(path, stored)
        else:  # a pickled file is read whole: keep the last one for the weights that follow
            if self._loaded is None or self._loaded[0] != path:
                self._loaded = (path, read_weights_file(path))
            base = self._loaded[1][stored]
        total = delta.to(torch.float32, copy=True)
        total[: base.shape[0]] += base.float()
        return total.to(delta.dtype)


def converted_shards(
    files: list[Path],
    names: WeightNames,
    vocab_size: int,
    keep: Callable[[str], bool],
    base: BaseWeights | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Each source file's weights that ``keep`` accepts, under transformers' names, the base added to the
    LLM's when they are deltas, the vocabulary grown."""
    for path in files:
        out: dict[str, torch.Tensor] = {}
        for name, tensor in read_weights_file(path).items():
            target = names(name)
            if target is None or not keep(name):
                continue
            if base is not None and target.startswith(LLM_PREFIXES):
                tensor = base.added(name, tensor)
            if target in VOCAB_ROWS:
                tensor = _grown(tensor, vocab_size - tensor.shape[0])
            out[target] = tensor.contiguous()
            if names.projector is ProjectorType.LINEAR and target.endswith("linear_1.weight"):
                out.update(_identity_linear_2(tensor))
        yield out


def planned_shapes(
    source_shapes: Mapping[str, tuple[int, ...]],
    names: WeightNames,
    vocab_size: int,
    keep: Callable[[str], bool],
) -> dict[str, tuple[int, ...]]:
    """The shapes :func:`converted_shards` will write, from the source's shapes alone."""
    planned: dict[str, tuple[int, ...]] = {}
    for name, shape in source_shapes.items():
        target = names(name)
        if target is None or not keep(name):
            continue
        planned[target] = (vocab_size, *shape[1:]) if target in VOCAB_ROWS else tuple(shape)
        if names.projector is ProjectorType.LINEAR and target.endswith("linear_1.weight"):
            planned[_IDENTITY + "weight"] = (shape[0], shape[0])
            planned[_IDENTITY + "bias"] = (shape[0],)
    return planned


def write_weights(
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
        del tensors  # before the generator reads the next file
    if count > 1:
        write_index(directory, weight_map, total)


def check_delta(files: list[Path], *, delta: bool) -> None:
    """Whether the LLM's weights are deltas (``--base`` given) agrees with the weights: the final norm's
    weights average near 0 in a delta (the base's, near 1 or above when trained, are added later) and far
    from 0 in full weights. Adding the base twice, or not at all, would write a model that runs and talks
    nonsense."""
    name = "model.norm.weight"
    for path in files:
        norm = read_tensor(path, name)
        if norm is None:
            continue
        mean = norm.float().mean().item()
        if delta and abs(mean) >= 0.5:
            raise ConversionError(
                f"{path}: {name} averages {mean:.3f}, as full weights do (a delta's is near 0): leave out --base"
            )
        if not delta and abs(mean) < 0.5:
            raise ConversionError(
                f"{path}: {name} averages {mean:.3f}, as delta weights do (a trained model's is near 1): "
                f"give --base, the LLM they are deltas over"
            )
        return


def source_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every stored weight's shape, read from the safetensors headers (a .bin file is loaded, mmapped)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        if path.suffix == ".safetensors" and path.is_file():
            with safe_open(path, framework="pt") as handle:
                shapes.update({n: tuple(handle.get_slice(n).get_shape()) for n in handle.keys()})
        else:
            shapes.update({n: tuple(t.shape) for n, t in read_weights_file(path).items()})
    return shapes
