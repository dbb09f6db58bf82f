"""linear_cross_entropy: LM head + loss over supervised tokens vs eager full logits, same device, same run.

Default shapes: 16,384 tokens of hidden size 4096, vocabulary 32,000 (LLaMA/Mistral), 30 % of tokens
supervised (conversations), bf16, LM head trainable (stage 2). Eager: `F.cross_entropy(hidden @ W.T)` with
ignore_index, i.e. logits for every token; also its `torch.compile` and Liger-Kernel's fused linear
cross-entropy when installed. Forward and forward+backward; peak memory above the inputs.
Last line: JSON with `speedup_vs_eager` and `memory_vs_eager` (fwd+bwd; targets ≥ 2 and ≤ 1/8).
`--smoke` runs tiny shapes on the CPU to check the script.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from harness import measure, report, row

from llavamed_fast import ops
from llavamed_fast.ops import use_backend


def eager(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--supervised", type=float, default=0.3)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--frozen-head", action="store_true", help="LM head frozen (stage 1)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny CPU run that checks the script, not the speed"
    )
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.hidden, args.vocab, args.dtype, args.repeat = 256, 64, 500, "float32", 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    weight = (
        torch.randn(args.vocab, args.hidden, device=device, dtype=dtype) * args.hidden**-0.5
    ).requires_grad_(not args.frozen_head)
    labels = torch.randint(0, args.vocab, (args.tokens,), device=device)
    labels[torch.rand(args.tokens, device=device) >= args.supervised] = -100
    inputs = [hidden] + ([weight] if weight.requires_grad else [])
    supervised = int((labels != -100).sum())
    # Matmul FLOPs actually needed: logits, d hidden and d weight for the supervised rows only.
    flops_fwd = 2 * supervised * args.hidden * args.vocab

    candidates = {}
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        candidates["ours (triton)"] = lambda: _with("triton", hidden, weight, labels)
    candidates["torch reference"] = lambda: _with("torch", hidden, weight, labels)
    candidates["eager (full logits)"] = lambda: eager(hidden, weight, labels)
    if device.type == "cuda":
        compiled = torch.compile(eager)
        candidates["eager + torch.compile"] = lambda: compiled(hidden, weight, labels)
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        except ImportError:
            liger_fused_linear_cross_entropy = None
        if liger_fused_linear_cross_entropy is not None:
            candidates["liger"] = lambda: liger_fused_linear_cross_entropy(hidden, weight, labels)

    rows, totals = [], {}
    for name, fn in candidates.items():
        with torch.no_grad():
            forward = measure(f"{name} fwd", fn, device, flops=flops_fwd, repeat=args.repeat)

        def step(fn=fn):
            torch.autograd.grad(fn(), inputs)

        grads = 2 if weight.requires_grad else 1
        total = measure(f"{name} fwd+bwd", step, device, flops=(1 + grads) * flops_fwd, repeat=args.repeat)
        totals[name] = total
        rows += [row(forward, impl=name, **{"pass": "fwd"}), row(total, impl=name, **{"pass": "fwd+bwd"})]
    ours, base = totals.get("ours (triton)"), totals["eager (full logits)"]
    headline = {
        "speedup_vs_eager": round(base.median_ms / ours.median_ms, 3) if ours else None,
        "memory_vs_eager": round(ours.peak_mib / base.peak_mib, 4) if ours and base.peak_mib else None,
        "tokens": args.tokens,
        "supervised_tokens": supervised,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "lm_head_trainable": weight.requires_grad,
    }
    report("linear_cross_entropy", device, rows, headline, save=not args.smoke)


def _with(backend, hidden, weight, labels):
    with use_backend(linear_cross_entropy=backend):
        return ops.linear_cross_entropy(hidden, weight, labels)


if __name__ == "__main__":
    main()
