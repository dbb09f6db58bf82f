"""What a training run reports, once per optimizer step: ``metrics.jsonl``, TensorBoard, plots, a progress bar.

``run_dir/metrics.jsonl`` is the record of the run, one JSON object per line: step lines (``step``,
``stage``, ``loss``, throughput, MFU, memory, ...) and event lines (``"event": kind``: stage start/end,
checkpoints, skipped steps, stops), so a reader keeps step lines with ``"event" not in line``. Each line
goes out in one ``write`` and is fsynced, so a killed run leaves only whole lines. Losses are written
exactly (``repr`` of the float) because resume tests compare them bit for bit; other floats are rounded.
Non-finite values are written as the strings ``"nan"``/``"inf"``/``"-inf"`` (``float()`` reads them back)
so that the file stays strict JSON.

Only rank 0 writes; on other ranks every method is a no-op (``log_step`` still returns its record). The
caller passes Python numbers it already has on the host: this module never touches device tensors.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from llavamed_fast.data.durable import write_atomic

METRICS_FILE = "metrics.jsonl"


class RunMetrics:
    """The run's metrics writer (rank 0) or a no-op (other ranks).

    ``resume_step=k`` resumes a run whose checkpoint holds step ``k``: the lines of ``metrics.jsonl``
    from the first one about a step after ``k`` onwards are dropped (those steps are about to be run
    again), so that an interrupted and resumed run ends with the lines an uninterrupted one would have.
    """

    def __init__(
        self,
        run_dir: Path | str,
        *,
        rank: int,
        world_size: int,
        peak_tflops: float | None,
        tensorboard: bool,
        plots: bool,
        total_steps: int | None = None,
        resume_step: int | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if peak_tflops is not None and peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be positive or None (unknown), got {peak_tflops}")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.rank = rank
        self.world_size = world_size
        self.peak_tflops = peak_tflops
        self.plots = plots
        self.total_steps = total_steps
        self.writes = rank == 0
        self._fd: int | None = None
        self._tensorboard: Any = None
        self._bar: tqdm | None = None
        self._last_step: int | None = None
        self._stage_events: set[tuple[str, str]] = set()
        self._event_kinds: set[str] = set()
        if not self.writes:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for record in _prepare(self.path, resume_step):
            if "event" in record:
                self._event_kinds.add(record["event"])
            if "event" in record and "stage" in record:
                self._stage_events.add((record["event"], record["stage"]))
            if isinstance(record.get("step"), int):
                self._last_step = record["step"]
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if tensorboard:
            # Imported here: runs without TensorBoard never load it. purge_step makes TensorBoard drop
            # the events of steps that a resumed run computes again.
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge)

    def start_stage(self, stage: str, total_steps: int, **fields: Any) -> None:
        """Open the stage's progress bar and record its start (with ``fields``), unless the file already
        has it: a run resumed inside the stage must not record a second start."""
        if not self.writes:
            return
        self._stage_event("stage_start", stage, total_steps=total_steps, **fields)
        self._close_bar()
        self._bar = tqdm(
            total=total_steps,
            desc=stage,
            unit="step",
            file=sys.stderr,
            mininterval=1.0,
            dynamic_ncols=True,
            disable=None,  # off when stderr is not a terminal (batch jobs, CI): no control codes in logs
        )

    def log_step(
        self,
        *,
        step: int,
        stage: str,
        stage_step: int,
        loss: float,
        lr: float,
        grad_norm: float | None,
        tokens: int,
        samples: int,
        supervised_tokens: int,
        flops: float,
        seconds: float,
        skipped: bool,
        memory_bytes: int | None,
    ) -> dict[str, Any]:
        """Record one optimizer step and return the record.

        ``tokens``, ``samples``, ``supervised_tokens`` and ``flops`` are totals over all ranks for the
        step; ``seconds`` its wall time; ``memory_bytes`` the device's peak allocation (None on CPU).
        """
        _require_host_numbers(loss=loss, lr=lr, grad_norm=grad_norm, flops=flops, seconds=seconds)
        timed = seconds > 0
        tflops = flops / seconds / self.world_size / 1e12 if timed else None
        record: dict[str, Any] = {
            "step": step,
            "stage": stage,
            "stage_step": stage_step,
            "loss": loss,
            "lr": _significant(lr),
            "grad_norm": _significant(grad_norm),
            "tokens": tokens,
            "samples": samples,
            "supervised_tokens": supervised_tokens,
            "flops": _significant(flops),
            "seconds": _significant(seconds),
            "tokens_per_s": _significant(tokens / seconds) if timed else None,
            "samples_per_s": _significant(samples / seconds) if timed else None,
            "tflops_per_device": _significant(tflops),
            "mfu": _significant(tflops / self.peak_tflops)
            if tflops is not None and self.peak_tflops
            else None,
            "skipped": skipped,
            "memory_bytes": memory_bytes,
            "time": round(time.time(), 3),
        }
        if not self.writes:
            return record
        self._write(record)
        self._last_step = step
        if self._tensorboard is not None:
            self._scalars(record)
        if self._bar is not None:
            self._bar.set_postfix(_postfix(record, self.total_steps), refresh=False)
            self._bar.update(stage_step - self._bar.n)
        return record

    def event(self, kind: str, **fields: Any) -> None:
        """A non-step record (``"event": kind``). Pass ``step=`` when it concerns a step, so that a resume
        from before that step drops it with the step."""
        if not self.writes:
            return
        if "event" in fields:
            raise ValueError("'event' is the record's kind; name the field something else")
        self._write({"event": kind, **fields, "time": round(time.time(), 3)})
        self._event_kinds.add(kind)

    def has_event(self, kind: str) -> bool:
        """Whether the file holds an event of ``kind`` (kept from before a resume, or written since);
        always False on ranks other than 0."""
        return kind in self._event_kinds

    def end_stage(self, stage: str, **fields: Any) -> None:
        """Record the stage's end (with ``fields``; once, as for the start) and draw
        ``run_dir/plots/<stage>.png`` from the stage's lines of the file."""
        if not self.writes:
            return
        self._close_bar()
        self._stage_event("stage_end", stage, step=self._last_step, **fields)
        if self.plots:
            records = [r for r in _read_records(self.path) if "event" not in r and r.get("stage") == stage]
            if records:
                _plot_stage(records, self.run_dir / "plots" / f"{stage}.png", stage, self.peak_tflops)

    def close(self) -> None:
        self._close_bar()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunMetrics:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _stage_event(self, kind: str, stage: str, **fields: Any) -> None:
        if (kind, stage) not in self._stage_events:
            self._stage_events.add((kind, stage))
            self.event(kind, stage=stage, **fields)

    def _write(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            raise RuntimeError(f"metrics for {self.run_dir} are closed")
        line = json.dumps(_strict_json(record), allow_nan=False) + "\n"
        _write_all(self._fd, line.encode())
        os.fsync(self._fd)

    def _scalars(self, record: dict[str, Any]) -> None:
        step = record["step"]
        memory = record["memory_bytes"]
        values = {
            "train/loss": record["loss"],
            "train/lr": record["lr"],
            "train/grad_norm": record["grad_norm"],
            "perf/tokens_per_s": record["tokens_per_s"],
            "perf/samples_per_s": record["samples_per_s"],
            "perf/tflops_per_device": record["tflops_per_device"],
            "perf/mfu": record["mfu"],
            "memory/max_allocated_gib": None if memory is None else memory / 2**30,
        }
        for tag, value in values.items():
            if value is not None:
                self._tensorboard.add_scalar(tag, value, step)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _require_host_numbers(**values: object) -> None:
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(
                f"{name} must be a Python number, got {type(value).__name__}: convert it where the loop "
                "logs (a device tensor here would mean a host sync on every step)"
            )


def _significant(value: float | None, digits: int = 6) -> float | None:
    """Rounded to ``digits`` significant digits: enough for rates and LRs, and short lines."""
    if value is None or not math.isfinite(value):
        return value
    return float(f"{value:.{digits}g}")


def _strict_json(record: dict[str, Any]) -> dict[str, Any]:
    return {
        key: str(value) if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in record.items()
    }


def _write_all(fd: int, data: bytes) -> None:
    # One write() for the whole line; a regular file takes it whole unless the disk is full, when the
    # loop finishes the line rather than leave half of it.
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_records(path: Path) -> Iterable[dict[str, Any]]:
    with path.open("rb") as file:
        for line in file:
            if line.endswith(b"\n"):
                yield json.loads(line)


def _prepare(path: Path, resume_step: int | None) -> list[dict[str, Any]]:
    """The records to keep from an existing file, which is rewritten atomically if anything goes: a torn
    last line (no newline), and on resume everything from the first record of a step after
    ``resume_step``."""
    if not path.exists():
        return []
    data = path.read_bytes()
    kept: list[dict[str, Any]] = []
    end = 0
    # split on b"\n" only: the last piece is b"" after a complete line, else a torn line to drop.
    for number, line in enumerate(data.split(b"\n")[:-1], start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}:{number}: not a JSON line ({error}); the file was changed by something other "
                "than the run: fix or move it"
            ) from error
        step = record.get("step")
        if resume_step is not None and isinstance(step, int) and step > resume_step:
            break
        kept.append(record)
        end += len(line) + 1
    if end < len(data):
        write_atomic(path, data[:end])
    return kept


