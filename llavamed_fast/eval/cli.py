"""``llavamed-fast eval export | answer | score | chat``. torch is imported only by ``answer`` and by
``chat --model``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llavamed_fast._argtypes import COUNT, NOT_NEGATIVE_INT, TEMPLATE_HELP, client_options
from llavamed_fast.eval.datasets import DEFAULT_FOLDERS, LOADERS, DatasetError

DTYPES = ("bfloat16", "float16", "float32")


LIMIT = NOT_NEGATIVE_INT  # 0 means all
QA50 = "llava-med-qa50/llava_med_eval_qa50_qa.jsonl"  # the chat questions, under the shared data


def _export(args: argparse.Namespace) -> int:
    from llavamed_fast.data.durable import write_atomic
    from llavamed_fast.eval import datasets

    options = {"source": args.source} if args.dataset == "vqa-rad" else {}
    try:
        if args.hub:
            images = Path(args.images or Path(args.out).with_name(Path(args.out).stem + "_images"))
            records = datasets.from_hub(args.hub, args.split, images)
        else:
            records = datasets.load(args.dataset, args.split, args.root, **options)
        if args.limit:
            records = records[: args.limit]
        datasets.check_images(records)
    except DatasetError as error:
        print(f"eval export: {error}", file=sys.stderr)
        return 2
    except ImportError as error:
        print(
            f"eval export: --hub needs the 'datasets' package (pip install datasets): {error}",
            file=sys.stderr,
        )
        return 2
    if args.format == "llava":
        write_atomic(args.out, json.dumps(datasets.to_llava(records, prefix=args.dataset), indent=1) + "\n")
    else:
        datasets.write_jsonl(records, args.out)
    closed = sum(r.answer_type == "CLOSED" for r in records)
    print(f"{len(records)} {args.dataset} {args.split} questions ({closed} closed) -> {args.out}")
    return 0


def _answer(args: argparse.Namespace) -> int:
    from llavamed_fast.eval.answer import (
        AnswerConfig,
        AnswerFileError,
        answer_questions,
        answered_ids,
        vqa_questions,
    )
    from llavamed_fast.eval.datasets import read_records
    from llavamed_fast.model.checkpoint import CheckpointError, checkpoint_name, load_for_inference

    config = AnswerConfig(
        prompt_style=args.prompt_style,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        noise_images=args.noise_images,
        model_id=args.model_id or checkpoint_name(args.model),
    )
    try:
        records = read_records(args.questions)
        if args.limit:
            records = records[: args.limit]
        items = vqa_questions(records, config.prompt_style)
        # The answer file is checked before the model is loaded: a run it cannot resume fails at once.
        answered_ids(args.out, config, {question_id: turn for question_id, turn, _ in items})
        model, processor = load_for_inference(
            args.model, template=args.template, device=args.device, dtype=args.dtype
        )
        summary = answer_questions(model, processor, items, args.out, config, progress=args.progress)
    except (DatasetError, AnswerFileError, CheckpointError) as error:
        print(f"eval answer: {error}", file=sys.stderr)
        return 2
    print(json.dumps({**summary, "answers": str(args.out)}))
    return 1 if summary["failed"] else 0


def _score(args: argparse.Namespace) -> int:
    from llavamed_fast.data.durable import write_atomic
    from llavamed_fast.eval import report, scoring
    from llavamed_fast.eval.datasets import read_jsonl

    protocols = scoring.PROTOCOLS if args.protocol == "both" else (args.protocol,)
    try:
        references = list(read_jsonl(args.references))
        if not references:
            raise scoring.ScoringError(f"{args.references}: no reference questions (an empty file?)")
        pairs = scoring.join(read_jsonl(args.predictions), references)
    except (DatasetError, scoring.ScoringError) as error:
        print(f"eval score: {error}", file=sys.stderr)
        return 2
    summary, rows = scoring.score(pairs, protocols)
    summary = {**summary, "predictions": str(args.predictions), "references": str(args.references)}
    stem = Path(args.report or f"{args.predictions}.scores")
    if not args.no_report:
        write_atomic(
            stem.with_name(stem.name + ".json"),
            json.dumps({"summary": summary, "questions": rows}, indent=1) + "\n",
        )
        report.write_vqa(summary, stem, f"VQA scores: {Path(args.predictions).name}")
    print(report.vqa_markdown(summary, f"VQA scores: {Path(args.predictions).name}"), end="")
    if args.json:
        print(json.dumps(summary))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from llavamed_fast.data.teacher import TeacherError, config_from_args
    from llavamed_fast.eval import chat, report
    from llavamed_fast.eval.datasets import default_path

    out = Path(args.out)
    try:
        questions = chat.load_questions(args.questions or default_path(QA50, "--questions"))
        if args.limit:
            questions = questions[: args.limit]
        if args.answers:
            answers_file = Path(args.answers)
        else:
            if not args.image_folder:
                print(
                    "eval chat: --model needs --image-folder (the figures are not in the question file)",
                    file=sys.stderr,
                )
                return 2
            chat.check_images(questions, args.image_folder)
            answers_file = out / "answers.jsonl"
            from llavamed_fast.eval.answer import (
                AnswerConfig,
                AnswerFileError,
                answer_questions,
                answered_ids,
            )
            from llavamed_fast.model.checkpoint import CheckpointError, checkpoint_name, load_for_inference

            config = AnswerConfig(
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                model_id=args.model_id or checkpoint_name(args.model),
            )
            items = [(q.question_id, q.prompt, [str(Path(args.image_folder) / q.image)]) for q in questions]
            try:
                answered_ids(answers_file, config, {q.question_id: q.prompt for q in questions})
                model, processor = load_for_inference(
                    args.model, template=args.template, device=args.device, dtype=args.dtype
                )
                done = answer_questions(model, processor, items, answers_file, config, metadata=lambda _q: {})
            except (AnswerFileError, CheckpointError) as error:
                print(f"eval chat: {error}", file=sys.stderr)
                return 2
            if done["failed"]:
                print(f"eval chat: {len(done['failed'])} questions could not be answered", file=sys.stderr)
                return 1
        answers = chat.load_answers(answers_file, questions)
    except (DatasetError, chat.ChatEvalError) as error:
        print(f"eval chat: {error}", file=sys.stderr)
        return 2
    config = config_from_args(args, model=args.judge_model)
    try:
        result = chat.judge(
            questions, answers, config, out, ledger_path=args.ledger, answers_file=str(answers_file)
        )
    except TeacherError as error:
        print(f"eval chat: {error}", file=sys.stderr)
        return 2
    title = f"Chat benchmark: {answers_file.name}"
    report.write_chat(result.summary, out / "chat_report", title)
    print(report.chat_markdown(result.summary, title), end="")
    for qid, why in result.failed.items():
        print(f"eval chat: question {qid} not scored: {why}", file=sys.stderr)
    overall = result.summary["groups"]["overall"]
    print(
        json.dumps({**{k: v for k, v in result.summary.items() if k != "groups"}, **overall, "out": str(out)})
    )
    return 1 if result.failed else 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    from llavamed_fast.eval.prompts import PROMPT_STYLES

    evaluate = commands.add_parser(
        "eval", help="evaluation: VQA export, answering, scoring; the chat benchmark"
    )
    steps = evaluate.add_subparsers(dest="step", required=True)

    export = steps.add_parser("export", help="a VQA set as canonical JSONL (or LLaVA JSON for training)")
    export.add_argument("--dataset", required=True, choices=sorted(LOADERS))
    export.add_argument("--split", default="test", help="test / train (SLAKE also validate)")
    export.add_argument(
        "--root",
        help=f"the dataset folder (PathVQA: its JSONL); default $LLAVAMED_SHARED_DATA/{{{', '.join(DEFAULT_FOLDERS.values())}}}",
    )
    export.add_argument("--source", default="public", choices=("public", "data_rad"), help="VQA-RAD only")
    export.add_argument(
        "--hub",
        help="read a Hugging Face copy instead (hub id or save_to_disk folder; needs the datasets package)",
    )
    export.add_argument("--images", help="with --hub: where to write its images (default: OUT_images/)")
    export.add_argument("--format", default="canonical", choices=("canonical", "llava"))
    export.add_argument("--limit", type=LIMIT, default=0, help="only the first N questions")
    export.add_argument("--out", required=True)
    export.set_defaults(run=_export)

    def model_options(parser: argparse.ArgumentParser, required: bool) -> None:
        parser.add_argument("--model", required=required, help="a checkpoint directory (HF layout)")
        parser.add_argument(
            "--model-id",
            help="model_id written into the answer file (default: folder name; RUN for RUN/model)",
        )
        parser.add_argument("--template", help=TEMPLATE_HELP)
        parser.add_argument("--batch-size", type=COUNT, default=16)
        parser.add_argument("--max-new-tokens", type=COUNT, default=64)
        parser.add_argument("--device", help="default: cuda if available, else cpu")
        parser.add_argument("--dtype", choices=DTYPES, help="default: as stored")

    answer = steps.add_parser("answer", help="batched greedy answers to canonical VQA questions")
    answer.add_argument("--questions", required=True, help="canonical VQA JSONL (eval export)")
    answer.add_argument("--out", required=True, help="answer file (JSONL); an existing one is resumed")
    model_options(answer, required=True)
    answer.add_argument("--prompt-style", default="llava-med", choices=sorted(PROMPT_STYLES))
    answer.add_argument("--noise-images", action="store_true", help="replace every image with noise")
    answer.add_argument("--limit", type=LIMIT, default=0)
    answer.add_argument("--progress", action="store_true")
    answer.set_defaults(run=_answer)

    score = steps.add_parser("score", help="score an answer file against canonical references")
    score.add_argument("--predictions", required=True)
    score.add_argument("--references", required=True)
    score.add_argument("--protocol", default="both", choices=("both", "llava-med", "strict"))
    score.add_argument("--json", action="store_true", help="end with a JSON line of the numbers")
    score.add_argument("--report", help="report path stem (default: PREDICTIONS.scores -> .md/.png/.json)")
    score.add_argument("--no-report", action="store_true")
    score.set_defaults(run=_score)

    judge = steps.add_parser("chat", help="LLaVA-Med's chat benchmark with an OpenAI-compatible judge")
    judge.add_argument(
        "--questions",
        help=f"the question file (default: the shared copy of LLaVA-Med's qa50, $LLAVAMED_SHARED_DATA/{QA50})",
    )
    source = judge.add_mutually_exclusive_group(required=True)
    source.add_argument("--answers", help="a LLaVA-style answer file to judge")
    source.add_argument("--model", help="answer with this checkpoint first (needs --image-folder)")
    judge.add_argument("--image-folder", help="the figures, named as the questions' 'image'")
    for name in ("--model-id", "--device"):
        judge.add_argument(name)
    judge.add_argument("--template", help=TEMPLATE_HELP)
    judge.add_argument("--dtype", choices=DTYPES)
    judge.add_argument("--batch-size", type=COUNT, default=8)
    judge.add_argument("--max-new-tokens", type=COUNT, default=512)
    judge.add_argument("--out", required=True, help="folder for reviews, report and the judge's ledger")
    judge.add_argument("--judge-model", required=True, help="e.g. gpt-4o-2024-08-06; recorded in the report")
    judge.add_argument("--ledger", help="judge reply cache (default: OUT/judge_ledger.jsonl)")
    client_options(judge, temperature=0.0, max_tokens=512)
    judge.add_argument("--limit", type=LIMIT, default=0)
    judge.set_defaults(run=_chat)
