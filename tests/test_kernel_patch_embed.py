"""The ``patch_embed`` op (``vatt_fast.kernels.patch_embed``): its PyTorch reference against an
explicit ``F.conv3d`` / ``F.conv1d`` on the normalised input (computed in float64), the
``keep`` (DropToken) selection, gradients, low precision and autocast, input checks, and how
it dispatches by ``impl``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from embed_helpers import gather_tokens, random_video
from parity import assert_parity
from vatt_fast.kernels import _dispatch, patch_embed

pe = importlib.import_module("vatt_fast.kernels.patch_embed")

SCALE, SHIFT = 1.0 / 127.5, -1.0


# --------------------------------------------------------------------------------------
# independent computation
# --------------------------------------------------------------------------------------
def conv3d_tokens(x, weight, bias, scale=None, shift=None, pos=None):
    """Normalise the whole video in float64, run Conv3d, flatten the grid into tokens."""
    xf = x.double()
    C = x.shape[-1]
    if scale is not None:
        xf = xf * torch.as_tensor(scale, dtype=torch.float64, device=x.device).reshape(-1).expand(C)
    if shift is not None:
        xf = xf + torch.as_tensor(shift, dtype=torch.float64, device=x.device).reshape(-1).expand(C)
    out = F.conv3d(
        xf.permute(0, 4, 1, 2, 3),  # (B, C, T, H, W)
        weight.double(),
        None if bias is None else bias.double(),
        stride=tuple(weight.shape[2:]),
    )  # (B, D, Tp, Hp, Wp)
    out = out.flatten(2).transpose(1, 2)  # (B, N, D)
    return out if pos is None else out + pos.double()


# --------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    """``impl="triton"`` never falls back silently: on CPU tensors without the interpreter it raises."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randint(0, 256, (1, 2, 4, 4, 3), dtype=torch.uint8)
    w, b = torch.randn(5, 3, 2, 2, 2), torch.randn(5)
    with pytest.raises((RuntimeError, NotImplementedError), match="impl='triton'"):
        patch_embed(x, w, b, impl="triton")


def test_registered_triton_kernel_is_called(monkeypatch):
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    calls = []

    def fake_patch_embed(x, weight, bias, pos=None, keep=None, scale=None, shift=None):
        calls.append((pos, keep, scale, shift))
        return "fake-triton-output"

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(_dispatch._TRITON_OPS, "patch_embed", fake_patch_embed)
    x = torch.zeros(1, 2, 4, 4, 3, dtype=torch.uint8)
    keep = torch.tensor([1])
    assert patch_embed(x, torch.zeros(5, 3, 2, 2, 2), None, keep=keep, scale=0.5, impl="triton") == "fake-triton-output"
    assert calls[-1] == (None, keep, 0.5, None)
    assert _dispatch.has_triton("patch_embed")


# --------------------------------------------------------------------------------------
# video
# --------------------------------------------------------------------------------------
VIDEO_CASES = [
    # (B, T, H, W, C), (t, h, w), D
    ((2, 6, 24, 24, 3), (2, 8, 8), 40),
    ((3, 5, 14, 21, 2), (5, 7, 3), 17),
    ((1, 4, 9, 10, 3), (1, 3, 5), 7),
]