def _postfix(record: dict[str, Any], total_steps: int | None) -> dict[str, str]:
    postfix = {"loss": f"{record['loss']:.4f}"}
    if record["tokens_per_s"] is not None:
        postfix["tok/s"] = f"{record['tokens_per_s']:.0f}"
    if record["mfu"] is not None:
        postfix["mfu"] = f"{record['mfu']:.1%}"
    if total_steps:
        postfix["run"] = f"{record['step']}/{total_steps}"
    return postfix


def _number(value: Any) -> float:
    """A value as written to the file (non-finite floats are strings) back to a float; None is NaN."""
    return math.nan if value is None else float(value)


def _smoothed(values: list[float]) -> list[float]:
    """Centred moving average over the finite values. The plot is drawn after the stage, so the window
    can look ahead and the curve does not lag the raw one as an online EMA would. Half-width: a
    twentieth of the stage, capped at 50 steps, so long stages show the trend and short ones stay close
    to the raw curve."""
    raw = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(raw)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, raw, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    half = min(50, len(raw) // 20)
    index = np.arange(len(raw))
    low, high = np.maximum(index - half, 0), np.minimum(index + half + 1, len(raw))
    count = counts[high] - counts[low]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (sums[high] - sums[low]) / count, np.nan).tolist()


def _plot_stage(records: list[dict[str, Any]], path: Path, stage: str, peak_tflops: float | None) -> None:
    # Figure + the Agg canvas directly, not pyplot: no global backend switch, no figure registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in records]
    loss = [_number(r["loss"]) for r in records]
    mfu = [_number(r.get("mfu")) for r in records]
    with_mfu = peak_tflops is not None and any(math.isfinite(m) for m in mfu)
    panels = 3 if with_mfu else 2
    figure = Figure(figsize=(8, 2.6 * panels), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    axes[0].plot(steps, loss, alpha=0.35, label="loss")
    axes[0].plot(steps, _smoothed(loss), label="smoothed")
    axes[0].set_ylabel("loss")
    axes[0].legend(loc="upper right")
    axes[0].set_title(f"stage {stage}")
    axes[1].plot(steps, [_number(r.get("tokens_per_s")) for r in records])
    axes[1].set_ylabel("tokens/s (all ranks)")
    if with_mfu:
        axes[2].plot(steps, [100 * m for m in mfu])
        axes[2].set_ylabel(f"MFU % (peak {peak_tflops:g} TFLOP/s)")
    axes[-1].set_xlabel("step")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    figure.savefig(temporary, format="png", dpi=100)
    os.replace(temporary, path)


__all__ = ["METRICS_FILE", "RunMetrics"]
