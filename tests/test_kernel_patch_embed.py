"""The ``patch_embed`` op (``vatt_fast.kernels.patch_embed``): its PyTorch reference against an
explicit ``F.conv3d`` / ``F.conv1d`` on the normalised input (computed in float64), the
``keep`` (DropToken) selection, gradients, low precision and autocast, input checks, and how
it dispatches by ``impl``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from embed_helpers import gather_tokens, random_video
from vatt_fast.kernels import _dispatch, patch_embed

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
def test_never_falls_back_silently():
    x = torch.randint(0, 256, (1, 2, 4, 4, 3), dtype=torch.uint8)
    w, b = torch.randn(5, 3, 2, 2, 2), torch.randn(5)
    with pytest.raises(NotImplementedError, match="patch_embed lands in a later release"):
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
