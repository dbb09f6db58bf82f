"""One harness for every benchmark: timing, peak memory, device ceilings and result files.

Timing on CUDA: CUDA events around each call, after warm-up, median of many runs (``triton.testing.do_bench``
semantics, written out so that the CPU smoke mode uses the same code path with a host clock). Inputs are
drawn fresh and random (never zeros). Peak memory: the allocator's peak during one call above what was
allocated before it. Rows are appended to ``benchmarks/results/<name>.jsonl`` with the device, versions
and commit; the script prints a table and, last, one JSON line of headline numbers.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Measurement:
    name: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mib: float
    tflops: float | None = None
    gbps: float | None = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object], device: torch.device, *, warmup: int = 5, repeat: int = 30
) -> list[float]:
    """Milliseconds per call, ``repeat`` samples after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
        for start, end in zip(starts, ends, strict=True):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    else:
        for _ in range(repeat):
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return samples


def kernel_ms(fn: Callable[[], object], device: torch.device, *, repeat: int = 5) -> float | None:
    """Milliseconds of GPU kernel time per call, summed over the kernels the profiler saw (CUDA only;
    None elsewhere). Unlike :func:`time_ms`, host gaps between the kernels do not count: for an op whose
    host work (autograd, launches) takes longer than its kernels, the events measure the host."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()  # compiled and the pool grown before the profiler starts
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeat):
            fn()
        synchronize(device)
    cuda = torch.autograd.DeviceType.CUDA
    total_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == cuda)
    return total_us / repeat / 1e3


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one call above what was allocated before it (CUDA only; 0 on CPU)."""
    if device.type != "cuda":
        return 0.0
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def measure(
    name: str,
    fn: Callable[[], object],
    device: torch.device,
    *,
    flops: float | None = None,
    bytes_moved: float | None = None,
    warmup: int = 5,
    repeat: int = 30,
) -> Measurement:
    memory = peak_mib(fn, device)
    samples = sorted(time_ms(fn, device, warmup=warmup, repeat=repeat))
    median = statistics.median(samples)
    return Measurement(
        name=name,
        median_ms=median,
        p20_ms=samples[int(0.2 * (len(samples) - 1))],
        p80_ms=samples[int(0.8 * (len(samples) - 1))],
        peak_mib=memory,
        tflops=flops / (median * 1e-3) / 1e12 if flops else None,
        gbps=bytes_moved / (median * 1e-3) / 1e9 if bytes_moved else None,
    )


def warm_device(device: torch.device, seconds: float = 2.0, size: int = 8192) -> None:
    """Keep the device busy with GEMMs for ``seconds``: a GPU that was idle runs its first work at lower
    clocks, and whatever a benchmark times first would pay for that."""
    if device.type != "cuda":
        return
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(8):
            a @ a
        synchronize(device)


def measured_gemm_tflops(
    device: torch.device, dtype: torch.dtype = torch.bfloat16, size: int = 8192
) -> float:
    """The device's own dense GEMM rate (the ceiling the projector is judged against)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    result = measure("gemm", lambda: a @ b, device, flops=2 * size**3, warmup=3, repeat=10)
    return result.tflops or 0.0


def measured_copy_gbps(device: torch.device, mib: int = 2048) -> float:
    """Device-to-device copy bandwidth, bytes read plus bytes written."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    result = measure("copy", lambda: dst.copy_(src), device, bytes_moved=2 * src.numel(), warmup=3, repeat=10)
    return result.gbps or 0.0


def _commit() -> str:
    # A copied tree may carry a stale .git (or none): the commit a caller names wins.
    named = os.environ.get("LLAVAMED_FAST_COMMIT")
    if named:
        return named
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    info = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": _commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def report(
    bench: str, device: torch.device, rows: Sequence[dict], headline: dict, *, save: bool = True
) -> None:
    """Print the table, append rows to the results file, and print the headline JSON as the last line."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    widths = {c: max(len(c), *(len(_fmt(row.get(c))) for row in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).rjust(widths[c]) for c in columns))
    env = environment(device)
    if save and device.type == "cuda":
        out = Path(os.environ.get("LLAVAMED_FAST_RESULTS", RESULTS))
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"{bench}.jsonl", "a") as handle:
            for row in rows:
                handle.write(json.dumps({**env, "bench": bench, **row}) + "\n")
    print(json.dumps({**headline, **{k: env[k] for k in ("device", "torch", "triton", "cuda", "commit")}}))


def row(measurement: Measurement, **extra) -> dict:
    data = {k: v for k, v in asdict(measurement).items() if v is not None and k != "name"}
    return {**extra, **data}


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