@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32], ids=["uint8", "float32"])
@pytest.mark.parametrize("shape,patch,D", VIDEO_CASES)
@pytest.mark.parametrize("affine", ["pixels", "per_channel", "none"])
def test_video_matches_conv3d(device, in_dtype, shape, patch, D, affine):
    C = shape[-1]
    x = random_video(shape, in_dtype, device)
    w = torch.randn(D, C, *patch, device=device) * 0.05
    b = torch.randn(D, device=device)
    N = (shape[1] // patch[0]) * (shape[2] // patch[1]) * (shape[3] // patch[2])
    pos = torch.randn(N, D, device=device)
    if affine == "pixels":
        scale, shift = SCALE, SHIFT
    elif affine == "per_channel":
        scale = torch.rand(C, device=device) * 0.01 + 0.001
        shift = torch.randn(C, device=device)
    else:
        scale = shift = None
    out = patch_embed(x, w, b, pos=pos, scale=scale, shift=shift, impl="reference")
    ref = conv3d_tokens(x, w, b, scale, shift, pos)
    assert out.shape == (shape[0], N, D) and out.dtype == torch.float32
    atol = 1e-4 * ref.abs().max().item() + 1e-5
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32], ids=["uint8", "float32"])
def test_video_keep_equals_gathered_full_output(device, per_sample, in_dtype):
    B, T, H, W, C, D = 3, 6, 24, 16, 3, 40
    x = random_video((B, T, H, W, C), in_dtype, device)
    w, b = torch.randn(D, C, 2, 8, 8, device=device) * 0.05, torch.randn(D, device=device)
    N = 3 * 3 * 2
    pos = torch.randn(N, D, device=device)
    if per_sample:
        keep = torch.rand(B, N, device=device).argsort(dim=1)[:, :7]
        keep[1, 0] = keep[1, 1]  # a repeated index must work too
    else:
        keep = torch.randperm(N, device=device)[:7]
    full = patch_embed(x, w, b, pos=pos, scale=SCALE, shift=SHIFT, impl="reference")
    kept = patch_embed(x, w, b, pos=pos, keep=keep, scale=SCALE, shift=SHIFT, impl="reference")
    assert kept.shape == (B, 7, D)
    torch.testing.assert_close(kept, gather_tokens(full, keep), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kept.double(), gather_tokens(conv3d_tokens(x, w, b, SCALE, SHIFT, pos), keep), rtol=1e-5, atol=1e-4)


def test_keep_int32_and_empty(device):
    x = random_video((2, 4, 8, 12, 3), torch.uint8, device)
    w, b = torch.randn(5, 3, 2, 4, 4, device=device), torch.randn(5, device=device)
    pos = torch.randn(12, 5, device=device)
    for keep in (torch.tensor([11, 0, 4], device=device), torch.tensor([[3, 3], [10, 1]], device=device)):
        torch.testing.assert_close(
            patch_embed(x, w, b, pos=pos, keep=keep.int(), impl="reference"),
            patch_embed(x, w, b, pos=pos, keep=keep, impl="reference"),
            rtol=0, atol=0,
        )
    for empty in (torch.zeros(0, dtype=torch.long, device=device), torch.zeros(2, 0, dtype=torch.long, device=device)):
        assert patch_embed(x, w, b, pos=pos, keep=empty, impl="reference").shape == (2, 0, 5)


