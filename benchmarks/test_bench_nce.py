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

Implementations: ``reference`` (eager), ``reference-compiled`` (``torch.compile``; CUDA
only, at the paper's batch of 2048 rows only, to bound compile time: inductor takes minutes
on a 2-core CPU), ``chunked`` (the CPU default of ``impl="auto"``) and ``triton`` (CUDA only).

Memory-bound cases (``test_bench_nce_memory``), the issue's targets:

- CPU, ``B = 8192, K = 5, D = 256``, reference vs chunked. Opt-in: the reference needs
  14 GiB and half a minute per step, so it runs only with ``VATT_BENCH_LARGE=1``
  (``VATT_BENCH_LARGE=1 pytest benchmarks/test_bench_nce.py -k memory --benchmark-only``).
  Peak extra memory is measured in a fresh subprocess per implementation: the peak
  resident set (``VmHWM``, reset just before the call) after one forward + backward minus
  the resident set just before it, with the inputs already built (torch's CPU allocator is not seen by
  ``tracemalloc``; glibc returns these large blocks to the system, so the resident set
  follows the allocations; the figure includes allocator and page rounding, so it is an
  upper bound on what the op itself allocates). Correctness is checked with the parity
  rule at ``B = 512`` before the timing (a float64 reference at 8192 would need 28 GiB).
- CUDA: a rank's 256 local clips against a gathered batch of 2048 (gradients to the local
  and the gathered tensors), and a single-GPU batch of 16384; K = 5, D = 256; reference
  eager, reference compiled and Triton. Peak extra memory from
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict

import pytest
import torch
import torch.nn.functional as F
from bench_utils import assert_parity, device_name, inductor_error, record, sync, time_it

from vatt_fast.kernels import _dispatch
from vatt_fast.kernels.nce import mil_nce, mil_nce_reference
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


CASES = [(impl, op, rows) for impl in ("reference", "chunked", "triton") for op in ("nce", "mil_nce") for rows in (256, 2048)]
CASES += [("reference-compiled", op, 2048) for op in ("nce", "mil_nce")]


def _skip_unless_runs(impl: str, device: torch.device) -> None:
    if impl == "reference-compiled":
        if device.type != "cuda":
            pytest.skip("torch.compile of the reference is benchmarked on CUDA only (minutes to compile on a CPU)")
        reason = inductor_error(device)
        if reason is not None:
            pytest.skip(f"torch.compile (inductor) does not work on this machine: {reason}")
    if impl == "triton":
        if device.type != "cuda":
            pytest.skip("the Triton kernels are benchmarked on CUDA only (the CPU runs them in the interpreter)")
        if not _dispatch.has_triton("mil_nce"):
            pytest.skip("triton is not installed")


def _impl_fn(impl: str):
    """The per-clip loss function of an implementation: ``fn(video, text, mask, video_all=None, ...)``."""
    if impl == "reference":
        return mil_nce_reference
    if impl == "reference-compiled":
        return torch.compile(mil_nce_reference, dynamic=False)
    return lambda *args: mil_nce(*args, impl=impl)


@pytest.mark.parametrize("impl, op, rows", CASES, ids=[f"{i}-{o}-{r}" for i, o, r in CASES])
def test_bench_nce(benchmark, device, impl, op, rows):
    _skip_unless_runs(impl, device)
    shape = _shape(op, rows, device)
    video, text, mask = _inputs(shape, device)
    fn = _impl_fn(impl)

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


# --------------------------------------------------------------------------------------
# Memory: the targets (CPU B = 8192; CUDA 256 local vs 2048 global, and 16384)
# --------------------------------------------------------------------------------------
LARGE_ENV = "VATT_BENCH_LARGE"
# (name, local rows B, global rows N, K, D): the medium preset's video-text space (D = 256,
# K = 5 captions). cpu-8192: the CPU size. local256-global2048: one of 8 ranks at the
# paper's global batch of 2048. single-16384: one GPU holding a global batch of 16384.
MEMORY_SHAPES = {
    "cpu-8192": (8192, 8192, 5, 256),
    "local256-global2048": (256, 2048, 5, 256),
    "single-16384": (16384, 16384, 5, 256),
}
MEMORY_CASES = [("cpu-8192", impl) for impl in ("reference", "chunked")]
MEMORY_CASES += [(name, impl) for name in ("local256-global2048", "single-16384")
                 for impl in ("reference", "reference-compiled", "triton")]

_CPU_MEASURE = r"""
import json, sys, time
import torch
import torch.nn.functional as F
from vatt_fast.kernels.nce import mil_nce, mil_nce_reference

impl, b, k, d = sys.argv[1], *map(int, sys.argv[2:5])
torch.manual_seed(0)
video = F.normalize(torch.randn(b, d), dim=-1).requires_grad_(True)
text = F.normalize(torch.randn(b, k, d), dim=-1).requires_grad_(True)
mask = torch.rand(b, k) > 0.3
mask[:, 0] |= ~mask.any(dim=1)
mask[: b // 8] = False
fn = mil_nce_reference if impl == "reference" else (lambda *a: mil_nce(*a, impl=impl))


def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


try:  # reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
base, peak_before = status("VmRSS"), status("VmHWM")
t0 = time.perf_counter()
fn(video, text, mask).sum().backward()
seconds = time.perf_counter() - t0
print(json.dumps(dict(seconds=seconds, base=base, peak_before=peak_before, peak=status("VmHWM"))))
"""


