"""Block-size sweep for the varlen attention kernels (``kernels/varlen_attention.py``) on the GPU.

Times ``bench_varlen_attention.py``'s default problem (a 16K-token packed row of LLaVA-Med stage-2
lengths, or stage 1's with ``--stage 1``; 32 heads, 8 KV heads, head dim 128, bf16, causal): the shipped
``_config`` first, then the forward's, the dK/dV kernel's and the dQ kernel's tiles varied one kernel at a
time around it, each variant's results checked against the shipped one's (the forward's output, the
backward's gradients). It changes nothing: a winner goes into ``_config`` by hand. Stage 1's samples are
short (mean ~430 tokens), so more of a large query tile is masked than at stage 2's lengths; the best
tiles may differ. Last line: JSON with the shipped and the fastest tiles of each kernel and their times.

    python benchmarks/tune_varlen_attention.py [--tokens 16384] [--stage 2] [--repeat 20]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from bench_varlen_attention import row_lengths, tiles_replaced
from harness import measure

from llavamed_fast import ops
from llavamed_fast.kernels import varlen_attention as va
from llavamed_fast.ops import use_backend

# (query rows, key rows, warps, stages) per tile
FORWARD = [(128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2), (128, 32, 8, 3), (64, 32, 4, 3),
           (128, 128, 8, 2), (64, 128, 4, 2)]  # fmt: skip
DKDV = [(32, 64, 8, 2), (32, 64, 8, 1), (32, 128, 8, 2), (32, 128, 4, 2), (64, 64, 8, 2),
        (64, 128, 8, 2), (16, 128, 8, 2), (16, 64, 4, 2)]  # fmt: skip
DQ = [(64, 32, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 4, 3),
      (128, 16, 8, 2), (32, 32, 4, 2)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--stage", type=int, choices=(1, 2), default=2, help="the length mix")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device("cuda")
    lengths = row_lengths(args.tokens, args.seed, args.stage)
    tokens, max_len = sum(lengths), max(lengths)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)
    torch.manual_seed(args.seed)
    q = torch.randn(tokens, 32, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(tokens, 8, 128, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in "kv"
    )
    dout = torch.randn_like(q)
    with use_backend(varlen_attention="triton"):
        out = ops.varlen_attention(q, k, v, cu, max_len, causal=True)
    tiles_of = va._config(128, False)

    def forward():
        with torch.no_grad(), use_backend(varlen_attention="triton"):
            return (ops.varlen_attention(q, k, v, cu, max_len, causal=True),)

    def backward():
        return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

    causal_half = sum(L * (L + 1) / 2 for L in lengths) * 32 * 128
    flops = {"forward": 4 * causal_half, "dkdv": 2.5 * 4 * causal_half, "dq": 2.5 * 4 * causal_half}
    calls = {"forward": forward, "dkdv": backward, "dq": backward}
    candidates = {"forward": FORWARD, "dkdv": DKDV, "dq": DQ}
    results: dict[str, dict] = {}
    for kernel, call in calls.items():
        reference = [t.double() for t in call()]
        shipped_tiles = tuple(getattr(tiles_of, kernel))
        timed = {}
        for tiles in [shipped_tiles] + [t for t in candidates[kernel] if t != shipped_tiles]:
            name = f"{kernel} {tiles}{' (shipped)' if tiles == shipped_tiles else ''}"
            try:
                with tiles_replaced(**{kernel: va._Blocks(*tiles)}):
                    got = call()
                    errors = [
                        ((g.double() - r).norm() / r.norm()).item()
                        for g, r in zip(got, reference, strict=True)
                    ]
                    m = measure(name, call, device, flops=flops[kernel], repeat=args.repeat)
            except Exception as error:  # a tile that does not compile is a result, not a crash
                print(f"{name:36s} failed: {type(error).__name__}: {str(error)[:120]}")
                continue
            ok = max(errors) < 1e-2
            if ok:
                timed[tiles] = m.median_ms
            print(f"{name:36s} {m.median_ms:8.3f} ms {flops[kernel] / m.median_ms / 1e9:7.1f} TFLOP/s  "
                  f"max rel err {max(errors):.1e}{'' if ok else '  WRONG'}")  # fmt: skip
        best = min(timed, key=timed.get, default=None)
        # "dkdv"/"dq" times are the whole backward's (preprocess, dK/dV and dQ) with that kernel's tiles.
        results[kernel] = {
            "shipped": list(shipped_tiles),
            "shipped_ms": timed.get(shipped_tiles),
            "best": None if best is None else list(best),
            "best_ms": None if best is None else timed[best],
        }
    print(json.dumps({
        **results, "stage": args.stage, "tokens": tokens, "samples": len(lengths),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
