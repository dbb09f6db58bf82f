"""The ``llavamed-fast`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from llavamed_fast._argtypes import ABOVE_ZERO, COUNT, NOT_NEGATIVE, NOT_NEGATIVE_INT, client_options

if TYPE_CHECKING:
    from llavamed_fast.data.selection import FigurePolicy

# torch is imported by the commands that need it, never here: data curation runs without it.
DTYPES = ("bfloat16", "float16", "float32")


def _init(args: argparse.Namespace) -> int:
    import torch

    from llavamed_fast.model import build, save_pretrained
    from llavamed_fast.model.config import PRESETS

    if args.preset not in PRESETS:
        print(f"init: unknown preset {args.preset!r}; known: {', '.join(sorted(PRESETS))}", file=sys.stderr)
        return 2
    model, processor = build(args.preset, seed=args.seed, dtype=getattr(torch, args.dtype))
    path = save_pretrained(model, processor, args.out, overwrite=args.overwrite)
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote a random-init {args.preset} checkpoint ({count:,} parameters) to {path}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from llavamed_fast.model.checkpoint import CheckpointError
    from llavamed_fast.model.convert import convert_llava

    try:
        done = convert_llava(
            args.source,
            args.out,
            vision=args.vision,
            tokenizer=args.tokenizer,
            template=args.template,
            base=args.base,
            overwrite=args.overwrite,
        )
    except CheckpointError as error:
        print(f"convert: {error}", file=sys.stderr)
        return 2
    for note in done.notes:
        print(f"convert: note: {note}", file=sys.stderr)
    print(f"converted {args.source} to {done.path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from llavamed_fast.demo import run

    run(Path(args.out), scale=args.scale, eval_questions=args.eval_questions, seed=args.seed)
    return 0


def _backends(args: argparse.Namespace) -> int:
    import torch

    from llavamed_fast import ops

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(ops.REGISTRY.describe(device), indent=2))
    return 0


def _curate_pmc(args: argparse.Namespace) -> int:
    from llavamed_fast.data import pmc

    files = pmc.article_files(args.input)
    if not files:
        print(f"curate pmc: no .nxml/.xml files in {', '.join(args.input)}", file=sys.stderr)
        return 2
    repeats = []

    def repeat(text: str) -> None:  # a warning, not a failure: the first figure of the pair id is written
        repeats.append(text)
        print(f"curate pmc: {text}", file=sys.stderr)

    records, errors = pmc.parse_files(files, repeat=repeat)
    count = pmc.write_jsonl(records, args.out)
    for error in errors:
        print(f"curate pmc: skipped {error}", file=sys.stderr)
    articles = len({r.source for r in records})
    print(
        f"{count} figures from {articles} articles -> {args.out}"
        + (f"; {len(repeats)} repeated pair ids left out" if repeats else "")
        + (f"; {len(errors)} of {len(files)} files could not be read" if errors else "")
    )
    return 1 if errors else 0


def _figure_policy(args: argparse.Namespace) -> FigurePolicy:
    """The figure selection of ``curate align`` and ``curate instruct`` (one implementation, one set of
    options); reading ``--images`` raises a ValueError naming the manifest and line."""
    from llavamed_fast.data import selection

    images = selection.ImageManifest(args.images) if args.images else None
    return selection.FigurePolicy(
        licence=args.licence, domains=tuple(args.domain), skip_compound=args.skip_compound, images=images
    )


def _curate_align(args: argparse.Namespace) -> int:
    from llavamed_fast.data import alignment

    if args.images and args.image_name:
        # --images keeps figures whose file 'curate images' saved, under its name; another name would
        # point the records at files nobody checked.
        print(
            "curate align: --image-name cannot go with --images (the records name the fetched files)",
            file=sys.stderr,
        )
        return 2
    records, skipped, errors = [], {}, []
    try:
        policy = _figure_policy(args)
        figures = alignment.unique_figures(
            args.input,
            invalid=errors.append,
            repeat=lambda text: print(f"curate align: {text}", file=sys.stderr),
        )
        for number, figure in figures:
            why = policy.reason(figure)
            if why is None and not (figure.get("caption") or "").strip():
                why = "no_caption"
            if why is not None:
                skipped[why] = skipped.get(why, 0) + 1
                continue
            try:
                records.append(alignment.alignment_record(figure, seed=args.seed, image_name=args.image_name))
            except ValueError as error:
                errors.append(f"{args.input}: line {number}: {error}")
    except (OSError, ValueError) as error:
        print(f"curate align: {error}", file=sys.stderr)
        return 2
    alignment.write_json(records, args.out)
    for error in errors:
        print(f"curate align: skipped {error}", file=sys.stderr)
    # Selection reasons first, then images (named by their manifest status), then captions.
    order = ("licence", "domain", "compound")
    reasons = sorted(
        skipped, key=lambda why: (order.index(why) if why in order else 3, why == "no_caption", why)
    )
    shown = {"no_caption": "no caption"}
    left_out = ", ".join(
        f"{skipped[why]} {shown.get(why, why.replace('image_', 'image ', 1))}" for why in reasons
    )
    print(f"{len(records)} alignment records -> {args.out}" + (f"; left out: {left_out}" if left_out else ""))
    return 1 if errors else 0


def _curate_instruct(args: argparse.Namespace) -> int:
    from llavamed_fast.data.curation import Interrupted, curate_instruct
    from llavamed_fast.data.teacher import TeacherError, config_from_args, redact

    try:
        config = config_from_args(args, model=args.model)
        summary = curate_instruct(
            args.input,
            args.out,
            config,
            ledger_path=args.ledger,
            use_context=not args.no_context,
            seed=args.seed,
            limit=args.limit,
            dry_run=args.dry_run,
            progress=not args.no_progress,
            batch=args.batch,
            poll_seconds=args.poll_seconds,
            policy=_figure_policy(args),
        )
    except Interrupted as stop:  # Ctrl-C: nothing received is lost, so one line instead of a traceback
        pending = "; the batch goes on at the provider" if stop.batch_pending else ""
        print(
            f"curate instruct: interrupted; {stop.replies} replies are saved in {stop.ledger}{pending}, "
            "run the same command again to continue",
            file=sys.stderr,
        )
        return 130
    except KeyboardInterrupt:  # before the ledger was opened or after the teacher run: nothing to keep
        print("curate instruct: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, TeacherError) as error:
        print(f"curate instruct: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # the SDK's own errors (openai.OpenAIError) outside a request's retries
        if type(error).__module__.split(".")[0] != "openai":
            raise
        secret = os.environ.get(args.api_key_env)
        print(f"curate instruct: {redact(f'{type(error).__name__}: {error}', secret)}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 1 if summary.get("failed") or summary["filters"].get("invalid_record") else 0


def _curate_images(args: argparse.Namespace) -> int:
    from llavamed_fast.data.alignment import unique_figures
    from llavamed_fast.data.fetch import FetchConfig, fetch

    config = FetchConfig(
        out=Path(args.out),
        url_template=args.url_template,
        concurrency=args.concurrency,
        timeout=args.timeout,
        retries=args.retries,
        licence=args.licence,
    )
    invalid = 0

    def left_out(text: str, *, counted: bool) -> None:
        nonlocal invalid
        invalid += counted
        print(f"curate images: {'skipped ' if counted else ''}{text}", file=sys.stderr)

    # Checked here, where line numbers are known; a bad record is left out and the others go on.
    records = (
        figure
        for _, figure in unique_figures(
            args.input,
            invalid=lambda text: left_out(text, counted=True),
            repeat=lambda text: left_out(text, counted=False),
        )
    )

    try:
        counts = fetch(records, config)
    except (OSError, ValueError) as error:
        print(f"curate images: {error}", file=sys.stderr)
        return 2
    if invalid:
        counts["invalid_record"] = invalid
    print(json.dumps({"manifest": str(Path(args.out) / "manifest.jsonl"), **counts}))
    # Items already done ("skipped"), repeats and licence exclusions are not failures; the rest is, and
    # the manifest says which, so a rerun tries exactly those again.
    failed = invalid + sum(counts.get(status, 0) for status in ("not_found", "corrupt", "error"))
    return 1 if failed else 0


def _curate_stats(args: argparse.Namespace) -> int:
    from llavamed_fast.data import stats
    from llavamed_fast.data.curation import summary_path

    try:
        numbers = stats.write(args.input, args.out, args.summary or summary_path(args.input))
    except (OSError, ValueError) as error:
        print(f"curate stats: {error}", file=sys.stderr)
        return 2
    print(stats.table(numbers))
    print(f"-> {Path(args.out) / 'stats.json'}, {Path(args.out) / 'stats.png'}")
    return 0


def _selection_options(step: argparse.ArgumentParser) -> None:
    """The figure selection options, the same for every step that writes training data (align, instruct)."""
    from llavamed_fast.data.selection import DOMAINS, LICENCE_POLICIES

    # One default for images, align and instruct, so that no step drops what another keeps; it is the
    # images step's, which must keep LLaVA-Med's URL list (no licences). Choose a policy on purpose.
    step.add_argument(
        "--licence", default="any-including-unknown", choices=LICENCE_POLICIES,
        help="commercial: only licences that allow commercial use; any: every classified licence; "
        "any-including-unknown (default): also unclassified or missing licences",
    )  # fmt: skip
    step.add_argument(
        "--domain", nargs="*", default=[], choices=DOMAINS,
        help="keep only figures of these modalities (default: all figures)",
    )  # fmt: skip
    step.add_argument("--skip-compound", action="store_true", help="leave out multi-panel figures")
    step.add_argument(
        "--images", default=None, metavar="DIR",
        help="keep only figures whose image 'curate images --out DIR' fetched (status ok in "
        "DIR/manifest.jsonl, file present); the others are counted by reason",
    )  # fmt: skip


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="llavamed-fast", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init", help="write a random-init checkpoint of a preset (HF LLaVA layout)")
    init.add_argument(
        "--preset", required=True, help="a model preset (llava-med-v0, llava-med-v1.5, tiny-v0, ...)"
    )
    init.add_argument("--out", required=True, help="checkpoint directory to create")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dtype", choices=DTYPES, default="float32")
    init.add_argument("--overwrite", action="store_true", help="replace an existing non-empty directory")
    init.set_defaults(run=_init)

    convert = commands.add_parser(
        "convert",
        help="a checkpoint of LLaVA's original layout (the released LLaVA-Med v1.5) -> ours (HF LLaVA layout)",
    )
    convert.add_argument(
        "source", help="the checkpoint's folder (config.json with mm_* fields, weights, tokenizer)"
    )
    convert.add_argument("--out", required=True, help="checkpoint directory to create")
    convert.add_argument(
        "--vision", default=None, metavar="DIR",
        help="a CLIP checkpoint folder: the vision tower's config and weights, replacing any stored ones "
        "(needed when the checkpoint holds no tower)",
    )  # fmt: skip
    convert.add_argument(
        "--tokenizer", default=None, metavar="DIR_OR_ID",
        help="take the tokenizer from here instead (e.g. the base LLM's, when the checkpoint ships only a "
        "SentencePiece model and sentencepiece is not installed)",
    )  # fmt: skip
    convert.add_argument(
        "--template", default=None,
        help="chat template (default: mistral_instruct for llava_mistral; needed for other models)",
    )  # fmt: skip
    convert.add_argument(
        "--base", default=None, metavar="DIR",
        help="the base LLM's folder when the checkpoint's LLM weights are deltas over it (LLaVA-Med v0's "
        "releases: LLaMA-7B in transformers' layout)",
    )  # fmt: skip
    convert.add_argument("--overwrite", action="store_true", help="replace an existing non-empty directory")
    convert.set_defaults(run=_convert)

    demo = commands.add_parser(
        "demo",
        help="offline demo: synthetic scans, the curriculum (stages 1 and 2, then two short stages) on a tiny "
        "model, held-out evaluation",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (data, run, evaluation)")
    demo.add_argument("--scale", type=float, default=1.0, help="scale data and steps (smoke runs: 0.05)")
    demo.add_argument("--eval-questions", type=int, default=400)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    # Listed for --help; the arguments are the training entry point's own (see main).
    commands.add_parser("train", help="train a recipe: llavamed-fast train --recipe NAME --out DIR ...")

    backends = commands.add_parser("backends", help="which implementation each op uses")
    backends.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    backends.set_defaults(run=_backends)

    curate = commands.add_parser("curate", help="data curation: PMC figures, alignment and instruction data")
    steps = curate.add_subparsers(dest="step", required=True)
    pmc = steps.add_parser("pmc", help="PMC JATS articles -> figure records (JSONL)")
    pmc.add_argument("--input", nargs="+", required=True, help=".nxml/.xml files or folders of them")
    pmc.add_argument("--out", required=True, help="FIGURES.jsonl to write")
    pmc.set_defaults(run=_curate_pmc)
    align = steps.add_parser("align", help="figure records -> stage-1 alignment records (LLaVA JSON)")
    align.add_argument("--input", required=True, help="FIGURES.jsonl from 'curate pmc'")
    align.add_argument("--out", required=True, help="ALIGN.json to write")
    align.add_argument("--seed", type=int, default=0, help="instruction wording and <image> placement")
    _selection_options(align)
    align.add_argument(
        "--image-name",
        default=None,
        help="image file name from record fields (default: as 'curate images' saves)",
    )
    align.set_defaults(run=_curate_align)

    teach = steps.add_parser(
        "instruct",
        help="figure records -> teacher-written conversations (LLaVA JSONL); key in OPENAI_API_KEY",
    )
    teach.add_argument("--input", required=True, help="FIGURES.jsonl from 'curate pmc'")
    teach.add_argument("--out", required=True, help="CONVERSATIONS.jsonl to write")
    teach.add_argument("--model", required=True, help="the teacher model (Azure: the deployment name)")
    client_options(teach, temperature=0.7, max_tokens=1024)
    teach.add_argument("--price", type=NOT_NEGATIVE, nargs=2, metavar=("IN", "OUT"), help="USD per 1M tokens")
    teach.add_argument("--ledger", default=None, help="reply ledger (default: OUT.ledger.jsonl)")
    teach.add_argument("--no-context", action="store_true", help="send the caption only, not the mentions")
    teach.add_argument("--seed", type=int, default=0, help="<image> placement")
    _selection_options(teach)
    teach.add_argument("--limit", type=COUNT, default=None, help="only the first N figures kept")
    teach.add_argument("--dry-run", action="store_true", help="print the first prompt and the estimated cost")
    teach.add_argument("--no-progress", action="store_true")
    teach.add_argument(
        "--batch", action="store_true", help="use the Batch API (half price, hours, resumable)"
    )
    teach.add_argument(
        "--poll-seconds", type=NOT_NEGATIVE, default=30.0, help="Batch API: seconds between polls"
    )
    teach.set_defaults(run=_curate_instruct)

    images = steps.add_parser(
        "images", help="download figure images (per file, or article packages), resumable"
    )
    images.add_argument("--input", required=True, help="FIGURES.jsonl, or LLaVA-Med's URL list (JSONL)")
    images.add_argument("--out", required=True, help="image folder; its manifest.jsonl records every item")
    images.add_argument(
        "--url-template", default="https://europepmc.org/articles/{pmcid}/bin/{graphic}.jpg",
        help="per-file URL, from record fields (records with pmc_tar_url use their package instead)",
    )  # fmt: skip
    images.add_argument("--concurrency", type=COUNT, default=8)
    images.add_argument("--timeout", type=ABOVE_ZERO, default=30.0, help="seconds per request")
    images.add_argument("--retries", type=NOT_NEGATIVE_INT, default=3)
    from llavamed_fast.data.selection import LICENCE_POLICIES

    images.add_argument("--licence", default="any-including-unknown", choices=LICENCE_POLICIES)
    images.set_defaults(run=_curate_images)

    numbers = steps.add_parser("stats", help="statistics of a curated set: a table, stats.json and stats.png")
    numbers.add_argument("--input", required=True, help="records: ALIGN.json or CONVERSATIONS.jsonl")
    numbers.add_argument("--out", required=True, help="folder for stats.json and stats.png")
    numbers.add_argument(
        "--summary", default=None, help="the instruct run's summary (default: INPUT.summary.json)"
    )
    numbers.set_defaults(run=_curate_stats)

    from llavamed_fast.eval.cli import add_parser as add_eval  # pure Python until a command needs torch

    add_eval(commands)

    from llavamed_fast.serve.cli import add_parser as add_serve

    add_serve(commands)
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
