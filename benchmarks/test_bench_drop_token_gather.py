"""drop_token_gather benchmarks: the PyTorch reference, eager and under torch.compile, and the
Triton kernel (CUDA only).

Each benchmark first checks its output against an independent dense computation in
float64 (a one-hot selection matmul, exact for a selection), then is timed, and reports
GB/s and the device in ``extra_info``. The op only selects rows and adds one fp32 ``pos``
row, so it has no low-precision noise to compare with: the output must be the correctly
rounded sum, within ``2**-24`` relative of the exact one (on any device; no TF32 is
involved in a gather and an add).
Run with ``pytest benchmarks/test_bench_drop_token_gather.py --benchmark-only``.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from bench_utils import device_name, inductor_error, peak_extra_mb, record, time_it

from vatt_fast.kernels import _dispatch, drop_token_gather
from vatt_fast.kernels.drop_token_gather import drop_token_gather_reference
from vatt_fast.models.config import get_config


def _case(shape: str, device: torch.device):
    cfg = get_config(shape)
    # tiny: its training batch of 32 clips, 64 video tokens of width 128.
    # base: VATT-Base video, 1568 tokens of width 768; batch 32 on CUDA, scaled down to 4 on CPU.
    B = cfg.batch_size if shape == "tiny" else (32 if device.type == "cuda" else 4)
    N, D = cfg.num_video_tokens, cfg.video_encoder.dim
    return B, N, D, int(N * (1 - cfg.drop_token))


def _dense64(x, keep, pos):
    B, N, _ = x.shape
    rows = keep if keep.dim() == 2 else keep.expand(B, -1)
    select = F.one_hot(rows, N).double()  # (B, N_keep, N)
    return select @ x.double() + select @ pos.double()


def _run(benchmark, fn, device, x, keep, pos, impl):
    out = fn()
    assert out.dtype == x.dtype and out.shape == (x.shape[0], keep.shape[-1], x.shape[2])
    torch.testing.assert_close(out.double(), _dense64(x, keep, pos), rtol=2.0 ** -23, atol=0)
    time_it(benchmark, fn, device, rounds=20 if device.type == "cuda" else 5, warmup_rounds=2)
    B, N, D = x.shape
    n = keep.shape[-1]
    # Must move: read the kept rows of x and pos, write the output (int64 indices are negligible).
    record(
        benchmark, bytes_moved=(B * n * D + n * D + B * n * D) * x.element_size(), device=device_name(device),
        impl=impl, shape=f"B={B} N={N} D={D} N_keep={n} keep={tuple(keep.shape)}",
        peak_extra_mb=peak_extra_mb(fn, device),
    )


def _keep(B, N, n, per_sample, device):
    return torch.rand(B, N, device=device).argsort(1)[:, :n] if per_sample else torch.randperm(N, device=device)[:n]


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("shape", ["tiny", "base"])
def test_drop_token_gather_reference_eager(benchmark, device, shape, per_sample):
    B, N, D, n = _case(shape, device)
    x = torch.randn(B, N, D, device=device)
    pos = torch.randn(N, D, device=device)
    keep = _keep(B, N, n, per_sample, device)
    fn = functools.partial(drop_token_gather_reference, x, keep, pos=pos)
    _run(benchmark, fn, device, x, keep, pos, "reference eager")


def test_drop_token_gather_reference_compiled(benchmark, device):
    reason = inductor_error(device)
    if reason is not None:
        pytest.skip(f"torch.compile (inductor) does not work on this machine: {reason}")
    # One shared draw, as in pretraining: the base video on CUDA, the tiny one on the CPU.
    B, N, D, n = _case("base" if device.type == "cuda" else "tiny", device)
    x = torch.randn(B, N, D, device=device)
    pos = torch.randn(N, D, device=device)
    keep = _keep(B, N, n, False, device)
    fn = functools.partial(torch.compile(drop_token_gather_reference, fullgraph=True), x, keep, pos=pos)
    _run(benchmark, fn, device, x, keep, pos, "reference torch.compile")


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("shape", ["tiny", "base"])
def test_drop_token_gather_triton(benchmark, device, shape, per_sample):
    if device.type != "cuda":
        pytest.skip("the Triton kernel is timed on CUDA only (on the CPU it runs in the interpreter, see tests/)")
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    B, N, D, n = _case(shape, device)
    x = torch.randn(B, N, D, device=device)
    pos = torch.randn(N, D, device=device)
    keep = _keep(B, N, n, per_sample, device)
    # The public function, as users call it (its index check is an async device assert on CUDA).
    fn = functools.partial(drop_token_gather, x, keep, pos=pos, impl="triton")
    _run(benchmark, fn, device, x, keep, pos, "triton")
