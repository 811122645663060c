"""NCE / MIL-NCE (kernels.nce reference and nn.losses modules) against an explicit
fp64 computation of the released formula, written independently here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from parity import assert_parity
from vatt_fast import distributed as vdist
from vatt_fast.kernels.nce import mil_nce, mil_nce_reference, nce, nce_reference
from vatt_fast.nn.losses import MILNCELoss, NCELoss, VATTLoss

TAU = 0.07


def explicit_mil_nce(video, text, mask=None, tau=TAU, per_clip=False, dtype=torch.float64):
    """The released formula, clip by clip, on an explicit [B, B, K] logits tensor.

    For clip i: numerator = logsumexp of x[i, i, valid k]; denominator = logsumexp of the
    concatenation of row i (x[i, j, k] over every valid caption (j, k)) and column i
    (x[j, i, k] over every video j and clip i's valid captions k).
    Computed in ``dtype`` (fp64: the reference; fp32: the plain PyTorch comparator of the
    parity rule) on the inputs' device.
    """
    v = F.normalize(video.to(dtype), dim=-1)
    t = F.normalize(text.to(dtype), dim=-1)
    b, k, _ = t.shape
    if mask is None:
        mask = torch.ones(b, k, dtype=torch.bool)
    mask = mask.to(v.device)
    x = torch.einsum("id,jkd->ijk", v, t) / tau  # (B, B, K): video i vs caption k of clip j
    losses = []
    for i in range(b):
        if not mask[i].any():
            continue
        numerator = torch.logsumexp(x[i, i][mask[i]], dim=0)
        row = x[i][mask]  # every valid caption of every clip
        col = x[:, i][:, mask[i]].reshape(-1)  # every video against clip i's valid captions
        denominator = torch.logsumexp(torch.cat([row, col]), dim=0)
        losses.append(denominator - numerator)
    if per_clip:
        return losses
    if not losses:
        return (v.sum() + t.sum()) * 0.0
    return torch.stack(losses).mean()


def released_mil_nce_unmasked(video, text, tau=TAU):
    """The MIL-NCE reference code's vectorised form (cat of x and its transpose), fp64."""
    v = F.normalize(video.double(), dim=-1)
    t = F.normalize(text.double(), dim=-1)
    b, k, d = t.shape
    x = (v @ t.reshape(b * k, d).T / tau).view(b, b, k)
    nominator = torch.logsumexp((x * torch.eye(b, dtype=x.dtype)[:, :, None]).sum(dim=1), dim=1)
    denominator = torch.logsumexp(torch.cat((x, x.permute(1, 0, 2)), dim=1).view(b, -1), dim=1)
    return (denominator - nominator).mean()


def holey_mask(b, k, empty_rows=(1,)):
    """Random holes, every listed row empty, every other row with at least one caption."""
    mask = torch.rand(b, k) > 0.4
    mask[:, 0] |= ~mask.any(dim=1)
    for r in empty_rows:
        mask[r] = False
    return mask


def grads_of(fn, *inputs):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs)
    return out.detach(), grads


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("masked", [False, True])
def test_mil_nce_matches_explicit(device, k, masked):
    """Loss and both input gradients under STYLE.md's parity rule: the reference is the
    explicit formula in float64 on the CPU, the comparator the same explicit formula in fp32
    on the test's device (so TF32 matmuls, when the user's torch settings allow them, widen
    the bound exactly as they affect plain PyTorch)."""
    b, d = 7, 13
    video = torch.randn(b, d, device=device) * 3
    text = torch.randn(b, k, d, device=device)
    mask = holey_mask(b, k, empty_rows=(1, 4) if k > 1 else (4,)).to(device) if masked else None

    loss, (gv, gt) = grads_of(lambda v, t: MILNCELoss()(v, t, mask), video, text)
    ref, (rv, rt) = grads_of(lambda v, t: explicit_mil_nce(v, t, mask), video.double().cpu(), text.double().cpu())
    plain, (pv, pt) = grads_of(lambda v, t: explicit_mil_nce(v, t, mask, dtype=torch.float32), video, text)
    assert loss.dtype == torch.float32 and loss.device == video.device
    # Floors of about ten fp32 ulps of the values (loss ~5, gradients <= 1): the loss is one
    # number, so the comparator can be exact by chance; measured excess <= 1.2e-6 / 3e-7.
    assert_parity(loss, ref, plain, 5e-6, "loss", plain_rtol=1e-3)
    assert_parity(gv, rv, pv, 1e-6, "video grad", plain_rtol=1e-3)
    assert_parity(gt, rt, pt, 1e-6, "text grad", plain_rtol=1e-3)
    if masked:
        # Masked captions get no gradient; an empty clip's video still does (it is a
        # candidate in the other clips' columns).
        assert torch.all(gt[~mask] == 0)
        assert gv[4].abs().sum() > 0


