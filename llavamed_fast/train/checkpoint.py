"""Training checkpoints that resume exactly, written atomically.

``<run>/checkpoints/<name>/`` holds ``model.safetensors`` (every weight, our module names),
``trainer_state.json`` (stage, steps done, skip counters, the number of processes that wrote it), the
engine's optimizer and schedule state, ``rng-<rank>.pt`` (each rank's random state) and, written last,
``COMPLETE``. A checkpoint is assembled in a hidden temporary directory, fsynced, then renamed into place;
a directory without ``COMPLETE`` is never read, so a run killed while saving resumes from the previous one.
A checkpoint resumes only with the number of processes that wrote it. Step checkpoints
(``step-<global step>``) are pruned to the last ``keep_last``; stage-end checkpoints (``stage-<i>-<name>``)
are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llavamed_fast.data.durable import fsync_path, seal_tree
from llavamed_fast.train.batches import PLAN_VERSION
from llavamed_fast.train.dist import Dist

MARKER = "COMPLETE"


@dataclass
class TrainerState:
    stage_index: int = 0
    stage_step: int = 0  # optimizer steps done in the current stage
    global_step: int = 0  # optimizer steps done in the run
    stage_done: bool = False  # the stage at stage_index finished (its end checkpoint)
    consecutive_skips: int = 0
    skipped_steps: int = 0
    # The current stage's samples left out for bad images so far ([record, path, reason], all ranks), so
    # that the stage's end reports them after a resume too.
    skipped_samples: list[list[str]] = field(default_factory=list)
    plan_version: int = PLAN_VERSION  # the step plan stage_step counts in (see batches.PLAN_VERSION)


def _unique(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors sharing storage (tied embeddings) are stored once; ``aliases`` maps the others back."""
    seen: dict[tuple[int, int], str] = {}
    unique, aliases = {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.detach().cpu().contiguous()
    return unique, aliases


def save(
    run_dir: Path,
    name: str,
    *,
    model_state: dict[str, torch.Tensor] | None,
    engine,
    state: TrainerState,
    dist: Dist,
    keep_last: int,
) -> Path:
    """Write checkpoint ``name`` (all ranks call this; ``model_state`` is needed on the main rank only)."""
    root = run_dir / "checkpoints"
    final, staging = root / name, root / f".{name}.tmp"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    dist.barrier()
    if dist.is_main:
        weights, aliases = _unique(model_state)
        save_file(weights, staging / "model.safetensors", metadata={"format": "pt"})
        record = {**asdict(state), "world_size": dist.world_size, "aliases": aliases}
        (staging / "trainer_state.json").write_text(json.dumps(record, indent=2) + "\n")
    if engine is not None:
        engine.save(staging)
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, staging / f"rng-{dist.rank}.pt")
    dist.barrier()
    if dist.is_main:
        seal_tree(staging)  # the usual file mode (safetensors writes 0600), all on disk before the marker
        with open(staging / MARKER, "w") as handle:
            handle.write(f"{state.global_step}\n")
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_path(root)
        _prune(root, keep_last)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.glob("step-*") if (p / MARKER).exists())
    for old in steps[:-keep_last]:
        shutil.rmtree(old)


def latest(run_dir: Path) -> Path | None:
    """The complete checkpoint with the most optimizer steps done (stage ends win ties), or None."""
    candidates = []
    for path in (run_dir / "checkpoints").glob("*"):
        if path.name.startswith(".") or not (path / MARKER).exists():
            continue
        state = read_state(path)
        candidates.append(((state.global_step, state.stage_done), path))
    return max(candidates)[1] if candidates else None


def read_state(path: Path) -> TrainerState:
    record = json.loads((path / "trainer_state.json").read_text())
    record.pop("aliases", None)
    record.pop("world_size", None)
    record.setdefault("plan_version", 1)  # written before the field: the first plan
    return TrainerState(**record)


def saved_world_size(path: Path) -> int:
    """How many processes wrote checkpoint ``path``."""
    record = json.loads((path / "trainer_state.json").read_text())
    if "world_size" in record:
        return record["world_size"]
    return len(list(path.glob("rng-*.pt")))  # checkpoints from before the field: one RNG file per rank


def check_world_size(path: Path, dist: Dist, *, plan_follows_world_size: bool) -> None:
    """Refuse to resume checkpoint ``path`` with another number of processes than wrote it: each rank's
    RNG state and ZeRO optimizer partition are saved per rank, and with ``rows_multiple=0`` the rows a step
    is packed into follow the number of processes (its samples do not)."""
    saved = saved_world_size(path)
    if saved == dist.world_size:
        return
    changes = ["each process's random state (dropout) and ZeRO optimizer partition are saved per process"]
    if plan_follows_world_size:
        changes.append(
            "a step's samples are packed into a multiple of the number of processes of rows "
            "(rows_multiple=0), so the rows would differ"
        )
    raise ValueError(
        f"{path} was written by {saved} process(es) and this run has {dist.world_size}: resume it with "
        f"{saved} (torchrun --nproc_per_node {saved}). Another number would change the run: "
        + "; ".join(changes)
        + "."
    )


def load_model(path: Path, model: torch.nn.Module) -> None:
    record = json.loads((path / "trainer_state.json").read_text())
    weights = load_file(path / "model.safetensors")
    for alias, original in record.get("aliases", {}).items():
        weights[alias] = weights[original]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def load_rng(path: Path, dist: Dist) -> None:
    rng = torch.load(path / f"rng-{dist.rank}.pt", weights_only=False)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
