"""The training loop: build, then for each stage of the curriculum: set what trains, plan the steps,
step, log, checkpoint. Parallelism, checkpoints, metrics and data each live in their own module."""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from llavamed_fast.data.batch import PackedBatch, SkippedSample
from llavamed_fast.data.dataset import skipped_summary
from llavamed_fast.data.durable import write_atomic
from llavamed_fast.data.packing import collate
from llavamed_fast.data.templates import IGNORE_INDEX
from llavamed_fast.model import build, load_pretrained, save_pretrained
from llavamed_fast.model.config import PRESETS
from llavamed_fast.train import checkpoint as ckpt
from llavamed_fast.train import dist as dist_mod
from llavamed_fast.train import features
from llavamed_fast.train.batches import PLAN_VERSION, Step, plan_stage
from llavamed_fast.train.config import (
    RESUMABLE_DATA_FIELDS,
    RESUMABLE_RUN_FIELDS,
    RESUMABLE_STAGE_FIELDS,
    RunConfig,
    StageConfig,
    Trainable,
    config_changes,
    resumable,
)
from llavamed_fast.train.data import stage_dataset
from llavamed_fast.train.engine import PlainEngine
from llavamed_fast.train.flops import batch_flops, peak_tflops
from llavamed_fast.train.metrics import METRICS_FILE, RunMetrics
from llavamed_fast.train.trainable import StageParameters, apply_lora, merge_lora

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class RunStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite steps); a checkpoint was written first."""


def count_targets(batch: PackedBatch) -> int:
    """Supervised targets the loss sees: labels other than -100, except each sample's first token, which
    nothing before it predicts (the model shifts within samples)."""
    valid = batch.labels != IGNORE_INDEX
    if batch.num_tokens:
        valid[batch.cu_seqlens[:-1].long()] = False
    return int(valid.sum())


def placeholder(pad_token_id: int) -> PackedBatch:
    """A one-token row without supervision: it contributes a zero loss and zero gradients."""
    return PackedBatch(
        input_ids=torch.tensor([pad_token_id]),
        labels=torch.tensor([IGNORE_INDEX]),
        position_ids=torch.tensor([0]),
        cu_seqlens=torch.tensor([0, 1], dtype=torch.int32),
        max_seqlen=1,
        image_offsets=torch.zeros(0, dtype=torch.int64),
    )


def steps_of(
    dataset, steps: Sequence[Step], dist, num_workers: int, seed: int
) -> Iterator[list[PackedBatch]]:
    """This rank's micro-batches, step by step (rows are loaded and collated by a DataLoader)."""
    mine = [step.rows_for(dist.rank, dist.world_size) for step in steps]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=[list(row) for rows in mine for row in rows],
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=dist.device.type == "cuda",
        persistent_workers=False,
        # Its own generator: a DataLoader draws its workers' base seed when iterated, and from the global
        # RNG that would be at a stage's start in one run and at the resumed step in a resumed one, which
        # would shift every later draw (dropout) of the resumed run.
        generator=torch.Generator().manual_seed(seed),
    )
    batches = iter(loader)
    for rows in mine:
        yield [next(batches) for _ in rows]


def make_engine(model, parameters, stage: StageConfig, total_steps: int, dist, dtype):
    if stage.zero_stage == 0:
        return PlainEngine(model, parameters, stage, total_steps, dist, dtype=dtype)
    from llavamed_fast.train.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(model, parameters, stage, total_steps, dist, dtype=dtype)


