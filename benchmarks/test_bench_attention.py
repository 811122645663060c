"""Attention backends, forward + backward of the softmax(QK^T)V core.

Run: ``pytest benchmarks/test_bench_attention.py --benchmark-only``. Every backend is first
checked against an explicit float64 ``softmax(Q K^T / sqrt(d) + bias) V`` written here (not
the library's ``math`` backend), for the output and the three input gradients, with
STYLE.md's parity rule: its error at most twice that of the same explicit computation in
the benchmark's dtype (bf16 on CUDA, fp32 on the CPU) on the same device, plus a small
atol, without dropout. Then it is timed, with attention dropout 0 or 0.1 (pretraining's; a
backend without dropout, such as flash_attn_4, is skipped there: that is the cost of the
dropout). ``extra_info`` holds TFLOP/s (forward 4*B*H*N^2*d, backward 2.5x
the forward, the flash-attention convention) and the device name.
"""

from typing import Dict

import pytest
import torch
from bench_utils import assert_parity, device_name, record, time_it

from vatt_fast.models.config import get_config
from vatt_fast.nn.attention import attention, available_backends, padding_mask_to_bias, resolve_backend

# Floor of the parity bound, and how far the plain comparator itself may be from float64
# (relative to the largest reference value) before the comparison is declared broken.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
PLAIN_RTOL = {torch.float32: 1e-4, torch.bfloat16: 0.1}


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


def _explicit_attention(q, k, v, bias):
    """softmax(q k^T / sqrt(d) + bias) v in q's dtype, every step spelled out; [B, N, H, d] in and out."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
    scores = (qt @ kt.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, N, N)
    if bias is not None:
        scores = scores + bias.to(q.dtype)
    return (scores.softmax(dim=-1) @ vt).transpose(1, 2)  # (B, N, H, d)


def _fwd_bwd(fn, q, k, v, grad_out):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return (out,) + grads


@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("preset", ["tiny", "base"])
@pytest.mark.parametrize("backend", available_backends())
def test_bench_attention(benchmark, device, backend, preset, with_bias, dropout_p):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = _shape(preset, device)
    if dropout_p and device.type != "cuda" and preset != "tiny":
        pytest.skip("attention dropout is timed on CUDA, and at tiny shapes on the CPU (keeps the CPU suite short)")
    q, k, v, grad_out, bias = _inputs(shape, dtype, device, with_bias)
    try:
        resolve_backend(backend, q, with_bias, dropout=dropout_p > 0)
    except (RuntimeError, ValueError) as err:
        pytest.skip(f"backend {backend!r} cannot serve this case: {err}")

    def run_backend(q_, k_, v_):
        return attention(q_, k_, v_, bias, backend=backend)

    reference = _fwd_bwd(lambda *t: _explicit_attention(*t, bias), *(t.double() for t in (q, k, v, grad_out)))
    plain = _fwd_bwd(lambda *t: _explicit_attention(*t, bias), q, k, v, grad_out)
    got = _fwd_bwd(run_backend, q, k, v, grad_out)
    for name, g, ref, p in zip(("out", "dq", "dk", "dv"), got, reference, plain):
        assert_parity(g, ref, p, ATOL[dtype], f"{backend} {preset} {name}", plain_rtol=PLAIN_RTOL[dtype])
    del reference, plain, got

    # Checked without dropout (a dropout mask is each backend's own draw); timed as parametrised:
    # VATT pretraining runs attention dropout 0.1, which some kernels serve more slowly or not at all.
    def run_timed(q_, k_, v_):
        return attention(q_, k_, v_, bias, dropout_p=dropout_p, backend=backend)

    time_it(benchmark, lambda: _fwd_bwd(run_timed, q, k, v, grad_out), device,
            rounds=20 if device.type == "cuda" else 3, warmup_rounds=2 if device.type == "cuda" else 1)
    B, N, H, D = shape["B"], shape["N"], shape["H"], shape["D"]
    record(
        benchmark,
        flops=3.5 * 4 * B * H * N * N * D,  # forward + backward (2.5x forward)
        device=device_name(device), backend=backend, dtype=str(dtype).replace("torch.", ""),
        shape=f"B={B} N={N} H={H} d={D}", dropout_p=dropout_p, bias=with_bias,
    )
