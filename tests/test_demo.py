"""The full offline demo, as the README runs it: synthetic scans, the demo recipe's four stages with the
real training code, held-out questions answered with the real images and with noise in their place.

What it asserts is what the demo shows: the run completes, the summary and the checkpoint are what the
README promises, the model answers held-out closed questions from the image (every finding well above
chance, and with noise images no better than chance), and closed accuracy is near the demo's target of
0.85. The floors sit below the measured values (docs/TRAINING.md, "The offline demo") by about twice the
spread that the training seed causes, so that the test fails on a regression, not on that spread.
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
        timeout=2700,
    )
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print(result.stdout[-1500:])
    print(f"demo: {seconds:.0f} s")
    assert summary["n_closed"] >= 200
    real, noise = summary["closed_accuracy"], summary["closed_accuracy_noise_images"]
    # Closed questions are balanced between their two answers (chance 0.5). With noise images the model
    # must not do better than chance.
    assert noise <= 0.6, f"with noise images the model answers {noise:.3f} right: not from the image"
    # Measured (2 threads, seed 0): 0.937 closed; presence 0.982, size 0.821, brightness 0.966, side 0.930
    # (yes/no) and 0.982 ("Which side"). Seeds moved closed accuracy by up to 0.05, single findings more.
    assert real >= 0.78, f"closed accuracy {real} (target 0.85)"
    by_question = summary["by_question"]
    for start, floor in (
        ("Is there a lesion?", 0.85),
        ("Is the lesion large", 0.6),
        ("Is the lesion bright", 0.65),
        ("Is the lesion on", 0.65),
        ("Which side is the", 0.7),
    ):
        assert by_question[start] >= floor, f"{start!r}: {by_question[start]} < {floor}"
    model = LlavaForConditionalGeneration.from_pretrained(summary["checkpoint"])
    assert model.config.model_type == "llava"
