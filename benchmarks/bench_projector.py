"""projector: vision features -> Linear -> GELU -> Linear, written into the packed embeddings.

Default shapes: LLaVA-Med v1.5 (CLIP-L/14-336: 576 tokens of width 1024 per image; Mistral-7B width
4096), 14 images scattered through a 16,384-token packed row, bf16; the vision tower is frozen, so no
gradient for the features. Ours (the compiled extension) vs the torch reference (cuBLAS GEMMs, eager GELU,
index_copy) and its `torch.compile`; forward and forward+backward against the device's own measured bf16
GEMM rate. Last line: JSON with `fraction_of_gemm_rate` (ours, fwd+bwd; target ≥ 0.70).
`--smoke` runs tiny shapes on the CPU to check the script.
"""

from __future__ import annotations

import argparse

import torch
from harness import measure, measured_gemm_tflops, report, row

from llavamed_fast import ops
from llavamed_fast.ops import reference, use_backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=14)
    parser.add_argument("--image-tokens", type=int, default=576)
    parser.add_argument("--vision", type=int, default=1024)
    parser.add_argument("--text", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--linear", action="store_true", help="the v0 linear projector")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny CPU run that checks the script, not the speed"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also print the kernels of ours fwd+bwd (torch.profiler)"
    )
    args = parser.parse_args()
    if args.smoke:
        args.images, args.image_tokens, args.vision, args.text, args.tokens = 3, 16, 32, 64, 200
        args.dtype, args.repeat = "float32", 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    n, p, c, d = args.images, args.image_tokens, args.vision, args.text
    if n * p > args.tokens:
        raise SystemExit(f"{n} images of {p} tokens do not fit in {args.tokens} tokens")
    # Scatter the images through the row: random gaps of text between them.
    gaps = torch.rand(n + 1, generator=gen)
    gaps = (gaps / gaps.sum() * (args.tokens - n * p)).floor().long()
    offsets = (torch.cumsum(gaps[:-1], 0) + torch.arange(n) * p).to(device)

    def param(*shape):
        return (torch.randn(*shape, device=device, dtype=dtype) * shape[-1] ** -0.5).requires_grad_()

    x = torch.randn(n, p, c, device=device, dtype=dtype)  # frozen vision tower: no gradient
    w1, b1 = param(d, c), param(d)
    w2, b2 = (None, None) if args.linear else (param(d, d), param(d))
    embeds = torch.randn(args.tokens, d, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(args.tokens, d, device=device, dtype=dtype)
    params = [t for t in (w1, b1, w2, b2, embeds) if t is not None]
    m = n * p
    fwd_flops = 2 * m * c * d + (0 if args.linear else 2 * m * d * d)
    # Backward without dx: dW2 and dA (2 x 2md^2) and dW1 (2mcd); the linear projector only dW1.
    bwd_flops = 2 * m * c * d + (0 if args.linear else 4 * m * d * d)

    host_offsets = offsets.cpu()

    def ours(image_offsets=offsets):
        with use_backend(projector="cuda"):
            return ops.projector(x, w1, b1, w2, b2, embeds=embeds, image_offsets=image_offsets)

    def ref():
        with use_backend(projector="torch"):
            return ops.projector(x, w1, b1, w2, b2, embeds=embeds, image_offsets=offsets)

    candidates = {}
    if device.type == "cuda" and ops.REGISTRY.why_not("projector", "cuda", "cuda") is None:
        candidates["ours (cuda)"] = ours
        # The same op given the offsets on the host: the GEMM pointers need no device-to-host copy.
        candidates["ours (cuda), host offsets"] = lambda: ours(host_offsets)
    candidates["torch reference"] = ref
    if device.type == "cuda":
        compiled = torch.compile(reference.projector)
        candidates["reference + torch.compile"] = lambda: compiled(x, w1, b1, w2, b2, embeds, offsets)

    rows, totals = [], {}
    for name, fn in candidates.items():
        with torch.no_grad():
            forward = measure(f"{name} fwd", fn, device, flops=fwd_flops, repeat=args.repeat)

        def step(fn=fn):
            torch.autograd.grad(fn(), params, dy)

        total = measure(f"{name} fwd+bwd", step, device, flops=fwd_flops + bwd_flops, repeat=args.repeat)
        totals[name] = total
        rows += [row(forward, impl=name, **{"pass": "fwd"}), row(total, impl=name, **{"pass": "fwd+bwd"})]
    if args.profile and "ours (cuda)" in candidates:
        _profile(lambda: torch.autograd.grad(ours(), params, dy))
    gemm = measured_gemm_tflops(device, dtype) if device.type == "cuda" else None
    ours_total = totals.get("ours (cuda)")
    headline = {
        "fraction_of_gemm_rate": round(ours_total.tflops / gemm, 3) if ours_total and gemm else None,
        "measured_gemm_tflops": round(gemm, 1) if gemm else None,
        "speedup_vs_reference": round(totals["torch reference"].median_ms / ours_total.median_ms, 3)
        if ours_total
        else None,
        "images": n,
        "image_tokens": p,
        "vision": c,
        "text": d,
        "tokens": args.tokens,
        "projector": "linear" if args.linear else "mlp2x_gelu",
        "dtype": args.dtype,
    }
    report("projector", device, rows, headline, save=not args.smoke)


def _profile(step) -> None:
    """The kernels (device time) and host calls of a few fwd+bwd steps, to see where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(table.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    print(table.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))


if __name__ == "__main__":
    main()