def _cpu_peak_extra(impl: str, b: int, k: int, d: int) -> Dict[str, float]:
    """One forward + backward in a fresh process: its peak resident set (``VmHWM``, reset just
    before the call through ``/proc/self/clear_refs``; ``ru_maxrss`` would carry the parent's
    resident set over ``fork`` + ``exec``) above the resident set before it."""
    run = subprocess.run([sys.executable, "-c", _CPU_MEASURE, impl, str(b), str(k), str(d)],
                         capture_output=True, text=True, env=dict(os.environ))
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    # Where the reset is refused, a peak reached before the call counts against the op: an upper bound.
    res["peak_extra"] = max(res["peak"], res["peak_before"]) - res["base"]
    return res


def _memory_inputs(b: int, n: int, k: int, d: int, device: torch.device):
    """Local rows and, when ``n > b``, the gathered batch they are rows [0, b) of."""
    video_all, text_all, mask_all = _inputs(dict(N=n, K=k, D=d), device)
    if n == b:
        return (video_all, text_all, mask_all)
    return (video_all[:b].clone(), text_all[:b].clone(), mask_all[:b].clone(), video_all, text_all, mask_all)


def _fwd_bwd_all(fn, *inputs):
    """Per-clip losses and the gradients of every float input (local and gathered)."""
    leaves = [x.detach().requires_grad_(True) if x.is_floating_point() else x for x in inputs]
    per_clip = fn(*leaves)
    per_clip.sum().backward()
    return [per_clip.detach()] + [x.grad for x in leaves if x.is_floating_point()]


def _check_small(impl: str, device: torch.device, b: int, n: int, k: int, d: int) -> None:
    """Correctness before timing: parity rule against float64 on every output and gradient."""
    fn = _impl_fn(impl)
    inputs = _memory_inputs(b, n, k, d, device)
    got = _fwd_bwd_all(fn, *inputs)
    ref = _fwd_bwd_all(mil_nce_reference, *[x.double() if x.is_floating_point() else x for x in inputs])
    plain = _fwd_bwd_all(mil_nce_reference, *inputs)
    names = ("per-clip loss", "d video", "d text", "d video_all", "d text_all")
    for i, (name, g, r, p) in enumerate(zip(names, got, ref, plain)):
        assert_parity(g, r, p, ATOL_LOSS if i == 0 else ATOL_GRAD, f"{impl} {name}", plain_rtol=1e-3)


@pytest.mark.parametrize("case, impl", MEMORY_CASES, ids=[f"{c}-{i}" for c, i in MEMORY_CASES])
def test_bench_nce_memory(benchmark, device, case, impl):
    b, n, k, d = MEMORY_SHAPES[case]
    if (device.type == "cuda") != (case != "cpu-8192"):
        pytest.skip(f"{case} is a {'CPU' if case == 'cpu-8192' else 'CUDA'} case")
    _skip_unless_runs(impl, device)
    if device.type == "cpu":
        if os.environ.get(LARGE_ENV) != "1":
            pytest.skip(f"the reference at B=8192 needs ~6.4 GiB and ~23 s per step on 2 cores; set {LARGE_ENV}=1 to run it")
        _check_small(impl, device, 512, 512, k, d)
        mem = _cpu_peak_extra(impl, b, k, d)
        inputs = _memory_inputs(b, n, k, d, device)
        fn = _impl_fn(impl)
        time_it(benchmark, lambda: _fwd_bwd_all(fn, *inputs), device, rounds=2, warmup_rounds=0)
        extra = dict(peak_extra_gib=round(mem["peak_extra"] / 2**30, 3), subprocess_step_s=round(mem["seconds"], 2),
                     memory_method="fresh process: VmHWM after one fwd+bwd (reset before it) minus VmRSS before it")
    else:
        _check_small(impl, device, 256, 2048, k, d)
        inputs = _memory_inputs(b, n, k, d, device)
        fn = _impl_fn(impl)
        _fwd_bwd_all(fn, *inputs)  # warm up (compiles)
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _fwd_bwd_all(fn, *inputs)
        sync(device)
        peak_extra = torch.cuda.max_memory_allocated(device) - base
        time_it(benchmark, lambda: _fwd_bwd_all(fn, *inputs), device, rounds=10, warmup_rounds=2)
        extra = dict(peak_extra_gib=round(peak_extra / 2**30, 3),
                     memory_method="torch.cuda.max_memory_allocated during one fwd+bwd minus allocated before")
    record(
        benchmark,
        flops=3 * 2 * b * (n * k) * d,  # as above: one B x (N*K) x D product forward, backward 2x
        device=device_name(device), impl=impl, shape=f"B={b} N={n} K={k} D={d}", dtype="fp32", **extra,
    )
