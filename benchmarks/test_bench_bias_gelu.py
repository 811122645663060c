"""bias_gelu_dropout benchmarks, forward + backward as a training step runs it: the PyTorch reference
eager and under torch.compile, and the Triton kernel (CUDA only).

Shapes (``_case``): on CUDA the medium preset's video-tower MLP hidden activation at batch 64 after
DropToken 0.5 (``64 * 784`` tokens by ``mlp_dim`` 4096, bf16); on the CPU the tiny preset's (32 clips,
32 kept tokens, ``mlp_dim`` 512, fp32). Dropout 0.1 (VATT pretraining). The bias has the product's
dtype, as autocast hands it to ``nn.Linear``, so the eager reference runs in bf16 like today's model.

Each benchmark first checks the output, ``dx`` and ``dbias`` with STYLE.md's parity rule (float64
reference, plain = the eager reference in the benchmark's dtype), all with the same seed and so the
same dropout mask, then is timed. The eager reference is timed with ``seed=None``, i.e. ``F.dropout``
(today's model path, the fair baseline); the compiled reference and the kernel are timed exactly as
checked. GB/s counts what a fused forward + backward must move: read ``x``, write ``out``; read
``dout``, ``x``, write ``dx`` (5 ``M x H`` tensors; the ``[H]`` bias and partial sums are negligible).
Peak extra memory of one call on CUDA in ``extra_info``.
Run with ``pytest benchmarks/test_bench_bias_gelu.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch
from bench_utils import assert_parity, device_name, inductor_error, peak_extra_mb, record, time_it

from vatt_fast.kernels import _dispatch
from vatt_fast.kernels.bias_gelu import bias_gelu_dropout, bias_gelu_dropout_reference
from vatt_fast.models.config import get_config

P = 0.1
ATOL = {torch.float32: 1e-5, torch.bfloat16: 4e-2}


def _case(device: torch.device):
    """(M, H, dtype): medium video MLP at batch 64 on CUDA, tiny at its batch of 32 on the CPU."""
    cfg = get_config("medium" if device.type == "cuda" else "tiny")
    batch = 64 if device.type == "cuda" else cfg.batch_size
    n_keep = int(cfg.num_video_tokens * (1 - cfg.drop_token))  # 784 (medium), 32 (tiny)
    return batch * n_keep, cfg.video_encoder.mlp_dim, (torch.bfloat16 if device.type == "cuda" else torch.float32)


def _inputs(device):
    M, H, dtype = _case(device)
    leaves = [torch.randn(M, H, device=device, dtype=dtype), 0.1 * torch.randn(H, device=device, dtype=dtype)]
    leaves = [t.requires_grad_() for t in leaves]
    grad = torch.randn(M, H, device=device, dtype=dtype)
    seed = torch.randint(0, 2**62, (1,), device=device)
    return leaves, grad, seed


def _fwd_bwd(op, leaves, grad, seed):
    out = op(*leaves, P, True, seed)
    return (out,) + torch.autograd.grad(out, leaves, grad)


def _check(op, leaves, grad, seed):
    """Output and gradients of ``op`` (one call, seed given) against float64 with the parity rule."""
    dtype = leaves[0].dtype
    got = _fwd_bwd(op, leaves, grad, seed)
    plain = _fwd_bwd(bias_gelu_dropout_reference, leaves, grad, seed)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = _fwd_bwd(bias_gelu_dropout_reference, leaves64, grad.double(), seed)
    for name, g, p, r in zip(("out", "dx", "dbias"), got, plain, ref):
        assert g.dtype == dtype
        # dbias sums M rows to values of ~100: the floor is relative to its size there (an absolute
        # 1e-5 is one fp32 ulp at 76, below what any summation order of M terms can promise; eager's
        # pairwise sum happens to be near-exact, Inductor's CPU reduction is ~5x off it).
        floor = ATOL[dtype] * (max(1.0, r.abs().max().item()) if name == "dbias" else 1.0)
        assert_parity(g, r, p, floor, name=name)
    del got, plain, ref, leaves64


def _run(benchmark, fn, device, leaves, impl, mask):
    M, H = leaves[0].shape
    peak = peak_extra_mb(fn, device)
    time_it(benchmark, fn, device, rounds=20 if device.type == "cuda" else 10, warmup_rounds=2)
    record(
        benchmark, bytes_moved=5 * M * H * leaves[0].element_size(), device=device_name(device), impl=impl,
        dtype=str(leaves[0].dtype), shape=f"M={M} H={H} dropout={P}", dropout_mask=mask, peak_extra_mb=peak,
    )


def test_bias_gelu_dropout_reference_eager(benchmark, device):
    leaves, grad, seed = _inputs(device)
    _check(bias_gelu_dropout_reference, leaves, grad, seed)
    _run(benchmark, lambda: _fwd_bwd(bias_gelu_dropout_reference, leaves, grad, None), device, leaves,
         "reference eager", "F.dropout (seed=None)")


def test_bias_gelu_dropout_reference_compiled(benchmark, device):
    reason = inductor_error(device)
    if reason is not None:
        pytest.skip(f"torch.compile (inductor) does not work on this machine: {reason}")
    torch._dynamo.reset()
    leaves, grad, seed = _inputs(device)
    op = torch.compile(bias_gelu_dropout_reference, fullgraph=True)
    _check(op, leaves, grad, seed)
    _run(benchmark, lambda: _fwd_bwd(op, leaves, grad, seed), device, leaves, "reference torch.compile",
         "philox(seed), integer ops fused by Inductor")


def test_bias_gelu_dropout_triton(benchmark, device):
    if device.type != "cuda":
        pytest.skip("the Triton kernel is timed on CUDA only (on the CPU it runs in the interpreter, see tests/)")
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    leaves, grad, seed = _inputs(device)

    def op(*args):
        return bias_gelu_dropout(*args, impl="triton")

    _check(op, leaves, grad, seed)
    _run(benchmark, lambda: _fwd_bwd(op, leaves, grad, seed), device, leaves, "triton", "philox(seed) in the kernel")
