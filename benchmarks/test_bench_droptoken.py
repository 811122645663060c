"""drop_token_gather benchmarks: the PyTorch reference, eager and under torch.compile.

Each benchmark checks its output against an independent dense computation (a one-hot
selection matmul) before it is timed, and reports GB/s and the device in ``extra_info``.
Run with ``pytest benchmarks/test_bench_droptoken.py --benchmark-only``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from bench_utils import inductor_error
import torch.nn.functional as F

from vatt_fast.kernels.droptoken import drop_token_gather_reference
from vatt_fast.models.config import get_config


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _case(shape: str, device: torch.device):
    cfg = get_config(shape)
    # tiny: its training batch of 32 clips, 64 video tokens of width 128.
    # base: VATT-Base video, 1568 tokens of width 768; batch 32 on CUDA, scaled down to 4 on CPU.
    B = cfg.batch_size if shape == "tiny" else (32 if device.type == "cuda" else 4)
    N, D = cfg.num_video_tokens, cfg.video_encoder.dim
    return B, N, D, int(N * (1 - cfg.drop_token))


def _dense(x, keep, pos):
    B, N, _ = x.shape
    rows = keep if keep.dim() == 2 else keep.expand(B, -1)
    select = F.one_hot(rows, N).to(x.dtype)  # (B, N_keep, N)
    return select @ x + select @ pos


def _run(benchmark, fn, device, x, keep, pos, impl):
    torch.testing.assert_close(fn(), _dense(x, keep, pos), rtol=1e-5, atol=1e-5)

    def timed():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    benchmark.pedantic(timed, rounds=20, iterations=1, warmup_rounds=2)
    B, N, D = x.shape
    n = keep.shape[-1]
    # Must move: read the kept rows of x and pos, write the output (int64 indices are negligible).
    bytes_moved = (B * n * D + n * D + B * n * D) * x.element_size()
    benchmark.extra_info.update(
        device=_device_name(device), impl=impl, shape=f"B={B} N={N} D={D} N_keep={n} keep={tuple(keep.shape)}",
        GBps=round(bytes_moved / benchmark.stats.stats.median / 1e9, 3),
    )


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("shape", ["tiny", "base"])
def test_drop_token_gather_reference_eager(benchmark, device, shape, per_sample):
    B, N, D, n = _case(shape, device)
    x = torch.randn(B, N, D, device=device)
    pos = torch.randn(N, D, device=device)
    keep = torch.rand(B, N, device=device).argsort(1)[:, :n] if per_sample else torch.randperm(N, device=device)[:n]
    fn = functools.partial(drop_token_gather_reference, x, keep, pos=pos)
    _run(benchmark, fn, device, x, keep, pos, "reference eager")


def test_drop_token_gather_reference_compiled(benchmark, device):
    reason = inductor_error()
    if reason is not None:
        pytest.skip(f"torch.compile (inductor) does not work on this machine: {reason}")
    B, N, D, n = _case("tiny", device)
    x = torch.randn(B, N, D, device=device)
    pos = torch.randn(N, D, device=device)
    keep = torch.randperm(N, device=device)[:n]
    fn = functools.partial(torch.compile(drop_token_gather_reference, fullgraph=True), x, keep, pos=pos)
    _run(benchmark, fn, device, x, keep, pos, "reference torch.compile")
