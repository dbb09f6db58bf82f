"""metrics.jsonl content and exactness, resume truncation, plots, TensorBoard, ranks, MFU."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from llavamed_fast.train.metrics import RunMetrics

LOSSES = (0.1 + 0.2, 1e-300, 1 / 3, 5e-324, 12345.678901234567, 2.0)


def step_args(step: int, **overrides) -> dict:
    args = {
        "step": step,
        "stage": "align",
        "stage_step": step,
        "loss": LOSSES[(step - 1) % len(LOSSES)],
        "lr": 2e-3 * step / 7,
        "grad_norm": 0.5 + step,
        "tokens": 4096,
        "samples": 32,
        "supervised_tokens": 1000,
        "flops": 3.2e14,
        "seconds": 0.8,
        "skipped": False,
        "memory_bytes": None,
    }
    return {**args, **overrides}


def metrics(run_dir: Path, **overrides) -> RunMetrics:
    options = {"rank": 0, "world_size": 1, "peak_tflops": None, "tensorboard": False, "plots": False}
    return RunMetrics(run_dir, **{**options, **overrides})


def read(run_dir: Path) -> list[dict]:
    text = (run_dir / "metrics.jsonl").read_text()
    assert text.endswith("\n")

    def strict(constant: str):
        raise AssertionError(f"non-standard JSON constant {constant}")

    return [json.loads(line, parse_constant=strict) for line in text.splitlines()]


def test_lines_and_exact_losses(tmp_path):
    with metrics(tmp_path) as run:
        run.start_stage("align", total_steps=len(LOSSES))
        returned = [run.log_step(**step_args(step)) for step in range(1, len(LOSSES) + 1)]
        run.event("checkpoint", step=len(LOSSES), path="ckpt-6")
    records = read(tmp_path)
    assert [r["event"] for r in records if "event" in r] == ["stage_start", "checkpoint"]
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, len(LOSSES) + 1))
    for record, loss, back in zip(steps, LOSSES, returned, strict=True):
        assert float(record["loss"]) == loss and back["loss"] == loss
        assert record["stage"] == "align" and record["tokens"] == 4096 and record["mfu"] is None
        assert record["tokens_per_s"] == pytest.approx(4096 / 0.8)


def test_non_finite_values_stay_strict_json(tmp_path):
    with metrics(tmp_path) as run:
        run.log_step(**step_args(1, loss=math.nan, grad_norm=math.inf, skipped=True))
    (record,) = read(tmp_path)
    assert record["loss"] == "nan" and record["grad_norm"] == "inf" and record["skipped"] is True
    assert math.isnan(float(record["loss"]))


def test_mfu_for_a_made_up_peak(tmp_path):
    with metrics(tmp_path, world_size=4, peak_tflops=250.0) as run:
        record = run.log_step(**step_args(1, flops=1e15, seconds=2.0, tokens=8000, samples=40))
    # 1e15 FLOPs over 2 s on 4 devices: 125 TFLOP/s each, half of a 250 TFLOP/s peak.
    assert record["tflops_per_device"] == pytest.approx(125.0)
    assert record["mfu"] == pytest.approx(0.5)
    assert record["tokens_per_s"] == pytest.approx(4000.0) and record["samples_per_s"] == pytest.approx(20.0)
    assert read(tmp_path)[0]["mfu"] == pytest.approx(0.5)


def test_refuses_tensors(tmp_path):
    with metrics(tmp_path) as run, pytest.raises(TypeError, match="loss must be a Python number"):
        run.log_step(**step_args(1, loss=torch.tensor(1.0)))


def without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def run_steps(run: RunMetrics, steps: range, *, end: bool) -> None:
    for step in steps:
        if step == 4:
            run.event("skipped_step", step=4, reason="non-finite loss")
        run.log_step(**step_args(step))
        if step % 3 == 0:
            run.event("checkpoint", step=step)
    if end:
        run.end_stage("align", skipped_samples=0)


def test_resume_drops_later_steps_and_matches_an_uninterrupted_run(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    with metrics(whole) as run:
        run.start_stage("align", total_steps=6, samples=192)
        run_steps(run, range(1, 7), end=True)

    with metrics(resumed) as run:  # killed during step 5, after the checkpoint of step 3
        run.start_stage("align", total_steps=6, samples=192)
        run_steps(run, range(1, 5), end=False)
    with (resumed / "metrics.jsonl").open("a") as file:
        file.write('{"step": 5, "stage": "al')  # a torn line

    with metrics(resumed, resume_step=3) as run:
        kept = read(resumed)
        assert [r.get("step") for r in kept] == [None, 1, 2, 3, 3]  # stage start ... checkpoint of 3
        assert kept[-1]["event"] == "checkpoint" and not (resumed / "metrics.jsonl.tmp").exists()
        run.start_stage("align", total_steps=6, samples=192)  # already recorded: not written again
        run_steps(run, range(4, 7), end=True)
    assert without_time(read(resumed)) == without_time(read(whole))
    events = [r for r in read(whole) if "event" in r]
    assert events[0] == {**events[0], "event": "stage_start", "total_steps": 6, "samples": 192}
    assert events[-1] == {**events[-1], "event": "stage_end", "step": 6, "skipped_samples": 0}


def test_a_torn_last_line_is_dropped_on_any_restart(tmp_path):
    with metrics(tmp_path) as run:
        run.log_step(**step_args(1))
    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write('{"step": 2, "lo')
    with metrics(tmp_path) as run:
        run.log_step(**step_args(2))
    assert [r["step"] for r in read(tmp_path)] == [1, 2]


def test_stage_plot_is_a_png(tmp_path):
    with metrics(tmp_path, plots=True, peak_tflops=100.0) as run:
        run.start_stage("align", total_steps=30)
        for step in range(1, 31):
            run.log_step(**step_args(step, loss=2.0 / step))
        run.end_stage("align")
    with Image.open(tmp_path / "plots" / "align.png") as image:
        assert image.format == "PNG" and image.size[0] > 100
    assert list((tmp_path / "plots").iterdir()) == [tmp_path / "plots" / "align.png"]


def test_tensorboard_event_files(tmp_path):
    with metrics(tmp_path, tensorboard=True) as run:
        run.log_step(**step_args(1, memory_bytes=3 * 2**30))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_off_never_imports_it(tmp_path, monkeypatch):
    for name in ("torch.utils.tensorboard", "tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # any import of it now raises ImportError
    with metrics(tmp_path, tensorboard=False) as run:
        run.log_step(**step_args(1))
    with pytest.raises(ImportError):
        metrics(tmp_path / "other", tensorboard=True)


def test_other_ranks_write_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with metrics(run_dir, rank=1, world_size=2, tensorboard=True, plots=True, resume_step=0) as run:
        run.start_stage("align", total_steps=2)
        record = run.log_step(**step_args(1))
        run.event("checkpoint", step=1)
        run.end_stage("align")
    assert record["loss"] == LOSSES[0]
    assert not run_dir.exists()
