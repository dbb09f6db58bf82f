"""The engine against the one-conversation reference decoder: batching, joining mid-flight, stops, sampling."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch
from conftest import force_token
from PIL import Image

from llavamed_fast.data.templates import Message
from llavamed_fast.model import build
from llavamed_fast.model.generate import greedy_generate
from llavamed_fast.serve.engine import (
    Delta,
    Engine,
    Failed,
    Finished,
    RequestError,
    SamplingParams,
    sample_token,
)

NEW = 12


def conversations(vqa_rad_images, count=6):
    questions = [
        "What is shown?",
        "Is there a mass in the left lung?",
        "Which organ is this?",
        "Describe it.",
    ]
    out = []
    for i in range(count):
        image = Image.open(vqa_rad_images[i * 7]).convert("RGB")
        text = questions[i % len(questions)] * (1 + i % 3)  # prompts of different lengths
        messages = [Message("user", f"<image>\n{text}" if i % 2 else f"{text}\n<image>")]
        if i == 5:  # a multi-turn conversation
            messages = [
                Message("user", f"<image>\n{text}"),
                Message("assistant", "A scan."),
                Message("user", "And?"),
            ]
        out.append((messages, [image]))
    return out


class Collector:
    def __init__(self) -> None:
        self.events: dict[int, list] = {}

    def __call__(self, key: int):
        self.events[key] = []
        return self.events[key].append

    def final(self, key: int):
        return self.events[key][-1]

    def streamed(self, key: int) -> str:
        return "".join(e.text for e in self.events[key] if isinstance(e, Delta))


def run_until_idle(engine: Engine, limit: int = 500) -> None:
    for _ in range(limit):
        if not engine.busy:
            return
        engine.step()
    raise AssertionError("the engine did not finish")


@pytest.mark.parametrize(("preset", "stop"), [("tiny-v0", "###"), ("tiny-v1.5", "eos")])
def test_requests_joining_mid_flight_get_the_reference_replies(preset, stop, vqa_rad_images):
    model, processor = build(preset, seed=5)
    convs = conversations(vqa_rad_images)
    free = [greedy_generate(model, processor, m, im, max_new_tokens=NEW) for m, im in convs]
    stopper = (
        processor.tokenizer.eos_token_id
        if stop == "eos"
        else processor.tokenizer.convert_tokens_to_ids("###")
    )
    force_token(model, stopper, free[0].token_ids[4])
    reference = [greedy_generate(model, processor, m, im, max_new_tokens=NEW) for m, im in convs]
    assert len({len(r.token_ids) for r in reference}) > 1  # some rows end early, others run to the limit

    engine = Engine(model, processor, max_batch=8)
    got = Collector()
    params = SamplingParams(max_new_tokens=NEW)
    # Two requests start; two more join after two steps, two more after four: their caches are merged
    # with the running batch's, padded on the left, while earlier rows may already have finished.
    for i in (0, 1):
        engine.submit(*convs[i], params, got(i))
    engine.step(), engine.step()
    for i in (2, 3):
        engine.submit(*convs[i], params, got(i))
    engine.step(), engine.step()
    for i in (4, 5):
        engine.submit(*convs[i], params, got(i))
    run_until_idle(engine)
    for i, ref in enumerate(reference):
        final = got.final(i)
        assert isinstance(final, Finished), final
        assert final.text == ref.text, i
        assert final.completion_tokens == len(ref.token_ids)
        assert final.reason == (
            "length" if len(ref.token_ids) == NEW and ref.token_ids[-1] != stopper else "stop"
        )
        assert got.streamed(i) == final.text  # the deltas add up to the reply
    assert engine.max_rows_seen >= 3
    assert engine.steps < sum(len(r.token_ids) for r in reference)  # rows shared forward passes


def test_max_batch_and_threads(vqa_rad_images):
    model, processor = build("tiny-v1.5", seed=2)
    convs = conversations(vqa_rad_images)
    reference = [greedy_generate(model, processor, m, im, max_new_tokens=8).text for m, im in convs]
    results: dict[int, str] = {}
    with Engine(model, processor, max_batch=2) as engine:

        def ask(i: int) -> None:
            results[i] = engine.generate(*convs[i], SamplingParams(max_new_tokens=8)).text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(convs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert [results[i] for i in range(len(convs))] == reference
    assert engine.max_rows_seen == 2


def test_stop_strings_of_the_request_end_the_reply_and_are_not_streamed(vqa_rad_images):
    model, processor = build("tiny-v1.5", seed=5)
    messages, images = conversations(vqa_rad_images, 1)[0]
    free = greedy_generate(model, processor, messages, images, max_new_tokens=NEW)
    assert len(free.text) > 12
    stop = free.text[5:8]
    engine = Engine(model, processor)
    got = Collector()
    engine.submit(messages, images, SamplingParams(max_new_tokens=NEW, stop=(stop,)), got(0))
    run_until_idle(engine)
    expected = free.text[: free.text.index(stop)].strip()
    assert got.final(0).text == expected and got.final(0).reason == "stop"
    assert got.streamed(0) == expected


def test_sampling_is_seeded_per_request_and_top_p_narrows_it(vqa_rad_images):
    model, processor = build("tiny-v1.5", seed=5)
    messages, images = conversations(vqa_rad_images, 1)[0]
    greedy = greedy_generate(model, processor, messages, images, max_new_tokens=NEW).text
    engine = Engine(model, processor)
    got = Collector()
    hot = SamplingParams(max_new_tokens=NEW, temperature=1.5, seed=7)
    engine.submit(messages, images, hot, got(0))
    engine.submit(messages, images, SamplingParams(max_new_tokens=NEW, temperature=1.5, seed=8), got(1))
    engine.submit(messages, images, hot, got(2))
    engine.submit(messages, images, SamplingParams(max_new_tokens=NEW, temperature=1.5, top_p=1e-6), got(3))
    run_until_idle(engine)
    assert got.final(0).text == got.final(2).text  # same seed, same reply, whatever else is in the batch
    assert got.final(0).text != got.final(1).text
    assert got.final(0).text != greedy
    assert got.final(3).text == greedy  # a nucleus of one token is greedy


def test_sample_token_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = probs.log()
    generator = torch.Generator().manual_seed(0)
    draws = Counter(sample_token(logits, 1.0, 0.7, generator) for _ in range(4000))
    # top-p 0.7 keeps the tokens whose higher-ranked mass is below 0.7: {0, 1}, renormalised to 0.625/0.375.
    assert set(draws) == {0, 1}
    assert abs(draws[0] / 4000 - 0.625) < 0.03
    draws = Counter(sample_token(logits, 1.0, 1.0, generator) for _ in range(4000))
    for token, p in enumerate(probs.tolist()):
        assert abs(draws[token] / 4000 - p) < 0.03
    assert sample_token(logits, 0.0, 0.1, generator) == 0


def test_cancel_and_bad_requests(vqa_rad_images):
    model, processor = build("tiny-v1.5", seed=5)
    convs = conversations(vqa_rad_images, 2)
    engine = Engine(model, processor)
    got = Collector()
    cancel = engine.submit(*convs[0], SamplingParams(max_new_tokens=NEW), got(0))
    engine.submit(*convs[1], SamplingParams(max_new_tokens=NEW), got(1))
    engine.step()
    cancel()
    run_until_idle(engine)
    assert got.final(0) == Failed("cancelled")
    assert isinstance(got.final(1), Finished)
    with pytest.raises(RequestError, match="context is"):
        engine.submit([Message("user", "word " * 3000)], [], SamplingParams(), got(2))
    for bad, message in (
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ("",)}, "stop strings"),
        ({"seed": 2**64}, "seed must be a 64-bit"),  # torch would fail later, naming no parameter
        ({"seed": -(2**63) - 1}, "seed must be a 64-bit"),
    ):
        with pytest.raises(RequestError, match=message):
            SamplingParams(**bad)