def test_matches_released_vectorised_form():
    b, k, d = 9, 5, 16
    video, text = torch.randn(b, d), torch.randn(b, k, d)
    torch.testing.assert_close(
        MILNCELoss()(video.double(), text.double()), released_mil_nce_unmasked(video, text), rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(explicit_mil_nce(video, text), released_mil_nce_unmasked(video, text))


def test_per_clip_reference_and_empty_clip_zero():
    b, k, d = 6, 3, 10
    video = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(b, k, d, dtype=torch.float64), dim=-1)
    mask = holey_mask(b, k, empty_rows=(2,))
    per = mil_nce_reference(video, text, mask)
    assert per.shape == (b,)
    assert per[2] == 0
    expected = torch.stack(explicit_mil_nce(video, text, mask, per_clip=True))
    torch.testing.assert_close(per[mask.any(dim=1)], expected)


def test_local_rows_against_gathered_candidates():
    """Rows [4, 7) of a 10-clip batch, computed with the batch as gathered candidates."""
    n, k, d, lo, hi = 10, 4, 9, 4, 7
    video = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, k, d, dtype=torch.float64), dim=-1)
    mask = holey_mask(n, k, empty_rows=(5, 8))
    full = mil_nce_reference(video, text, mask)
    local = mil_nce_reference(video[lo:hi], text[lo:hi], mask[lo:hi], video, text, mask)
    torch.testing.assert_close(local, full[lo:hi])
    a = text[:, 0]
    torch.testing.assert_close(nce_reference(video[lo:hi], a[lo:hi], video, a), nce_reference(video, a)[lo:hi])


def test_all_masked_is_zero_without_nan():
    b, k, d = 5, 3, 8
    video = torch.randn(b, d, requires_grad=True)
    text = torch.randn(b, k, d)
    text[0, 1] = float("nan")  # garbage in a masked slot must not leak
    text.requires_grad_(True)
    mask = torch.zeros(b, k, dtype=torch.bool)
    loss = MILNCELoss()(video, text, mask)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(video.grad == 0) and torch.all(text.grad == 0)


def test_nan_in_masked_caption_does_not_leak():
    b, k, d = 6, 3, 8
    video, text = torch.randn(b, d), torch.randn(b, k, d)
    mask = holey_mask(b, k, empty_rows=(3,))
    poisoned = text.clone()
    poisoned[~mask] = float("nan")
    loss, (gv, gt) = grads_of(lambda v, t: MILNCELoss()(v, t, mask), video, poisoned)
    ref, (rv, _) = grads_of(lambda v, t: MILNCELoss()(v, t, mask), video, text)
    assert torch.isfinite(gv).all() and torch.isfinite(gt).all()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gv, rv)


def test_gradcheck_fp64():
    b, k, d = 3, 2, 4
    video = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    text = torch.randn(b, k, d, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False], [False, False], [True, True]])
    assert torch.autograd.gradcheck(lambda v, t: MILNCELoss(tau=0.5)(v, t, mask), (video, text))
    audio = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, a: NCELoss(tau=0.3)(v, a), (video, audio))


