"""The command line: `init` writes a checkpoint transformers loads; `demo` runs on real VQA-RAD images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from transformers import LlavaForConditionalGeneration


def run(*args, env=None):
    # From an empty folder, so that the installed package runs, not the source tree beside the tests.
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run(
            [sys.executable, "-m", "llavamed_fast", *args],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )


def test_init_writes_a_loadable_checkpoint(tmp_path):
    result = run("init", "--preset", "tiny-v1.5", "--out", str(tmp_path / "ckpt"))
    assert result.returncode == 0, result.stderr
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    assert model.config.text_config.model_type == "mistral" and model.config.image_seq_length == 16
    again = run("init", "--preset", "tiny-v1.5", "--out", str(tmp_path / "ckpt"))
    assert again.returncode != 0 and "not empty" in again.stderr


def test_demo_smoke_run(tmp_path):
    """The demo's whole path at a tiny scale (the full demo and its accuracy: tests/test_demo.py)."""
    out = tmp_path / "demo"
    result = run("demo", "--out", str(out), "--scale", "0.02", "--eval-questions", "40")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("closed_accuracy", "closed_accuracy_noise_images", "open_accuracy", "checkpoint"):
        assert key in summary
    assert summary["n_closed"] + summary["n_open"] >= 40
    model = LlavaForConditionalGeneration.from_pretrained(summary["checkpoint"])
    assert model.config.model_type == "llava"


def test_train_subcommand_is_the_training_entry_point(tmp_path):
    result = run(
        "train", "--recipe", "tiny", "--out", str(tmp_path / "t"), "--set", "seed=3", "--print-config"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["seed"] == 3
    bad = run("train", "--recipe", "tiny", "--out", str(tmp_path / "t"), "--set", "stages.nope.lr=1")
    assert bad.returncode == 2 and "no element 'nope'" in bad.stderr
