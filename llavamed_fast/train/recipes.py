"""Recipes: functions that return a complete RunConfig. Data paths and base models are fields; override
them with ``--set`` (e.g. ``--set stages.alignment.data.path=/data/llava_med_alignment_500k.json``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from types import MappingProxyType

from llavamed_fast.train.config import DataConfig, DataKind, RunConfig, StageConfig, Trainable

PROJECTOR, IMAGE_TOKENS, LLM = Trainable.PROJECTOR, Trainable.IMAGE_TOKENS, Trainable.LLM


def llava_med_v0() -> RunConfig:
    """The LLaVA-Med paper's curriculum (Li et al., 2023) on LLaVA-7B-v0 / Vicuna, CLIP-L/14-224.

    Stage 1 (concept alignment): 600K PMC figure-caption pairs (LLaVA-Med releases 500K as
    llava_med_alignment_500k.json), only the projector and the <im_start>/<im_end> embeddings train,
    lr 2e-3, 1 epoch, global batch 128. Stage 2 (instruction tuning): the 60K conversations with inline
    mentions, projector + LLM, lr 2e-5, 3 epochs, global batch 128 as the paper states; note that
    LLaVA-Med's own training script gives 64 (16 per GPU x 4). Cosine schedule, 3 % warmup, no weight
    decay, bf16. ZeRO-2 while the LLM is frozen, ZeRO-3 with gradient checkpointing when it trains.
    """
    return RunConfig(
        recipe="llava-med-v0",
        model="llava-med-v0",
        stages=(
            StageConfig(
                name="alignment",
                data=DataConfig(path="data/llava_med_alignment_500k.json", image_folder="data/images"),
                trainable=(PROJECTOR, IMAGE_TOKENS),
                lr=2e-3,
                epochs=1,
                global_batch_size=128,
                micro_batch_tokens=8192,
                zero_stage=2,
            ),
            StageConfig(
                name="instruct",
                data=DataConfig(
                    path="data/llava_med_instruct_60k_inline_mention.json", image_folder="data/images"
                ),
                trainable=(PROJECTOR, LLM),
                lr=2e-5,
                epochs=3,
                global_batch_size=128,
                micro_batch_tokens=8192,
                zero_stage=3,
                gradient_checkpointing=True,
            ),
        ),
        dtype="bfloat16",
    )


def llava_med_v1_5() -> RunConfig:
    """LLaVA-Med v1.5: Mistral-7B-Instruct-v0.2 + CLIP-L/14-336 + mlp2x_gelu, with LLaVA-1.5's schedule
    (alignment lr 1e-3 and global batch 256; instruction tuning lr 2e-5, global batch 128) on the same
    LLaVA-Med data as v0, 3 epochs of instruction tuning."""
    v0 = llava_med_v0()
    alignment, instruct = v0.stages
    return RunConfig(
        recipe="llava-med-v1.5",
        model="llava-med-v1.5",
        stages=(
            replace(alignment, trainable=(PROJECTOR,), lr=1e-3, global_batch_size=256),
            instruct,
        ),
        dtype="bfloat16",
    )


def vqa_finetune() -> RunConfig:
    """Fine-tune a stage-2 model (``model``: its exported directory; by default ``runs/v15/model``, where
    the README's ``llava-med-v1.5`` run puts it) on a VQA training split; VQA-RAD by default (``data.path``:
    the folder with the public JSON and images/, by default ``$LLAVAMED_SHARED_DATA/vqa-rad``): LLaVA-Med's
    1,797 freeform + para training questions, one per record. Set ``stages.vqa.epochs`` per dataset."""
    return RunConfig(
        recipe="vqa-finetune",
        model="runs/v15/model",
        stages=(
            StageConfig(
                name="vqa",
                data=DataConfig(kind=DataKind.VQA_RAD),
                trainable=(PROJECTOR, LLM),
                lr=2e-5,
                epochs=3,
                global_batch_size=64,
                micro_batch_tokens=8192,
                zero_stage=3,
                gradient_checkpointing=True,
            ),
        ),
        dtype="bfloat16",
    )


def _synthetic(task: str, count: int, seed: int) -> DataConfig:
    return DataConfig(
        kind=DataKind.SYNTHETIC, synthetic_task=task, synthetic_count=count, synthetic_seed=seed
    )


def _synthetic_curriculum(
    recipe: str,
    *,
    captions: int,
    conversations: int,
    epochs: tuple[float, float],
    batch: int,
    micro_tokens: int,
) -> RunConfig:
    """Stage 1 (projector, lr 1e-3) on synthetic captions, stage 2 (projector + LLM, lr 5e-4) on synthetic
    conversations, on tiny-v1.5 in float32: the shape of the tiny and demo recipes."""

    def stage(name, task, count, seed, trainable, lr, stage_epochs):
        return StageConfig(
            name=name,
            data=_synthetic(task, count, seed),
            trainable=trainable,
            lr=lr,
            epochs=stage_epochs,
            global_batch_size=batch,
            micro_batch_tokens=micro_tokens,
        )

    return RunConfig(
        recipe=recipe,
        model="tiny-v1.5",
        stages=(
            stage("alignment", "captions", captions, 0, (PROJECTOR,), 1e-3, epochs[0]),
            stage("instruct", "conversations", conversations, 1, (PROJECTOR, LLM), 5e-4, epochs[1]),
        ),
        dtype="float32",
    )


def tiny() -> RunConfig:
    """Both stages on a tiny random-init model and synthetic scans, for tests and smoke runs: 48 optimizer
    steps (32 + 16) in about 15 s on two CPU cores, a checkpoint every 10 steps."""
    base = _synthetic_curriculum(
        "tiny", captions=256, conversations=256, epochs=(2, 1), batch=16, micro_tokens=512
    )
    return replace(base, checkpoint_every=10, keep_last=2)


def tiny_v0() -> RunConfig:
    """The tiny recipe on the v0 structure: linear projector, <im_start>/<im_end> trained in stage 1."""
    base = tiny()
    alignment, instruct = base.stages
    return replace(
        base,
        recipe="tiny-v0",
        model="tiny-v0",
        stages=(replace(alignment, trainable=(PROJECTOR, IMAGE_TOKENS)), instruct),
    )


def demo() -> RunConfig:
    """The offline demo's curriculum (``llavamed-fast demo``): synthetic scans, a tiny model, two CPU
    cores, under ten minutes. AdamW at 5e-4 for the LLM: on these tiny models 1e-3 and above collapse to
    one constant answer.

    After the two LLaVA-Med stages come two short ones, because the conversation mix alone leaves one
    finding unlearned: where the lesions are (docs/TRAINING.md has the measurements). ``side`` trains on
    single side questions (both forms), a focused fine-tune in the spirit of LLaVA-Med's VQA stage; it
    learns side in a few hundred steps but unlearns the other findings, which ``consolidate`` (the
    conversation mix again, at a fifth of the rate) brings back while side holds.
    """
    base = _synthetic_curriculum(
        "demo", captions=2000, conversations=8000, epochs=(1, 5), batch=32, micro_tokens=1024
    )
    alignment, instruct = base.stages
    side = replace(instruct, name="side", data=_synthetic("side_questions", 2400, 2), epochs=5)
    consolidate = replace(instruct, name="consolidate", lr=1e-4, max_steps=350)
    return replace(
        base,
        # 8-pixel patches: with tiny-v1.5's 16-pixel ones brightness and size are learned more slowly and
        # less well.
        model="tiny-v1.5-demo",
        stages=(alignment, instruct, side, consolidate),
        checkpoint_every=250,
        keep_last=1,
        tensorboard=False,
    )


RECIPES: Mapping[str, Callable[[], RunConfig]] = MappingProxyType(
    {
        "llava-med-v0": llava_med_v0,
        "llava-med-v1.5": llava_med_v1_5,
        "vqa-finetune": vqa_finetune,
        "tiny": tiny,
        "tiny-v0": tiny_v0,
        "demo": demo,
    }
)


def get_recipe(name: str) -> RunConfig:
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]()
