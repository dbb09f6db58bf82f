"""The full offline demo, as the README runs it: synthetic scans, stage 1 and stage 2 with the real training
code, held-out questions answered with the real images and with noise in their place.

What it asserts is what the demo shows today: the run completes in its time budget, the summary and the
checkpoint are what the README promises, answers to held-out closed questions with the real images beat
the same questions with noise images by a wide margin, and with noise the model is no better than chance.
The demo's target (closed accuracy >= 0.85) is not reached yet: the tiny random-init model learns presence,
size and brightness but not the lesion's side (see docs/TRAINING.md, "The offline demo").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from transformers import LlavaForConditionalGeneration

pytestmark = pytest.mark.slow


def test_full_demo_answers_from_the_image(tmp_path):
    out = tmp_path / "demo"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "llavamed_fast", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        # The installed package, from outside the checkout; one thread, as each test worker has one core.
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
        timeout=1800,
    )
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print(result.stdout[-1500:])
    print(f"demo: {seconds:.0f} s")
    assert summary["n_closed"] >= 200
    real, noise = summary["closed_accuracy"], summary["closed_accuracy_noise_images"]
    # Closed questions are balanced between their two answers (chance 0.5). With noise images the model
    # must not do better than chance; it may do worse, since a reply that is neither answer counts as
    # wrong for both. Measured (2 threads): 0.733 with the real images, 0.488 with noise, 1,687 steps.
    assert noise <= 0.6, f"with noise images the model answers {noise:.3f} right: not from the image"
    assert real >= noise + 0.15, f"real images {real} vs noise {noise}: the answers do not use the image"
    # The findings it has learned (measured: presence 0.912, size 0.946, brightness 0.810); side is not
    # among them yet (0.46-0.54).
    by_question = summary["by_question"]
    for start, floor in (
        ("Is there a lesion?", 0.75),
        ("Is the lesion large", 0.75),
        ("Is the lesion bright", 0.65),
    ):
        assert by_question[start] >= floor, f"{start!r}: {by_question[start]} < {floor}"
    model = LlavaForConditionalGeneration.from_pretrained(summary["checkpoint"])
    assert model.config.model_type == "llava"
