"""The ``llavamed-fast`` command."""

from __future__ import annotations

import argparse
import json
import sys
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
    from llavamed_fast.demo import run

    run(Path(args.out), scale=args.scale, eval_questions=args.eval_questions, seed=args.seed)
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
        "demo",
        help="offline demo: synthetic scans, both training stages on a tiny model, held-out evaluation",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (data, run, evaluation)")
    demo.add_argument("--scale", type=float, default=1.0, help="scale data and steps (smoke runs: 0.05)")
    demo.add_argument("--eval-questions", type=int, default=400)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    # Listed for --help; the arguments are the training entry point's own (see main).
    commands.add_parser("train", help="train a recipe: llavamed-fast train --recipe NAME --out DIR ...")

    backends = commands.add_parser("backends", help="which implementation each op uses")
    backends.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    backends.set_defaults(run=_backends)
    return root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from llavamed_fast.train.__main__ import main as train_main

        return train_main(argv[1:])
    args = parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
