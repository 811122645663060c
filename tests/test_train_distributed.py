"""torchrun --nproc_per_node 2 (gloo, CPU): DDP and FSDP2 runs match one process at the same global batch.

What is compared, and why it cannot flake. Two process layouts sum the same numbers in a
different order (which also depends on the CPU's vector width and thread count), so every
gradient differs from the single-process one by fp32 rounding. The tolerances are sized
for that, measured on this project's machine under OMP_NUM_THREADS=1/2 and
ATEN_CPU_CAPABILITY=default/avx2 (observed error in brackets):

- Step 1's loss and gradient norm come from the same weights and the same 8 clips, before
  any update: loss rel 1e-5 [5e-7], gradient norm rel 1e-4 [1e-5; a norm over many
  elements that each cancel partial sums].
- Later steps go through the optimizer. With VATT's Adam eps of 1e-7 the first update is
  ``lr * g / (|g| + 1e-7)``, whose sensitivity ``d update / d g <= lr / eps`` turns a
  1e-12 reduction-order difference in a gradient that is mathematically ~0 into a
  full-size step of either sign: the weights then differ by 5e-4 and the step-3 loss by
  7e-4 relative across machines. These runs use ``adam_eps = 0.1`` (the ``model:``
  overrides of a config file): the same optimizer and code path, but a gradient error
  ``delta`` moves a weight by at most ``lr / eps * delta <= 1.5e-3 * delta`` (lr <= 1.5e-4
  in these warmup steps). The parameters after 3 updates then agree to a few ulps
  (atol 1e-6 [1.2e-7]); the BatchNorm running statistics, which the global BatchNorm
  computes as E[x^2] - mean^2 in fp32, to atol 1e-4 [1e-5]. A loss moves by at most
  ``|grad| * |delta weights|`` (grad norm ~100 here), so steps 2-3 get loss rel 1e-4 [6e-6]
  and gradient norm rel 2e-4 [2e-5].

What the comparison proves: a wrong BatchNorm (local statistics), missing negatives from
the other rank, or a gradient that is not the global loss's changes step 1's loss or
gradient norm by far more than these tolerances (each is an O(1) change of the
computation), and an update that ignores the other rank's gradient changes the weights.
"""

import subprocess

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import PYTHON, read_rows, subprocess_env, train_argv
from vatt_fast.train import main

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _torchrun(argv, timeout=300):
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vatt_fast.train", *argv]
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def _weights(run_dir, step=3):
    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def single_process(tiny_data, tmp_path_factory, stable_adam):
    out = tmp_path_factory.mktemp("single") / "run"
    main(train_argv(tiny_data, out, 3, 8, "--attention", "math", "--config", stable_adam))
    rows = read_rows(out)
    return {"loss": [r["loss"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows], "weights": _weights(out)}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tiny_data, tmp_path, single_process, stable_adam, mode):
    out = tmp_path / mode
    extra = ["--attention", "math", "--config", stable_adam] + (["--fsdp"] if mode == "fsdp" else [])
    proc = _torchrun(train_argv(tiny_data, out, 3, 8, *extra))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    loss, grad_norm = [r["loss"] for r in rows], [r["grad_norm"] for r in rows]
    # Step 1: same weights, same clips; only the summation order differs.
    assert loss[0] == pytest.approx(single_process["loss"][0], rel=1e-5)
    assert grad_norm[0] == pytest.approx(single_process["grad_norm"][0], rel=1e-4)
    # Steps 2-3 and the weights after 3 updates: reduction noise through a Lipschitz update.
    assert loss[1:] == pytest.approx(single_process["loss"][1:], rel=1e-4)
    assert grad_norm[1:] == pytest.approx(single_process["grad_norm"][1:], rel=2e-4)
    weights = _weights(out)
    assert weights.keys() == single_process["weights"].keys()
    for name, w in single_process["weights"].items():
        atol = 1e-4 if "running_" in name else 1e-6
        torch.testing.assert_close(weights[name], w, rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    summary = (out / "summary.json").read_text()
    assert '"world_size": 2' in summary
    if mode == "fsdp":  # the sharded model and optimizer load back from the full checkpoint
        proc = _torchrun(train_argv(tiny_data, out, 4, 8, *extra, "--resume", "auto"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert [r["step"] for r in read_rows(out)] == [1, 2, 3, 4]


def test_batch_not_divisible_by_world_size_fails_clearly(tiny_data, tmp_path):
    proc = _torchrun(train_argv(tiny_data, tmp_path / "o", 2, 5))
    assert proc.returncode != 0
    assert "--batch-size 5 (global) is not divisible by the world size 2" in proc.stderr + proc.stdout
    assert not (tmp_path / "o").exists()
