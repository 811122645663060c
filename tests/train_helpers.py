"""Helpers for the trainer and evaluation tests: arguments of a fast CPU run, metrics rows, child-process
environment. The datasets and runs they share are session fixtures in ``conftest.py``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, List

# 24 videos: 21 train, 3 val, short clips at a small size: generated in a few seconds.
SYNTH_KW = dict(videos=24, seed=0, short_side=40, segments=2, segment_seconds=1.5)


def train_argv(data: Path, out: Path, steps: int = 3, batch_size: int = 4, *extra: str) -> List[str]:
    """Arguments of a fast in-process CPU training run (no workers, no progress bar, no periodic eval).

    The device is pinned to the CPU (where runs are bit-for-bit reproducible) even on a GPU
    machine; the CUDA path has its own test."""
    return [
        "--data", str(data), "--out", str(out), "--steps", str(steps), "--batch-size", str(batch_size),
        "--log-every", "1", "--eval-every", "0", "--workers", "0", "--no-progress", "--peak-tflops", "0.1",
        "--device", "cpu", "--loader", "pyav", *extra,
    ]  # fmt: skip


def read_rows(run_dir: Path, kind: str = "train") -> List[Dict]:
    """Rows of a run's metrics.jsonl of one kind ("train" or "eval")."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def subprocess_env() -> Dict[str, str]:
    """Environment for child processes: the repository importable, one thread each (2-core CI)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


PYTHON = sys.executable
