"""patch_embed benchmarks: the PyTorch reference, eager and under torch.compile.

Each benchmark checks its output against an independent computation (``F.conv3d`` /
``F.conv1d`` on the explicitly normalised input) before it is timed, and reports GB/s
(bytes the op must move), TFLOP/s and the device in ``extra_info``.
Run with ``pytest benchmarks/test_bench_patch_embed.py --benchmark-only``.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional

import pytest
import torch
from bench_utils import inductor_error
import torch.nn.functional as F

from vatt_fast.kernels.patch_embed import patch_embed_reference
from vatt_fast.models.config import get_config

SCALE, SHIFT = 1.0 / 127.5, -1.0


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
        # down to one clip of 8 frames (392 tokens) to keep the run short; the full clip on CUDA.
        "base": _video_case("base", batch=16) if on_gpu else _video_case("base", batch=1, frames=8),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _conv3d_tokens(x, weight, bias, pos, keep):
    """Independent: normalise the whole video in float32, Conv3d, flatten, add pos, gather."""
    xf = x.float() * SCALE + SHIFT
    out = F.conv3d(xf.permute(0, 4, 1, 2, 3), weight.float(), bias.float(), stride=tuple(weight.shape[2:]))
    out = out.flatten(2).transpose(1, 2) + pos.float()  # (B, N, D)
    return out if keep is None else out[:, keep]


def _time(benchmark, fn, device, rounds):
    def run():
        out = fn()
        _sync(device)
        return out

    return benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=2)


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


def _video_extra_info(benchmark, case, keep, N, device, impl):
    B, C, D = case["B"], case["C"], case["D"]
    t, h, w = case["patch"]
    K = C * t * h * w
    n_out = N if keep is None else keep.numel()
    # Must move: the kept uint8 patches, the fp32 weight, pos rows and bias, the fp32 output.
    bytes_moved = B * n_out * K * 1 + K * D * 4 + n_out * D * 4 + D * 4 + B * n_out * D * 4
    flops = 2 * B * n_out * K * D
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        device=_device_name(device), impl=impl, shape=f"B={B} T={case['T']} HxW={case['H']}x{case['W']} "
        f"patch={case['patch']} D={D} tokens={n_out}/{N}",
        GBps=round(bytes_moved / seconds / 1e9, 3), TFLOPs=round(flops / seconds / 1e12, 4),
    )


@pytest.mark.parametrize("drop", [False, True], ids=["all_tokens", "droptoken0.5"])
@pytest.mark.parametrize("shape", ["tiny", "base"])
def test_patch_embed_video_reference_eager(benchmark, device, shape, drop):
    case = _video_cases(device)[shape]
    x, weight, bias, pos, keep = _video_inputs(case, device, drop)
    fn = functools.partial(patch_embed_reference, x, weight, bias, pos=pos, keep=keep, scale=SCALE, shift=SHIFT)
    torch.testing.assert_close(fn(), _conv3d_tokens(x, weight, bias, pos, keep), rtol=1e-4, atol=1e-4)
    _time(benchmark, fn, device, rounds=10 if shape == "tiny" else 5)
    _video_extra_info(benchmark, case, keep, pos.shape[0], device, "reference eager")


def test_patch_embed_video_reference_compiled(benchmark, device):
    reason = inductor_error()
    if reason is not None:
        pytest.skip(f"torch.compile (inductor) does not work on this machine: {reason}")
    case = _video_cases(device)["tiny"]
    x, weight, bias, pos, keep = _video_inputs(case, device, with_keep=True)
    compiled = torch.compile(patch_embed_reference, fullgraph=True)
    fn = functools.partial(compiled, x, weight, bias, pos=pos, keep=keep, scale=SCALE, shift=SHIFT)
    torch.testing.assert_close(fn(), _conv3d_tokens(x, weight, bias, pos, keep), rtol=1e-4, atol=1e-4)
    _time(benchmark, fn, device, rounds=10)
    _video_extra_info(benchmark, case, keep, pos.shape[0], device, "reference torch.compile")


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
    ref = (F.conv1d(wave.unsqueeze(1), weight, bias, stride=p).transpose(1, 2) + pos)[:, keep]
    torch.testing.assert_close(fn(), ref, rtol=1e-4, atol=1e-4)
    _time(benchmark, fn, device, rounds=10)
    n = keep.numel()
    bytes_moved = B * n * p * 4 + p * D * 4 + n * D * 4 + B * n * D * 4
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        device=_device_name(device), impl="reference eager", shape=f"B={B} S={S} p={p} D={D} tokens={n}/{N}",
        GBps=round(bytes_moved / seconds / 1e9, 3), TFLOPs=round(2 * B * n * p * D / seconds / 1e12, 4),
    )
