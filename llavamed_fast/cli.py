"""The ``llavamed-fast`` command."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _init(args: argparse.Namespace) -> int:
    from llavamed_fast.model import build, save_pretrained

    model, processor = build(args.preset, seed=args.seed, dtype=DTYPES[args.dtype])
    path = save_pretrained(model, processor, args.out, overwrite=args.overwrite)
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote a random-init {args.preset} checkpoint ({count:,} parameters) to {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """One forward + loss + backward pass of a tiny model over packed rows of real VQA-RAD images."""
    from llavamed_fast import ops
    from llavamed_fast.data.dataset import LlavaJsonDataset
    from llavamed_fast.data.packing import PackedBatchSampler, collate
    from llavamed_fast.data.vqa import shared_data_dir, vqa_rad_conversations
    from llavamed_fast.model import build

    root = Path(args.data) if args.data else shared_data_dir() / "vqa-rad"
    if not (root / "trainset.json").exists():
        print(
            f"error: VQA-RAD not found at {root} (expected trainset.json and images/). Get it from "
            "https://osf.io/89kps/ (the data_RAD split) and pass --data DIR, or set LLAVAMED_SHARED_DATA.",
            file=sys.stderr,
        )
        return 2
    torch.manual_seed(args.seed)
    model, processor = build(args.preset, seed=args.seed)
    records = vqa_rad_conversations(root, split="train")[: args.samples]
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "vqa_rad_train.json"
        path.write_text(json.dumps(records))
        dataset = LlavaJsonDataset(path, root / "images", processor)
    sampler = PackedBatchSampler(dataset.lengths, args.budget, seed=args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    model.train()
    start = time.perf_counter()
    print(f"{'row':>4} {'samples':>8} {'images':>7} {'tokens':>7} {'supervised':>11} {'loss':>8}")
    losses, tokens, supervised = [], 0, 0
    for row, batch in enumerate(loader):
        output = model(batch)
        output.loss.backward()
        losses.append(output.loss.item())
        tokens += batch.num_tokens
        supervised += int(output.num_supervised)
        print(
            f"{row:>4} {batch.num_samples:>8} {batch.num_images:>7} {batch.num_tokens:>7} "
            f"{int(output.num_supervised):>11} {losses[-1]:>8.4f}"
        )
    seconds = time.perf_counter() - start
    summary = {
        "preset": args.preset,
        "samples": len(dataset),
        "rows": len(losses),
        "tokens": tokens,
        "real_token_fraction": round(tokens / (len(losses) * args.budget), 4),
        "supervised_tokens": supervised,
        "mean_loss": round(sum(losses) / len(losses), 4),
        "seconds": round(seconds, 2),
        "backends": ops.REGISTRY.describe("cpu"),
    }
    print(json.dumps(summary))
    return 0


def _backends(args: argparse.Namespace) -> int:
    from llavamed_fast import ops

    print(json.dumps(ops.REGISTRY.describe(args.device), indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    from llavamed_fast.model.config import PRESETS

    root = argparse.ArgumentParser(prog="llavamed-fast", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init", help="write a random-init checkpoint of a preset (HF LLaVA layout)")
    init.add_argument("--preset", required=True, choices=sorted(PRESETS))
    init.add_argument("--out", required=True, help="checkpoint directory to create")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    init.add_argument("--overwrite", action="store_true", help="replace an existing non-empty directory")
    init.set_defaults(run=_init)

    demo = commands.add_parser(
        "demo", help="forward + loss over packed rows of real VQA-RAD images, tiny model"
    )
    demo.add_argument("--data", help="VQA-RAD folder (default: $LLAVAMED_SHARED_DATA/vqa-rad)")
    demo.add_argument(
        "--preset", default="tiny-v1.5", choices=[p for p in sorted(PRESETS) if p.startswith("tiny")]
    )
    demo.add_argument("--samples", type=int, default=64)
    demo.add_argument("--budget", type=int, default=1024, help="tokens per packed row")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    backends = commands.add_parser("backends", help="which implementation each op uses")
    backends.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    backends.set_defaults(run=_backends)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
