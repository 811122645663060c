"""The loaders through the trainer: DALI's CPU pipeline, and broken files in train mode.

"Bad data never stops a run" is checked end to end here: broken files in the batches of a
training run are replaced and counted in ``summary.json``, with and without DataLoader
workers and with the DALI loader.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from train_helpers import read_rows, train_argv
from vatt_fast.data import build_loader, read_manifest


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


needs_dali = pytest.mark.skipif(not _has_dali(), reason="needs NVIDIA DALI (pip install 'vatt_fast[dali]')")


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def _check_run(run_dir, steps):
    summary = _summary(run_dir)
    rows = read_rows(run_dir)
    assert summary["status"] == "done" and summary["steps"] == steps
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) for r in rows) and math.isfinite(summary["final_loss"])
    return summary


@needs_dali
def test_trainer_runs_the_dali_loader_on_cpu(tiny_data, tmp_path):
    from vatt_fast.train import main

    out = tmp_path / "run"
    main(train_argv(tiny_data, out, 3, 4, "--loader", "dali"))  # the later --loader wins
    summary = _check_run(out, 3)
    assert summary["bad_data"] == {}


def test_trainer_logs_which_loader_auto_picks_and_why(tiny_data, tmp_path):
    """--loader auto without CUDA, DALI or NVDEC trains with PyAV and says why in train.log."""
    from vatt_fast.data.loader import choose_loader
    from vatt_fast.train import main

    chosen, why = choose_loader("auto")
    if chosen == "dali":
        pytest.skip("this machine has CUDA, DALI and NVDEC: auto picks DALI")
    out = tmp_path / "run"
    main(train_argv(tiny_data, out, 1, 4, "--loader", "auto"))  # the later --loader wins
    _check_run(out, 1)
    lines = [line for line in (out / "train.log").read_text().splitlines() if "loader auto:" in line]
    assert len(lines) == 1 and lines[0].endswith(f"loader auto: PyAV (CPU decoding), because {why}")


def _broken_copy(tiny_data, tmp_path):
    """A copy of the tiny dataset whose first training batch holds a garbage FLAC and a garbage
    video (the copy: the fixture is shared by the session)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    records = read_manifest(data, split="train")
    loader = build_loader(data, "train", 4, backend="pyav", num_workers=0, seed=0)  # the trainer's schedule
    first = loader.schedule.batch(0, 0).tolist()
    rng = np.random.default_rng(0)
    audio, video = records[first[0]].audio, records[first[1]].video
    with open(audio, "r+b") as f:
        size = len(f.read())
        f.seek(0)
        f.write(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    with open(video, "r+b") as f:
        size = len(f.read())
        f.seek(0)
        f.write(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    return data


@pytest.mark.parametrize("workers", [0, 2])
def test_broken_files_in_training_batches_are_replaced_and_counted(tiny_data, tmp_path, workers):
    from vatt_fast.train import main

    data = _broken_copy(tiny_data, tmp_path)
    out = tmp_path / "run"
    main(train_argv(data, out, 3, 4, "--workers", str(workers)))
    summary = _check_run(out, 3)
    assert summary["bad_data"] == {"unreadable": 2}


@needs_dali
def test_broken_files_in_training_batches_with_the_dali_loader(tiny_data, tmp_path):
    from vatt_fast.train import main

    data = _broken_copy(tiny_data, tmp_path)
    out = tmp_path / "run"
    main(train_argv(data, out, 3, 4, "--loader", "dali"))
    summary = _check_run(out, 3)
    assert summary["bad_data"] == {"unreadable": 2}