def test_nce_equals_mil_nce_k1(device):
    b, d = 11, 17
    video = torch.randn(b, d, device=device, dtype=torch.float64)
    audio = torch.randn(b, d, device=device, dtype=torch.float64)
    nce_loss, (gv, ga) = grads_of(lambda v, a: NCELoss()(v, a), video, audio)
    mil_loss, (mv, ma) = grads_of(lambda v, a: MILNCELoss()(v, a[:, None]), video, audio)
    # Same math; the MIL-NCE path also runs its (all-true) mask, which may round differently.
    torch.testing.assert_close(nce_loss, mil_loss, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(gv, mv, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ga, ma, rtol=1e-12, atol=1e-13)
    # Explicit NCE: the positive s_ii is counted in the row and in the column.
    v = F.normalize(video.double().cpu(), dim=-1)
    a = F.normalize(audio.double().cpu(), dim=-1)
    s = v @ a.T / TAU
    explicit = torch.stack(
        [torch.logsumexp(torch.cat([s[i], s[:, i]]), 0) - s[i, i] for i in range(b)]
    ).mean()
    torch.testing.assert_close(nce_loss.double().cpu(), explicit, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_computed_in_fp32(dtype):
    b, k, d = 8, 5, 32
    video, text = torch.randn(b, d, dtype=dtype), torch.randn(b, k, d, dtype=dtype)
    loss = MILNCELoss()(video, text)
    assert loss.dtype == torch.float32
    # Same (rounded) inputs, fp64 explicit: only fp32 arithmetic error remains.
    torch.testing.assert_close(loss.double(), explicit_mil_nce(video, text), rtol=1e-5, atol=1e-5)


def test_tau_scales_logits():
    b, k, d = 5, 2, 6
    video, text = torch.randn(b, d), torch.randn(b, k, d)
    torch.testing.assert_close(
        MILNCELoss(tau=0.2)(video, text).double(), explicit_mil_nce(video, text, tau=0.2), rtol=1e-5, atol=1e-5
    )


def test_vatt_loss_total_and_missing_modalities():
    b, k = 6, 3
    out = {
        "video_va": torch.randn(b, 24),
        "audio_va": torch.randn(b, 24),
        "video_vt": torch.randn(b, 12),
        "text_vt": torch.randn(b, k, 12),
        "text_mask": holey_mask(b, k, empty_rows=(0,)),
    }
    l_va = explicit_mil_nce(out["video_va"], out["audio_va"][:, None])
    l_vt = explicit_mil_nce(out["video_vt"], out["text_vt"], out["text_mask"])

    res = VATTLoss()(out)
    assert set(res) == {"loss", "loss_va", "loss_vt"}
    torch.testing.assert_close(res["loss"].double(), (l_va + l_vt) / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res["loss_va"].double(), l_va, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res["loss_vt"].double(), l_vt, rtol=1e-5, atol=1e-5)

    weighted = VATTLoss(vt_weight=2.0, va_weight=0.5)(out)
    torch.testing.assert_close(weighted["loss"].double(), (2.0 * l_vt + 0.5 * l_va) / 2, rtol=1e-5, atol=1e-5)

    va_only = VATTLoss()({"video_va": out["video_va"], "audio_va": out["audio_va"]})
    assert set(va_only) == {"loss", "loss_va"}
    torch.testing.assert_close(va_only["loss"].double(), l_va, rtol=1e-5, atol=1e-5)
    vt_only = VATTLoss(vt_weight=3.0)({k_: out[k_] for k_ in ("video_vt", "text_vt", "text_mask")})
    assert set(vt_only) == {"loss", "loss_vt"}
    torch.testing.assert_close(vt_only["loss"].double(), 3.0 * l_vt, rtol=1e-5, atol=1e-5)


def test_vatt_loss_text_mask_argument_and_partial_outputs():
    b, k = 5, 2
    video_va, video_vt, text_vt = torch.randn(b, 8), torch.randn(b, 6), torch.randn(b, k, 6)
    mask = holey_mask(b, k, empty_rows=(2,))
    # A model run on video + text: video_va has no audio partner, so only L_vt is computed.
    res = VATTLoss()({"video_va": video_va, "video_vt": video_vt, "text_vt": text_vt}, text_mask=mask)
    assert set(res) == {"loss", "loss_vt"}
    torch.testing.assert_close(res["loss"].double(), explicit_mil_nce(video_vt, text_vt, mask), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pass it once"):
        VATTLoss()({"video_vt": video_vt, "text_vt": text_vt, "text_mask": mask}, text_mask=mask)


def test_vatt_loss_bad_outputs():
    with pytest.raises(ValueError, match="video_va"):
        VATTLoss()({"video_va": torch.randn(2, 4)})
    with pytest.raises(ValueError, match="video_va"):
        VATTLoss()({"text_mask": torch.ones(2, 1, dtype=torch.bool)})


def test_bad_inputs_raise_with_shapes():
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(5, 8\)"):
        NCELoss()(torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(4, 2, 7\)"):
        MILNCELoss()(torch.randn(4, 8), torch.randn(4, 2, 7))
    with pytest.raises(ValueError, match=r"text\[:, None\]"):
        MILNCELoss()(torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="bool"):
        MILNCELoss()(torch.randn(4, 8), torch.randn(4, 2, 8), torch.ones(4, 2))
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        MILNCELoss()(torch.randn(4, 8), torch.randn(4, 2, 8), torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="tau"):
        NCELoss(tau=0.0)
    with pytest.raises(ValueError, match="video_all"):
        mil_nce_reference(torch.randn(4, 8), torch.randn(4, 2, 8), video_all=torch.randn(6, 7))
    with pytest.raises(ValueError, match="smaller than the local batch"):
        mil_nce_reference(torch.randn(4, 8), torch.randn(4, 2, 8), video_all=torch.randn(3, 8))
    with pytest.raises(TypeError, match="floating point"):
        nce_reference(torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long))


def test_impl_dispatch(monkeypatch):
    video, text = torch.randn(5, 8), torch.randn(5, 3, 8)
    ref = mil_nce_reference(F.normalize(video, dim=-1), F.normalize(text, dim=-1))
    with pytest.raises(NotImplementedError, match="nce"):
        mil_nce(video, text, impl="triton")
    with pytest.raises(NotImplementedError):
        NCELoss(impl="triton")(video, text[:, 0])
    with pytest.raises(ValueError, match="impl"):
        nce(video, text[:, 0], impl="fast")
    monkeypatch.setenv("VATT_FAST_KERNELS", "triton")
    with pytest.raises(NotImplementedError):
        MILNCELoss()(video, text)
    monkeypatch.setenv("VATT_FAST_KERNELS", "reference")
    torch.testing.assert_close(MILNCELoss()(video, text), ref.mean())
    monkeypatch.setenv("VATT_FAST_KERNELS", "auto")
    torch.testing.assert_close(MILNCELoss(impl="auto")(video, text), ref.mean())


def test_perfect_alignment_has_known_value():
    """Orthonormal pairs (v_i == a_i, cross terms 0): loss = log(2 e^(1/tau) + 2 (B-1)) - 1/tau."""
    b = 6
    eye = torch.eye(b, dtype=torch.float64)
    expected = math.log(2 * math.exp(1 / TAU) + 2 * (b - 1)) - 1 / TAU
    assert abs(NCELoss()(eye, eye).item() - expected) < 1e-12


def test_distributed_helpers_outside_process_group():
    assert not vdist.is_dist()
    assert vdist.get_rank() == 0 and vdist.get_world_size() == 1
    x = torch.randn(3, 2, requires_grad=True)
    assert vdist.all_gather_with_grad(x) is x
    reduced = vdist.all_reduce_value(x, op="mean")
    assert not reduced.requires_grad and torch.equal(reduced, x.detach())
    reduced.add_(1)
    assert not torch.equal(reduced, x.detach())  # a copy, not a view
    with pytest.raises(ValueError, match="op must be one of"):
        vdist.all_reduce_value(x, op="prod")
