"""One LLaVA-Med training step, ours vs the way LLaVA-style training runs it, with MFU and the projected
time of the whole curriculum.

Models: random init with the shapes of LLaVA-Med v0 (CLIP-L/14-224 + LLaMA-7B: hidden 4096, 32 heads,
MLP 11008, vocab 32000, linear projector) and v1.5 (CLIP-L/14-336 + Mistral-7B: 8 KV heads, MLP 14336,
mlp2x_gelu), with ``--layers`` LLM layers so that the step fits one GPU and the time budget: the cost per
layer is what is measured. bf16 weights, AdamW on what trains. Samples follow ``bench_packing.py``'s
length mix for each stage (stage 1: image + prompt + caption; stage 2: image + prompt + a 2-4 turn
conversation), the image-token count of each model swapped in.

- **stage 1**: LLM and vision tower frozen, the projector trains (and v0's image-start/end rows do not:
  they are embeddings of the frozen LLM here); **stage 2**: LLM + projector train.
- **baseline**: transformers' ``LlavaForConditionalGeneration`` on padded batches (each batch padded to
  its longest sample), SDPA attention, gradient checkpointing, logits over every token.
- **ours**: packed rows (no padding) through ``LlavaMed`` and our ops; **ours (reference ops)**: the same
  with every op on its torch reference, so the kernels' share of the gain is visible.

Each configuration takes the same samples, in the same order, and steps the optimizer once per
``--step-samples`` samples (default: once per pass of ``--samples``, 96, near the paper's global batch
of 128; ours accumulates over whole rows, the baseline over padded batches, as LLaVA's trainer does). One
pass warms up, ``--passes`` whole passes are timed, and tokens/s is their real tokens over their time. On
a GPU, a few seconds of GEMMs come first, so the first configuration is not timed at idle clocks.
Tokens/s counts real tokens only. MFU is model FLOPs
(``llavamed_fast.train.flops.batch_flops``: 4N per token when the LLM is frozen, 6N when it trains, plus
the head on supervised tokens, attention and the vision tower; padding and recompute earn nothing) over
the time and the device's dense bf16 peak. With ``--marginal-layers M`` ours is timed again with M layers:
the difference is the time and FLOPs of one layer (its MFU is the per-layer MFU), and the 32-layer
model's step is the measured one plus the missing layers, so the parts that do not grow with depth (the
vision tower, the embeddings, the head, host work) count once, as in the real model. The projection
runs the full model's FLOPs over the paper's curriculum (600K alignment pairs x 1 epoch, 60K
conversations x 3 epochs) at that 32-layer MFU (at the measured model's MFU without ``--marginal-layers``).

Last line: JSON. ``--smoke``: the tiny presets on the CPU, a step or two each (checks the script, not the
speed).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
from bench_packing import stage_lengths
from harness import measured_gemm_tflops, report, synchronize, warm_device

from llavamed_fast import ops
from llavamed_fast.data.packing import Sample, collate, pack
from llavamed_fast.data.templates import IGNORE_INDEX
from llavamed_fast.model import build, fused, get_preset
from llavamed_fast.model.checkpoint import hf_config
from llavamed_fast.model.convert import KNOWN_VISION_TOWERS
from llavamed_fast.train.flops import batch_flops, peak_tflops

VOCAB = 32000
# The paper's curriculum: 600K alignment pairs for one epoch, 60K conversations for three.
CURRICULUM = {1: 600_000, 2: 3 * 60_000}
PAPER_HOURS_8XA100 = 6.8 + 8.0
FULL_LAYERS = 32  # LLaMA-7B and Mistral-7B


def model_config(variant: str, layers: int):
    vision = dict(KNOWN_VISION_TOWERS["openai/clip-vit-large-patch14" + ("" if variant == "v0" else "-336")])
    text = {
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_hidden_layers": layers,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    }
    if variant == "v0":
        text |= {"model_type": "llama", "intermediate_size": 11008}
        base = get_preset("tiny-v0")
    else:
        text |= {
            "model_type": "mistral",
            "intermediate_size": 14336,
            "num_key_value_heads": 8,
            "sliding_window": None,
        }
        base = get_preset("tiny-v1.5")
    return base.replace(name=f"bench-{variant}-{layers}l", vision=vision, text=text, max_length=4096)


def build_model(variant: str, layers: int, device: torch.device, dtype: torch.dtype, smoke: bool):
    with torch.device(device):
        if smoke:
            tiny = get_preset(f"tiny-{variant}")
            tiny = tiny.replace(text={**tiny.text, "num_hidden_layers": layers})
            model, processor = build(tiny, seed=0, dtype=dtype)
        else:
            model, processor = build(model_config(variant, layers), seed=0, dtype=dtype)
            # The tiny tokenizer stands in for the real one; the head and embeddings get the real vocabulary.
            model.language_model.resize_token_embeddings(VOCAB, mean_resizing=False)
    return model, processor


@dataclass
class Item:
    ids: np.ndarray
    labels: np.ndarray
    image_start: int  # first image token


def make_samples(stage: int, count: int, model, processor, seed: int, smoke: bool) -> list[Item]:
    """Token ids with one image block after a short prefix, supervised where the stage supervises."""
    per_image = image_block = model.tokens_per_image
    lengths = stage_lengths(stage, count, seed) - 258 + per_image
    if smoke:
        lengths = np.minimum(lengths, 48 + per_image)
    rng = np.random.default_rng([seed, stage, 1])
    vocab = model.language_model.get_input_embeddings().weight.shape[0]
    special = {model.image_token_id}
    items = []
    for length in lengths.tolist():
        ids = rng.integers(3, min(vocab, 30000), size=length)
        while special & set(ids.tolist()):
            ids = np.where(np.isin(ids, list(special)), 5, ids)
        start = 8
        ids[start : start + image_block] = model.image_token_id
        labels = np.full(length, IGNORE_INDEX, dtype=np.int64)
        text_start = start + image_block + 40
        if stage == 1:
            labels[text_start:] = ids[text_start:]  # the caption
        else:
            # Alternating human / assistant spans; the assistant's are supervised (~60 % of the text).
            cuts = np.linspace(text_start, length, 7).astype(int)
            for a, b in zip(cuts[:-1:2], cuts[1::2], strict=False):
                labels[a + (b - a) // 5 : b] = ids[a + (b - a) // 5 : b]
        items.append(Item(ids.astype(np.int64), labels, start))
    return items


def pixel_batch(model, count: int, device, dtype, generator) -> torch.Tensor:
    size = model.vision_tower.config.image_size
    return torch.randn(count, 3, size, size, generator=generator).to(device=device, dtype=dtype)


def trainable(model, stage: int) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    keep = list(model.multi_modal_projector.parameters())
    if stage == 2:
        keep += list(model.language_model.parameters())
    for p in keep:
        p.requires_grad_(True)
    return keep


def optimizer_for(params, device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")


# ------------------------------------------------------------------------------------------------- ours
def our_steps(model, items: list[Item], budget: int, device, dtype, stage: int, step_samples: int):
    """Packed rows of at most ``budget`` tokens, grouped into optimizer steps of about ``step_samples``
    samples (whole rows; at least one row a step)."""
    rows = pack([len(it.ids) for it in items], budget)
    steps_rows = max(1, round(len(rows) * step_samples / len(items)))
    generator = torch.Generator().manual_seed(0)
    built = []
    for row in rows:
        samples = [
            Sample(
                str(i),
                items[i].ids,
                items[i].labels,
                np.array([items[i].image_start]),
                pixel_batch(model, 1, "cpu", torch.float32, generator),
            )
            for i in row
        ]
        batch = collate(samples)
        flops = batch_flops(model, batch, llm_trainable=stage == 2)
        built.append((batch.to(device), flops, sum(len(items[i].ids) for i in row)))
    return [built[i : i + steps_rows] for i in range(0, len(built), steps_rows)]


def run_ours(model, steps, optimizer, *, reference_ops: bool, recompute: bool):
    llm = model.language_model
    if recompute:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif llm.is_gradient_checkpointing:
        llm.gradient_checkpointing_disable()
    model.train()

    def context():
        if not reference_ops:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(
            ops.use_backend(
                **dict.fromkeys(
                    ("varlen_attention", "projector", "linear_cross_entropy", "rms_norm", "swiglu", "rotary"),
                    "torch",
                )
            )
        )
        stack.enter_context(fused.transformers_linears())  # projections and residual adds as transformers
        return stack

    def one(step):
        with context():
            total = sum(int((model.shifted_labels(b) != IGNORE_INDEX).sum()) for b, _, _ in step)
            for batch, _, _ in step:
                loss = model(batch, reduction="sum").loss / total
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return one


# --------------------------------------------------------------------------------------------- baseline
def baseline_model(model, device, dtype):
    from transformers import LlavaForConditionalGeneration

    config = hf_config(model)
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    with torch.device(device):
        hf = LlavaForConditionalGeneration(config).to(dtype)
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return hf


def baseline_steps(
    hf, model, items: list[Item], batch_size: int, device, dtype, stage: int, step_samples: int
):
    """Padded batches of ``batch_size`` samples (pad to the longest, right padding), in sample order,
    grouped into optimizer steps of ``step_samples`` samples (gradient accumulation, as LLaVA's trainer)."""
    steps_batches = max(1, step_samples // batch_size)
    pad = 0
    generator = torch.Generator().manual_seed(0)
    built = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        width = max(len(it.ids) for it in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, it in enumerate(chunk):
            ids[row, : len(it.ids)] = torch.from_numpy(it.ids)
            labels[row, : len(it.ids)] = torch.from_numpy(it.labels)
            mask[row, : len(it.ids)] = 1
        pixels = pixel_batch(model, len(chunk), "cpu", torch.float32, generator)
        built.append(
            (
                ids.to(device),
                labels.to(device),
                mask.to(device),
                pixels.to(device, dtype),
                sum(len(it.ids) for it in chunk),
            )
        )
    return [built[i : i + steps_batches] for i in range(0, len(built), steps_batches)]


def run_baseline(hf, optimizer):
    hf.train()

    def one(step):
        for ids, labels, mask, pixels, _ in step:
            # transformers averages over each batch's supervised tokens; scaled per batch as LLaVA does.
            loss = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss / len(step)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return one


def _our_tokens(step) -> int:
    return sum(tokens for _, _, tokens in step)


def _our_flops(step) -> float:
    return sum(flops for _, flops, _ in step)


def _baseline_tokens(step) -> int:
    return sum(batch[-1] for batch in step)


def _baseline_flops(step, per_token: float) -> float:
    # The same samples as ours, so the same model FLOPs per real token; padding earns none.
    return _baseline_tokens(step) * per_token


# ---------------------------------------------------------------------------------------------- timing
def time_steps(one, steps, passes: int, device) -> tuple[list[float], float]:
    """Seconds of each optimizer step over ``passes`` whole passes through ``steps``, after one pass of
    warm-up, and the warm-up's seconds. The first sight of a row's shapes compiles Triton specialisations
    (lengths divisible by 16 or not) and grows the allocator's pool; a warm-up shorter than a pass once
    left that inside the timed steps, and the 4-layer model, timed first, paid for it while the deeper one
    timed later did not, so a layer's cost came out too small (MFU > 1)."""
    synchronize(device)
    begin = time.perf_counter()
    for step in steps:
        one(step)
    synchronize(device)
    warm_s = time.perf_counter() - begin
    times = []
    for step in steps * passes:
        synchronize(device)
        begin = time.perf_counter()
        one(step)
        synchronize(device)
        times.append(time.perf_counter() - begin)
    return times, warm_s


def attempt(name: str, measure_it, failures: list[str]) -> dict | None:
    """One configuration's measurement; a failure (an out-of-memory, say) is printed and counted, and the
    other configurations still run, so one run on a GPU machine brings back everything that worked."""
    began = time.perf_counter()
    try:
        out = measure_it()
    except Exception:  # reported below and in the exit status
        traceback.print_exc()
        failures.append(name)
        print(f"FAILED: {name}", file=sys.stderr, flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None
    # Each row as soon as it exists (a run cut short still leaves its rows in the log).
    print("row " + json.dumps({**out, "wall_s": round(time.perf_counter() - began, 1)}), flush=True)
    return out


def measure(name, one, steps, tokens_of, flops_of, passes, device, peak) -> dict:
    """Tokens/s and MFU over whole passes through ``steps``: every row (ours) or padded batch (the
    baseline) is timed equally often, so both configurations are measured on the whole sample set, and
    rates are totals over totals (steps differ in size; a median of step times would weigh them wrongly)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, warm_s = time_steps(one, steps, passes, device)
    chosen, timed = steps * passes, len(steps) * passes
    seconds, tokens = sum(times), sum(tokens_of(s) for s in chosen)
    flops = float(sum(flops_of(s) for s in chosen))
    out = {
        "config": name,
        "steps": timed,
        "step_s": seconds / timed,
        "flops_per_step": flops / timed,
        "tokens_per_s": tokens / seconds,
        "tflops": flops / seconds / 1e12,
        "mfu": (flops / seconds / 1e12) / peak if peak else None,
        # The warm-up's seconds per step, to set against step_s: what a cold start costs.
        "warmup_s_per_step": warm_s / len(steps),
    }
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def profile_steps(key: str, one, steps, device) -> dict:
    """Where one configuration's step goes on the GPU: kernel time by kind, the share of the step's wall
    time the GPU was busy (the rest is host work and waiting), and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    # Called after `measure` on the same model and rows: every shape is compiled and the pool is grown.
    synchronize(device)
    chosen = steps[:3]  # up to three steps (one when a step is the whole pass)
    began = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for step in chosen:
            one(step)
        synchronize(device)
    wall_us = (time.perf_counter() - began) * 1e6
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kinds: dict[str, float] = {}
    for event in kernels:
        name = event.key.lower()
        kind = next(
            (
                label
                for label, words in (
                    ("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas")),
                    ("attention", ("varlen_attention", "flash", "attn", "sdpa")),
                    ("cross_entropy", ("linear_cross_entropy", "cross_entropy")),
                    ("projector", ("projector",)),
                    ("norm/swiglu/rotary", ("rms_norm", "swiglu", "rotary")),
                    ("optimizer", ("adam", "multi_tensor")),
                    ("copy/memset", ("memcpy", "memset", "copy")),
                    ("reduce", ("reduce",)),
                    ("elementwise", ("elementwise", "vectorized", "unrolled")),
                )
                if any(w in name for w in words)
            ),
            "other",
        )
        kinds[kind] = kinds.get(kind, 0.0) + event.self_device_time_total
    busy = sum(kinds.values())
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60))
    return {
        "config": f"{key} profile",
        "steps": len(chosen),
        "wall_ms_per_step": round(wall_us / len(chosen) / 1e3, 2),
        "gpu_busy_fraction": round(busy / wall_us, 3),
        "kernel_ms_per_step": {k: round(v / len(chosen) / 1e3, 2) for k, v in sorted(kinds.items())},
        # The profiled rows' size: kernel time per token, and kernel-time MFU, against the timed passes'.
        "tokens_per_step": sum(_our_tokens(s) for s in chosen) / len(chosen),
        "flops_per_step": sum(_our_flops(s) for s in chosen) / len(chosen),
    }


def measure_more_layers(
    model, processor, stage, args, device, dtype, peak, fast: dict, shallow_profile: dict | None
) -> dict:
    """Ours again on ``model`` (``--marginal-layers`` LLM layers), on the same samples and rows as ``fast``.

    One more layer costs ``(t_M - t_L) / (M - L)`` seconds and ``(F_M - F_L) / (M - L)`` FLOPs per step:
    its MFU is the per-layer MFU. The full model's step is the measured one plus the missing layers,
    ``t_L + (32 - L) * dt`` for ``F_L + (32 - L) * dF``: the vision tower, the embeddings, the head and
    the step's host work are counted once, as in the real model, not once per four layers.

    With ``shallow_profile`` (the smaller model's :func:`profile_steps`), the deeper model is profiled on
    the same rows too, and the difference gives one layer's kernel time by kind: what a layer spends
    outside its GEMMs, which is what stands between the per-layer MFU and the GEMM rate."""
    items = make_samples(stage, args.samples, model, processor, seed=stage, smoke=args.smoke)
    steps = our_steps(model, items, args.budget, device, dtype, stage, args.step_samples)
    opt = optimizer_for(trainable(model, stage), device)
    one = run_ours(model, steps, opt, reference_ops=False, recompute=args.recompute)
    row = measure("ours", one, steps, _our_tokens, _our_flops, args.passes, device, peak)
    per_layer_kernels, kernel_mfu = None, None
    extra = args.marginal_layers - args.layers
    if shallow_profile is not None:
        deep_profile = profile_steps(f"{args.marginal_layers} layers", one, steps, device)
        deep, shallow = deep_profile["kernel_ms_per_step"], shallow_profile["kernel_ms_per_step"]
        per_layer_kernels = {
            kind: round((deep.get(kind, 0.0) - shallow.get(kind, 0.0)) / extra, 3)
            for kind in sorted(set(deep) | set(shallow))
        }
        # One layer's MFU over its kernels' time alone: set against the timed per-layer MFU, the
        # difference is time the GPU waits within a layer (launches, host syncs).
        busy_s = sum(per_layer_kernels.values()) / 1e3
        profiled_flops = (deep_profile["flops_per_step"] - shallow_profile["flops_per_step"]) / extra
        if peak and busy_s > 0:
            kernel_mfu = profiled_flops / busy_s / 1e12 / peak
            if not 0 < kernel_mfu <= 1:  # per-kind differences of two profiles: noise can make nonsense
                print(f"per-layer kernel MFU {kernel_mfu:.3f} is not a rate; not reported", file=sys.stderr)
                kernel_mfu = None
    del opt, one, steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    seconds = (row["step_s"] - fast["step_s"]) / extra
    layer_flops = (row["flops_per_step"] - fast["flops_per_step"]) / extra
    if seconds <= 0 and not args.smoke:  # tiny CPU models: noise may exceed a layer; the smoke checks code
        raise RuntimeError(
            f"{args.marginal_layers} layers took {row['step_s']:.4f} s per step, no more than "
            f"{args.layers} layers' {fast['step_s']:.4f} s: the timing is too noisy to give a layer's cost"
        )
    rated = peak is not None and seconds > 0
    if rated and layer_flops / seconds / 1e12 > peak and not args.smoke:
        # More FLOP/s than the chip has: one of the two timings is off (a cold start inside the smaller
        # model's timing did this once); no number is better than an impossible one.
        raise RuntimeError(
            f"{extra} more layers took {seconds * extra:.4f} s, "
            f"above the device's peak rate for their FLOPs: the two timings are inconsistent"
        )
    missing = FULL_LAYERS - args.layers
    full_seconds = fast["step_s"] + missing * seconds
    full_flops = fast["flops_per_step"] + missing * layer_flops
    return {
        **row,
        "config": f"ours, {args.marginal_layers} layers",
        "layers": args.marginal_layers,
        "per_layer_ms": seconds * 1e3,
        "per_layer_mfu": layer_flops / seconds / 1e12 / peak if rated else None,
        f"step_s_{FULL_LAYERS}_layers": full_seconds,
        "mfu_full_model": full_flops / full_seconds / 1e12 / peak if rated else None,
        **({"per_layer_kernel_ms": per_layer_kernels} if per_layer_kernels is not None else {}),
        **({"per_layer_kernel_mfu": kernel_mfu} if kernel_mfu is not None else {}),
    }


def full_model_flops_per_sample(variant: str, stage: int, items_probe: int, seed: int) -> float:
    """Model FLOPs per sample of the full 32-layer model on the stage's length mix (a meta-device model)."""
    with torch.device("meta"):
        model, processor = build(model_config(variant, 32), dtype=torch.bfloat16)
        model.language_model.resize_token_embeddings(VOCAB, mean_resizing=False)
    items = make_samples(stage, items_probe, model, processor, seed, smoke=False)
    total = 0.0
    for it in items:
        sample = Sample("p", it.ids, it.labels, np.array([it.image_start]), torch.zeros(1, 3, 1, 1))
        total += batch_flops(model, collate([sample]), llm_trainable=stage == 2)
    return total / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", choices=("v0", "v1.5", "both"), default="both")
    parser.add_argument("--stage", choices=("1", "2", "both"), default="both")
    parser.add_argument("--layers", type=int, default=4, help="LLM layers (the cost per layer is measured)")
    parser.add_argument("--budget", type=int, default=16384, help="tokens per packed row (ours)")
    parser.add_argument(
        "--step-samples",
        type=int,
        default=0,
        help="samples per optimizer step, ours and the baseline alike (default: all of --samples, one step "
        "a pass, near the paper's batch of 128; 8: a step after about every row or padded batch)",
    )
    parser.add_argument("--baseline-batch", type=int, default=8, help="samples per padded batch (baseline)")
    parser.add_argument("--samples", type=int, default=96)
    # A layer's cost is a difference of two timings, so their noise counts twice.
    parser.add_argument("--passes", type=int, default=3, help="timed passes through the samples")
    parser.add_argument(
        "--marginal-layers",
        type=int,
        default=0,
        help="also time ours with this many LLM layers: the difference is the cost of one layer, and "
        f"it gives the {FULL_LAYERS}-layer model's MFU for the projection",
    )
    parser.add_argument("--recompute", action="store_true", help="gradient checkpointing in ours too")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument(
        "--profile", action="store_true", help="also profile ours' step on the GPU (kernel time by kind)"
    )
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.passes < 1:
        parser.error("--passes must be at least 1")
    if args.marginal_layers and args.marginal_layers <= args.layers:
        parser.error(f"--marginal-layers must exceed --layers ({args.layers})")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        args.samples, args.budget, args.baseline_batch, args.passes = 8, 512, 2, 1
    peak = peak_tflops(device, dtype)
    args.step_samples = step_samples = args.step_samples or args.samples
    variants = ("v0", "v1.5") if args.variant == "both" else (args.variant,)
    stages = (1, 2) if args.stage == "both" else (int(args.stage),)
    headline = {"layers": args.layers, "samples_per_step": step_samples, "budget": args.budget}
    rows, failures = [], []
    if device.type == "cuda":
        warm_device(device)  # clocks up before the first configuration, which is timed like the others
        headline["measured_gemm_tflops"] = round(measured_gemm_tflops(device), 1)
    for variant in variants:
        measured: dict[int, dict] = {}  # stage -> ours' row
        profiled: dict[int, dict | None] = {}  # stage -> ours' profile (--profile)
        model, processor = build_model(variant, args.layers, device, dtype, args.smoke)
        hf = None if args.no_baseline else baseline_model(model, device, dtype)
        for stage in stages:
            items = make_samples(stage, args.samples, model, processor, seed=stage, smoke=args.smoke)
            real = sum(len(it.ids) for it in items)
            base = {"variant": variant, "stage": stage, "budget": args.budget}
            key = f"{variant}_stage{stage}"
            ours = our_steps(model, items, args.budget, device, dtype, stage, step_samples)
            opt = optimizer_for(trainable(model, stage), device)
            fast, slow = (
                attempt(
                    f"{key} {name}",
                    functools.partial(
                        measure,
                        name,
                        run_ours(model, ours, opt, reference_ops=reference, recompute=args.recompute),
                        ours,
                        _our_tokens,
                        _our_flops,
                        args.passes,
                        device,
                        peak,
                    ),
                    failures,
                )
                for name, reference in (("ours", False), ("ours (reference ops)", True))
            )
            rows += [{**base, **r} for r in (fast, slow) if r is not None]
            if args.profile:  # on the CPU (--smoke) this checks the code; kernel times need a GPU
                one = run_ours(model, ours, opt, reference_ops=False, recompute=args.recompute)
                profiled[stage] = attempt(
                    f"{key} profile", functools.partial(profile_steps, key, one, ours, device), failures
                )
            del opt
            if fast is not None:
                headline[f"{key}_tokens_per_s"] = round(fast["tokens_per_s"], 1)
                headline[f"{key}_mfu"] = None if fast["mfu"] is None else round(fast["mfu"], 4)
                if slow is not None:
                    headline[f"{key}_kernels_speedup"] = round(fast["tokens_per_s"] / slow["tokens_per_s"], 3)
            if hf is not None:
                # The same samples, the same model FLOPs (padding earns none): FLOPs per sample carried over.
                flops_per_token = sum(f for s in ours for _, f, _ in s) / real
                steps = baseline_steps(
                    hf, model, items, args.baseline_batch, device, dtype, stage, step_samples
                )
                for p in hf.parameters():
                    p.requires_grad_(False)
                keep = list(hf.model.multi_modal_projector.parameters())
                if stage == 2:
                    keep += list(hf.model.language_model.parameters()) + list(hf.lm_head.parameters())
                for p in keep:
                    p.requires_grad_(True)
                opt = optimizer_for(keep, device)
                name = "baseline (HF, padded, SDPA, checkpointing)"
                baseline = attempt(
                    f"{key} baseline",
                    functools.partial(
                        measure,
                        name,
                        run_baseline(hf, opt),
                        steps,
                        _baseline_tokens,
                        functools.partial(_baseline_flops, per_token=flops_per_token),
                        args.passes,
                        device,
                        peak,
                    ),
                    failures,
                )
                del opt, steps
                if baseline is not None:
                    rows.append({**base, **baseline})
                    headline[f"{key}_baseline_tokens_per_s"] = round(baseline["tokens_per_s"], 1)
                    if fast is not None:
                        headline[f"{key}_speedup_vs_baseline"] = round(
                            fast["tokens_per_s"] / baseline["tokens_per_s"], 3
                        )
            if fast is not None:
                measured[stage] = fast
            del ours
        del model, hf
        if device.type == "cuda":
            torch.cuda.empty_cache()
        deeper = None  # the same shapes with --marginal-layers layers, built once for both stages
        if args.marginal_layers and measured:
            try:
                deeper = build_model(variant, args.marginal_layers, device, dtype, args.smoke)
            except Exception:  # reported, and counted in the exit status, like a failed configuration
                traceback.print_exc()
                failures.append(f"{variant} model with {args.marginal_layers} layers")
        for stage, fast in measured.items():
            key = f"{variant}_stage{stage}"
            mfu = fast["mfu"]
            if deeper is not None:
                more = attempt(
                    f"{key} ours with {args.marginal_layers} layers",
                    functools.partial(
                        measure_more_layers,
                        *deeper,
                        stage,
                        args,
                        device,
                        dtype,
                        peak,
                        fast,
                        profiled.get(stage),
                    ),
                    failures,
                )
                if more is not None:
                    rows.append({"variant": variant, "stage": stage, **more})
                    headline[f"{key}_per_layer_ms"] = round(more["per_layer_ms"], 3)
                    if more.get("per_layer_kernel_mfu") is not None:
                        # over the layer's kernel time alone: the timed per-layer MFU's ceiling
                        headline[f"{key}_per_layer_kernel_mfu"] = round(more["per_layer_kernel_mfu"], 4)
                    if more["mfu_full_model"] is not None:
                        headline[f"{key}_per_layer_mfu"] = round(more["per_layer_mfu"], 4)
                        headline[f"{key}_mfu_{FULL_LAYERS}_layers"] = round(more["mfu_full_model"], 4)
                        mfu = more["mfu_full_model"]
            if not args.smoke and mfu:
                # Projection: the full model's FLOPs over the curriculum at the MFU of ours (the full
                # model's, from the per-layer cost, where it was measured; else the measured model's).
                per_sample = full_model_flops_per_sample(variant, stage, 512, seed=stage)
                total = per_sample * CURRICULUM[stage]
                for name, gpus, peak_gpu in (("8xA100", 8, 312.0), ("1xH100", 1, 989.4)):
                    hours = total / (mfu * peak_gpu * 1e12 * gpus) / 3600
                    headline[f"{key}_projected_hours_{name}"] = round(hours, 2)
        del deeper
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for name in ("8xA100", "1xH100"):
        parts = [headline.get(f"v0_stage{s}_projected_hours_{name}") for s in (1, 2)]
        if all(p is not None for p in parts):
            headline[f"v0_curriculum_projected_hours_{name}"] = round(sum(parts), 2)
    headline["paper_hours_8xA100"] = PAPER_HOURS_8XA100
    if failures:
        headline["failed"] = failures
    report("train_step", device, rows, headline, save=not args.smoke)
    if failures:
        raise SystemExit(f"{len(failures)} configuration(s) failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
