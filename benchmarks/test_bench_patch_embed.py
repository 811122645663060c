"""patch_embed benchmarks: the PyTorch reference, eager and under torch.compile, and the
fused Triton kernel (CUDA only), forward alone and forward plus backward.

Each benchmark first checks its output with STYLE.md's parity rule: the reference is
``F.conv3d`` / ``F.conv1d`` on the explicitly normalised input in float64, the comparator
the same convolution in fp32 on the same device (cuDNN runs it in TF32 on CUDA by default,
and the bound admits exactly that). Then it is timed; ``extra_info`` holds GB/s (bytes the
op must move), TFLOP/s and the device.
Run with ``pytest benchmarks/test_bench_patch_embed.py --benchmark-only``.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional

import pytest
import torch
import torch.nn.functional as F
from bench_utils import assert_parity, device_name, inductor_error, record, time_it

from vatt_fast.kernels._dispatch import triton_available
from vatt_fast.kernels.patch_embed import patch_embed, patch_embed_reference
from vatt_fast.models.config import get_config

SCALE, SHIFT = 1.0 / 127.5, -1.0
# fp32 parity floor, relative to the largest output: the reference folds the pixel affine into
# the weights and sums raw pixels (up to 255) against them, a little more rounding than the
# convolution of the normalised video.
ATOL_REL = 1e-5


def _video_case(preset: str, batch: int, frames: Optional[int] = None) -> Dict[str, object]:
    cfg = get_config(preset)
    t, h, w = cfg.video_patch
    T = frames or cfg.num_frames
    return dict(B=batch, T=T, H=cfg.frame_size, W=cfg.frame_size, C=3, patch=(t, h, w),
                D=cfg.video_encoder.dim, drop=cfg.drop_token)


def _video_cases(device: torch.device) -> Dict[str, Dict[str, object]]:
    on_gpu = device.type == "cuda"
    return {
        # tiny preset: 8 frames of 32x32, tubelets 2x8x8, D=128, its training batch of 32 -> 64 tokens per clip.
        "tiny": _video_case("tiny", batch=32),
        # base preset (VATT-Base video: 32 frames of 224x224, 4x16x16, D=768 -> 1568 tokens). On CPU scaled
        # down to one clip of 8 frames (392 tokens) to keep the run short; the full clip, batch 16, on CUDA.
        "base": _video_case("base", batch=16) if on_gpu else _video_case("base", batch=1, frames=8),
    }


def _conv3d_tokens(x, weight, bias, pos, keep, dtype):
    """Independent: normalise the whole video in ``dtype``, Conv3d, flatten, add pos, gather."""
    xf = x.to(dtype) * SCALE + SHIFT
    out = F.conv3d(xf.permute(0, 4, 1, 2, 3), weight.to(dtype), bias.to(dtype), stride=tuple(weight.shape[2:]))
    out = out.flatten(2).transpose(1, 2) + pos.to(dtype)  # (B, N, D)
    return out if keep is None else out[:, keep]


def _check_video(out, x, weight, bias, pos, keep, name):
    ref = _conv3d_tokens(x, weight, bias, pos, keep, torch.float64)
    plain = _conv3d_tokens(x, weight, bias, pos, keep, torch.float32)
    assert_parity(out, ref, plain, ATOL_REL * ref.abs().max().item(), name, plain_rtol=1e-2)


def _video_inputs(case, device, with_keep):
    B, T, H, W, C = case["B"], case["T"], case["H"], case["W"], case["C"]
    t, h, w = case["patch"]
    D = case["D"]
    N = (T // t) * (H // h) * (W // w)
    x = torch.randint(0, 256, (B, T, H, W, C), dtype=torch.uint8, device=device)
    weight = torch.randn(D, C, t, h, w, device=device) * 0.02
    bias = torch.randn(D, device=device)
    pos = torch.randn(N, D, device=device) * 0.02
    keep = torch.randperm(N, device=device)[: int(N * (1 - case["drop"]))] if with_keep else None
    return x, weight, bias, pos, keep


def _record_video(benchmark, case, keep, N, device, impl):
    B, C, D = case["B"], case["C"], case["D"]
    t, h, w = case["patch"]
    K = C * t * h * w
    n_out = N if keep is None else keep.numel()
    # Must move: the kept uint8 patches, the fp32 weight, pos rows and bias, the fp32 output.
    bytes_moved = B * n_out * K * 1 + K * D * 4 + n_out * D * 4 + D * 4 + B * n_out * D * 4
    record(
        benchmark, flops=2 * B * n_out * K * D, bytes_moved=bytes_moved, device=device_name(device), impl=impl,
        shape=f"B={B} T={case['T']} HxW={case['H']}x{case['W']} patch={case['patch']} D={D} tokens={n_out}/{N}",
    )


@pytest.mark.parametrize("drop", [False, True], ids=["all_tokens", "droptoken0.5"])
@pytest.mark.parametrize("shape", ["tiny", "base"])
def test_patch_embed_video_reference_eager(benchmark, device, shape, drop):
    case = _video_cases(device)[shape]
    x, weight, bias, pos, keep = _video_inputs(case, device, drop)
    fn = functools.partial(patch_embed_reference, x, weight, bias, pos=pos, keep=keep, scale=SCALE, shift=SHIFT)
    _check_video(fn(), x, weight, bias, pos, keep, f"video {shape} eager")
    time_it(benchmark, fn, device, rounds=10 if device.type == "cuda" else 3, warmup_rounds=2)
    _record_video(benchmark, case, keep, pos.shape[0], device, "reference eager")


def test_patch_embed_video_reference_compiled(benchmark, device):
    reason = inductor_error(device)
    if reason is not None:
        pytest.skip(f"torch.compile (inductor) does not work on this machine: {reason}")
    # With DropToken, as in pretraining: the base clip on CUDA, the tiny one on the CPU.
    case = _video_cases(device)["base" if device.type == "cuda" else "tiny"]
    x, weight, bias, pos, keep = _video_inputs(case, device, with_keep=True)
    compiled = torch.compile(patch_embed_reference, fullgraph=True)
    fn = functools.partial(compiled, x, weight, bias, pos=pos, keep=keep, scale=SCALE, shift=SHIFT)
    _check_video(fn(), x, weight, bias, pos, keep, "video compiled")
    time_it(benchmark, fn, device, rounds=10 if device.type == "cuda" else 3, warmup_rounds=2)
    _record_video(benchmark, case, keep, pos.shape[0], device, "reference torch.compile")


@pytest.mark.parametrize("shape", ["tiny", "base"])
def test_patch_embed_audio_reference_eager(benchmark, device, shape):
    cfg = get_config(shape)
    # tiny: 0.8 s at 8 kHz = 6400 samples, 50 tokens of 128, batch 32. base: 3.2 s at 48 kHz = 153,600
    # samples, 1200 tokens, D=768 (VATT-Base audio); batch 16 on CUDA, 2 on CPU.
    B = cfg.batch_size if shape == "tiny" else (16 if device.type == "cuda" else 2)
    S, p, D = cfg.audio_samples, cfg.audio_patch, cfg.audio_encoder.dim
    N = S // p
    wave = torch.randn(B, S, device=device)
    weight, bias = torch.randn(D, 1, p, device=device) * 0.05, torch.randn(D, device=device)
    pos = torch.randn(N, D, device=device) * 0.02
    keep = torch.randperm(N, device=device)[: int(N * (1 - cfg.drop_token))]
    fn = functools.partial(patch_embed_reference, wave, weight, bias, pos=pos, keep=keep)

    def conv1d_tokens(dtype):
        out = F.conv1d(wave.to(dtype).unsqueeze(1), weight.to(dtype), bias.to(dtype), stride=p)
        return (out.transpose(1, 2) + pos.to(dtype))[:, keep]

    ref = conv1d_tokens(torch.float64)
    assert_parity(fn(), ref, conv1d_tokens(torch.float32), ATOL_REL * ref.abs().max().item(), f"audio {shape}",
                  plain_rtol=1e-2)
    del ref
    time_it(benchmark, fn, device, rounds=10 if device.type == "cuda" else 3, warmup_rounds=2)
    n = keep.numel()
    record(
        benchmark, flops=2 * B * n * p * D, bytes_moved=B * n * p * 4 + p * D * 4 + n * D * 4 + B * n * D * 4,
        device=device_name(device), impl="reference eager", shape=f"B={B} S={S} p={p} D={D} tokens={n}/{N}",
    )


# --------------------------------------------------------------------------------------
# Forward + backward, over impl: what a training step runs
# --------------------------------------------------------------------------------------
# GPU: the medium preset (32 clips of 32x224x224x3 uint8, 4x16x16 tubelets, D=1024, DropToken 0.5;
# audio 153,600 samples in 128-sample segments, D=768) under bf16 autocast, fp32 parameters, as
# the trainer runs it. CPU: the tiny preset in fp32 (the Triton case is CUDA only: the
# interpreter is a correctness tool, not a speed one).
FWD_BWD_IMPLS = ["reference_eager", "reference_compiled", "triton"]


def _fwd_bwd_case(kind: str, device: torch.device):
    on_gpu = device.type == "cuda"
    cfg = get_config("medium" if on_gpu else "tiny")
    B = 32
    if kind == "video":
        t, h, w = cfg.video_patch
        D = cfg.video_encoder.dim
        shape = (B, cfg.num_frames, cfg.frame_size, cfg.frame_size, 3)
        x = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
        weight = torch.randn(D, 3, t, h, w, device=device) * 0.02
        N = (shape[1] // t) * (shape[2] // h) * (shape[3] // w)
        affine = dict(scale=SCALE, shift=SHIFT)
        desc = f"B={B} {shape[1]}x{shape[2]}x{shape[3]}x3 uint8 patch={(t, h, w)} D={D}"
    else:
        p, D, S = cfg.audio_patch, cfg.audio_encoder.dim, cfg.audio_samples
        x = torch.randn(B, S, device=device)
        weight = torch.randn(D, 1, p, device=device) * 0.05
        N = S // p
        affine = {}
        desc = f"B={B} S={S} fp32 patch={p} D={D}"
    bias = torch.randn(D, device=device) * 0.1
    pos = torch.randn(N, D, device=device) * 0.02
    keep = torch.randperm(N, device=device)[: max(1, int(N * (1 - cfg.drop_token)))]
    dtype = torch.bfloat16 if on_gpu else torch.float32
    return x, weight, bias, pos, keep, affine, dtype, f"{desc} tokens={keep.numel()}/{N} {str(dtype)[6:]}"


def _fwd_bwd(fn, x, params, keep, affine, dtype, device):
    """One forward and backward of ``fn`` (patch_embed-like) under autocast to ``dtype``; returns
    the output and the parameter gradients."""
    leaves = [t.detach().requires_grad_() for t in params]
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = fn(x, leaves[0], leaves[1], pos=leaves[2], keep=keep, **affine)
    gen = torch.Generator(device=device).manual_seed(0)  # the same output gradient for every impl
    grad_out = torch.randn(out.shape, generator=gen, device=device, dtype=torch.float32).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, grads


@pytest.mark.parametrize("impl", FWD_BWD_IMPLS)
@pytest.mark.parametrize("kind", ["video", "audio"])
def test_patch_embed_forward_backward(benchmark, device, kind, impl):
    if impl == "triton" and (device.type != "cuda" or not triton_available()):
        pytest.skip("the Triton kernel is benchmarked on CUDA only (the interpreter is not a speed measure)")
    if impl == "reference_compiled":
        reason = inductor_error(device)
        if reason is not None:
            pytest.skip(f"torch.compile (inductor) does not work on this machine: {reason}")
    x, weight, bias, pos, keep, affine, dtype, desc = _fwd_bwd_case(kind, device)
    params = (weight, bias, pos)
    if impl == "reference_eager":
        op = functools.partial(patch_embed, impl="reference")
    elif impl == "reference_compiled":
        op = torch.compile(functools.partial(patch_embed, impl="reference"), fullgraph=True)
    else:
        op = functools.partial(patch_embed, impl="triton")

    # Correctness first: output and weight/bias/pos gradients against float64 (STYLE.md's rule,
    # plain = the eager reference in the same dtype and settings).
    out, grads = _fwd_bwd(op, x, params, keep, affine, dtype, device)
    plain, plain_grads = _fwd_bwd(functools.partial(patch_embed, impl="reference"), x, params, keep, affine, dtype, device)
    xd = x if x.dtype == torch.uint8 else x.double()
    ref, ref_grads = _fwd_bwd(functools.partial(patch_embed, impl="reference"), xd, [t.double() for t in params], keep,
                              affine, torch.float32, device)
    for name, a, p, r in zip(("out", "dweight", "dbias", "dpos"), (out,) + grads, (plain,) + plain_grads, (ref,) + ref_grads):
        assert_parity(a, r, p, 1e-5 * r.abs().max().item(), f"{kind} {impl} {name}")
    del out, grads, plain, plain_grads, ref, ref_grads

    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    time_it(benchmark, lambda: _fwd_bwd(op, x, params, keep, affine, dtype, device), device,
            rounds=20 if device.type == "cuda" else 3, warmup_rounds=3 if device.type == "cuda" else 1)
    info = {}
    if device.type == "cuda":
        extra = torch.cuda.max_memory_allocated(device) - base
        clip_low = x.numel() * torch.finfo(dtype).bits // 8  # a float copy of the clip in the compute dtype
        info = dict(peak_extra_mb=round(extra / 2 ** 20, 1), peak_extra_over_float_clip=round(extra / clip_low, 3))
    B, n = x.shape[0], keep.numel()
    D, K = weight.shape[0], weight[0].numel()
    # forward: 2*M*K*D; backward: dW 2*M*K*D (+ dX 2*M*K*D for float input); input bytes read per pass
    flops = (3 if x.is_floating_point() else 2) * 2 * B * n * K * D
    record(benchmark, flops=flops, device=device_name(device), impl=impl, shape=desc, **info)
