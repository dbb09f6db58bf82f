"""DeepSpeed ZeRO-2/ZeRO-3 as the multi-GPU engine (``StageConfig.zero_stage`` 2 or 3; see ``engine.py``).

Gradient accumulation: the loop runs a varying number of micro-batches per step (equal on all ranks) and
hands ``backward`` losses already scaled for the global batch, so DeepSpeed runs with
``gradient_accumulation_steps`` 1 (``backward`` never divides the loss) and the micro-batches of a step
run inside ``coalesce_grad_reduction``: backward only accumulates gradients locally, and leaving the
block runs one reduction (reduce-scatter into each rank's partition) for the whole step, like DDP's
``no_sync``. DeepSpeed's unmanaged mode (``managed_gradient_accumulation: false``) would also make
``step()`` the boundary, but ZeRO-2/3 still reduce in every backward there, once per micro-batch. The
price of one reduction per step: until ``step()`` every rank holds a full-size gradient of the trainable
parameters in their dtype, as DDP does (ZeRO-3 training a 7B LLM: 13 GB of bf16 per GPU, of which
ZeRO-3 would otherwise keep a 1/N partition), and the one reduction runs after the last backward
instead of overlapping it (``overlap_comm`` overlaps it with nothing but its own buckets).

The block stays open until ``step()`` or ``skip()``. ``step()`` leaves it (the reduction), then DeepSpeed
computes the global gradient norm, clips to ``max_grad_norm`` and updates. A non-finite norm makes
DeepSpeed skip the update and clear the gradients itself: always on ZeRO-3, and on ZeRO-2 in fp32/fp16
and in bf16 with ``bf16.check_grad_overflow`` (set here, though it is the default). ``skip()`` (the loop
saw a non-finite loss) fills the unreduced local gradients with NaN before leaving the block, so that
DeepSpeed's own overflow path throws them away; a finite gradient cannot sneak through. The LR schedule
is a LambdaLR over the AdamW that this engine steps itself, after every step, skipped or not (DeepSpeed
would not advance a scheduler it owns on an overflow).

Precision: on CUDA the config turns on DeepSpeed's bf16 (or fp16) mode: the module is cast to that dtype
and AdamW updates fp32 master weights. Trainable parameters enter with the model's fp32 values (the
master weights are set from them, not from the cast), and ``model_state_dict``/``close`` return the
masters, so stages and checkpoints hand fp32 weights on exactly; frozen weights are computed in the low
dtype and come back from it rounded. fp16 uses DeepSpeed's dynamic loss scale, whose overflow steps
are skipped steps for the run (and count towards ``nan_limit``). On the CPU everything is fp32.

Checkpoints: DeepSpeed's own files (``deepspeed/state/``: each rank's partition of the fp32 master
weights and AdamW moments) with frozen parameters excluded, plus ``scheduler.pt``. ZeRO-2's file of the
main rank also holds a copy of the trainable weights in the module dtype, which DeepSpeed cannot leave
out; ZeRO-3's per-rank module files hold only placeholders.

Shipped configs (``deepspeed/zero2.json``, ``deepspeed/zero3.json``) follow LLaVA's for 7B runs:
``overlap_comm`` and ``contiguous_gradients`` on (gradients bucketed into one contiguous buffer, no
fragmentation), reduce-scatter rather than all-reduce, ZeRO-2's all-gather of updated weights in buckets
of 5e8 elements (DeepSpeed's default), ZeRO-3 ``sub_group_size``/``max_live_parameters``/
``max_reuse_distance`` at 1e9, ``"auto"`` sizes derived from the LLM's hidden size ``h`` as
transformers' Trainer does: reduce buckets of ``h * h`` elements (16.8M for h = 4096: 32 MB in bf16),
ZeRO-3 prefetch ``0.9 * h * h``, and ZeRO-3 keeps parameters of at most ``10 * h`` elements (norms,
biases) unpartitioned, where gathering costs more than it saves. ``stage3_gather_16bit_weights_on_model_save``
only matters to DeepSpeed's own model export; this engine gathers the weights itself. The engine fills
in the batch (micro-batch 1, accumulation 1), clipping, precision and logging fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llavamed_fast.model.llava_med import LlavaMedOutput
from llavamed_fast.train.config import StageConfig
from llavamed_fast.train.dist import Dist
from llavamed_fast.train.engine import StepResult, lr_lambda, parameter_groups, set_peak_lr, warmup_steps

CONFIG_DIR = Path(__file__).with_name("deepspeed")
CHECKPOINT_DIR, CHECKPOINT_TAG = "deepspeed", "state"


def zero_config(zero_stage: int, hidden_size: int) -> dict[str, Any]:
    """The shipped ``zero_optimization`` section for ``zero_stage`` with its ``"auto"`` sizes filled in."""
    path = CONFIG_DIR / f"zero{zero_stage}.json"
    if not path.exists():
        raise ValueError(f"no DeepSpeed config for ZeRO stage {zero_stage}: {path} does not exist")
    section = json.loads(path.read_text())["zero_optimization"]
    auto = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in section.items():
        if value == "auto":
            if key not in auto:
                raise ValueError(f"{path}: {key} cannot be 'auto' (only {sorted(auto)} can)")
            section[key] = auto[key]
    return section


def deepspeed_config(stage: StageConfig, *, dtype: torch.dtype, hidden_size: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 1,  # a micro-batch is one packed row
        "gradient_accumulation_steps": 1,  # the loop scales the loss; see the module docstring
        "gradient_clipping": stage.max_grad_norm,
        "bf16": {"enabled": dtype == torch.bfloat16, "check_grad_overflow": True},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_optimization": zero_config(stage.zero_stage, hidden_size),
        "steps_per_print": 2**31 - 1,  # the run's metrics log the steps
        "wall_clock_breakdown": False,
    }


class _DictOutput(torch.nn.Module):
    """The module DeepSpeed wraps: the model's forward, returning a dict.

    DeepSpeed finds the tensors of a module's output only in tensors, tuples, lists and dicts, and the
    model returns a dataclass. Two things depend on it: the engine's backward prologue (hooked onto the
    output tensors) and, under ZeRO-3, the hook that gathers a module's parameters again for backward.
    The model's forward therefore runs as this module's body (``forward``, not ``__call__``): parameters
    read outside their own module's forward, such as the LM head's weight that the fused loss reads
    directly, are then registered with this module, whose dict output gets the hooks. The model has no
    parameters of its own, so skipping its module hooks skips nothing else.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch, *, reduction: str) -> dict[str, torch.Tensor]:
        output = self.model.forward(batch, reduction=reduction)
        return {"loss": output.loss, "num_supervised": output.num_supervised}


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class _ModelState:
    """What the model looked like before DeepSpeed took it over, to give it back as ordinary modules.

    DeepSpeed converts the model in place: ZeRO-3 empties every parameter into a partition, swaps each
    module's parameter container for a gathering one and adds attributes to modules and parameters;
    bf16/fp16 casts the parameters. ``restore`` puts full values back and removes what DeepSpeed added:
    parameter attributes added since construction (nothing else annotates parameters), module
    attributes and hooks added by ``deepspeed.initialize`` (``initialized`` marks its end). Module
    attributes that appear later belong to the model too (transformers records there that it has
    installed its output-capture hooks), so only DeepSpeed's own hooks are removed, by ``destroy``.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.modules = [(m, set(vars(m)), m._parameters) for m in model.modules()]
        self.parameters = _unique_parameters(model)
        self.parameter_keys = {id(p): set(vars(p)) for p in self.parameters}
        self.dtypes = {id(p): p.dtype for p in self.parameters}
        self.shapes = {id(p): p.shape for p in self.parameters}
        self.state_names = {
            name: id(tensor) if isinstance(tensor, torch.nn.Parameter) else None
            for name, tensor in model.state_dict(keep_vars=True).items()
        }
        self.added: list[set[str]] = []
        self.hooks: list[set[int]] = [_hook_ids(m) for m, _, _ in self.modules]

    def initialized(self) -> None:
        self.added = [set(vars(m)) - keys for m, keys, _ in self.modules]
        self.hooks = [
            _hook_ids(m) - before for (m, _, _), before in zip(self.modules, self.hooks, strict=True)
        ]

    def restore(self, values: dict[int, torch.Tensor]) -> None:
        for (module, _, container), added, hooks in zip(self.modules, self.added, self.hooks, strict=True):
            left = hooks & _hook_ids(module)
            if left:
                raise RuntimeError(
                    f"DeepSpeed left {len(left)} hooks on a {type(module).__name__} after destroy()"
                )
            for key in added & set(vars(module)):
                delattr(module, key)
            module._parameters = container
        for param in self.parameters:
            for key in set(vars(param)) - self.parameter_keys[id(param)]:
                delattr(param, key)
            param.data = values[id(param)]
            param.grad = None
            if param.shape != self.shapes[id(param)]:
                raise RuntimeError(
                    f"restoring the model after DeepSpeed: a parameter has shape {tuple(param.shape)}, "
                    f"expected {tuple(self.shapes[id(param)])}"
                )


def _hook_ids(module: torch.nn.Module) -> set[int]:
    return {key for name in _HOOK_DICTS for key in getattr(module, name)}


def _unique_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every parameter once (tied weights are one parameter), read without ZeRO-3's gathering getter."""
    seen: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for param in dict.values(module._parameters):
            if param is not None:
                seen.setdefault(id(param), param)
    return list(seen.values())


