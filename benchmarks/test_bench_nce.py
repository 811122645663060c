"""NCE / MIL-NCE per-clip losses (vatt_fast.kernels.nce), forward + backward.

Run: ``pytest benchmarks/test_bench_nce.py --benchmark-only``. Each case first checks the
per-clip losses and both input gradients with STYLE.md's parity rule: the reference is an
independent float64 computation (the released ``cat(x, x^T)`` form on an explicit
``[N, N, K]`` logits tensor), the comparator the same explicit computation in fp32 on the
same device. Then it is timed.

``extra_info`` holds TFLOP/s counted as ``vatt_fast.flops`` counts the loss: one
``N x (N*K) x D`` similarity product forward (``2 * N * N*K * D`` FLOPs; the row and column
halves reuse it), backward twice the forward, so ``6 * N * N*K * D`` per step; GB/s of the
minimal traffic a fused kernel must move (read the embeddings, write their gradients, fp32);
and the device.

Implementations: ``reference`` (eager) and ``reference-compiled`` (``torch.compile``; CUDA
only, at the paper's batch of 2048 rows only, to bound compile time: inductor takes minutes
on a 2-core CPU). The Triton kernel gets its own case when it is registered for op ``"mil_nce"``.
"""

from __future__ import annotations

from typing import Dict

import pytest
import torch
import torch.nn.functional as F
from bench_utils import assert_parity, device_name, inductor_error, record, time_it

from vatt_fast.kernels.nce import mil_nce_reference
from vatt_fast.models.config import get_config

# Parity floors (fp32): per-clip losses are ~log(2 N K) <= 10, gradient entries <= ~10.
ATOL_LOSS, ATOL_GRAD = 1e-5, 1e-5


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
    """Per-clip losses (0 for clips without a caption) from an explicit [N, N, K] logits tensor,
    in the inputs' dtype."""
    n, k, _ = text.shape
    mask = torch.ones(n, k, dtype=torch.bool, device=video.device) if mask is None else mask
    x = torch.einsum("id,jkd->ijk", video, text) / tau  # video i vs caption k of clip j
    neg = float("-inf")
    row = x.masked_fill(~mask[None], neg).reshape(n, n * k)
    col = x.permute(1, 0, 2).masked_fill(~mask[:, None, :], neg).reshape(n, n * k)
    idx = torch.arange(n, device=x.device)
    diag = x[idx, idx].masked_fill(~mask, neg)  # (N, K) positives
    valid = mask.any(dim=1)
    loss = torch.logsumexp(torch.cat([row, col], dim=1), dim=1) - torch.logsumexp(diag, dim=1)
    return torch.where(valid, loss, torch.zeros_like(loss))


def _fwd_bwd(fn, video, text, mask):
    video, text = video.detach().requires_grad_(True), text.detach().requires_grad_(True)
    per_clip = fn(video, text, mask)
    per_clip.sum().backward()
    return per_clip.detach(), video.grad, text.grad


CASES = [(impl, op, rows) for impl in ("reference",) for op in ("nce", "mil_nce") for rows in (256, 2048)]
CASES += [("reference-compiled", op, 2048) for op in ("nce", "mil_nce")]


@pytest.mark.parametrize("impl, op, rows", CASES, ids=[f"{i}-{o}-{r}" for i, o, r in CASES])
def test_bench_nce(benchmark, device, impl, op, rows):
    if impl == "reference-compiled":
        if device.type != "cuda":
            pytest.skip("torch.compile of the reference is benchmarked on CUDA only (minutes to compile on a CPU)")
        reason = inductor_error(device)
        if reason is not None:
            pytest.skip(f"torch.compile (inductor) does not work on this machine: {reason}")
    shape = _shape(op, rows, device)
    video, text, mask = _inputs(shape, device)
    fn = torch.compile(mil_nce_reference, dynamic=False) if impl == "reference-compiled" else mil_nce_reference

    # Correctness first: losses and both input gradients, parity rule against fp64.
    got = _fwd_bwd(fn, video, text, mask)
    ref = _fwd_bwd(_independent, video.double(), text.double(), mask)
    plain = _fwd_bwd(_independent, video, text, mask)
    valid = torch.ones(shape["N"], dtype=torch.bool, device=device) if mask is None else mask.any(dim=1)
    assert torch.all(got[0][~valid] == 0), "clips without a caption must have loss 0"
    for name, g, r, p, atol in zip(("per-clip loss", "video grad", "text grad"), got, ref, plain,
                                   (ATOL_LOSS, ATOL_GRAD, ATOL_GRAD)):
        assert_parity(g, r, p, atol, f"{impl} {op} {name}", plain_rtol=1e-3)
    del got, ref, plain

    time_it(benchmark, lambda: _fwd_bwd(fn, video, text, mask), device,
            rounds=20 if device.type == "cuda" else 3, warmup_rounds=2 if device.type == "cuda" else 1)
    n, k, d = shape["N"], shape["K"], shape["D"]
    record(
        benchmark,
        flops=3 * 2 * n * (n * k) * d,  # forward one N x (N*K) x D product, backward 2x (vatt_fast.flops)
        bytes_moved=2 * 4 * (n * d + n * k * d),  # read video + text, write their gradients (fp32)
        device=device_name(device), op=op, impl=impl, shape=f"N={n} K={k} D={d} (from {rows} rows)",
    )
