"""Batched greedy answers with a KV cache, written as LLaVA-style answer files.

Prompts are built by our processor (chat template, image tokens) and embedded by our model (projected image
features in their rows), then ``transformers``' own ``generate`` decodes the whole batch greedily from those
embeddings with a KV cache: left padding and an attention mask, SDPA attention while decoding (our packed
attention serves training and has no cache), EOS and the template's stop string both end a reply. The
result equals :func:`~llavamed_fast.model.generate.greedy_generate` (one conversation, no cache) token for
token; the tests hold the two together.

Answer files are JSONL ``{question_id, prompt, text, answer_id, model_id, metadata}`` (LLaVA-Med's). They
are appended and flushed batch by batch, and a run started again skips the questions already answered, so
a crash or a bad image loses nothing that was done.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from llavamed_fast.data.durable import read_log
from llavamed_fast.data.images import ImageError, load_image
from llavamed_fast.data.synthetic import noise_like
from llavamed_fast.data.templates import Message
from llavamed_fast.eval.datasets import VQARecord
from llavamed_fast.eval.prompts import PROMPT_STYLES
from llavamed_fast.model import attention
from llavamed_fast.model.generate import GenerationResult, left_padded_prompts
from llavamed_fast.model.llava_med import LlavaMed
from llavamed_fast.model.processor import LlavaMedProcessor


@torch.no_grad()
def generate_batch(
    model: LlavaMed,
    processor: LlavaMedProcessor,
    conversations: Sequence[tuple[Sequence[Message], Sequence[Image.Image]]],
    *,
    max_new_tokens: int = 64,
) -> list[GenerationResult]:
    """Greedy replies to several conversations at once (each ends with a user turn)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not conversations:
        return []
    tokenizer = processor.tokenizer
    was_training = model.training
    model.eval()
    try:
        prompts = []
        for messages, images in conversations:
            encoded = processor.encode(messages, num_images=len(images), add_generation_prompt=True)
            prompts.append((encoded.input_ids, encoded.image_starts, images))
        padded, mask, _ = left_padded_prompts(model, processor, prompts)
        stop = processor.template.stop
        eos = tokenizer.eos_token_id
        lm = model.language_model
        lm.set_attn_implementation("sdpa")
        try:
            out = lm.generate(
                inputs_embeds=padded,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                stop_strings=[stop] if stop and stop != tokenizer.eos_token else None,
                tokenizer=tokenizer,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        finally:
            lm.set_attn_implementation(attention.register())
        return [_finish(row.tolist(), tokenizer, eos, stop) for row in out]
    finally:
        model.train(was_training)


def _finish(tokens: list[int], tokenizer, eos: int, stop: str | None) -> GenerationResult:
    """Cut a generated row where one reply ends: at EOS (kept in the ids) or after the stop string."""
    for end in range(1, len(tokens) + 1):
        if tokens[end - 1] == eos:
            return GenerationResult(tokenizer.decode(tokens[: end - 1]).strip(), tokens[:end])
        if stop:
            text = tokenizer.decode(tokens[:end])
            if stop in text:
                return GenerationResult(text[: text.index(stop)].strip(), tokens[:end])
    return GenerationResult(tokenizer.decode(tokens).strip(), tokens)


@dataclass(frozen=True)
class AnswerConfig:
    prompt_style: str = "llava-med"
    batch_size: int = 16
    max_new_tokens: int = 64
    noise_images: bool = False
    model_id: str = ""

    def __post_init__(self) -> None:
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"unknown prompt style {self.prompt_style!r}; known: {', '.join(PROMPT_STYLES)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")

    def recorded(self) -> dict[str, Any]:
        """The settings each answer records (``metadata``), which a resumed run must share."""
        return {
            "prompt_style": self.prompt_style,
            "noise_images": self.noise_images,
            "max_new_tokens": self.max_new_tokens,
        }


class AnswerFileError(ValueError):
    """An answer file that cannot be resumed: a line that is not an answer, or answers made differently."""


