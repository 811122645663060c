"""Helpers shared by the benchmark files.

Every benchmark checks correctness before it is timed, with STYLE.md's parity rule
(``assert_parity``, shared with the tests in ``tests/parity.py``), times a function that
synchronises the device itself, and records its figures with :func:`record`, which works
under ``--benchmark-disable`` too (no timing then, so no throughput).

When ``$VATT_BENCH_LOG`` names a file, :func:`record` also appends one JSON line per
finished benchmark to it, so that a run cut off by a timeout still has the figures of the
benchmarks that finished (``scripts/gpu_check.sh`` prints them).
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

_TESTS = str(Path(__file__).resolve().parent.parent / "tests")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)
from parity import assert_parity, max_error  # noqa: E402,F401  (re-exported for the benchmarks)


def machine() -> str:
    """The machine a figure was measured on, e.g. ``2-core x86_64 CPU, no GPU``."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, {gpu}"


def device_name(device: torch.device) -> str:
    """The device a figure was measured on: the GPU's name, or the CPU and its thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def inductor_error(device: torch.device) -> Optional[str]:
    """Why torch.compile (inductor) cannot compile for ``device`` here, or None when it works."""
    return _inductor_error(torch.device(device).type)


@functools.lru_cache(maxsize=None)
def _inductor_error(device_type: str) -> Optional[str]:
    try:
        x = torch.arange(4.0, device=device_type)
        fn = torch.compile(lambda a: a * 2 + 1)
        torch.testing.assert_close(fn(x), x * 2 + 1)
    except Exception as exc:  # a missing C++ compiler (CPU) or Triton (CUDA), an unsupported platform, ...
        return f"{type(exc).__name__}: {exc}"
    return None


def time_it(benchmark: Any, fn: Callable[[], Any], device: torch.device, rounds: int, warmup_rounds: int = 1) -> Any:
    """Time ``fn`` with ``benchmark.pedantic``, synchronising the device inside the timed call."""

    def run():
        out = fn()
        sync(device)
        return out

    return benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)


def peak_extra_mb(fn: Callable[[], Any], device: torch.device) -> Optional[float]:
    """Peak device memory one call of ``fn`` allocates beyond what is live before it, in MiB
    (its output included); ``None`` on the CPU, whose allocator torch does not track."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    sync(device)
    extra = torch.cuda.max_memory_allocated(device) - base
    del out
    return round(extra / 2 ** 20, 2)


def largest_fitting(fits: Callable[[int], bool], start: int = 64, cap: int = 4096, step: int = 16) -> int:
    """The largest batch size ``b`` (a multiple of ``step``, at most ``cap``) with ``fits(b)``, assuming
    ``fits`` is monotone: doubling from ``start`` until a size fails (or passes ``cap``), then
    bisecting; 0 when ``start`` itself does not fit."""
    lo, hi = 0, start
    while hi <= cap and fits(hi):
        lo, hi = hi, hi * 2
    if lo == 0:
        return 0
    hi = min(hi, cap + step)
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def seconds(benchmark: Any) -> Optional[float]:
    """Median seconds per call, or None when timing is off (``--benchmark-disable``)."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return None
    return stats.stats.median


def record(benchmark: Any, flops: Optional[float] = None, bytes_moved: Optional[float] = None, **info: Any) -> None:
    """Put ``info`` and, when timed, TFLOP/s and GB/s from the median time into ``extra_info``.

    ``flops`` / ``bytes_moved``: the work of one timed call (pass the one that has a
    ceiling for this op, or both). Appends the record to ``$VATT_BENCH_LOG`` when set.
    """
    benchmark.extra_info.update(info)
    t = seconds(benchmark)
    if t is not None:
        benchmark.extra_info["median_ms"] = round(1e3 * t, 4)
        if flops is not None:
            benchmark.extra_info["tflops"] = round(flops / t / 1e12, 4)
        if bytes_moved is not None:
            benchmark.extra_info["gbps"] = round(bytes_moved / t / 1e9, 3)
    log = os.environ.get("VATT_BENCH_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        with open(log, "a") as f:
            f.write(json.dumps({"test": test, **provenance(), **benchmark.extra_info}, default=str) + "\n")


@functools.lru_cache(maxsize=None)
def provenance() -> dict:
    """Where and how a figure was measured, kept with it in the JSON lines (and so in RESULTS.md):
    the machine (GPU name or CPU), the date (UTC), torch/Triton versions and the command."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    argv = [Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv)]
    if argv and argv[0] in ("pytest", "__main__.py", "py.test"):
        argv[0] = "pytest"
    return {
        "card": machine(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "triton": triton_version,
        "command": " ".join(argv),
    }


def record_loader_throughput(benchmark: Any, spec: Any, batch_size: int, per_round: int, **extra: Any) -> None:
    """Put clips/s and frames/s of a loader benchmark (``per_round`` batches a round) in ``extra_info``."""
    info = dict(
        batches_per_round=per_round,
        clip=f"{spec.num_frames}x{spec.frame_size}x{spec.frame_size}",
        batch_size=batch_size,
        machine=machine(),
        **extra,
    )
    t = seconds(benchmark)
    if t is not None:
        per_batch = t / per_round
        info.update(
            clips_per_s=round(batch_size / per_batch, 2),
            frames_per_s=round(batch_size * spec.num_frames / per_batch, 1),
        )
    record(benchmark, **info)
