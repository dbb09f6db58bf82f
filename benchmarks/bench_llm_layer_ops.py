"""rms_norm, residual_rms_norm, swiglu and rotary: the fused Triton kernels vs transformers' eager formulas.

Default shapes: one packed row of 16,384 tokens through a LLaMA-7B layer (hidden 4096, MLP 11008, 32
heads of 128; ``--kv-heads 8`` for Mistral), bf16. Eager is the ops' torch backend, which is transformers'
own formula under autograd. Forward+backward of each op, with its weight trained (stage 2) and the
bandwidth it reaches on the bytes it must move (inputs read and outputs written once, forward and
backward), against the device's measured copy bandwidth. ``residual_rms_norm`` is the norm as a decoder
layer uses it, its input also the residual stream: eager, autograd adds the stream's gradient to the
norm's in a pass of its own. Last line: JSON with each op's speedup and the milliseconds they save per
layer (two norms of the residual stream, one MLP activation, one rotation of q and k), same run.
Each row also has the op's kernel time alone (``kernel_ms``, from the profiler): a sub-millisecond op
whose autograd and launches cost the host more than its kernels cost the GPU is timed by the host
between CUDA events, so its bandwidth is judged on the kernel time too (``kernel_fraction_of_copy_bandwidth``).
``--smoke`` runs tiny shapes on the CPU (under ``TRITON_INTERPRET=1``) to check the script.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from harness import kernel_ms, measure, measured_copy_gbps, report, row

from llavamed_fast import ops


def _cases(args, device, dtype) -> dict:
    """``op: (call, leaves, bytes moved forward+backward, uses per layer)``; ``call`` runs the op on the
    backend chosen around it and ``leaves`` are the inputs that take gradients. A layer's norms are counted
    as ``residual_rms_norm``, so plain ``rms_norm`` (the model's final norm) counts for none."""
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, device=device)).to(dtype).requires_grad_()

    tokens, size = args.tokens, dtype.itemsize
    x, weight = leaf(1, tokens, args.hidden), leaf(args.hidden, scale=0.1)
    gate, up = leaf(1, tokens, args.mlp, scale=3.0), leaf(1, tokens, args.mlp)
    q, k = leaf(1, tokens, args.heads, args.head_dim), leaf(1, tokens, args.kv_heads, args.head_dim)
    angles = torch.rand(1, tokens, args.head_dim // 2, generator=generator, device=device) * 6.28
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    return {
        # fwd: read x, write y; bwd: read x and dy, write dx (the weight and 1/rms are small)
        "rms_norm": (lambda: ops.rms_norm(x, weight, 1e-5), [x, weight], 5 * x.numel() * size, 0),
        # the same, and bwd reads the residual stream's gradient too; a decoder layer's two norms
        "residual_rms_norm": (
            lambda: ops.residual_rms_norm(x, weight, 1e-5),
            [x, weight],
            6 * x.numel() * size,
            2,
        ),
        # fwd: read gate and up, write out; bwd: read dout, gate and up, write dgate and dup
        "swiglu": (lambda: ops.swiglu(gate, up), [gate, up], 8 * gate.numel() * size, 1),
        # fwd: read q and k, write them rotated; bwd: the same on their gradients
        "rotary": (lambda: ops.rotary(q, k, cos, sin), [q, k], 4 * (q.numel() + k.numel()) * size, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny CPU run that checks the script, not the speed"
    )
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.hidden, args.mlp, args.heads, args.kv_heads, args.head_dim = 16, 32, 48, 4, 2, 16
        args.dtype, args.repeat = "float32", 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = getattr(torch, args.dtype)
    fast = "triton" if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else None
    copy_gbps = measured_copy_gbps(device) if device.type == "cuda" else None

    rows, headline, saved_ms = [], {}, 0.0
    for op, (call, leaves, bytes_moved, per_layer) in _cases(args, device, dtype).items():
        times = {}
        for backend in ("torch", fast):
            if backend is None:
                continue

            def step(backend=backend, op=op, call=call, leaves=leaves):
                with ops.use_backend(**{op.removeprefix("residual_"): backend}):
                    out = call()
                outs = out if isinstance(out, tuple) else (out,)
                torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])

            name = "eager (transformers' formula)" if backend == "torch" else "ours (triton)"
            result = measure(f"{op} {name}", step, device, bytes_moved=bytes_moved, repeat=args.repeat)
            times[backend] = result.median_ms
            extra = {"op": op, "impl": name, "pass": "fwd+bwd"}
            if copy_gbps and result.gbps:
                extra["fraction_of_copy_bandwidth"] = round(result.gbps / copy_gbps, 3)
            try:
                kernels = kernel_ms(step, device)
            except RuntimeError as error:  # the profiler: say so, keep the timed rows
                print(f"{op} {name}: no kernel time, the profiler failed: {error}", file=sys.stderr)
                kernels = None
            if kernels:
                extra["kernel_ms"] = round(kernels, 4)
                if copy_gbps:
                    fraction = bytes_moved / (kernels * 1e-3) / 1e9 / copy_gbps
                    extra["kernel_fraction_of_copy_bandwidth"] = round(fraction, 3)
            rows.append(row(result, **extra))
            if backend == fast and "kernel_fraction_of_copy_bandwidth" in extra:
                headline[f"{op}_kernel_fraction_of_copy_bandwidth"] = extra[
                    "kernel_fraction_of_copy_bandwidth"
                ]
        if fast in times:
            headline[f"{op}_speedup"] = round(times["torch"] / times[fast], 3)
            saved_ms += per_layer * (times["torch"] - times[fast])
    headline |= {
        "layer_ms_saved": round(saved_ms, 3) if fast else None,
        "copy_gbps": round(copy_gbps, 1) if copy_gbps else None,
        "tokens": args.tokens,
        "dtype": args.dtype,
    }
    report("llm_layer_ops", device, rows, headline, save=not args.smoke)


if __name__ == "__main__":
    main()
