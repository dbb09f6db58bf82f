"""Real-token fraction of packed rows vs padded batches on a LLaVA-Med-like length mix.

Lengths (tokens per sample) follow the two curriculum stages of LLaVA-Med v0:
  stage 1: 258 image tokens (256 + <im_start>/<im_end>) + ~48 tokens of system prompt and instruction
           + a caption of mean ~120 tokens with a long (log-normal) tail;
  stage 2: the same image and prompt + a 2-4 turn conversation of mean ~400 text tokens (log-normal).
Samples are cut at the 2048-token context, as the dataset does.

Packed: the training sampler (C++ first-fit-decreasing over windows of shuffled samples); the fraction
counts every row as if padded to the full budget (what static shapes would cost), so it is a lower
bound. Padded: random batches of 16 padded to their longest sample (what LLaVA-style training does).
The last line is a JSON object with `packed_real_fraction` and `padded_real_fraction` (the headline
budget and window, both stages pooled) and the per-stage, per-budget table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from llavamed_fast.data.packing import PackedBatchSampler

IMAGE_TOKENS = 258
PROMPT_TOKENS = 48
CONTEXT = 2048


def lognormal(rng: np.random.Generator, mean: float, sigma: float, size: int) -> np.ndarray:
    # Parameterised by the mean: E[X] = exp(mu + sigma^2 / 2).
    return rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, size)


def stage_lengths(stage: int, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, stage])
    if stage == 1:
        text = lognormal(rng, 120, 0.8, count)
    else:
        turns = rng.integers(2, 5, size=count)  # 2-4 turns
        text = lognormal(rng, 400 / 3, 0.6, count) * turns  # ~133 tokens per turn, mean ~400 in all
    lengths = IMAGE_TOKENS + PROMPT_TOKENS + np.maximum(text.round(), 1)
    return np.minimum(lengths, CONTEXT).astype(np.int64)


def packed_fraction(
    lengths: np.ndarray, budget: int, window: int | None, seed: int
) -> tuple[float, int, float]:
    start = time.perf_counter()
    rows = list(PackedBatchSampler(lengths, budget, seed=seed, window=window))
    seconds = time.perf_counter() - start
    return float(lengths.sum() / (len(rows) * budget)), len(rows), seconds


def padded_fraction(lengths: np.ndarray, batch: int, seed: int) -> float:
    order = np.random.default_rng(seed).permutation(len(lengths))
    real = padded = 0
    for start in range(0, len(order) - batch + 1, batch):
        chunk = lengths[order[start : start + batch]]
        real += chunk.sum()
        padded += chunk.max() * batch
    return float(real / padded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=60_000, help="samples per stage")
    parser.add_argument("--budgets", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--budget", type=int, default=8192, help="headline budget")
    parser.add_argument(
        "--window", type=int, default=10_000, help="samples packed together (0: the whole epoch)"
    )
    parser.add_argument("--batch", type=int, default=16, help="padded baseline batch size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    window = args.window or None
    budgets = sorted(set(args.budgets) | {args.budget})

    table = []
    print(f"{'stage':>5} {'budget':>7} {'mean len':>9} {'packed':>8} {'rows':>7} {'pack s':>7} {'padded':>8}")
    for stage in (1, 2):
        lengths = stage_lengths(stage, args.samples, args.seed)
        padded = padded_fraction(lengths, args.batch, args.seed)
        for budget in budgets:
            fraction, rows, seconds = packed_fraction(lengths, budget, window, args.seed)
            table.append(
                {
                    "stage": stage,
                    "budget": budget,
                    "mean_length": float(lengths.mean()),
                    "packed": fraction,
                    "rows": rows,
                    "pack_seconds": seconds,
                    "padded": padded,
                }
            )
            print(
                f"{stage:>5} {budget:>7} {lengths.mean():>9.1f} {fraction:>8.4f} {rows:>7} {seconds:>7.2f} {padded:>8.4f}"
            )

    headline = [r for r in table if r["budget"] == args.budget]
    real = {s: stage_lengths(s, args.samples, args.seed).sum() for s in (1, 2)}
    pooled_packed = sum(real[r["stage"]] for r in headline) / sum(r["rows"] * r["budget"] for r in headline)
    pooled_padded = sum(real[r["stage"]] for r in headline) / sum(
        real[r["stage"]] / r["padded"] for r in headline
    )
    print(
        json.dumps(
            {
                "packed_real_fraction": round(float(pooled_packed), 4),
                "padded_real_fraction": round(float(pooled_padded), 4),
                "budget": args.budget,
                "window": args.window,
                "samples_per_stage": args.samples,
                "padded_batch": args.batch,
                "machine": platform.machine(),
                "table": [
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in table
                ],
            }
        )
    )


if __name__ == "__main__":
    main()
