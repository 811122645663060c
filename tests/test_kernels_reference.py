"""Dispatch and the PyTorch references of patch_embed and drop_token_gather.

Independent computations: ``F.conv3d`` / ``F.conv1d`` on the explicitly normalised input,
and a dense one-hot selection matmul for the gather; references run in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from embed_helpers import gather_tokens, random_video

from vatt_fast.kernels import _dispatch, drop_token_gather, patch_embed, resolve_impl
from vatt_fast.kernels.droptoken import drop_token_gather_reference
from vatt_fast.kernels.patch_embed import patch_embed_reference

SCALE, SHIFT = 1.0 / 127.5, -1.0


# --------------------------------------------------------------------------------------
# independent computations
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
def test_resolve_impl_explicit_and_auto_on_cpu(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    x = torch.zeros(2)
    assert resolve_impl("reference", x, op="patch_embed") == "reference"
    assert resolve_impl("auto", x, op="patch_embed") == "reference"
    assert resolve_impl(None, x, op="patch_embed") == "reference"
    # A registered Triton kernel still does not make "auto" pick it for CPU tensors.
    monkeypatch.setitem(_dispatch._TRITON_OPS, "fake_op", lambda *a, **k: None)
    assert resolve_impl("auto", x, None, op="fake_op") == "reference"


def test_resolve_impl_auto_follows_device_and_registry(monkeypatch, device):
    x = torch.zeros(3, device=device)
    assert resolve_impl("auto", x, op="not_registered_op") == "reference"
    monkeypatch.setitem(_dispatch._TRITON_OPS, "fake_op", lambda *a, **k: None)
    expected = "triton" if device.type == "cuda" and _dispatch.triton_available() else "reference"
    assert resolve_impl("auto", x, op="fake_op") == expected


def test_resolve_impl_rejects_unknown_impl():
    with pytest.raises(ValueError, match=r"impl='fast'.*\['auto', 'triton', 'reference'\]"):
        resolve_impl("fast", torch.zeros(1), op="patch_embed")


@pytest.mark.parametrize("op", ["patch_embed", "drop_token_gather"])
def test_triton_without_kernel_raises_not_implemented(op):
    with pytest.raises(NotImplementedError, match=rf"Triton kernel for {op} lands in a later release.*impl='reference'"):
        resolve_impl("triton", torch.zeros(1), op=op)


def test_patch_embed_and_gather_never_fall_back_silently():
    x = torch.randint(0, 256, (1, 2, 4, 4, 3), dtype=torch.uint8)
    w, b = torch.randn(5, 3, 2, 2, 2), torch.randn(5)
    with pytest.raises(NotImplementedError, match="patch_embed lands in a later release"):
        patch_embed(x, w, b, impl="triton")
    with pytest.raises(NotImplementedError, match="drop_token_gather lands in a later release"):
        drop_token_gather(torch.randn(2, 4, 3), torch.tensor([0, 2]), impl="triton")


def test_env_var_sets_process_default(monkeypatch):
    x = torch.randint(0, 256, (1, 2, 4, 4, 3), dtype=torch.uint8)
    w, b = torch.randn(5, 3, 2, 2, 2), torch.randn(5)
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    assert _dispatch.default_impl() == "triton"
    with pytest.raises(NotImplementedError, match="lands in a later release"):
        patch_embed(x, w, b)
    # An explicit impl overrides the environment.
    assert patch_embed(x, w, b, impl="reference").shape == (1, 4, 5)
    monkeypatch.setenv(_dispatch.ENV_VAR, " Reference ")
    assert resolve_impl(None, x, op="patch_embed") == "reference"
    torch.testing.assert_close(patch_embed(x, w, b), patch_embed_reference(x, w, b), rtol=0, atol=0)
    monkeypatch.setenv(_dispatch.ENV_VAR, "")
    assert _dispatch.default_impl() == "auto"
    monkeypatch.setenv(_dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=r"VATT_FAST_KERNELS='cuda'.*\['auto', 'triton', 'reference'\]"):
        patch_embed(x, w, b)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setitem(_dispatch._TRITON_OPS, "fake_op", lambda *a, **k: None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"needs CUDA tensors, got tensors on \['cpu'\].*TRITON_INTERPRET=1"):
        resolve_impl("triton", torch.zeros(1), op="fake_op")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("triton", torch.zeros(1), op="fake_op") == "triton"


def test_registered_triton_kernel_is_called(monkeypatch):
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    calls = []

    def fake_patch_embed(x, weight, bias, pos=None, keep=None, scale=None, shift=None):
        calls.append((pos, keep, scale, shift))
        return "fake-triton-output"

    def fake_gather(x, keep, pos=None):
        calls.append((keep, pos))
        return "fake-gather-output"

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(_dispatch._TRITON_OPS, "patch_embed", fake_patch_embed)
    monkeypatch.setitem(_dispatch._TRITON_OPS, "drop_token_gather", fake_gather)
    x = torch.zeros(1, 2, 4, 4, 3, dtype=torch.uint8)
    keep = torch.tensor([1])
    assert patch_embed(x, torch.zeros(5, 3, 2, 2, 2), None, keep=keep, scale=0.5, impl="triton") == "fake-triton-output"
    assert calls[-1] == (None, keep, 0.5, None)
    assert drop_token_gather(torch.zeros(1, 3, 2), keep, impl="triton") == "fake-gather-output"
    assert _dispatch.has_triton("patch_embed")


def test_register_triton_validates():
    with pytest.raises(ValueError, match="non-empty string"):
        _dispatch.register_triton("", lambda: None)
    with pytest.raises(TypeError, match="must be callable, got int"):
        _dispatch.register_triton("some_op", 3)
    assert not _dispatch.has_triton("some_op")


# --------------------------------------------------------------------------------------
# patch_embed: video
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
        tokens = torch.randn(2, 12, 5, device=device)
        torch.testing.assert_close(drop_token_gather(tokens, keep.int(), pos), drop_token_gather(tokens, keep, pos), rtol=0, atol=0)
    for empty in (torch.zeros(0, dtype=torch.long, device=device), torch.zeros(2, 0, dtype=torch.long, device=device)):
        assert patch_embed(x, w, b, pos=pos, keep=empty, impl="reference").shape == (2, 0, 5)
        assert drop_token_gather(torch.randn(2, 12, 5, device=device), empty).shape == (2, 0, 5)


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
# patch_embed: audio
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
# patch_embed: bad inputs
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
# drop_token_gather
# --------------------------------------------------------------------------------------
def dense_gather(x, keep, pos=None):
    """Independent: a one-hot selection matrix times the tokens."""
    B, N, _ = x.shape
    rows = keep if keep.dim() == 2 else keep.expand(B, -1)
    select = F.one_hot(rows, N).to(x.dtype)  # (B, N_keep, N)
    out = select @ x
    return out if pos is None else out + select @ pos.to(x.dtype)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("with_pos", [False, True], ids=["no_pos", "pos"])
def test_drop_token_gather_matches_dense(device, per_sample, with_pos):
    B, N, D, K = 3, 37, 19, 11
    x = torch.randn(B, N, D, device=device, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(N, D, device=device, dtype=torch.float64, requires_grad=True) if with_pos else None
    if per_sample:
        keep = torch.rand(B, N, device=device).argsort(dim=1)[:, :K]
        keep[2, 3] = keep[2, 4]  # repeated index: its gradient must accumulate
    else:
        keep = torch.randperm(N, device=device)[:K]
    out = drop_token_gather(x, keep, pos=pos, impl="reference")
    ref = dense_gather(x, keep, pos)
    assert out.shape == (B, K, D)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    inputs = (x,) if pos is None else (x, pos)
    grad_out = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, inputs, grad_out), torch.autograd.grad(ref, inputs, grad_out)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


def test_drop_token_gather_keeps_x_dtype():
    x = torch.randn(2, 10, 4, dtype=torch.bfloat16)
    pos = torch.randn(10, 4)
    out = drop_token_gather(x, torch.tensor([3, 1]), pos=pos, impl="reference")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, x[:, [3, 1]] + pos[[3, 1]].bfloat16())
    assert drop_token_gather_reference(x, torch.tensor([3, 1])).dtype == torch.bfloat16


BAD_GATHER = [
    ("x_rank", dict(x=torch.randn(2, 10)), r"x must be tokens \[B, N, D\], got \(2, 10\)"),
    ("keep_none", dict(keep=None), r"keep is required"),
    ("keep_high", dict(keep=torch.tensor([2, 10])), r"keep holds token index 10 but there are 10 tokens"),
    ("keep_rows", dict(keep=torch.zeros(4, 3, dtype=torch.long)), r"has 4 rows but the batch has 2"),
    ("keep_float", dict(keep=torch.tensor([1.0])), r"int64 token indices, got dtype torch.float32"),
    ("pos_shape", dict(pos=torch.randn(10, 5)), r"pos must be \[N, D\] = \(10, 4\).*got \(10, 5\)"),
]


@pytest.mark.parametrize("name,override,message", BAD_GATHER, ids=[c[0] for c in BAD_GATHER])
def test_drop_token_gather_bad_inputs(name, override, message):
    args = dict(x=torch.randn(2, 10, 4), keep=torch.tensor([1, 2]), pos=None)
    args.update(override)
    with pytest.raises(ValueError, match=message):
        drop_token_gather(**args, impl="reference")
