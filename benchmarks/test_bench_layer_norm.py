"""dropout_add_layer_norm benchmarks, forward + backward as a training step runs it: the PyTorch
reference eager and under torch.compile, and the Triton kernel (CUDA only).

Shapes (``_case``): on CUDA the medium preset's video tower at batch 64 after DropToken 0.5
(``64 * 784`` tokens of width 1024, bf16); on the CPU the tiny preset's (32 clips, 32 kept
tokens of width 128, fp32). Dropout 0.1 on the branch, a residual, ``prenorm=True``.

Each benchmark first checks ``y``, ``h`` and the four gradients with STYLE.md's parity rule
(float64 reference, plain = the eager reference in the benchmark's dtype), all with the same
seed and so the same dropout mask, then is timed. The eager reference is timed with ``seed=None``,
i.e. ``F.dropout`` (today's model path, the fair baseline; only the mask's source differs from
the checked call); the compiled reference and the kernel are timed exactly as checked. GB/s
counts what a fused forward + backward must move: read ``x``, ``residual``, write ``y``, ``h``;
read ``dy``, ``dh``, ``h``, write ``dx``, ``dresidual`` (9 ``M x D`` tensors; the ``[D]`` vectors
and fp32 row statistics are negligible). Peak extra memory of one call on CUDA in ``extra_info``.
Run with ``pytest benchmarks/test_bench_layer_norm.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch
from bench_utils import assert_parity, device_name, inductor_error, peak_extra_mb, record, time_it

from vatt_fast.kernels import _dispatch
from vatt_fast.kernels.layer_norm import dropout_add_layer_norm, dropout_add_layer_norm_reference
from vatt_fast.models.config import get_config

P = 0.1
ATOL = {torch.float32: 1e-5, torch.bfloat16: 4e-2}


def _case(device: torch.device):
    """(M, D, dtype): medium video tokens at batch 64 on CUDA, tiny at its batch of 32 on the CPU."""
    cfg = get_config("medium" if device.type == "cuda" else "tiny")
    batch = 64 if device.type == "cuda" else cfg.batch_size
    n_keep = int(cfg.num_video_tokens * (1 - cfg.drop_token))  # 784 (medium), 32 (tiny)
    return batch * n_keep, cfg.video_encoder.dim, (torch.bfloat16 if device.type == "cuda" else torch.float32)


def _inputs(device):
    M, D, dtype = _case(device)
    leaves = [torch.randn(M, D, device=device, dtype=dtype) for _ in range(2)]
    leaves += [1 + 0.1 * torch.randn(D, device=device, dtype=dtype), 0.1 * torch.randn(D, device=device, dtype=dtype)]
    leaves = [t.requires_grad_() for t in leaves]
    grads = [torch.randn(M, D, device=device, dtype=dtype) for _ in range(2)]  # dy, dh
    seed = torch.randint(0, 2**62, (1,), device=device)
    return leaves, grads, seed


def _fwd_bwd(op, leaves, grads, seed):
    y, h = op(*leaves, P, 1e-6, True, seed, True)
    return (y, h) + torch.autograd.grad((y, h), leaves, grads)


def _check(op, leaves, grads, seed):
    """Outputs and gradients of ``op`` (one call, seed given) against float64 with the parity rule."""
    dtype = leaves[0].dtype
    got = _fwd_bwd(op, leaves, grads, seed)
    plain = _fwd_bwd(dropout_add_layer_norm_reference, leaves, grads, seed)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = _fwd_bwd(dropout_add_layer_norm_reference, leaves64, [g.double() for g in grads], seed)
    for name, g, p, r in zip(("y", "h", "dx", "dresidual", "dweight", "dbias"), got, plain, ref):
        assert g.dtype == dtype
        assert_parity(g, r, p, ATOL[dtype], name=name)
    del got, plain, ref, leaves64


def _run(benchmark, fn, device, leaves, impl, mask):
    M, D = leaves[0].shape
    peak = peak_extra_mb(fn, device)
    time_it(benchmark, fn, device, rounds=20 if device.type == "cuda" else 10, warmup_rounds=2)
    record(
        benchmark, bytes_moved=9 * M * D * leaves[0].element_size(), device=device_name(device), impl=impl,
        dtype=str(leaves[0].dtype), shape=f"M={M} D={D} dropout={P} residual prenorm", dropout_mask=mask,
        peak_extra_mb=peak,
    )


def test_dropout_add_layer_norm_reference_eager(benchmark, device):
    leaves, grads, seed = _inputs(device)
    _check(dropout_add_layer_norm_reference, leaves, grads, seed)
    _run(benchmark, lambda: _fwd_bwd(dropout_add_layer_norm_reference, leaves, grads, None), device, leaves,
         "reference eager", "F.dropout (seed=None)")


def test_dropout_add_layer_norm_reference_compiled(benchmark, device):
    reason = inductor_error(device)
    if reason is not None:
        pytest.skip(f"torch.compile (inductor) does not work on this machine: {reason}")
    torch._dynamo.reset()
    leaves, grads, seed = _inputs(device)
    op = torch.compile(dropout_add_layer_norm_reference, fullgraph=True)
    _check(op, leaves, grads, seed)
    _run(benchmark, lambda: _fwd_bwd(op, leaves, grads, seed), device, leaves, "reference torch.compile",
         "philox(seed), integer ops fused by Inductor")


def test_dropout_add_layer_norm_triton(benchmark, device):
    if device.type != "cuda":
        pytest.skip("the Triton kernel is timed on CUDA only (on the CPU it runs in the interpreter, see tests/)")
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    leaves, grads, seed = _inputs(device)

    def op(*args):
        return dropout_add_layer_norm(*args, impl="triton")

    _check(op, leaves, grads, seed)
    _run(benchmark, lambda: _fwd_bwd(op, leaves, grads, seed), device, leaves, "triton", "philox(seed) in the kernel")
