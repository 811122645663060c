"""Embedding layers: VideoPatchEmbed, AudioPatchEmbed, TextEmbed, DropToken.

The layers' own contract: a real ``nn.Conv3d`` / ``nn.Conv1d`` holds the weights (state_dicts
load both ways), the position tables (summed / interpolated with explicit loops here), the
default pixel affine, ``keep`` from DropToken, shapes, dtypes and errors; plain indexing for the
text table. VideoPatchEmbed is checked to run the ``patch_embed`` op on its parameters; the op's
own parity with Conv3d lives in ``test_kernel_patch_embed.py`` and is not repeated here.
Where a layer test compares against ``nn.Conv3d`` (interpolated tables, a bf16 module), fp32
layers are held to STYLE.md's parity rule (``tests/parity.py``) against a float64 CPU
reference, with the fp32 ``nn.Conv3d`` on the test's device as the plain PyTorch comparator:
on CUDA cuDNN runs that convolution in TF32 by default, and the bound admits exactly that.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from embed_helpers import gather_tokens, random_video
from parity import assert_parity
from vatt_fast.kernels import _dispatch
from vatt_fast.kernels.patch_embed import patch_embed
from vatt_fast.models import create_model
from vatt_fast.nn.embed import (
    AudioPatchEmbed,
    DropToken,
    TextEmbed,
    VideoPatchEmbed,
    interpolate_pos_table,
)


# --------------------------------------------------------------------------------------
# independent helpers
# --------------------------------------------------------------------------------------
def lerp_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linear resampling with align_corners=False, written out index by index."""
    L = table.shape[0]
    rows = []
    for i in range(length):
        src = max((i + 0.5) * L / length - 0.5, 0.0)
        i0 = min(int(math.floor(src)), L - 1)
        i1 = min(i0 + 1, L - 1)
        lam = src - i0
        rows.append((1 - lam) * table[i0] + lam * table[i1])
    return torch.stack(rows)


def summed_pos(e_t, e_h, e_w):
    """pos[(i * Hp + j) * Wp + k] = e_t[i] + e_h[j] + e_w[k], with loops."""
    rows = []
    for i in range(e_t.shape[0]):
        for j in range(e_h.shape[0]):
            for k in range(e_w.shape[0]):
                rows.append(e_t[i] + e_h[j] + e_w[k])
    return torch.stack(rows)


def conv3d_reference(layer: VideoPatchEmbed, x: torch.Tensor, pos: torch.Tensor, dtype=None, device=None) -> torch.Tensor:
    """A plain nn.Conv3d holding the layer's weights, on x / 127.5 - 1, plus pos.

    In the layer's dtype on x's device by default (the plain PyTorch comparator), or in
    ``dtype`` on ``device`` (``torch.float64, "cpu"``: the reference).
    """
    dtype = layer.proj.weight.dtype if dtype is None else dtype
    device = x.device if device is None else device
    conv = nn.Conv3d(layer.in_chans, layer.embed_dim, layer.patch_size, stride=layer.patch_size)
    conv = conv.to(device=device, dtype=dtype)
    conv.load_state_dict(layer.proj.state_dict())
    normalised = x.to(device=device, dtype=dtype) / 127.5 - 1.0
    out = conv(normalised.permute(0, 4, 1, 2, 3))  # (B, D, Tp, Hp, Wp)
    return out.flatten(2).transpose(1, 2) + pos.to(device=device, dtype=dtype)  # (B, N, D)


# fp32 parity floor. The layer folds x / 127.5 - 1 into its weights, so it sums pixel values
# up to 255 against scaled weights and cancels the shift in the bias: ~1e-6 more rounding than
# Conv3d on the normalised input (measured on these shapes). 1e-5 covers that on any CPU and
# stays far below the ~3.5e-4 that a TF32 convolution adds on CUDA.
ATOL_FP32 = 1e-5