def answered_ids(
    path: str | os.PathLike[str],
    config: AnswerConfig | None = None,
    prompts: Mapping[str, str] | None = None,
) -> set[str]:
    """Question ids already in an answer file (a cut last line from a crash is removed first).

    With ``config`` (and ``prompts``, question id -> user turn), every answer there must have been made as
    this run would make it: a resumed run skips the answered ids, so answers from another model, prompt
    style or setting would be mixed in silently and scored as this run's. An error names the line, the
    setting and both values.
    """
    lines, _ = read_log(path)
    done = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            row = json.loads(line)
            question_id = str(row["question_id"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise AnswerFileError(f"{where}: not an answer record ({error})") from None
        if config is not None:
            metadata = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
            recorded = {"model_id": row.get("model_id"), **{k: metadata.get(k) for k in config.recorded()}}
            wanted = {"model_id": config.model_id, **config.recorded()}
            for name, value in wanted.items():
                if recorded[name] != value:
                    # Same checkpoint, another name (an id given by hand, or the folder-name default of
                    # older versions): the user can say so.
                    same = (
                        f" or pass --model-id {recorded[name]!r} if it is the same model,"
                        if name == "model_id"
                        else ""
                    )
                    raise AnswerFileError(
                        f"{where}: question {question_id} was answered with {name} {recorded[name]!r}, this "
                        f"run asks for {value!r}; answer into another --out{same} (or delete this file to "
                        "start again)"
                    )
            if prompts is not None and question_id in prompts and row.get("prompt") != prompts[question_id]:
                raise AnswerFileError(
                    f"{where}: question {question_id} was answered with the prompt {row.get('prompt')!r}, this "
                    f"run asks {prompts[question_id]!r} (another question file?); answer into another --out"
                )
        done.add(question_id)
    return done


def _noise_seed(question_id: str) -> int:
    # From the question, not its place in the run: a resumed run draws the same noise.
    return int(hashlib.sha256(question_id.encode()).hexdigest()[:8], 16)


def _answer_id(model_id: str, question_id: str, text: str) -> str:
    return hashlib.sha256(f"{model_id}\0{question_id}\0{text}".encode()).hexdigest()[:22]


def answer_questions(
    model: LlavaMed,
    processor: LlavaMedProcessor,
    questions: Sequence[tuple[str, str, Sequence[str]]],
    out: str | os.PathLike[str],
    config: AnswerConfig,
    *,
    metadata: Callable[[str], dict[str, Any]] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Answer ``(question_id, user_turn, image_paths)`` items into the answer file ``out``.

    Questions already in ``out`` are skipped; answers there made with other settings are an
    :class:`AnswerFileError` (see :func:`answered_ids`). An image that cannot be read skips its question with an
    error that names the question and the file; the others are answered. Returns
    ``{"answered", "skipped_done", "failed": {question_id: why}}``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = answered_ids(out, config, {question_id: turn for question_id, turn, _ in questions})
    todo = [q for q in questions if q[0] not in done]
    failed: dict[str, str] = {}
    answered = 0
    with open(out, "a", encoding="utf-8") as handle:
        for start in range(0, len(todo), config.batch_size):
            chunk, conversations = [], []
            for question_id, turn, paths in todo[start : start + config.batch_size]:
                try:
                    images = [load_image(p, record=f"question {question_id}") for p in paths]
                except ImageError as error:
                    failed[question_id] = str(error)
                    print(f"answer: skipped question {question_id}: {error}", file=sys.stderr)
                    continue
                if config.noise_images:
                    images = [noise_like(image, seed=_noise_seed(question_id)) for image in images]
                chunk.append((question_id, turn))
                conversations.append(([Message("user", turn)], images))
            results = generate_batch(model, processor, conversations, max_new_tokens=config.max_new_tokens)
            for (question_id, turn), result in zip(chunk, results, strict=True):
                meta = {
                    **config.recorded(),
                    **(metadata(question_id) if metadata else {}),
                }
                row = {
                    "question_id": question_id,
                    "prompt": turn,
                    "text": result.text,
                    "answer_id": _answer_id(config.model_id, question_id, result.text),
                    "model_id": config.model_id,
                    "metadata": meta,
                }
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            answered += len(chunk)
            if progress:
                print(f"answer: {len(done) + answered}/{len(questions)}", file=sys.stderr)
    return {"answered": answered, "skipped_done": len(questions) - len(todo), "failed": failed}


def vqa_questions(records: Sequence[VQARecord], prompt_style: str) -> list[tuple[str, str, list[str]]]:
    """The answering items of canonical VQA records under a prompt style."""
    style = PROMPT_STYLES[prompt_style]
    return [(r.question_id, style(r), [r.image]) for r in records]
