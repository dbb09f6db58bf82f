"""Optimisation engines: the plain one (one process or DDP) here; DeepSpeed ZeRO in ``deepspeed_engine.py``.

An engine owns the optimizer and the LR schedule of one stage and hides how gradients are accumulated
and reduced. The loop calls, per optimizer step: ``micro_batch(last=...)`` around each micro-batch's
forward and ``backward``, then ``step()``. Losses reach ``backward`` already scaled for the global batch
(see ``batches.py``), so engines never rescale by the number of micro-batches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from llavamed_fast.train.config import Schedule, StageConfig
from llavamed_fast.train.dist import Dist


@dataclass
class StepResult:
    grad_norm: float
    stepped: bool  # False: the gradients were not finite and the update was skipped


def lr_lambda(schedule: Schedule, warmup_steps: int, total_steps: int):
    """Multiplier of the peak LR at step ``s`` (0-based): linear warmup, then the schedule down to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule is Schedule.CONSTANT:
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule is Schedule.LINEAR:
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def warmup_steps(stage: StageConfig, total_steps: int) -> int:
    return math.ceil(stage.warmup_ratio * total_steps)


def set_peak_lr(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float
) -> None:
    """Make ``lr`` the schedule's peak from the current step on. Loading a checkpoint restores the peak it
    was saved with (the optimizer's groups and the schedule's ``base_lrs``); a run resumed with another
    ``lr`` (after a non-finite stop, say) must use the new one. Nothing changes when they are equal."""
    state = scheduler.state_dict()
    if state["base_lrs"] == [lr] * len(optimizer.param_groups):
        return
    factors = [factor(state["last_epoch"]) for factor in scheduler.lr_lambdas]
    for group, factor in zip(optimizer.param_groups, factors, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * factor
    state["base_lrs"] = [lr] * len(optimizer.param_groups)
    state["_last_lr"] = [group["lr"] for group in optimizer.param_groups]
    scheduler.load_state_dict(state)


def parameter_groups(
    parameters: list[torch.nn.Parameter], stage: StageConfig, model: torch.nn.Module
) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms or (1-D) scales, as transformers' Trainer does;
    nor on the embedding when the stage trains only its image-token rows (decay would move the others)."""
    exempt = set()
    if stage.trains_image_rows and stage.weight_decay:
        exempt.add(id(model.language_model.get_input_embeddings().weight))
    decay = [p for p in parameters if p.dim() >= 2 and id(p) not in exempt]
    other = [p for p in parameters if p.dim() < 2 or id(p) in exempt]
    return [{"params": decay, "weight_decay": stage.weight_decay}, {"params": other, "weight_decay": 0.0}]


class PlainEngine:
    """AdamW + LR schedule over the stage's trainable parameters; DDP when there are several processes.

    On CUDA the model keeps float32 weights and runs under autocast in the run's dtype; on the CPU it runs
    in float32.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        parameters: list[torch.nn.Parameter],
        stage: StageConfig,
        total_steps: int,
        dist: Dist,
        *,
        dtype: torch.dtype,
    ) -> None:
        if not parameters:
            raise ValueError(f"stage {stage.name!r} has no trainable parameters")
        self.model = model
        self.parameters = parameters
        self.stage = stage
        self.dist = dist
        self.autocast = dtype if dist.device.type == "cuda" and dtype != torch.float32 else None
        self.module = (
            DistributedDataParallel(model, device_ids=[dist.device] if dist.device.type == "cuda" else None)
            if dist.distributed
            else model
        )
        self.optimizer = torch.optim.AdamW(
            parameter_groups(parameters, stage, model),
            lr=stage.lr,
            betas=stage.adam_betas,
            eps=stage.adam_eps,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(stage.schedule, warmup_steps(stage, total_steps), total_steps)
        )

    @contextlib.contextmanager
    def micro_batch(self, *, last: bool) -> Iterator[None]:
        """Gradients are reduced across ranks only in the step's last micro-batch."""
        sync = contextlib.nullcontext() if last or not self.dist.distributed else self.module.no_sync()
        autocast = (
            torch.autocast(self.dist.device.type, dtype=self.autocast)
            if self.autocast is not None
            else contextlib.nullcontext()
        )
        with sync, autocast:
            yield

    def forward(self, batch, *, reduction: str):
        return self.module(batch, reduction=reduction)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> StepResult:
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.stage.max_grad_norm)
        # One host sync per step: the finiteness decides whether to update (and is logged anyway).
        grad_norm = float(norm)
        stepped = math.isfinite(grad_norm)
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The schedule follows the data position, skipped steps included, so a resumed run matches.
        self.scheduler.step()
        return StepResult(grad_norm, stepped)

    def skip(self) -> None:
        """Drop this step's gradients without updating (a non-finite loss)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path) -> None:
        """Optimizer and schedule state (identical on every rank: the main rank writes it)."""
        if self.dist.is_main:
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            torch.save(state, directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "optimizer.pt", map_location=self.dist.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_peak_lr(self.optimizer, self.scheduler, self.stage.lr)

    def model_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full model weights on the main rank (None elsewhere), for checkpoints."""
        return self.model.state_dict() if self.dist.is_main else None

    def close(self) -> None:
        """End of stage: the model keeps its trained weights; optimizer state is released."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()
