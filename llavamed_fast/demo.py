"""The offline demo: the whole pipeline, learning, on a laptop-sized CPU in a few minutes.

1. Draw a synthetic biomedical-style dataset (``data/synthetic.py``): scans with 0-3 lesions whose
   presence, side, size, brightness and count are written into stage-1 captions and stage-2 conversations,
   plus held-out single questions on unseen scans.
2. Train a tiny LLaVA-Med (random init) through stage 1 (projector on captions) and stage 2 (projector +
   LLM on conversations), then a short side-question stage and a consolidation on the conversations, with
   the real training code (``train/loop.py``).
3. Answer the held-out questions by batched greedy decoding (``eval/answer.py``), once with the real images and once with the images
   replaced by noise: a model that answers from the image scores high with the images and near chance
   without them. Print a table; the last line is a JSON summary.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from llavamed_fast.data.synthetic import make_eval_set, noise_like, reply_answer
from llavamed_fast.data.templates import Message
from llavamed_fast.eval.answer import generate_batch
from llavamed_fast.model import load_pretrained
from llavamed_fast.train.config import RunConfig
from llavamed_fast.train.loop import train
from llavamed_fast.train.recipes import get_recipe


def demo_config(*, scale: float = 1.0, seed: int = 0) -> RunConfig:
    """The ``demo`` recipe, with its data and steps multiplied by ``scale`` (smoke runs)."""
    config = replace(get_recipe("demo"), seed=seed)
    if scale == 1.0:
        return config
    stages = []
    for stage in config.stages:
        count = max(16, int(stage.data.synthetic_count * scale))
        stages.append(replace(stage, data=replace(stage.data, synthetic_count=count)))
    return replace(config, stages=tuple(stages))


def evaluate(
    model_dir: Path, eval_file: Path, *, noise: bool, max_new_tokens: int = 8, batch_size: int = 64
) -> dict:
    """Greedy answers to every held-out question; accuracy per answer type and per question kind."""
    model, processor = load_pretrained(model_dir)
    model.eval()
    items = [json.loads(line) for line in eval_file.read_text().splitlines()]
    replies: list[str] = []
    for start in range(0, len(items), batch_size):
        conversations = []
        for number, item in enumerate(items[start : start + batch_size], start=start):
            image = Image.open(eval_file.parent / "images" / item["image"]).convert("RGB")
            if noise:
                image = noise_like(image, seed=number)
            conversations.append(([Message("user", f"<image>\n{item['question']}")], [image]))
        results = generate_batch(model, processor, conversations, max_new_tokens=max_new_tokens)
        replies += [result.text for result in results]
    hits: dict[str, list[bool]] = defaultdict(list)
    by_question: dict[str, list[bool]] = defaultdict(list)
    for item, reply in zip(items, replies, strict=True):
        right = reply_answer(reply) == item["answer"]
        hits[item["answer_type"]].append(right)
        # Each kind of question has one fixed wording (the side one names either side): group by its start.
        by_question[" ".join(item["question"].split()[:4])].append(right)
    result = {kind: sum(v) / len(v) for kind, v in hits.items()} | {f"n_{k}": len(v) for k, v in hits.items()}
    result["by_question"] = {q: round(sum(v) / len(v), 3) for q, v in sorted(by_question.items())}
    return result


def run(out: Path, *, scale: float = 1.0, eval_questions: int = 400, seed: int = 0) -> dict:
    out = Path(out)
    started = time.perf_counter()
    config = demo_config(scale=scale, seed=seed)
    model_dir = train(config, out / "run", resume=(out / "run" / "config.json").exists())
    trained = time.perf_counter() - started
    eval_file = make_eval_set(out / "eval", count=max(40, int(eval_questions * scale)), seed=seed)
    with torch.inference_mode():
        real = evaluate(model_dir, eval_file, noise=False)
        noise = evaluate(model_dir, eval_file, noise=True)
    steps = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "event" not in s]
    summary = {
        "closed_accuracy": round(real["CLOSED"], 4),
        "closed_accuracy_noise_images": round(noise["CLOSED"], 4),
        "open_accuracy": round(real.get("OPEN", float("nan")), 4),
        "open_accuracy_noise_images": round(noise.get("OPEN", float("nan")), 4),
        "n_closed": real["n_CLOSED"],
        "n_open": real.get("n_OPEN", 0),
        "optimizer_steps": len(steps),
        "final_loss": round(float(steps[-1]["loss"]), 4),
        "train_seconds": round(trained, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "checkpoint": str(model_dir),
        "by_question": real["by_question"],
    }
    print(f"{'':28}{'real images':>14}{'noise images':>14}")
    print(
        f"{'closed accuracy':28}{summary['closed_accuracy']:>14.3f}{summary['closed_accuracy_noise_images']:>14.3f}"
    )
    print(
        f"{'open accuracy (count)':28}{summary['open_accuracy']:>14.3f}{summary['open_accuracy_noise_images']:>14.3f}"
    )
    for question, accuracy in real["by_question"].items():
        print(
            f"{'  ' + question + ' ...':28}{accuracy:>14.3f}{noise['by_question'].get(question, 0.0):>14.3f}"
        )
    print(
        f"{summary['optimizer_steps']} optimizer steps, {summary['train_seconds']} s of training; model: {model_dir}"
    )
    print(json.dumps(summary))
    return summary