# --------------------------------------------------------------------------------------
# VideoPatchEmbed
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32], ids=["uint8", "float32"])
def test_video_patch_embed_is_patch_embed_on_its_conv3d(device, in_dtype):
    """The layer is the patch_embed op (held to Conv3d parity in test_kernel_patch_embed.py) on
    a real nn.Conv3d's weight and bias (kernel = stride = patch_size), the summed position
    tables and the default pixel affine x / 127.5 - 1, bit for bit."""
    layer = VideoPatchEmbed(patch_size=(2, 8, 8), in_chans=3, embed_dim=40, grid_size=(3, 3, 3)).to(device)
    assert isinstance(layer.proj, nn.Conv3d)
    assert layer.proj.kernel_size == layer.proj.stride == (2, 8, 8)
    x = random_video((2, 6, 24, 24, 3), in_dtype, device)
    out = layer(x)
    pos = layer.position_embedding()
    assert out.shape == (2, 27, 40) and out.dtype == torch.float32
    torch.testing.assert_close(pos, summed_pos(layer.pos_embed_t, layer.pos_embed_h, layer.pos_embed_w), rtol=0, atol=1e-7)
    op = patch_embed(x, layer.proj.weight, layer.proj.bias, pos=pos, scale=1 / 127.5, shift=-1.0, impl=layer.impl)
    torch.testing.assert_close(out, op, rtol=0, atol=0)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_video_patch_embed_keep(device, per_sample):
    layer = VideoPatchEmbed(patch_size=(2, 8, 8), in_chans=3, embed_dim=40, grid_size=(3, 3, 2)).to(device)
    x = random_video((3, 6, 24, 16, 3), torch.uint8, device)
    drop = DropToken(rate=0.5, per_sample=per_sample)
    keep = drop.sample_keep(3, 18, device)
    assert keep.shape == ((3, 9) if per_sample else (9,))
    torch.testing.assert_close(layer(x, keep=keep), gather_tokens(layer(x), keep), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_sample", [None, False, True], ids=["all", "shared", "per_sample"])
def test_video_patch_embed_gradients_reach_every_parameter(device, per_sample):
    """Gradients reach proj.weight, proj.bias and the three position tables as through the
    patch_embed op (whose gradients test_kernel_patch_embed.py holds to Conv3d's, on these
    shapes) given the tables summed with explicit loops."""
    layer = VideoPatchEmbed(patch_size=(2, 5, 5), in_chans=3, embed_dim=9, grid_size=(2, 2, 3)).to(device).double()
    x = random_video((2, 4, 10, 15, 3), torch.uint8, device)
    keep = None if per_sample is None else DropToken(0.5, per_sample=per_sample).sample_keep(2, 12, device)
    params = [layer.proj.weight, layer.proj.bias, layer.pos_embed_t, layer.pos_embed_h, layer.pos_embed_w]
    out = layer(x, keep=keep)
    pos = summed_pos(layer.pos_embed_t, layer.pos_embed_h, layer.pos_embed_w)
    ref = patch_embed(x, layer.proj.weight, layer.proj.bias, pos=pos, keep=keep, scale=1 / 127.5, shift=-1.0, impl=layer.impl)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, params, grad_out)
    want = torch.autograd.grad(ref, params, grad_out)
    for name, g, r in zip(("proj.weight", "proj.bias", "pos_embed_t", "pos_embed_h", "pos_embed_w"), got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")
        assert g.abs().sum() > 0, name


def test_video_patch_embed_interpolates_pos_tables(device):
    """Parity rule (module docstring) against nn.Conv3d; the reference interpolates the tables
    with explicit loops in float64, the comparator in fp32 on the device."""
    layer = VideoPatchEmbed(patch_size=(2, 4, 4), in_chans=3, embed_dim=12, grid_size=(3, 4, 5)).to(device)
    x = random_video((2, 10, 12, 8, 3), torch.uint8, device)  # grid (5, 3, 2): every table resized
    out = layer(x)
    tables = (layer.pos_embed_t, layer.pos_embed_h, layer.pos_embed_w)
    pos64 = summed_pos(*(lerp_table(e.detach().double().cpu(), n) for e, n in zip(tables, (5, 3, 2))))
    pos32 = summed_pos(*(lerp_table(e.detach(), n) for e, n in zip(tables, (5, 3, 2))))
    ref = conv3d_reference(layer, x, pos64, torch.float64, "cpu")
    plain = conv3d_reference(layer, x, pos32)
    assert out.shape == (2, 30, 12)
    assert_parity(out, ref, plain, ATOL_FP32, plain_rtol=1e-2)
    # Gradients reach the stored tables through the interpolation.
    grads = torch.autograd.grad(out.sum(), [layer.pos_embed_t, layer.pos_embed_h, layer.pos_embed_w])
    assert all(g.abs().sum() > 0 for g in grads)


def test_interpolate_pos_table_identity_and_values():
    table = torch.randn(7, 5)
    assert interpolate_pos_table(table, 7) is table
    for length in (1, 3, 11):
        torch.testing.assert_close(interpolate_pos_table(table, length), lerp_table(table, length))
    with pytest.raises(ValueError, match="to 0 entries"):
        interpolate_pos_table(table, 0)


def test_video_patch_embed_pixel_affine_options():
    x = random_video((1, 2, 8, 8, 3), torch.float32, "cpu")
    raw = VideoPatchEmbed(patch_size=(2, 4, 4), embed_dim=6, grid_size=(1, 2, 2), pixel_scale=None, pixel_shift=None)
    normalised_input = x / 127.5 - 1.0
    std = VideoPatchEmbed(patch_size=(2, 4, 4), embed_dim=6, grid_size=(1, 2, 2))
    std.load_state_dict(raw.state_dict())
    # Raw pixels through the default affine == normalised pixels with the affine switched off.
    torch.testing.assert_close(std(x), raw(normalised_input), rtol=1e-5, atol=1e-5)
    # Per-channel (ImageNet-style) normalisation.
    mean, sd = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    per_channel = VideoPatchEmbed(
        patch_size=(2, 4, 4), embed_dim=6, grid_size=(1, 2, 2),
        pixel_scale=[1 / (255 * s) for s in sd], pixel_shift=[-m / s for m, s in zip(mean, sd)],
    )
    per_channel.load_state_dict(raw.state_dict())
    expected = raw((x / 255 - torch.tensor(mean)) / torch.tensor(sd))
    torch.testing.assert_close(per_channel(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pixel_scale must be a float or 3 floats.*got 2 values"):
        VideoPatchEmbed(pixel_scale=[1.0, 2.0])


def test_video_patch_embed_low_precision_module_keeps_exact_affine():
    layer = VideoPatchEmbed(patch_size=(2, 8, 8), embed_dim=32, grid_size=(2, 2, 2))
    x = random_video((2, 4, 16, 16, 3), torch.uint8, "cpu")
    ref = conv3d_reference(layer.double(), x, layer.position_embedding())
    layer = layer.float()
    low = layer.to(torch.bfloat16)
    out = low(x)
    assert out.dtype == torch.bfloat16
    # Parity rule: no worse than twice what plain bf16 Conv3d gets on the normalised video.
    w = low.proj.weight
    torch_low = F.conv3d(((x.float() / 127.5 - 1).bfloat16()).permute(0, 4, 1, 2, 3).float(), w.float(),
                         low.proj.bias.float(), stride=(2, 8, 8)).bfloat16().flatten(2).transpose(1, 2)
    torch_low = torch_low + low.position_embedding()
    err = (out.double() - ref).abs().max().item()
    base = (torch_low.double() - ref).abs().max().item()
    assert err <= 2 * base + 1e-3, (err, base)


def test_video_patch_embed_autocast_dtype():
    layer = VideoPatchEmbed(patch_size=(2, 8, 8), embed_dim=16, grid_size=(1, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(random_video((1, 2, 16, 16, 3), torch.uint8, "cpu"))
    assert out.dtype == torch.bfloat16


def test_video_patch_embed_state_dict():
    layer = VideoPatchEmbed(patch_size=(2, 8, 8), in_chans=3, embed_dim=40, grid_size=(3, 3, 3))
    assert set(layer.state_dict()) == {"proj.weight", "proj.bias", "pos_embed_t", "pos_embed_h", "pos_embed_w"}
    assert layer.pos_embed_t.shape == (3, 40) and layer.proj.weight.shape == (40, 3, 2, 8, 8)
    clone = VideoPatchEmbed(patch_size=(2, 8, 8), in_chans=3, embed_dim=40, grid_size=(3, 3, 3))
    clone.load_state_dict(layer.state_dict())
    x = random_video((1, 6, 24, 24, 3), torch.uint8, "cpu")
    torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
    # A plain Conv3d's weights load into proj (and back).
    conv = nn.Conv3d(3, 40, (2, 8, 8), stride=(2, 8, 8))
    layer.proj.load_state_dict(conv.state_dict())
    torch.testing.assert_close(layer.proj.weight, conv.weight, rtol=0, atol=0)
    conv2 = nn.Conv3d(3, 40, (2, 8, 8), stride=(2, 8, 8))
    conv2.load_state_dict(layer.proj.state_dict())
    torch.testing.assert_close(conv2.bias, conv.bias, rtol=0, atol=0)


def test_position_tables_init():
    layer = VideoPatchEmbed(embed_dim=256, grid_size=(8, 14, 14))
    for table in (layer.pos_embed_t, layer.pos_embed_h, layer.pos_embed_w):
        assert table.abs().max() <= 2 * 0.02 + 1e-6  # truncated at two standard deviations
        assert 0.01 < table.std().item() < 0.03


BAD_VIDEO = [
    (dict(x=torch.zeros(2, 5, 16, 16, 3, dtype=torch.uint8)), r"patch size 2 does not divide frames T=5"),
    (dict(x=torch.zeros(2, 4, 16, 12, 3, dtype=torch.uint8)), r"patch size 8 does not divide width W=12"),
    # shorter than one tubelet: still the op's message, not a failure to size the position table
    (dict(x=torch.zeros(2, 1, 16, 16, 3, dtype=torch.uint8)), r"patch size 2 does not divide frames T=1"),
    (dict(x=torch.zeros(2, 4, 16, 16, dtype=torch.uint8)), r"expects video \[B, T, H, W, C=3\], got \(2, 4, 16, 16\)"),
    (dict(x=torch.zeros(2, 4, 16, 16, 1, dtype=torch.uint8)), r"x has 1 channels.*expects C=3"),
    (dict(keep=torch.tensor([0, 8])), r"keep holds token index 8 but there are 8 tokens"),
]


@pytest.mark.parametrize("override,message", BAD_VIDEO)
def test_video_patch_embed_bad_inputs(override, message):
    layer = VideoPatchEmbed(patch_size=(2, 8, 8), embed_dim=8, grid_size=(2, 2, 2))
    args = dict(x=torch.zeros(2, 4, 16, 16, 3, dtype=torch.uint8), keep=None)
    args.update(override)
    with pytest.raises(ValueError, match=message):
        layer(**args)


def test_impl_is_resolved_when_the_layer_is_built_or_switched(monkeypatch):
    """``impl=None`` reads ``$VATT_FAST_KERNELS`` once, at build (or ``set_kernel_impl``), never in forward."""
    monkeypatch.setenv("VATT_FAST_KERNELS", "reference")
    layers = [VideoPatchEmbed(impl=None), AudioPatchEmbed(impl=None), DropToken(impl=None)]
    assert [m.impl for m in layers] == ["reference"] * 3
    monkeypatch.setenv("VATT_FAST_KERNELS", "triton")  # later changes do not reach built layers
    assert [m.impl for m in layers] == ["reference"] * 3
    assert VideoPatchEmbed(impl="auto").impl == "auto"
    model = create_model("tiny", vocab_size=20).set_kernel_impl(None)
    assert {m.impl for m in model.modules() if hasattr(m, "impl") and isinstance(m, (VideoPatchEmbed, DropToken))} == {"triton"}
    monkeypatch.delenv("VATT_FAST_KERNELS")
    assert VideoPatchEmbed(impl=None).impl == "auto"
    with pytest.raises(ValueError, match=r"impl='cuda' is not one of"):
        VideoPatchEmbed(impl="cuda")
    with pytest.raises(ValueError, match=r"impl='fast'"):
        DropToken(impl="fast")
    with pytest.raises(ValueError, match=r"impl='fast'"):
        model.set_kernel_impl("fast")


def test_layers_with_the_triton_impl_match_the_reference(device):
    """The layers run the Triton kernels with impl="triton" (the interpreter on a CPU machine)."""
    pe = importlib.import_module("vatt_fast.kernels.patch_embed")
    if not _dispatch.triton_available() or (device.type == "cpu" and not pe.INTERPRETING):
        pytest.skip("needs Triton on CUDA, or TRITON_INTERPRET=1 on the CPU")
    video = VideoPatchEmbed(patch_size=(2, 8, 8), embed_dim=24, grid_size=(2, 2, 2), impl="triton").to(device)
    audio = AudioPatchEmbed(patch_size=4, embed_dim=12, num_patches=6, impl="triton").to(device)
    x = torch.randint(0, 256, (2, 4, 16, 16, 3), dtype=torch.uint8, device=device)
    wave = torch.randn(2, 24, device=device)
    keep = torch.tensor([5, 0, 2], device=device)
    for layer, inp in ((video, x), (audio, wave)):
        out = layer(inp, keep=keep)
        layer.impl = "reference"
        torch.testing.assert_close(out, layer(inp, keep=keep), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# AudioPatchEmbed
# --------------------------------------------------------------------------------------
def test_audio_patch_embed_matches_conv1d(device):
    layer = AudioPatchEmbed(patch_size=16, embed_dim=24, num_patches=13).to(device)
    wave = torch.randn(3, 13 * 16, device=device)
    conv = nn.Conv1d(1, 24, 16, stride=16).to(device)
    conv.load_state_dict(layer.proj.state_dict())
    ref = conv(wave.unsqueeze(1)).transpose(1, 2) + layer.pos_embed
    out = layer(wave)
    assert out.shape == (3, 13, 24)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    keep = DropToken(0.5).sample_keep(3, 13, device)
    torch.testing.assert_close(layer(wave, keep=keep), ref[:, keep], rtol=1e-5, atol=1e-5)
    keep = DropToken(0.3, per_sample=True).sample_keep(3, 13, device)
    torch.testing.assert_close(layer(wave, keep=keep), gather_tokens(ref, keep), rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, [layer.proj.weight, layer.proj.bias, layer.pos_embed], grad_out)
    want = torch.autograd.grad(ref, [conv.weight, conv.bias], grad_out)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[2], grad_out.sum(0), rtol=1e-5, atol=1e-5)


def test_audio_patch_embed_interpolates_and_state_dict():
    layer = AudioPatchEmbed(patch_size=8, embed_dim=6, num_patches=10)
    assert set(layer.state_dict()) == {"proj.weight", "proj.bias", "pos_embed"}
    wave = torch.randn(2, 7 * 8)
    conv = nn.Conv1d(1, 6, 8, stride=8)
    conv.load_state_dict(layer.proj.state_dict())
    ref = conv(wave.unsqueeze(1)).transpose(1, 2) + lerp_table(layer.pos_embed, 7)
    torch.testing.assert_close(layer(wave), ref, rtol=1e-5, atol=1e-5)
    clone = AudioPatchEmbed(patch_size=8, embed_dim=6, num_patches=10)
    clone.load_state_dict(layer.state_dict())
    torch.testing.assert_close(clone(wave), layer(wave), rtol=0, atol=0)


@pytest.mark.parametrize(
    "wave,message",
    [
        (torch.randn(2, 100), r"patch size 16 does not divide the waveform length S=100.*96 or 112"),
        (torch.randn(2, 5), r"patch size 16 does not divide the waveform length S=5.*\(e\.g\. 16 samples\)"),
        (torch.randn(2, 1, 64), r"expects a waveform \[B, S\], got \(2, 1, 64\)"),
        (torch.zeros(2, 64, dtype=torch.int16), r"waveform x must be floating point, got dtype torch.int16"),
    ],
)
def test_audio_patch_embed_bad_inputs(wave, message):
    with pytest.raises(ValueError, match=message):
        AudioPatchEmbed(patch_size=16, embed_dim=4, num_patches=4)(wave)


# --------------------------------------------------------------------------------------
# TextEmbed
# --------------------------------------------------------------------------------------
def test_text_embed_lookup(device):
    layer = TextEmbed(vocab_size=53, embed_dim=12).to(device)
    ids = torch.randint(0, 53, (3, 2, 7), device=device)
    out = layer(ids)
    assert out.shape == (3, 2, 7, 12)
    torch.testing.assert_close(out, layer.word_embedding.weight[ids], rtol=0, atol=0)
    assert set(layer.state_dict()) == {"word_embedding.weight"}
    assert torch.all(layer.word_embedding.weight[0] == 0)  # padding row


def test_text_embed_word_table_then_dense(device):
    layer = TextEmbed(vocab_size=41, embed_dim=16, word_dim=5).to(device)
    assert set(layer.state_dict()) == {"word_embedding.weight", "proj.weight", "proj.bias"}
    ids = torch.randint(0, 41, (4, 9), device=device)
    table, w, b = layer.word_embedding.weight, layer.proj.weight, layer.proj.bias
    torch.testing.assert_close(layer(ids), table[ids] @ w.t() + b, rtol=1e-5, atol=1e-5)


def test_text_embed_pretrained_table_and_freezing():
    layer = TextEmbed(vocab_size=11, embed_dim=8, word_dim=4)
    assert not layer.frozen
    table = torch.randn(11, 4)
    layer.load_pretrained_table(table)
    assert layer.frozen
    torch.testing.assert_close(layer.word_embedding.weight, table, rtol=0, atol=0)
    ids = torch.tensor([[1, 2, 0], [3, 10, 4]])
    layer(ids).sum().backward()
    assert layer.word_embedding.weight.grad is None and layer.proj.weight.grad is not None
    layer.load_pretrained_table(table.numpy(), freeze=False)
    assert not layer.frozen
    with pytest.raises(ValueError, match=r"shape \(11, 300\) but this TextEmbed expects \(11, 4\).*word_dim=300"):
        layer.load_pretrained_table(torch.zeros(11, 300))
    assert TextEmbed(11, 8, word_dim=4, freeze_word_embedding=True).frozen


def test_text_embed_padding_gets_no_gradient():
    layer = TextEmbed(vocab_size=9, embed_dim=4)
    layer(torch.tensor([[0, 3, 0, 5]])).pow(2).sum().backward()
    grad = layer.word_embedding.weight.grad
    assert torch.all(grad[0] == 0) and grad[3].abs().sum() > 0


@pytest.mark.parametrize(
    "ids,message",
    [
        (torch.tensor([[1, 2, 9]]), r"\[0, 8\], got ids from 1 to max id 9 with vocab_size=9"),
        (torch.tensor([[-1, 2]]), r"got ids from -1 to max id 2 with vocab_size=9"),
        (torch.tensor([[1.0, 2.0]]), r"expects int64 word ids, got dtype torch.float32"),
    ],
)
def test_text_embed_bad_ids(ids, message):
    with pytest.raises(ValueError, match=message):
        TextEmbed(vocab_size=9, embed_dim=4)(ids)


# --------------------------------------------------------------------------------------
# DropToken
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate,num_tokens,kept", [(0.5, 1568, 784), (0.5, 1200, 600), (0.5, 13, 6), (0.9, 50, 5), (0.9, 3, 1), (0.1, 50, 45)])
def test_drop_token_counts(rate, num_tokens, kept):
    drop = DropToken(rate)
    assert drop.num_kept(num_tokens) == kept
    keep = drop.sample_keep(2, num_tokens, "cpu")
    assert keep.shape == (kept,) and keep.dtype == torch.int64
    assert keep.unique().numel() == kept and keep.min() >= 0 and keep.max() < num_tokens


def test_drop_token_forward_shared_and_per_sample(device):
    x = torch.randn(4, 64, 6, device=device)
    shared, keep = DropToken(0.5)(x)
    assert keep.shape == (32,) and shared.shape == (4, 32, 6)
    torch.testing.assert_close(shared, x[:, keep], rtol=0, atol=0)
    per, keep = DropToken(0.25, per_sample=True)(x)
    assert keep.shape == (4, 48) and per.shape == (4, 48, 6)
    for b in range(4):
        assert keep[b].unique().numel() == 48
        torch.testing.assert_close(per[b], x[b, keep[b]], rtol=0, atol=0)
    # Independent draws per sample (identical rows have probability ~ 1 / 64!).
    assert any(not torch.equal(keep[0], keep[b]) for b in range(1, 4))


def test_drop_token_eval_and_zero_rate_are_identity():
    x = torch.randn(2, 10, 3)
    drop = DropToken(0.5).eval()
    out, keep = drop(x)
    assert out is x and keep is None
    assert drop.sample_keep(2, 10, "cpu") is None
    out, keep = DropToken(0.0)(x)
    assert out is x and keep is None


def test_drop_token_deterministic_under_manual_seed():
    drop = DropToken(0.5, per_sample=True)
    torch.manual_seed(123)
    a = drop.sample_keep(3, 40, "cpu")
    torch.manual_seed(123)
    b = drop.sample_keep(3, 40, "cpu")
    c = drop.sample_keep(3, 40, "cpu")
    assert torch.equal(a, b) and not torch.equal(b, c)
    shared = DropToken(0.5)
    torch.manual_seed(7)
    s1 = shared.sample_keep(3, 40, "cpu")
    torch.manual_seed(7)
    assert torch.equal(s1, shared.sample_keep(3, 40, "cpu"))


def test_drop_token_gradient_reaches_kept_tokens_only():
    x = torch.randn(2, 12, 3, requires_grad=True)
    out, keep = DropToken(0.5)(x)
    out.sum().backward()
    mask = torch.zeros(12, dtype=torch.bool)
    mask[keep] = True
    assert torch.all(x.grad[:, mask] == 1) and torch.all(x.grad[:, ~mask] == 0)


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5])
def test_drop_token_bad_rate(rate):
    with pytest.raises(ValueError, match=rf"rate must be in \[0, 1\), got {rate}"):
        DropToken(rate)


def test_drop_token_bad_input():
    with pytest.raises(ValueError, match=r"tokens \[B, N, D\], got shape \(2, 10\)"):
        DropToken(0.5)(torch.randn(2, 10))
