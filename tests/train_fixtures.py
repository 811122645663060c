"""Shared fixtures for the trainer/eval tests: one small synthetic dataset and one trained run per session.

Import the fixtures into a test module with
``from train_fixtures import tiny_data_fixture, tiny_run_fixture  # noqa: F401``; tests then
request them as ``tiny_data`` and ``tiny_run``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, List

import pytest

# 24 videos: 21 train, 3 val, short clips at a small size: generated in a few seconds.
SYNTH_KW = dict(videos=24, seed=0, short_side=40, segments=2, segment_seconds=1.5)


@pytest.fixture(scope="session", name="tiny_data")
def tiny_data_fixture(tmp_path_factory) -> Path:
    """A small synthetic dataset in the vatt_fast layout (generated once per session)."""
    from vatt_fast.data.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("synthetic") / "data"
    generate_synthetic(out, **SYNTH_KW)
    return out


@pytest.fixture(scope="session", name="learn_data")
def learn_data_fixture(tmp_path_factory) -> Path:
    """128 small videos (112 train, 16 val): enough for a 120-step run to show learning."""
    from vatt_fast.data.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("synthetic-learn") / "data"
    generate_synthetic(out, **{**SYNTH_KW, "videos": 128})
    return out


@pytest.fixture(scope="session", name="stable_adam")
def stable_adam_fixture(tmp_path_factory) -> str:
    """A ``--config`` file raising Adam's eps from 1e-7 to 0.1, for runs compared step by step.

    With eps 1e-7 the first Adam update ``lr * g / (|g| + eps)`` turns rounding noise in a
    gradient that is mathematically ~0 into a full-size step of either sign, so two
    correct runs that sum in a different order drift apart from step 2 on. With eps 0.1
    an error ``delta`` in a gradient moves a weight by at most ``lr / 0.1 * delta``.
    tests/test_train_distributed.py measures and explains the resulting tolerances.
    """
    path = tmp_path_factory.mktemp("cfg") / "stable_adam.yaml"
    path.write_text("model:\n  adam_eps: 0.1\n")
    return str(path)


def train_argv(data: Path, out: Path, steps: int = 3, batch_size: int = 4, *extra: str) -> List[str]:
    """Arguments of a fast in-process CPU training run (no workers, no progress bar, no periodic eval).

    The device is pinned to the CPU (where runs are bit-for-bit reproducible) even on a GPU
    machine; the CUDA path has its own test."""
    return [
        "--data", str(data), "--out", str(out), "--steps", str(steps), "--batch-size", str(batch_size),
        "--log-every", "1", "--eval-every", "0", "--workers", "0", "--no-progress", "--peak-tflops", "0.1",
        "--device", "cpu", "--loader", "pyav", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="session", name="tiny_run")
def tiny_run_fixture(tiny_data, tmp_path_factory) -> Path:
    """The run folder of a 4-step tiny training run on :func:`tiny_data`."""
    from vatt_fast.train import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    main(train_argv(tiny_data, out, 4))
    return out


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
