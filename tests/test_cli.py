"""The command line: `init` writes a checkpoint transformers loads; `demo` runs on real VQA-RAD images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch
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


def test_demo_runs_forward_and_loss_on_real_images(data_dir):
    result = run("demo", "--samples", "12", "--budget", "512", env={"LLAVAMED_SHARED_DATA": str(data_dir)})
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["samples"] == 12 and summary["rows"] >= 2
    assert 0 < summary["real_token_fraction"] <= 1
    # Random init over a ~900-token vocabulary: the loss is near log(vocab).
    assert abs(summary["mean_loss"] - torch.log(torch.tensor(896.0)).item()) < 0.5
    assert summary["backends"]["packing"] == "cuda"


def test_demo_without_data_says_where_to_get_it(tmp_path):
    result = run("demo", "--data", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "VQA-RAD not found" in result.stderr
