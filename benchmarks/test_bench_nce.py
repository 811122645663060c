"""NCE / MIL-NCE per-clip losses (vatt_fast.kernels.nce), forward + backward.

Run: ``pytest benchmarks/test_bench_nce.py --benchmark-only``. Each case first checks
the per-clip losses and the input gradients against an independent fp64 computation
(the released ``cat(x, x^T)`` form on an explicit ``[N, N, K]`` logits tensor), then
is timed. ``extra_info`` holds TFLOP/s (the reference does six ``B x N*K x D`` matmuls
forward + backward: ``12 * B * N * K * D`` FLOPs), GB/s of the minimal traffic a fused
kernel must move (read the embeddings, write their gradients, fp32), and the device.

Implementations: ``reference`` (eager) and ``reference-compiled`` (``torch.compile``;
CUDA only: inductor takes minutes to compile it on a 2-core CPU). The Triton kernel
gets its own case when it is registered for op ``"nce"``.
"""

from __future__ import annotations

import platform
from typing import Dict

import pytest
import torch
import torch.nn.functional as F

from vatt_fast.kernels.nce import mil_nce_reference
from vatt_fast.models.config import get_config


def _shape(op: str, rows: int, device: torch.device) -> Dict[str, int]:
    cfg = get_config("medium")
    # medium preset (paper MBS): S_va is 512-d (NCE, one positive), S_vt 256-d with
    # K = 5 captions (MIL-NCE). Global batch: 256 rows (e.g. 8 GPUs x 32) and the
    # paper's 2048 (cfg.batch_size), all on one device as a single process computes it.
    d, k = (cfg.va_dim, 1) if op == "nce" else (cfg.vt_dim, cfg.num_captions)
    if device.type != "cuda":
        rows = rows // 4  # CPU: a quarter of the rows keeps the suite short on two cores
    return dict(N=rows, K=k, D=d)


def _inputs(shape: Dict[str, int], device: torch.device):
    n, k, d = shape["N"], shape["K"], shape["D"]
    video = F.normalize(torch.randn(n, d, device=device), dim=-1)
    text = F.normalize(torch.randn(n, k, d, device=device), dim=-1)
    mask = None
    if k > 1:
        mask = torch.rand(n, k, device=device) > 0.3  # holes, as with short ASR transcripts
        mask[:, 0] |= ~mask.any(dim=1)
        mask[: n // 8] = False  # an AudioSet-like share of clips without text
    return video, text, mask


def _independent(video, text, mask, tau=0.07):
    """fp64 per-clip losses of the valid clips, from an explicit [N, N, K] logits tensor."""
    v, t = video.double(), text.double()
    n, k, _ = t.shape
    mask = torch.ones(n, k, dtype=torch.bool, device=v.device) if mask is None else mask
    x = torch.einsum("id,jkd->ijk", v, t) / tau  # video i vs caption k of clip j
    neg = float("-inf")
    row = x.masked_fill(~mask[None], neg).reshape(n, n * k)
    col = x.permute(1, 0, 2).masked_fill(~mask[:, None, :], neg).reshape(n, n * k)
    diag = x[torch.arange(n), torch.arange(n)].masked_fill(~mask, neg)  # (N, K) positives
    valid = mask.any(dim=1)
    loss = torch.logsumexp(torch.cat([row, col], dim=1), dim=1) - torch.logsumexp(diag, dim=1)
    return loss[valid], valid


def _fwd_bwd(fn, video, text, mask):
    video, text = video.detach().requires_grad_(True), text.detach().requires_grad_(True)
    per_clip = fn(video, text, mask)
    per_clip.sum().backward()
    return per_clip.detach(), video.grad, text.grad


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@pytest.mark.parametrize("rows", [256, 2048])
@pytest.mark.parametrize("op", ["nce", "mil_nce"])
@pytest.mark.parametrize("impl", ["reference", "reference-compiled"])
def test_bench_nce(benchmark, device, impl, op, rows):
    if impl == "reference-compiled" and device.type != "cuda":
        pytest.skip("torch.compile of the reference is benchmarked on CUDA only (minutes to compile on a CPU)")
    shape = _shape(op, rows, device)
    video, text, mask = _inputs(shape, device)
    fn = torch.compile(mil_nce_reference) if impl == "reference-compiled" else mil_nce_reference

    # Correctness first: losses and both input gradients against fp64.
    loss, gv, gt = _fwd_bwd(fn, video, text, mask)
    v64, t64 = video.double().requires_grad_(True), text.double().requires_grad_(True)
    expected, valid = _independent(v64, t64, mask)
    expected.sum().backward()
    assert torch.all(loss[~valid] == 0)
    torch.testing.assert_close(loss[valid].double(), expected.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gv.double(), v64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gt.double(), t64.grad, rtol=1e-4, atol=1e-4)
    del v64, t64, expected

    def step():
        result = _fwd_bwd(fn, video, text, mask)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result

    benchmark.pedantic(step, rounds=20 if device.type == "cuda" else 5, warmup_rounds=1)
    n, k, d = shape["N"], shape["K"], shape["D"]
    flops = 12 * n * n * k * d
    min_bytes = 2 * 4 * (n * d + n * k * d)  # read video + text, write their gradients (fp32)
    benchmark.extra_info.update(
        device=_device_name(device), op=op, impl=impl, shape=f"N={n} K={k} D={d} (from {rows} rows)"
    )
    if benchmark.stats is not None:  # None under --benchmark-disable
        mean = benchmark.stats.stats.mean
        benchmark.extra_info["tflops"] = flops / mean / 1e12
        benchmark.extra_info["gbps"] = min_bytes / mean / 1e9
