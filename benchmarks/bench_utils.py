"""Helpers shared by the benchmark files."""

from __future__ import annotations

import functools
import os
import platform
from typing import Any, Optional

import torch


def machine() -> str:
    """The machine a figure was measured on, e.g. ``2-core x86_64 CPU, no GPU``."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, {gpu}"


@functools.lru_cache(maxsize=None)
def inductor_error() -> Optional[str]:
    """Why torch.compile (inductor) cannot run here, or None when it works."""
    try:
        fn = torch.compile(lambda a: a * 2 + 1)
        torch.testing.assert_close(fn(torch.arange(4.0)), torch.arange(4.0) * 2 + 1)
    except Exception as exc:  # a missing C++ compiler, an unsupported platform, ...
        return f"{type(exc).__name__}: {exc}"
    return None


def record_loader_throughput(benchmark: Any, spec: Any, batch_size: int, per_round: int, **extra: Any) -> None:
    """Put clips/s and frames/s of a loader benchmark (``per_round`` batches a round) in ``extra_info``."""
    mean = benchmark.stats.stats.mean / per_round  # seconds per batch
    benchmark.extra_info.update(
        clips_per_s=round(batch_size / mean, 2),
        frames_per_s=round(batch_size * spec.num_frames / mean, 1),
        batches_per_round=per_round,
        clip=f"{spec.num_frames}x{spec.frame_size}x{spec.frame_size}",
        batch_size=batch_size,
        machine=machine(),
        **extra,
    )
