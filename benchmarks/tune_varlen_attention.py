"""Block-size sweep for the varlen attention backward (``kernels/varlen_attention.py``) on the GPU.

Times the backward pass of ``bench_varlen_attention.py``'s default problem (a 16K-token packed row of
LLaVA-Med stage-2 lengths, or stage 1's with ``--stage 1``; 32 heads, 8 KV heads, head dim 128, bf16,
causal) with the dK/dV kernel's and then the dQ kernel's tiles varied one at a time around the shipped
``_config``, and checks every variant's
gradients against the shipped one's. It changes nothing: the winner goes into ``_config`` by hand.
Last line: JSON with the fastest tiles of each kernel and the backward times.

    python benchmarks/tune_varlen_attention.py [--tokens 16384] [--stage 2] [--repeat 20]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from bench_varlen_attention import row_lengths
from harness import measure

from llavamed_fast import ops
from llavamed_fast.kernels import varlen_attention as va
from llavamed_fast.ops import use_backend

DKDV = [(32, 64, 8, 2), (32, 64, 4, 2), (32, 64, 8, 1), (32, 128, 8, 2), (32, 128, 4, 2), (64, 64, 8, 2),
        (64, 128, 8, 2), (16, 128, 8, 2), (16, 64, 4, 2)]  # fmt: skip
DQ = [(64, 32, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 4, 3),
      (128, 16, 8, 2)]  # fmt: skip


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
    shipped = va._config

    def config_with(**tiles):
        def patched(block_d, interpret):
            return shipped(block_d, interpret)._replace(**tiles)

        return patched

    def backward():
        return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

    reference = [g.double() for g in backward()]
    flops = 2.5 * 4 * sum(L * (L + 1) / 2 for L in lengths) * 32 * 128
    results = {}
    for kernel, candidates in (("dkdv", DKDV), ("dq", DQ)):
        for tiles in candidates:
            name = f"{kernel} {tiles}"
            va._config = config_with(**{kernel: va._Blocks(*tiles)})
            try:
                grads = backward()
                errors = [
                    ((g.double() - r).norm() / r.norm()).item() for g, r in zip(grads, reference, strict=True)
                ]
                m = measure(name, backward, device, flops=flops, repeat=args.repeat)
            except Exception as error:  # a tile that does not compile is a result, not a crash
                print(f"{name:28s} failed: {type(error).__name__}: {str(error)[:120]}")
                continue
            finally:
                va._config = shipped
            ok = max(errors) < 1e-2
            results[name] = (m.median_ms, ok)
            print(f"{name:28s} {m.median_ms:8.3f} ms {flops / m.median_ms / 1e9:7.1f} TFLOP/s  "
                  f"max rel err {max(errors):.1e}{'' if ok else '  WRONG'}")  # fmt: skip
    best = {
        kernel: min(
            ((n, t) for n, (t, ok) in results.items() if ok and n.startswith(kernel + " ")),
            key=lambda x: x[1],
            default=(None, None),
        )
        for kernel in ("dkdv", "dq")
    }
    print(json.dumps({
        "shipped_bwd_ms": results.get(f"dkdv {DKDV[0]}", (None,))[0],
        "best_dkdv": best["dkdv"][0], "best_dkdv_bwd_ms": best["dkdv"][1],
        "best_dq": best["dq"][0], "best_dq_bwd_ms": best["dq"][1],
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
