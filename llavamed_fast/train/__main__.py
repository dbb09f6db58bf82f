"""``python -m llavamed_fast.train --recipe NAME --out DIR [--set path=value ...] [--resume]``.

The same command runs one process or many: ``torchrun --nproc_per_node 8 -m llavamed_fast.train ...``.
"""

from __future__ import annotations

import argparse
import sys

from llavamed_fast.train.recipes import RECIPES


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="llavamed-fast train", description="Train a LLaVA-Med model: the whole curriculum."
    )
    root.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    root.add_argument(
        "--out", required=True, help="run directory (config, metrics, checkpoints, exported models)"
    )
    root.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a config field, e.g. seed=1, stages.instruct.lr=1e-5, stages.*.zero_stage=2",
    )
    root.add_argument(
        "--resume", action="store_true", help="continue from the latest complete checkpoint in --out"
    )
    root.add_argument(
        "--start-stage", help="start at this stage (with --set model=<exported model of the stage before>)"
    )
    root.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    root.add_argument(
        "--traceback",
        action="store_true",
        help="on an error, show Python's traceback instead of the one-line message (for bug reports)",
    )
    return root


def main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    from llavamed_fast.train.config import apply_overrides
    from llavamed_fast.train.loop import RunStopped, train
    from llavamed_fast.train.recipes import get_recipe

    args = parser().parse_args(argv)
    try:
        config = apply_overrides(get_recipe(args.recipe), args.overrides)
    except (KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.to_json(), end="")
        return 0
    try:
        model = train(config, Path(args.out), resume=args.resume, start_stage=args.start_stage)
    except RunStopped as stopped:
        print(f"error: {stopped}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        # Nothing is saved on an interrupt: the newest complete checkpoint is where --resume continues.
        print(
            f"interrupted; continue from the last checkpoint with --resume --out {args.out}", file=sys.stderr
        )
        return 130
    except (OSError, ValueError, KeyError) as error:
        # Bad input (a data path, a record, an image, the run directory): the message names the file or
        # record, and a traceback would only bury it. These types are broad, so a bug can land here too:
        # --traceback shows where it was raised.
        if args.traceback:
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        where = "".join(f" ({note})" for note in getattr(error, "__notes__", ()))
        print(f"error: {message}{where}", file=sys.stderr)
        return 1
    print(f"model: {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