def _disable_shm_comm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (~60 s) when its communication
    backend starts, if ``deepspeed.ops.__compatible_ops__`` lists the op as buildable; it serves only
    ``inference_all_reduce``, never training, so it is marked unbuildable and gloo carries everything.
    That dict is what the build check reads, and it is built once per process (module attribute)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def _ensure_process_group(dist: Dist) -> None:
    """DeepSpeed needs a process group and ``LOCAL_RANK`` even in a single process, where no launcher
    set them; an in-memory group needs no port."""
    if not torch.distributed.is_initialized():
        os.environ.setdefault("LOCAL_RANK", str(dist.local_rank))
        torch.distributed.init_process_group(
            backend="nccl" if dist.device.type == "cuda" else "gloo",
            store=torch.distributed.HashStore(),
            rank=0,
            world_size=1,
        )


class DeepSpeedEngine:
    """AdamW + LR schedule over the stage's trainable parameters under DeepSpeed ZeRO-2 or ZeRO-3."""

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
        if stage.zero_stage not in (2, 3):
            raise ValueError(
                f"stage {stage.name!r}: DeepSpeedEngine runs ZeRO 2 or 3, not {stage.zero_stage}"
            )
        import deepspeed

        self.model, self.stage, self.dist = model, stage, dist
        self.parameters = parameters
        self.trainable = {id(p) for p in parameters}
        self.autocast = dtype if dist.device.type == "cuda" and dtype != torch.float32 else None
        # A frozen vision tower stays outside DeepSpeed, replicated on every rank and in its own dtype: it
        # is never updated, so partitioning it (ZeRO-3) would only cost a gather per micro-batch, and a
        # rank whose row holds no image would leave the others waiting in that gather. The engine runs it
        # before the DeepSpeed module (``forward``); the model keeps it as a plain attribute meanwhile.
        self.vision = model.vision_tower if getattr(model, "vision_frozen", False) else None
        if self.vision is not None:
            del model._modules["vision_tower"]
            object.__setattr__(model, "vision_tower", self.vision)
        self.state = _ModelState(model)
        _disable_shm_comm_build()
        _ensure_process_group(dist)
        # DeepSpeed 0.19 calls collectives that torch 2.13 deprecates in favour of *_single; the warning
        # repeats for every bucket (over a hundred lines per tiny run) and there is nothing to act on.
        warnings.filterwarnings(
            "ignore",
            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
            category=FutureWarning,
        )
        # DeepSpeed's bf16/fp16 cast replaces the parameters' data; these references keep the fp32 values
        # alive until they seed the master weights.
        fp32 = {id(p): p.detach() for p in parameters} if dtype != torch.float32 else {}
        groups = [g for g in parameter_groups(parameters, stage, model) if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=stage.lr, betas=stage.adam_betas, eps=stage.adam_eps)
        config = deepspeed_config(stage, dtype=dtype, hidden_size=model.language_model.config.hidden_size)
        self.ds, _, _, _ = deepspeed.initialize(
            model=_DictOutput(model), optimizer=self.optimizer, config=config, dist_init_required=False
        )
        self.state.initialized()
        if fp32:
            from deepspeed.utils import safe_set_full_fp32_param

            for param in parameters:
                safe_set_full_fp32_param(param, fp32.pop(id(param)).float())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(stage.schedule, warmup_steps(stage, total_steps), total_steps)
        )
        self._accumulation: contextlib.ExitStack | None = None

    # -- one optimizer step ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def micro_batch(self, *, last: bool) -> Iterator[None]:
        """The first micro-batch of a step opens the local accumulation; ``step``/``skip`` close it."""
        if self._accumulation is None:
            self._accumulation = contextlib.ExitStack()
            self._accumulation.enter_context(self.ds.coalesce_grad_reduction())
        yield

    def forward(self, batch, *, reduction: str) -> LlavaMedOutput:
        if self.vision is not None and batch.pixel_values is not None:
            autocast = (
                torch.autocast("cuda", dtype=self.autocast)
                if self.autocast is not None
                else contextlib.nullcontext()
            )
            with torch.no_grad(), autocast:
                features = self.model.image_features(batch.pixel_values)
            batch = dataclasses.replace(batch, pixel_values=None, image_features=features)
        output = self.ds(batch, reduction=reduction)
        return LlavaMedOutput(loss=output["loss"], num_supervised=output["num_supervised"])

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)

    def _reduce(self) -> None:
        if self._accumulation is None:
            raise RuntimeError("step() or skip() without a micro-batch since the last step")
        accumulation, self._accumulation = self._accumulation, None
        accumulation.close()  # the step's one gradient reduction

    def step(self) -> StepResult:
        self._reduce()
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        # One host sync per step, as in the plain engine: the norm is logged anyway.
        grad_norm = float(norm) if norm is not None else float("nan")
        self.scheduler.step()
        return StepResult(grad_norm, self.ds.was_step_applied())

    def skip(self) -> None:
        """Drop this step's gradients without an update: poisoned gradients take DeepSpeed's overflow path,
        which discards them on every rank (a NaN on one rank reaches every partition in the reduction)."""
        for param in self.parameters:
            if param.grad is not None:
                param.grad.fill_(float("nan"))
        self._reduce()
        self.ds.step()
        if self.ds.was_step_applied():
            raise RuntimeError(
                f"stage {self.stage.name!r}: DeepSpeed applied an update that should have been skipped "
                "(non-finite loss); no rank held a gradient to poison"
            )
        self.scheduler.step()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # -- checkpoints -------------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Every rank writes its partition of the optimizer state; the main rank the schedule."""
        if self._accumulation is not None:
            raise RuntimeError("save() in the middle of a step")
        self.ds.save_checkpoint(
            str(directory / CHECKPOINT_DIR),
            tag=CHECKPOINT_TAG,
            client_state={},
            save_latest=False,
            exclude_frozen_parameters=True,
        )
        if self.dist.is_main:
            torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")

    def load(self, directory: Path) -> None:
        path, _ = self.ds.load_checkpoint(
            str(directory / CHECKPOINT_DIR),
            tag=CHECKPOINT_TAG,
            load_module_strict=False,  # frozen parameters are not in it; the loop loaded the weights
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise FileNotFoundError(
                f"{directory}: no DeepSpeed optimizer state in {CHECKPOINT_DIR}/{CHECKPOINT_TAG}; "
                "was this checkpoint written by a ZeRO stage with the same number of processes?"
            )
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
        set_peak_lr(self.optimizer, self.scheduler, self.stage.lr)

    # -- weights -----------------------------------------------------------------------------------------

    def _full_values(self, device: torch.device | None) -> Iterator[tuple[int, torch.Tensor | None]]:
        """Each parameter's full value in the model's dtype (trainable ones: the fp32 master weights),
        gathered module by module so that ZeRO-3 holds one module's weights at a time. Collective: every
        rank iterates to the end; values are copied to ``device``, or dropped where it is None."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        zero3 = self.stage.zero_stage == 3
        seen: set[int] = set()
        for module in self.model.modules():
            own = [p for p in dict.values(module._parameters) if p is not None and id(p) not in seen]
            seen.update(id(p) for p in own)
            frozen = [p for p in own if id(p) not in self.trainable]
            with deepspeed.zero.GatheredParameters(
                frozen, modifier_rank=None, enabled=zero3 and bool(frozen)
            ):
                for param in own:
                    if id(param) in self.trainable:
                        value = safe_get_full_fp32_param(param)
                        if value is None:
                            raise RuntimeError(
                                f"stage {self.stage.name!r}: DeepSpeed holds no master weight for a "
                                f"trainable parameter of {type(module).__name__}"
                            )
                    else:
                        value = param.detach()
                    dtype = self.state.dtypes[id(param)]
                    yield id(param), None if device is None else value.to(device, dtype, copy=True)

    def model_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full model weights with the model's names on the main rank (None elsewhere); every rank
        must call it."""
        values = dict(self._full_values(torch.device("cpu") if self.dist.is_main else None))
        if not self.dist.is_main:
            return None
        buffers = dict(self.model.named_buffers(remove_duplicate=False))
        state = {
            name: values[key] if key is not None else buffers[name].detach().cpu()
            for name, key in self.state.state_names.items()
        }
        if self.vision is not None:
            state.update(
                {f"vision_tower.{k}": v.detach().cpu().clone() for k, v in self.vision.state_dict().items()}
            )
        return state

    def close(self) -> None:
        """End of stage: the model gets its full trained weights back as ordinary parameters on every rank,
        in its own dtype, without DeepSpeed's hooks and attributes; DeepSpeed's state is released."""
        if self._accumulation is not None:
            raise RuntimeError("close() in the middle of a step")
        values = dict(self._full_values(self.dist.device))
        self.ds.destroy()
        self.state.restore(values)
        if self.vision is not None:
            del self.model.__dict__["vision_tower"]
            self.model.vision_tower = self.vision
        self.optimizer.state.clear()
        self.ds = None
        gc.collect()  # DeepSpeed's engine and optimizer hold reference cycles over the partitions
        if self.dist.device.type == "cuda":
            torch.cuda.empty_cache()


__all__ = ["DeepSpeedEngine", "deepspeed_config", "zero_config"]