@pytest.mark.parametrize("keep_kind", ["all", "shared", "per_sample"])
def test_video_gradients_match_conv3d(device, keep_kind):
    B, T, H, W, C, D = 2, 4, 10, 15, 3, 9
    patch = (2, 5, 5)
    N = 2 * 2 * 3
    x = random_video((B, T, H, W, C), torch.uint8, device)
    w = (torch.randn(D, C, *patch, device=device, dtype=torch.float64) * 0.05).requires_grad_()
    b = torch.randn(D, device=device, dtype=torch.float64).requires_grad_()
    pos = torch.randn(N, D, device=device, dtype=torch.float64).requires_grad_()
    keep = {
        "all": None,
        "shared": torch.randperm(N, device=device)[:5],
        "per_sample": torch.rand(B, N, device=device).argsort(dim=1)[:, :5],
    }[keep_kind]
    grad_out = torch.randn(B, N if keep is None else 5, D, device=device, dtype=torch.float64)

    out = patch_embed(x, w, b, pos=pos, keep=keep, scale=SCALE, shift=SHIFT, impl="reference")
    assert out.dtype == torch.float64
    got = torch.autograd.grad(out, (w, b, pos), grad_out)
    ref = gather_tokens(conv3d_tokens(x, w, b, SCALE, SHIFT, pos), keep)
    want = torch.autograd.grad(ref, (w, b, pos), grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for name, g, r in zip(("weight", "bias", "pos"), got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")


def test_video_float_input_gets_gradient(device):
    x = (torch.rand(2, 4, 6, 6, 3, device=device, dtype=torch.float64) * 255).requires_grad_()
    w = torch.randn(8, 3, 2, 3, 3, device=device, dtype=torch.float64)
    keep = torch.tensor([0, 5, 7], device=device)
    grad_out = torch.randn(2, 3, 8, device=device, dtype=torch.float64)
    (g,) = torch.autograd.grad(patch_embed(x, w, None, keep=keep, scale=SCALE, shift=SHIFT, impl="reference"), x, grad_out)
    (r,) = torch.autograd.grad(gather_tokens(conv3d_tokens(x, w, None, SCALE, SHIFT), keep), x, grad_out)
    torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_video_non_contiguous_input():
    channels_first = torch.randint(0, 256, (2, 3, 4, 8, 8), dtype=torch.uint8)
    x = channels_first.permute(0, 2, 3, 4, 1)  # channels-last view, not contiguous
    w, b = torch.randn(6, 3, 2, 4, 4) * 0.05, torch.randn(6)
    out = patch_embed(x, w, b, scale=SCALE, shift=SHIFT, impl="reference")
    torch.testing.assert_close(out.double(), conv3d_tokens(x, w, b, SCALE, SHIFT), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_video_low_precision_parity(low):
    """max|ours_lowp - ref64| <= 2 * max|torch_lowp - ref64| + atol (flash-attention's rule)."""
    x = random_video((2, 4, 16, 16, 3), torch.uint8, "cpu")
    w32, b32 = torch.randn(24, 3, 2, 8, 8) * 0.05, torch.randn(24) * 0.1
    pos32 = torch.randn(8, 24) * 0.02
    ref = conv3d_tokens(x, w32, b32, SCALE, SHIFT, pos32)
    w, b, pos = w32.to(low), b32.to(low), pos32.to(low)
    ours = patch_embed(x, w, b, pos=pos, scale=SCALE, shift=SHIFT, impl="reference")
    assert ours.dtype == low
    x_low = (x.float() * SCALE + SHIFT).to(low).permute(0, 4, 1, 2, 3)
    torch_low = F.conv3d(x_low.float(), w.float(), b.float(), stride=(2, 8, 8)).to(low)
    torch_low = torch_low.flatten(2).transpose(1, 2) + pos
    err = (ours.double() - ref).abs().max().item()
    base = (torch_low.double() - ref).abs().max().item()
    assert err <= 2 * base + 1e-3, (err, base)


def test_autocast_output_dtype_and_accuracy():
    x = random_video((2, 4, 16, 16, 3), torch.uint8, "cpu")
    w, b, pos = torch.randn(24, 3, 2, 8, 8) * 0.05, torch.randn(24), torch.randn(8, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = patch_embed(x, w, b, pos=pos, scale=SCALE, shift=SHIFT, impl="reference")
    assert out.dtype == torch.bfloat16
    ref = conv3d_tokens(x, w, b, SCALE, SHIFT, pos)
    assert (out.double() - ref).abs().max().item() < 0.02 * ref.abs().max().item()


# --------------------------------------------------------------------------------------
# audio
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep_kind", ["all", "shared", "per_sample"])
def test_audio_matches_conv1d_with_gradients(device, keep_kind):
    B, p, N, D = 3, 16, 13, 11
    wave = torch.randn(B, N * p, device=device, dtype=torch.float64)
    w = torch.randn(D, 1, p, device=device, dtype=torch.float64).requires_grad_()
    b = torch.randn(D, device=device, dtype=torch.float64).requires_grad_()
    pos = torch.randn(N, D, device=device, dtype=torch.float64).requires_grad_()
    keep = {
        "all": None,
        "shared": torch.randperm(N, device=device)[:6],
        "per_sample": torch.rand(B, N, device=device).argsort(dim=1)[:, :6],
    }[keep_kind]
    out = patch_embed(wave, w, b, pos=pos, keep=keep, impl="reference")
    ref = gather_tokens(F.conv1d(wave.unsqueeze(1), w, b, stride=p).transpose(1, 2) + pos, keep)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (w, b, pos), grad_out), torch.autograd.grad(ref, (w, b, pos), grad_out)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_audio_scale_shift_folded():
    wave = torch.randn(2, 64)
    w, b = torch.randn(5, 1, 8), torch.randn(5)
    out = patch_embed(wave, w, b, scale=0.5, shift=0.25, impl="reference")
    ref = F.conv1d((wave * 0.5 + 0.25).unsqueeze(1), w, b, stride=8).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------
def _video_args():
    return dict(
        x=torch.randint(0, 256, (2, 4, 8, 8, 3), dtype=torch.uint8),
        weight=torch.randn(6, 3, 2, 4, 4),
        bias=torch.randn(6),
    )


BAD_VIDEO = [
    ("t_not_dividing", dict(x=torch.zeros(2, 5, 8, 8, 3, dtype=torch.uint8)), r"patch size 2 does not divide frames T=5.*multiple of 2"),
    ("h_not_dividing", dict(x=torch.zeros(2, 4, 10, 8, 3, dtype=torch.uint8)), r"patch size 4 does not divide height H=10"),
    ("w_not_dividing", dict(x=torch.zeros(2, 4, 8, 7, 3, dtype=torch.uint8)), r"patch size 4 does not divide width W=7"),
    ("channels", dict(weight=torch.randn(6, 4, 2, 4, 4)), r"x has 3 channels.*expects C=4"),
    ("channels_first", dict(x=torch.zeros(2, 3, 4, 8, 8, dtype=torch.uint8)), r"channels-first.*permute\(0, 2, 3, 4, 1\)"),
    ("int_dtype", dict(x=torch.zeros(2, 4, 8, 8, 3, dtype=torch.int32)), r"uint8.*or floating point, got dtype torch.int32"),
    ("int_weight", dict(weight=torch.zeros(6, 3, 2, 4, 4, dtype=torch.int64)), r"weight must be floating point, got dtype torch.int64"),
    ("x_rank", dict(x=torch.zeros(2, 8, 8, 3, dtype=torch.uint8)), r"expects video x \[B, T, H, W, C\], got x of shape \(2, 8, 8, 3\)"),
    ("weight_rank", dict(weight=torch.randn(6, 3, 4, 4)), r"weight must be \[D, C, t, h, w\].*got shape \(6, 3, 4, 4\)"),
    ("bias_shape", dict(bias=torch.randn(5)), r"bias must be \[D=6\] or None, got \(5,\)"),
    ("pos_shape", dict(pos=torch.randn(7, 6)), r"pos must be \[N, D\] = \(8, 6\).*got \(7, 6\)"),
    ("keep_high", dict(keep=torch.tensor([0, 8])), r"keep holds token index 8 but there are 8 tokens.*\[0, 7\]"),
    ("keep_negative", dict(keep=torch.tensor([-1, 2])), r"keep holds token index -1"),
    ("keep_float", dict(keep=torch.tensor([0.0, 1.0])), r"keep must hold int64 token indices, got dtype torch.float32"),
    ("keep_rows", dict(keep=torch.zeros(3, 2, dtype=torch.long)), r"per-sample keep of shape \(3, 2\) has 3 rows but the batch has 2"),
    ("keep_rank", dict(keep=torch.zeros(2, 2, 2, dtype=torch.long)), r"keep must be \[N_keep\].*got shape \(2, 2, 2\)"),
    ("scale_len", dict(scale=[1.0, 2.0]), r"scale must be a scalar or hold one value per input channel \(3\), got 2 values"),
    ("shift_len", dict(shift=torch.zeros(4)), r"shift must be a scalar or hold one value per input channel \(3\), got 4 values"),
]


@pytest.mark.parametrize("name,override,message", BAD_VIDEO, ids=[c[0] for c in BAD_VIDEO])
def test_video_bad_inputs_raise_value_error(name, override, message):
    args = _video_args()
    args.update(override)
    with pytest.raises(ValueError, match=message):
        patch_embed(**args, impl="reference")


BAD_AUDIO = [
    ("length", dict(x=torch.randn(2, 100)), r"patch size 16 does not divide the waveform length S=100.*96 or 112"),
    ("int_wave", dict(x=torch.zeros(2, 64, dtype=torch.int16)), r"waveform x must be floating point, got dtype torch.int16"),
    ("channel_dim", dict(x=torch.randn(2, 1, 64)), r"expects a waveform x \[B, S\].*x\[:, 0\]"),
    ("stereo_weight", dict(weight=torch.randn(4, 2, 16)), r"must be \[D, 1, p\].*got \(4, 2, 16\)"),
]


@pytest.mark.parametrize("name,override,message", BAD_AUDIO, ids=[c[0] for c in BAD_AUDIO])
def test_audio_bad_inputs_raise_value_error(name, override, message):
    args = dict(x=torch.randn(2, 64), weight=torch.randn(4, 1, 16), bias=None)
    args.update(override)
    with pytest.raises(ValueError, match=message):
        patch_embed(**args, impl="reference")


# --------------------------------------------------------------------------------------
# Triton kernel (parity over impl, keep kinds, opcheck, compile, FLOP count)
# --------------------------------------------------------------------------------------
IMPLS = ["reference", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Floor of the parity bound, for outputs that plain PyTorch happens to get exactly right.
ATOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
# (B, T, H, W, C), (t, h, w), D: a 3x5x7 grid with D=45 (not a multiple of the 32- and
# 128-wide blocks, and two column blocks under the interpreter), K=210 (not a multiple of
# the K block); one clip with a grid of 2 tokens and D=16; channels 1 and 2.
TRITON_VIDEO = [((2, 6, 15, 35, 3), (2, 3, 5), 45), ((1, 2, 4, 6, 1), (2, 4, 3), 16), ((3, 4, 6, 6, 2), (1, 3, 3), 70)]


def _need_triton(device, dtype=torch.float32):
    """Skip, with the reason, the combinations this machine cannot run."""
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("the bf16 kernel is tested on CUDA only (bf16 arithmetic is wrong in the Triton interpreter)")
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    if device.type == "cpu" and not pe.INTERPRETING:
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1; this machine tests it on CUDA")


def _keep(B, N, n, kind, device):
    if kind == "none":
        return None
    if kind == "per_sample":
        return torch.rand(B, N, device=device).argsort(dim=1)[:, :n]  # (B, n)
    return torch.randperm(N, device=device)[:n]  # (n,)


def _check_parity(impl, x, weight, bias, pos, keep, scale=None, shift=None, grad_out=None):
    """Output and every gradient (x when float, weight, bias, pos) of ``impl`` against float64, with
    STYLE.md's rule: plain = the reference in the parameters' dtype on the same device."""
    dtype = weight.dtype
    atol = ATOL[dtype]
    params = [weight] + [t for t in (bias, pos) if t is not None]
    names = ["dweight"] + (["dbias"] if bias is not None else []) + (["dpos"] if pos is not None else [])
    if x.is_floating_point():
        params, names = [x] + params, ["dx"] + names

    def leaves(cast):
        return [cast(t).detach().clone().requires_grad_() for t in params]

    def run(ts, impl_):
        it = iter(ts)
        xx = next(it) if x.is_floating_point() else x
        w = next(it)
        b = next(it) if bias is not None else None
        p = next(it) if pos is not None else None
        return patch_embed(xx, w, b, pos=p, keep=keep, scale=scale, shift=shift, impl=impl_)

    ours, plain, ref = leaves(lambda t: t), leaves(lambda t: t), leaves(lambda t: t.double())
    out, out_plain, out_ref = run(ours, impl), run(plain, "reference"), run(ref, "reference")
    assert out.dtype == dtype and out.shape == out_ref.shape
    assert_parity(out, out_ref, out_plain, atol, name="out")
    g = torch.randn_like(out) if grad_out is None else grad_out
    got = torch.autograd.grad(out, ours, g)
    want_plain = torch.autograd.grad(out_plain, plain, g)
    want = torch.autograd.grad(out_ref, ref, g.double())
    for name, a, p, r, leaf in zip(names, got, want_plain, want, ours):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        assert_parity(a, r, p, atol, name=name)


@pytest.mark.parametrize("keep_kind", ["none", "shared", "per_sample"])
@pytest.mark.parametrize("case", range(len(TRITON_VIDEO)), ids=["grid3x5x7", "B1_grid1x1x2", "C2_D70"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_video_parity_over_impl(device, impl, dtype, case, keep_kind):
    """uint8 pixels with the [-1, 1] affine folded in, position table, DropToken keep."""
    if impl == "triton":
        _need_triton(device, dtype)
    shape, patch, D = TRITON_VIDEO[case]
    B, T, H, W, C = shape
    N = (T // patch[0]) * (H // patch[1]) * (W // patch[2])
    x = random_video(shape, torch.uint8, device)
    w = torch.randn(D, C, *patch, device=device, dtype=dtype) * 0.05
    b = torch.randn(D, device=device, dtype=dtype) * 0.1
    pos = torch.randn(N, D, device=device, dtype=dtype) * 0.02
    n_keep = max(1, N // 2)
    _check_parity(impl, x, w, b, pos, _keep(B, N, n_keep, keep_kind, device), scale=SCALE, shift=SHIFT)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_video_parity_keep_one_and_all_float_input(device, impl, dtype):
    """N_keep of 1 and of N (shared and per sample), float pixels with a gradient, no bias, no pos,
    a per-channel affine and a non-contiguous (channels-first storage) clip."""
    if impl == "triton":
        _need_triton(device, dtype)
    B, T, H, W, C, patch, D = 2, 3, 10, 6, 3, (1, 5, 3), 33
    N = 3 * 2 * 2
    x = (torch.rand(B, C, T, H, W, device=device, dtype=dtype) * 255).permute(0, 2, 3, 4, 1)
    w = torch.randn(D, C, *patch, device=device, dtype=dtype) * 0.05
    scale, shift = [1 / 58.0, 1 / 57.0, 1 / 56.0], [-0.5, -0.4, -0.3]
    _check_parity(impl, x, w, None, None, torch.tensor([7], device=device), scale=scale, shift=shift)
    _check_parity(impl, x, w, None, None, torch.rand(B, N, device=device).argsort(dim=1), scale=scale, shift=shift)
    b = torch.randn(D, device=device, dtype=dtype)
    _check_parity(impl, x, w, b, None, torch.randperm(N, device=device), scale=scale, shift=shift)


@pytest.mark.parametrize("keep_kind", ["none", "shared", "per_sample"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_audio_parity_over_impl(device, impl, dtype, keep_kind):
    """Waveform segments (the same kernel, the clip viewed as [B, 1, 1, S, 1]), with their gradient."""
    if impl == "triton":
        _need_triton(device, dtype)
    B, p, N, D = 3, 24, 11, 40
    wave = torch.randn(B, N * p, device=device, dtype=dtype)
    w = torch.randn(D, 1, p, device=device, dtype=dtype) * 0.2
    b = torch.randn(D, device=device, dtype=dtype) * 0.1
    pos = torch.randn(N, D, device=device, dtype=dtype) * 0.02
    _check_parity(impl, wave, w, b, pos, _keep(B, N, 5, keep_kind, device))


def test_triton_under_autocast_matches_reference(device):
    """fp32 parameters under autocast: the folded weight is cast once, the kernel returns the
    autocast dtype, as the reference does."""
    low = torch.bfloat16 if device.type == "cuda" else torch.float16
    if device.type == "cpu":
        _need_triton(device)
    else:
        _need_triton(device, low)
    x = random_video((2, 4, 8, 8, 3), torch.uint8, device)
    w, b, pos = torch.randn(20, 3, 2, 4, 4, device=device) * 0.05, torch.randn(20, device=device), torch.randn(8, 20, device=device)
    keep = torch.randperm(8, device=device)[:3]
    with torch.autocast(device.type, dtype=low):
        out = patch_embed(x, w, b, pos=pos, keep=keep, scale=SCALE, shift=SHIFT, impl="triton")
        plain = patch_embed(x, w, b, pos=pos, keep=keep, scale=SCALE, shift=SHIFT, impl="reference")
    assert out.dtype == plain.dtype == low
    ref = gather_tokens(conv3d_tokens(x, w, b, SCALE, SHIFT, pos), keep)
    assert_parity(out, ref, plain, ATOL[low], name="out")


def test_triton_rejects_out_of_range_keep():
    """Out-of-range indices are an error at the boundary, never a silent read past the clip: on
    the CPU a ValueError naming the index; traced by torch.compile, the device-side assert."""
    _need_triton(torch.device("cpu"))
    x = random_video((2, 4, 8, 8, 3), torch.uint8, "cpu")
    w = torch.randn(6, 3, 2, 4, 4)
    for keep, bad in ((torch.tensor([0, 8]), 8), (torch.tensor([[1, 2], [-3, 0]]), -3)):
        with pytest.raises(ValueError, match=f"keep holds token index {bad} but there are 8 tokens"):
            patch_embed(x, w, None, keep=keep, impl="triton")
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w, k: patch_embed(x, w, None, keep=k, impl="triton"), fullgraph=True, backend="aot_eager")
    assert compiled(x, w, torch.tensor([0, 7])).shape == (2, 2, 6)
    with pytest.raises(RuntimeError, match=r"keep holds a token index outside \[0, 7\]"):
        compiled(x, w, torch.tensor([0, 8]))


_CUDA_BAD_KEEP = """
import torch
from vatt_fast.kernels import patch_embed
x = torch.randint(0, 256, (2, 4, 8, 8, 3), dtype=torch.uint8, device="cuda")
w = torch.randn(6, 3, 2, 4, 4, device="cuda")
out = patch_embed(x, w, None, keep=torch.tensor([0, 8], device="cuda"), impl="triton")
torch.cuda.synchronize()
print("no error")
"""


def test_cuda_out_of_range_keep_fails_without_a_host_sync():
    """On CUDA the check is an asynchronous device assert (no host sync per step): the bad index
    fails the next synchronising call. Run apart: a device assert ends the process's CUDA context."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    run = subprocess.run([sys.executable, "-c", _CUDA_BAD_KEEP], capture_output=True, text=True)
    assert run.returncode != 0 and "no error" not in run.stdout, run.stdout
    assert "keep holds a token index outside [0, 7]" in run.stderr or "device-side assert" in run.stderr, run.stderr[-2000:]


def test_kernel_writes_every_output_element(device, monkeypatch):
    """A NaN-filled output buffer (the test hook) must come back fully written and right."""
    _need_triton(device)
    shape, patch, D = TRITON_VIDEO[0]
    x = random_video(shape, torch.uint8, device)
    w, b = torch.randn(D, 3, *patch, device=device) * 0.05, torch.randn(D, device=device)
    pos = torch.randn(105, D, device=device)
    monkeypatch.setattr(pe, "_POISON_OUTPUT", True)
    for keep in (None, _keep(2, 105, 9, "shared", device), _keep(2, 105, 105, "per_sample", device)):
        out = patch_embed(x, w, b, pos=pos, keep=keep, scale=SCALE, shift=SHIFT, impl="triton")
        assert not out.isnan().any()
        ref = patch_embed(x, w, b, pos=pos, keep=keep, scale=SCALE, shift=SHIFT, impl="reference")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    class NoLaunch:  # ``_launch(kernel)[grid](*args)`` that launches nothing: the hook is live
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(pe, "_launch", lambda kernel: NoLaunch())
    assert patch_embed(x, w, b, pos=pos, scale=SCALE, shift=SHIFT, impl="triton").isnan().all()


def test_empty_keep_triton(device):
    _need_triton(device)
    x = random_video((2, 4, 8, 8, 3), torch.uint8, device)
    w = torch.randn(6, 3, 2, 4, 4, device=device, requires_grad=True)
    pos = torch.randn(8, 6, device=device, requires_grad=True)
    for keep in (torch.zeros(0, dtype=torch.long, device=device), torch.zeros(2, 0, dtype=torch.long, device=device)):
        out = patch_embed(x, w, None, pos=pos, keep=keep, impl="triton")
        assert out.shape == (2, 0, 6)
        dw, dpos = torch.autograd.grad(out.sum(), (w, pos))
        assert not dw.any() and not dpos.any()


def test_opcheck_registered_ops(device):
    _need_triton(device)
    x = random_video((2, 4, 6, 10, 3), torch.uint8, device)
    xf = torch.rand(2, 4, 6, 10, 3, device=device, requires_grad=True)
    w = torch.randn(7, 2 * 3 * 5 * 3, device=device, requires_grad=True)
    b = torch.randn(7, device=device, requires_grad=True)
    pos = torch.randn(8, 7, device=device, requires_grad=True)
    shared, per_sample = torch.tensor([5, 0, 3], device=device), torch.rand(2, 8, device=device).argsort(1)[:, :2]
    fwd = torch.ops.vatt_fast.patch_embed.default
    dw = torch.ops.vatt_fast.patch_embed_weight_grad.default
    patch = [2, 3, 5]
    for args in ((x, w, b, pos, shared, patch), (xf, w, None, pos, per_sample, patch), (x, w.half().detach(), None, None, None, patch)):
        torch.library.opcheck(fwd, args)
    torch.library.opcheck(dw, (torch.randn(2, 3, 7, device=device), x, shared, patch))
    torch.library.opcheck(dw, (torch.randn(2, 8, 7, device=device), xf.detach(), None, patch))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(device, backend):
    _need_triton(device)
    if backend == "inductor" and device.type != "cuda":
        pytest.skip("inductor with the Triton kernel is tested on CUDA (on the CPU the op is an opaque custom_op)")
    torch._dynamo.reset()

    def step(x, w, b, pos, keep):
        return (patch_embed(x, w, b, pos=pos, keep=keep, scale=SCALE, shift=SHIFT, impl="triton") * 2).sin().sum()

    x = random_video((2, 4, 8, 8, 3), torch.uint8, device)
    w = (torch.randn(6, 3, 2, 4, 4, device=device) * 0.05).requires_grad_()
    b = torch.randn(6, device=device, requires_grad=True)
    pos = torch.randn(8, 6, device=device, requires_grad=True)
    keep = torch.randperm(8, device=device)[:5]
    loss = torch.compile(step, fullgraph=True, backend=backend)(x, w, b, pos, keep)
    got = torch.autograd.grad(loss, (w, b, pos))
    ref_loss = (patch_embed(x, w, b, pos=pos, keep=keep, scale=SCALE, shift=SHIFT, impl="reference") * 2).sin().sum()
    want = torch.autograd.grad(ref_loss, (w, b, pos))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["video", "audio"])
def test_flop_counter_counts_the_kernel(device, kind):
    """FlopCounterMode sees the registered formulas: the Triton path counts what the reference's
    matmuls count, forward and backward (so ``vatt_fast/flops.py``'s check holds with Triton)."""
    _need_triton(device)
    from torch.utils.flop_counter import FlopCounterMode

    if kind == "video":
        x, w = random_video((2, 4, 8, 8, 3), torch.uint8, device), torch.randn(6, 3, 2, 4, 4, device=device)
        keep, pos = torch.randperm(8, device=device)[:3], torch.randn(8, 6, device=device)
    else:
        x, w = torch.randn(2, 64, device=device, requires_grad=True), torch.randn(6, 1, 8, device=device)
        keep, pos = torch.rand(2, 8, device=device).argsort(1)[:, :3], torch.randn(8, 6, device=device)
    counts = {}
    for impl in IMPLS:
        wi = w.clone().requires_grad_()
        with FlopCounterMode(display=False) as counter:
            patch_embed(x, wi, None, pos=pos, keep=keep, impl=impl).sum().backward()
        counts[impl] = counter.get_total_flops()
    assert counts["triton"] == counts["reference"] > 0, counts


_TRACE_GPU_REGISTRATION = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import importlib
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch._subclasses.functional_tensor import dispatch_functionalize

pe = importlib.import_module("vatt_fast.kernels.patch_embed")
assert not pe.INTERPRETING


def step(x, w, b, pos, keep):
    out = torch.ops.vatt_fast.patch_embed(x, w, b, pos, keep, [2, 4, 4])
    return out, torch.ops.vatt_fast.patch_embed_weight_grad(out, x, keep, [2, 4, 4])


x = torch.empty(2, 4, 8, 8, 3, dtype=torch.uint8, device="meta")
w, b, pos = torch.empty(6, 96, device="meta"), torch.empty(6, device="meta"), torch.empty(8, 6, device="meta")
keep = torch.empty(2, 4, dtype=torch.long, device="meta")
gm = make_fx(dispatch_functionalize(step), tracing_mode="symbolic")(x, w, b, pos, keep)
print("kernels traced:", gm.code.count("triton_kernel_wrapper_functional("))
print("opaque ops left:", gm.code.count("vatt_fast."))
"""


def test_compiled_mode_registration_traces_into_the_kernels():
    """Without the interpreter the ops are ``triton_op``s: functionalization (as AOTAutograd and
    Inductor run it) must see both kernel launches, with symbolic shapes, on meta tensors, so a
    CPU-only machine checks the GPU registration too."""
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, "-c", _TRACE_GPU_REGISTRATION], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "kernels traced: 2" in run.stdout and "opaque ops left: 0" in run.stdout, run.stdout
