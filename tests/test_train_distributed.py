"""torchrun --nproc_per_node 2 (gloo, CPU): DDP and FSDP2 runs match one process at the same global batch."""

import subprocess

import pytest

from train_fixtures import PYTHON, read_rows, subprocess_env, tiny_data_fixture, train_argv  # noqa: F401
from vatt_fast.train import main

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _torchrun(argv, timeout=300):
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vatt_fast.train", *argv]
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def single_process_losses(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    main(train_argv(tiny_data, out, 3, 8, "--attention", "math"))
    return {key: [r[key] for r in read_rows(out)] for key in ("loss", "grad_norm")}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tiny_data, tmp_path, single_process_losses, mode):
    out = tmp_path / mode
    extra = ["--attention", "math"] + (["--fsdp"] if mode == "fsdp" else [])
    proc = _torchrun(train_argv(tiny_data, out, 3, 8, *extra))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # BatchNorm over the global batch, negatives from both ranks, gradients of the global loss:
    # the same loss and gradient norm at every step as one process holding the 8 clips.
    assert [r["loss"] for r in rows] == pytest.approx(single_process_losses["loss"], rel=2e-5)
    assert [r["grad_norm"] for r in rows] == pytest.approx(single_process_losses["grad_norm"], rel=1e-4)
    summary = (out / "summary.json").read_text()
    assert '"world_size": 2' in summary
    assert (out / "checkpoints" / "step-00000003" / "model.safetensors").is_file()
    if mode == "fsdp":  # the sharded model and optimizer load back from the full checkpoint
        proc = _torchrun(train_argv(tiny_data, out, 4, 8, *extra, "--resume", "auto"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert [r["step"] for r in read_rows(out)] == [1, 2, 3, 4]


def test_batch_not_divisible_by_world_size_fails_clearly(tiny_data, tmp_path):
    proc = _torchrun(train_argv(tiny_data, tmp_path / "o", 2, 5))
    assert proc.returncode != 0
    assert "--batch-size 5 (global) is not divisible by the world size 2" in proc.stderr + proc.stdout
    assert not (tmp_path / "o").exists()