class Trainer:
    def __init__(
        self, config: RunConfig, run_dir: Path, dist, *, resume: bool, start_stage: str | None
    ) -> None:
        self.config, self.run_dir, self.dist = config, run_dir, dist
        self.dtype = DTYPES[config.dtype] if dist.device.type == "cuda" else torch.float32
        self.changes = self._prepare_run_dir(resume)
        self.checkpoint = ckpt.latest(run_dir) if resume else None
        if self.checkpoint is not None:
            ckpt.check_world_size(self.checkpoint, dist, plan_follows_world_size=config.rows_multiple == 0)
            self.state = ckpt.read_state(self.checkpoint)
            inside = self.state.stage_step > 0 and not self.state.stage_done
            if inside and self.state.plan_version != PLAN_VERSION:
                stage = config.stages[self.state.stage_index].name
                raise ValueError(
                    f"{self.checkpoint} is {self.state.stage_step} steps into stage {stage!r} of a step plan "
                    f"this version does not make (plan {self.state.plan_version}, now {PLAN_VERSION}): its "
                    "remaining steps would take other samples. Finish the stage with the version that wrote "
                    "it, or train it again in another --out"
                    + (
                        f" (--start-stage {stage} --set model=<the export of the stage before>)"
                        if self.state.stage_index
                        else ""
                    )
                )
            self.state.plan_version = PLAN_VERSION  # stages from here on are planned by this version
        else:
            first = config.stage_index(start_stage) if start_stage else 0
            if first > 0 and config.model in PRESETS:
                # Random init in place of the stages before: almost surely a forgotten --set model=.
                before = config.stages[first - 1].name
                raise ValueError(
                    f"--start-stage {start_stage} continues from the model stage {before!r} exported, but "
                    f"model is the preset {config.model!r} (random init); pass --set model=<that export, "
                    f"e.g. RUN/stages/{before}>"
                )
            self.state = ckpt.TrainerState(stage_index=first)
        if config.model in PRESETS:
            self.model, self.processor = build(config.model, seed=config.seed)
        else:
            self.model, self.processor = load_pretrained(config.model, dtype=torch.float32)
        if self.checkpoint is not None:
            stage = config.stages[self.state.stage_index]
            if not self.state.stage_done and stage.lora is not None:
                apply_lora(self.model, stage.lora)  # the checkpoint holds the adapters of this stage
            ckpt.load_model(self.checkpoint, self.model)
            ckpt.load_rng(self.checkpoint, dist)
        self.model.to(dist.device)
        if self.checkpoint is None:
            # Per-rank streams (dropout): ranks must not draw the same masks.
            random.seed(config.seed + dist.rank)
            torch.manual_seed(config.seed + dist.rank)
        self.metrics = RunMetrics(
            run_dir,
            rank=dist.rank,
            world_size=dist.world_size,
            peak_tflops=config.peak_tflops or peak_tflops(dist.device, self.dtype),
            tensorboard=config.tensorboard,
            plots=config.plots,
            resume_step=self.state.global_step if self.checkpoint is not None else None,
        )
        if self.changes:
            self.metrics.event(
                "config_changed",
                step=self.state.global_step,
                changes={path: [old, new] for path, old, new in self.changes},
            )
        # The current stage's samples left out for bad images, by (record, image path): a bad image is
        # reported once per stage however many epochs meet it.
        self.skipped: dict[tuple[str, str], str] = {}

    def _prepare_run_dir(self, resume: bool) -> list[tuple[str, object, object]]:
        """Check the run directory against this run and (re)write its ``config.json``; returns the fields
        a resumed run changes (only those :func:`resumable` accepts)."""
        saved = self.run_dir / "config.json"
        changes: list[tuple[str, object, object]] = []
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if saved.exists() and ckpt.latest(self.run_dir) is None:
                # An earlier start stopped before its first checkpoint (a bad data path, a missing image, a
                # kill): nothing it trained survives, so this start begins afresh, with this config. Its
                # metrics describe steps that are about to run again. Exported models are kept from that:
                # a finished run whose checkpoints were deleted must not be trained over.
                exported = [self.run_dir / "model", *sorted((self.run_dir / "stages").glob("*"))]
                exported = [str(path.relative_to(self.run_dir)) for path in exported if path.is_dir()]
                if exported:
                    raise FileExistsError(
                        f"{self.run_dir} holds exported models ({', '.join(exported)}) but no checkpoint to "
                        "resume from; move them away or use another --out"
                    )
                print(
                    f"note: {self.run_dir} holds a run that never wrote a checkpoint; starting it afresh "
                    f"(its {METRICS_FILE} and tensorboard/ are replaced)",
                    file=sys.stderr,
                )
                (self.run_dir / METRICS_FILE).unlink(missing_ok=True)
                shutil.rmtree(self.run_dir / "tensorboard", ignore_errors=True)
            elif saved.exists():
                if not resume:
                    raise FileExistsError(f"{self.run_dir} already holds a run; pass --resume to continue it")
                changes = config_changes(json.loads(saved.read_text()), self.config)
                refused = [path for path, _, _ in changes if not resumable(path)]
                if refused:
                    raise ValueError(
                        f"{saved} differs from this run's config in {', '.join(refused)}; a resumed run may "
                        f"change only {', '.join(sorted(RESUMABLE_STAGE_FIELDS))}, "
                        f"{', '.join('data.' + f for f in sorted(RESUMABLE_DATA_FIELDS))} of a stage and the run's "
                        f"{', '.join(sorted(RESUMABLE_RUN_FIELDS))} (to change anything else, start a new run "
                        "in another --out)"
                    )
                for path, old, new in changes:
                    print(f"note: resuming with {path} changed from {old!r} to {new!r}", file=sys.stderr)
            write_atomic(saved, self.config.to_json())
        self.dist.barrier()
        return changes

    def fit(self) -> Path:
        for index in range(self.state.stage_index, len(self.config.stages)):
            if index == self.state.stage_index and self.state.stage_done:
                continue
            try:
                self._run_stage(index)
            except Exception as error:
                # The message names the file or record; which stage met it is the loop's to say.
                error.add_note(f"in stage {self.config.stages[index].name!r}")
                raise
        final = self.run_dir / "model"
        if self.dist.is_main:
            # run_end is written after the export: with both there, the run was already finished.
            if self.metrics.has_event("run_end") and (final / "config.json").exists():
                print(f"note: {self.run_dir} is already finished; nothing to do", file=sys.stderr)
            else:
                save_pretrained(self.model, self.processor, final, overwrite=True)
                self.metrics.event("run_end", model=str(final), skipped_steps=self.state.skipped_steps)
        self.metrics.close()
        self.dist.barrier()
        return final

    def _run_stage(self, index: int) -> None:
        config, stage, dist = self.config, self.config.stages[index], self.dist
        resuming = (
            self.checkpoint is not None and self.state.stage_index == index and self.state.stage_step > 0
        )
        if self.state.stage_index != index or self.state.stage_done:
            self.state = ckpt.TrainerState(
                stage_index=index, global_step=self.state.global_step, skipped_steps=self.state.skipped_steps
            )
        self.skipped = {(record, path): reason for record, path, reason in self.state.skipped_samples}
        params = StageParameters(self.model, stage, self.processor)
        llm = self.model.language_model
        if stage.gradient_checkpointing:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif llm.is_gradient_checkpointing:
            llm.gradient_checkpointing_disable()
        dataset = stage_dataset(stage.data, self.processor, self.run_dir, dist)
        too_long = np.flatnonzero(dataset.lengths > stage.micro_batch_tokens)
        if too_long.size:  # a row holds whole samples: one longer than the budget fits no row
            first = int(too_long[0])
            raise ValueError(
                f"{too_long.size} sample(s) of {len(dataset)} are longer than micro_batch_tokens "
                f"({stage.micro_batch_tokens}), the first record {dataset.records[first].id} with "
                f"{int(dataset.lengths[first])} tokens; raise it (--set stages.{stage.name}.micro_batch_tokens=N)"
            )
        if config.feature_cache and Trainable.VISION not in stage.trainable:
            # As both engines run the frozen tower on GPUs, so that cached features equal live ones.
            autocast = self.dtype if dist.device.type == "cuda" and self.dtype != torch.float32 else None
            dataset = features.build(self.model, dataset, self.run_dir / "features", dist, autocast=autocast)
        plan = plan_stage(
            dataset.lengths,
            budget=stage.micro_batch_tokens,
            global_batch_size=stage.global_batch_size,
            rows_multiple=config.rows_multiple or dist.world_size,
            seed=config.seed + index,
            epochs=stage.epochs,
            max_steps=stage.max_steps,
        )
        engine = make_engine(self.model, params.parameters(), stage, len(plan), dist, self.dtype)
        if resuming:
            engine.load(self.checkpoint)
        self.metrics.start_stage(stage.name, len(plan), samples=len(dataset))
        self.model.train()
        trains = set(stage.trainable)
        remaining = plan[self.state.stage_step :]
        for batches in steps_of(dataset, remaining, dist, config.num_workers, seed=config.seed + index):
            self._step(engine, stage, batches, trains, last=self.state.stage_step + 1 == len(plan))
        engine.close()  # the model holds the stage's full trained weights again
        params.close()
        merge_lora(self.model)
        skipped = self._gather_skipped()
        # The export, the plot and the stage_end event come before the checkpoint that marks the stage done:
        # a resume skips done stages, so whatever came after that mark would be lost to a kill. A kill
        # before it resumes from the stage's last step checkpoint and does the tail of the stage again.
        if dist.is_main:
            save_pretrained(self.model, self.processor, self.run_dir / "stages" / stage.name, overwrite=True)
        summary = skipped_summary([SkippedSample(*sample) for sample in skipped])
        if skipped and dist.is_main:  # data that did not train must not pass unseen
            print(f"stage {stage.name}: {summary}", file=sys.stderr)
        self.metrics.end_stage(stage.name, skipped=summary)
        self.state.stage_done = True
        self.state.skipped_samples = skipped
        ckpt.save(
            self.run_dir,
            f"stage-{index}-{stage.name}",
            model_state=self.model.state_dict() if dist.is_main else None,
            engine=None,
            state=self.state,
            dist=dist,
            keep_last=config.keep_last,
        )

    def _gather_skipped(self) -> list[list[str]]:
        """The stage's skipped samples so far over all ranks (each rank loads only its own rows), sorted;
        every rank must call it."""
        merged: dict[tuple[str, str], str] = {}
        for part in self.dist.gather(self.skipped):
            merged.update(part)
        self.skipped = merged
        return [[record, path, reason] for (record, path), reason in sorted(merged.items())]

    def _step(self, engine, stage: StageConfig, batches: list[PackedBatch], trains, *, last: bool) -> None:
        config, dist, device = self.config, self.dist, self.dist.device
        started = time.perf_counter()
        for batch in batches:
            for sample in batch.skipped:
                self.skipped[(sample.record, sample.path)] = sample.reason
        flops = sum(
            batch_flops(
                self.model,
                b,
                llm_trainable=Trainable.LLM in trains,
                projector_trainable=Trainable.PROJECTOR in trains,
                vision_trainable=Trainable.VISION in trains,
            )
            for b in batches
            if b.num_tokens
        )
        local = [sum(count_targets(b) for b in batches), sum(b.num_tokens for b in batches)]
        local += [sum(b.num_samples for b in batches), flops]
        targets, tokens, samples, flops = dist.sum(local)
        # Each micro-batch's summed loss over the step's targets; x world size because data-parallel
        # engines average gradients over ranks.
        scale = dist.world_size / max(targets, 1)
        inject = self.state.global_step + 1 in config.inject_nan_at
        lr = engine.lr()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for i, batch in enumerate(batches):
            with engine.micro_batch(last=i == len(batches) - 1):
                if batch.num_tokens == 0:
                    # Every sample of this row was skipped: a one-token row with nothing supervised runs
                    # the model anyway, so every rank gathers (ZeRO-3) and reduces the same parameters.
                    batch = placeholder(self.processor.tokenizer.pad_token_id)
                loss = engine.forward(batch.to(device, non_blocking=True), reduction="sum").loss
                if inject:
                    loss = loss * float("nan")
                engine.backward(loss * scale)
            loss_sum += loss.detach().double()
        loss = dist.sum([float(loss_sum)])[0] / max(targets, 1)
        if math.isfinite(loss):
            result = engine.step()
            stepped, grad_norm = result.stepped, result.grad_norm
        else:
            engine.skip()
            stepped, grad_norm = False, float("nan")
        self.state.stage_step += 1
        self.state.global_step += 1
        if stepped:
            self.state.consecutive_skips = 0
        else:
            self.state.consecutive_skips += 1
            self.state.skipped_steps += 1
            self.metrics.event("skipped_step", step=self.state.global_step, loss=loss, grad_norm=grad_norm)
        memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        self.metrics.log_step(
            step=self.state.global_step,
            stage=stage.name,
            stage_step=self.state.stage_step,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            tokens=int(tokens),
            samples=int(samples),
            supervised_tokens=int(targets),
            flops=flops,
            seconds=time.perf_counter() - started,
            skipped=not stepped,
            memory_bytes=memory,
        )
        if self.state.consecutive_skips >= config.nan_limit:
            self._save_step(engine)
            message = (
                f"stopped after {self.state.consecutive_skips} consecutive steps with a non-finite loss or gradient "
                f"(stage {stage.name!r}, step {self.state.global_step}); checkpoint written. Check the data "
                "or lower the learning rate, then resume: --resume accepts a new one "
                f"(--set stages.{stage.name}.lr=...)."
            )
            self.metrics.event("run_stopped", reason=message)
            self.metrics.close()
            raise RunStopped(message)
        if self.state.global_step % config.checkpoint_every == 0 and not last:
            self._save_step(engine)

    def _save_step(self, engine) -> None:
        self.state.skipped_samples = self._gather_skipped()
        path = ckpt.save(
            self.run_dir,
            f"step-{self.state.global_step:08d}",
            model_state=engine.model_state_dict(),
            engine=engine,
            state=self.state,
            dist=self.dist,
            keep_last=self.config.keep_last,
        )
        self.metrics.event("checkpoint", step=self.state.global_step, path=str(path))


def train(config: RunConfig, run_dir: Path, *, resume: bool = False, start_stage: str | None = None) -> Path:
    """Run the curriculum; returns the directory of the final model (HF LLaVA layout)."""
    dist = dist_mod.init()
    try:
        return Trainer(config, Path(run_dir), dist, resume=resume, start_stage=start_stage).fit()
    finally:
        dist_mod.shutdown()
