"""Attention backends, forward + backward of the softmax(QK^T)V core.

Run: ``pytest benchmarks/test_bench_attention.py --benchmark-only``. Every backend
first passes a parity check against an fp64 computation (the flash-attention rule:
its error at most twice the math backend's in the same dtype, plus a small atol),
then is timed. ``extra_info`` holds TFLOP/s (forward 4*B*H*N^2*d, backward 2.5x
the forward, the flash-attention convention) and the device name.
"""

import platform
from typing import Dict

import pytest
import torch

from vatt_fast.models.config import get_config
from vatt_fast.nn.attention import attention, available_backends, padding_mask_to_bias, resolve_backend


def _shape(preset: str, device: torch.device) -> Dict[str, int]:
    cfg = get_config(preset)
    enc = cfg.video_encoder
    heads, head_dim = enc.num_heads, enc.dim // enc.num_heads
    if preset == "tiny":
        # tiny preset video encoder: 64 tokens (no DropToken) + the agg token, batch 8.
        return dict(B=8, N=cfg.num_video_tokens + 1, H=heads, D=head_dim)
    # base preset video encoder in pretraining: 1568 tokens, DropToken 0.5 -> 784 + agg token.
    tokens = int(cfg.num_video_tokens * (1 - cfg.drop_token)) + 1
    if device.type == "cuda":
        return dict(B=32, N=tokens, H=heads, D=head_dim)
    # CPU: a quarter of the tokens and batch 2, to keep the suite fast on two cores.
    return dict(B=2, N=tokens // 4, H=heads, D=head_dim)


def _inputs(shape, dtype, device, with_bias):
    B, N, H, D = shape["B"], shape["N"], shape["H"], shape["D"]
    q, k, v, grad_out = (torch.randn(B, N, H, D, device=device) for _ in range(4))
    bias = None
    if with_bias:
        # text-encoder style: a learned per-head relative bias plus key padding
        keep = torch.rand(B, N, device=device) > 0.2
        keep[:, 0] = True
        bias = torch.randn(1, H, N, N, device=device) + padding_mask_to_bias(keep)
    return q.to(dtype), k.to(dtype), v.to(dtype), grad_out.to(dtype), bias


def _fwd_bwd(q, k, v, grad_out, bias, backend):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = attention(q, k, v, bias, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return (out,) + grads


def _max_errors(results, reference):
    return [(r.double() - ref).abs().max().item() for r, ref in zip(results, reference)]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("preset", ["tiny", "base"])
@pytest.mark.parametrize("backend", available_backends())
def test_bench_attention(benchmark, device, backend, preset, with_bias):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = _shape(preset, device)
    q, k, v, grad_out, bias = _inputs(shape, dtype, device, with_bias)
    try:
        resolve_backend(backend, q, with_bias)
    except (RuntimeError, ValueError) as err:
        pytest.skip(str(err))

    reference = _fwd_bwd(*(t.double() for t in (q, k, v, grad_out)), bias, "math")
    baseline = _max_errors(_fwd_bwd(q, k, v, grad_out, bias, "math"), reference)
    errors = _max_errors(_fwd_bwd(q, k, v, grad_out, bias, backend), reference)
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, err, base in zip(("out", "dq", "dk", "dv"), errors, baseline):
        assert err <= 2 * base + atol, f"{backend} {preset}: {name} error {err:.3g} vs math {base:.3g}"

    def step():
        result = _fwd_bwd(q, k, v, grad_out, bias, backend)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result

    # fixed rounds: the CPU suite must stay short; one warm-up round first
    benchmark.pedantic(step, rounds=20 if device.type == "cuda" else 5, warmup_rounds=1)
    B, N, H, D = shape["B"], shape["N"], shape["H"], shape["D"]
    flops = 3.5 * 4 * B * H * N * N * D  # forward + backward (2.5x forward)
    benchmark.extra_info.update(
        device=_device_name(device), dtype=str(dtype).replace("torch.", ""), shape=f"B={B} N={N} H={H} d={D}"
    )
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.mean / 1e12
