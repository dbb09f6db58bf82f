"""varlen_attention: ours vs the torch reference and the best peers on the same device, same run.

Packed rows of LLaVA-Med-like samples (bench_packing.py's length mix of `--stage`, 2 by default; stage 1's
captions are shorter, so more of each tile is masked) filling `--tokens`; 7B
shapes by default (32 query heads, 8 KV heads as Mistral, head dim 128, bf16). Peers: PyTorch's
`torch.nn.attention.varlen.varlen_attn` (FlashAttention kernels inside torch), SDPA run per sample, and
flash-attn's varlen kernel when that package is installed. Forward, backward and both; TFLOP/s count the
causal half only (4·L²·H·D/2 per sample forward, 2.5x that backward); peak memory above the inputs.
Last line: JSON with `fwd_bwd_vs_best_peer` (peer time / our time: ≥ 1 means we are faster).
`--forward-tiles M,N,WARPS,STAGES` (repeatable) times ours again with that forward tile (the rest as
shipped): on short samples a 128-row query tile is partly past the sample's end and partly above the
diagonal. The headline's `forward_tiles` maps each to its forward time and its error against ours.
`--smoke` runs tiny shapes on the CPU (the reference, and Triton under TRITON_INTERPRET=1) to check the script.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from bench_packing import stage_lengths
from harness import measure, report, row

from llavamed_fast import ops
from llavamed_fast.kernels import varlen_attention as va
from llavamed_fast.ops import use_backend


def row_lengths(tokens: int, seed: int, stage: int = 2) -> list[int]:
    """Sample lengths of one packed row of about `tokens` tokens (the last sample cut to fit)."""
    lengths, total = [], 0
    for length in stage_lengths(stage, 10_000, seed):
        length = int(min(length, tokens - total))
        lengths.append(length)
        total += length
        if total >= tokens:
            break
    return lengths


def peers(q, k, v, cu, max_len, lengths, causal):
    found = {}
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    if varlen_attn is not None and q.is_cuda:
        params = inspect.signature(varlen_attn).parameters
        groups = q.shape[1] // k.shape[1]
        gqa = "enable_gqa" in params
        # torch 2.11's varlen_attn has no GQA: its KV heads are expanded (that copy is timed too).
        extra = {"enable_gqa": True} if gqa and groups > 1 else {}
        extra["window_size"] = (-1, 0) if causal else (-1, -1)

        def torch_varlen(q, k, v):
            if groups > 1 and not gqa:
                k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
            return varlen_attn(q, k, v, cu, cu, max_len, max_len, **extra)

        found["torch varlen_attn"] = torch_varlen

    def sdpa_per_sample(q, k, v):
        outs, start = [], 0
        for length in lengths:
            s = slice(start, start + length)
            qs, ks, vs = (t[s].transpose(0, 1) for t in (q, k, v))
            outs.append(
                F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=True).transpose(0, 1)
            )
            start += length
        return torch.cat(outs)

    found["sdpa per sample"] = sdpa_per_sample
    if q.is_cuda and ops.REGISTRY.why_not("varlen_attention", "flash_attn", "cuda") is None:

        def flash(q, k, v):
            with use_backend(varlen_attention="flash_attn"):
                return ops.varlen_attention(q, k, v, cu, max_len, causal)

        found["flash_attn"] = flash
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--stage", type=int, choices=(1, 2), default=2, help="the length mix")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--non-causal", action="store_true")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--forward-tiles",
        type=lambda text: va._Blocks(*(int(x) for x in text.split(","))),
        action="append",
        default=[],
        help="M,N,WARPS,STAGES: also time ours with this forward tile (repeatable)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny CPU run that checks the script, not the speed"
    )
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.heads, args.kv_heads, args.head_dim, args.dtype, args.repeat = (
            300,
            4,
            2,
            64,
            "float32",
            2,
        )
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = getattr(torch, args.dtype)
    causal = not args.non_causal
    lengths = row_lengths(args.tokens, args.seed, args.stage) if not args.smoke else [37, 1, 200, 62]
    tokens = sum(lengths)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)
    max_len = max(lengths)
    torch.manual_seed(args.seed)
    q = torch.randn(tokens, args.heads, args.head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(tokens, args.kv_heads, args.head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(tokens, args.kv_heads, args.head_dim, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn(tokens, args.heads, args.head_dim, device=device, dtype=dtype)

    pairs = sum(L * (L + 1) / 2 if causal else L * L for L in lengths)
    fwd_flops = 4 * pairs * args.heads * args.head_dim
    candidates = {}
    triton_ok = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    if triton_ok:
        candidates["ours (triton)"] = lambda q, k, v: _with(
            "triton", q, k, v, cu=cu, max_len=max_len, causal=causal
        )
    alternatives = {}  # ours with each --forward-tiles
    for tiles in args.forward_tiles if triton_ok else ():
        name = f"{tiles.m},{tiles.n},{tiles.warps},{tiles.stages}"
        alternatives[name] = candidates[f"ours, fwd tiles {name}"] = functools.partial(
            _with, "triton", cu=cu, max_len=max_len, causal=causal, forward_tiles=tiles
        )
    candidates["torch reference"] = lambda q, k, v: _with(
        "torch", q, k, v, cu=cu, max_len=max_len, causal=causal
    )
    peer_fns = peers(q, k, v, cu, max_len, lengths, causal)
    candidates.update(peer_fns)

    rows, both, forward_ms = [], {}, {}
    for name, fn in candidates.items():
        forward = measure(
            f"{name} fwd", lambda fn=fn: fn(q, k, v), device, flops=fwd_flops, repeat=args.repeat
        )
        out = fn(q, k, v)
        backward = measure(
            f"{name} bwd",
            lambda out=out: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
            device,
            flops=2.5 * fwd_flops,
            repeat=args.repeat,
        )
        del out

        def step(fn=fn):
            torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

        total = measure(f"{name} fwd+bwd", step, device, flops=3.5 * fwd_flops, repeat=args.repeat)
        both[name] = total.median_ms
        forward_ms[name] = forward.median_ms
        for kind, m in (("fwd", forward), ("bwd", backward), ("fwd+bwd", total)):
            rows.append(row(m, impl=name, **{"pass": kind}))
    ours = both.get("ours (triton)")
    best_peer = min((both[n] for n in peer_fns), default=None)
    headline = {
        "fwd_bwd_vs_best_peer": round(best_peer / ours, 3) if ours and best_peer else None,
        "best_peer": min(peer_fns, key=both.get) if peer_fns else None,
        "fwd_bwd_vs_reference": round(both["torch reference"] / ours, 3) if ours else None,
        **(
            {
                "fwd_ms": round(forward_ms["ours (triton)"], 4),
                # Each other tile's forward time, and its error against ours (summation order only).
                "forward_tiles": {
                    name: {
                        "fwd_ms": round(forward_ms[f"ours, fwd tiles {name}"], 4),
                        "rel_err": _relative_error(fn, candidates["ours (triton)"], q, k, v),
                    }
                    for name, fn in alternatives.items()
                },
            }
            if ours and alternatives
            else {}
        ),
        "stage": args.stage,
        "tokens": tokens,
        "samples": len(lengths),
        "max_seqlen": max_len,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "dtype": args.dtype,
        "causal": causal,
    }
    report("varlen_attention", device, rows, headline, save=not args.smoke)


def _relative_error(fn, reference_fn, q, k, v) -> float:
    with torch.no_grad():
        got, want = fn(q, k, v).double(), reference_fn(q, k, v).double()
    return float((got - want).norm() / want.norm())


@contextlib.contextmanager
def tiles_replaced(**tiles: va._Blocks) -> Iterator[None]:
    """Inside the block, the Triton kernels named (``forward``, ``dkdv``, ``dq``) run with these tiles."""
    shipped = va._config
    va._config = lambda block_d, interpret: shipped(block_d, interpret)._replace(**tiles)
    try:
        yield
    finally:
        va._config = shipped


def _with(backend, q, k, v, *, cu, max_len, causal, forward_tiles=None):
    replaced = tiles_replaced(forward=forward_tiles) if forward_tiles else contextlib.nullcontext()
    with replaced, use_backend(varlen_attention=backend):
        return ops.varlen_attention(q, k, v, cu, max_len, causal)


if __name__ == "__main__":
    main()
