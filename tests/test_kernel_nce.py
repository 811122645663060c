"""The ``mil_nce`` and ``nce`` ops (``vatt_fast.kernels.nce``; one kernel family: ``nce``
runs ``mil_nce`` with K = 1) against an explicit fp64 computation of the released formula,
written independently in ``nce_helpers.py``: per-clip losses, masks, gradients, local rows
against gathered candidates, input checks and dispatch.

The ops take L2-normalised embeddings; the tests normalise with ``F.normalize`` and, where
a scalar is compared, reduce the per-clip losses as the loss modules do (the mean over the
clips that have a positive). The modules themselves are tested in ``test_losses.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nce_helpers import TAU, explicit_mil_nce, grads_of, holey_mask
from parity import assert_parity
from vatt_fast.kernels.nce import mil_nce, mil_nce_reference, nce, nce_reference


def released_mil_nce_unmasked(video, text, tau=TAU):
    """The MIL-NCE reference code's vectorised form (cat of x and its transpose), fp64."""
    v = F.normalize(video.double(), dim=-1)
    t = F.normalize(text.double(), dim=-1)
    b, k, d = t.shape
    x = (v @ t.reshape(b * k, d).T / tau).view(b, b, k)
    nominator = torch.logsumexp((x * torch.eye(b, dtype=x.dtype)[:, :, None]).sum(dim=1), dim=1)
    denominator = torch.logsumexp(torch.cat((x, x.permute(1, 0, 2)), dim=1).view(b, -1), dim=1)
    return (denominator - nominator).mean()


def mean_over_valid(per_clip, mask=None):
    """The loss modules' single-process reduction: the mean over the clips with a positive."""
    count = per_clip.shape[0] if mask is None else mask.any(dim=1).sum().clamp_min(1)
    return per_clip.sum() / count


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

    def op_loss(v, t):
        return mean_over_valid(mil_nce(F.normalize(v, dim=-1), F.normalize(t, dim=-1), mask), mask)

    loss, (gv, gt) = grads_of(op_loss, video, text)
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
    per_clip = mil_nce(F.normalize(video.double(), dim=-1), F.normalize(text.double(), dim=-1))
    torch.testing.assert_close(per_clip.mean(), released_mil_nce_unmasked(video, text), rtol=1e-10, atol=1e-10)
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


def test_nce_equals_mil_nce_k1(device):
    b, d = 11, 17
    video = torch.randn(b, d, device=device, dtype=torch.float64)
    audio = torch.randn(b, d, device=device, dtype=torch.float64)
    all_present = torch.ones(b, 1, dtype=torch.bool, device=device)

    def nce_loss_of(v, a):
        return nce(F.normalize(v, dim=-1), F.normalize(a, dim=-1)).mean()

    def mil_loss_of(v, a):
        return mil_nce(F.normalize(v, dim=-1), F.normalize(a, dim=-1)[:, None], all_present).mean()

    nce_loss, (gv, ga) = grads_of(nce_loss_of, video, audio)
    mil_loss, (mv, ma) = grads_of(mil_loss_of, video, audio)
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


def test_bad_inputs_raise_with_shapes():
    with pytest.raises(ValueError, match="video_all"):
        mil_nce_reference(torch.randn(4, 8), torch.randn(4, 2, 8), video_all=torch.randn(6, 7))
    with pytest.raises(ValueError, match="smaller than the local batch"):
        mil_nce_reference(torch.randn(4, 8), torch.randn(4, 2, 8), video_all=torch.randn(3, 8))
    with pytest.raises(TypeError, match="floating point"):
        nce_reference(torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long))


def test_impl_dispatch():
    video, text = torch.randn(5, 8), torch.randn(5, 3, 8)
    with pytest.raises(NotImplementedError, match="mil_nce"):
        mil_nce(video, text, impl="triton")
    # nce runs the mil_nce kernel: no separate registration.
    with pytest.raises(NotImplementedError, match="mil_nce"):
        nce(video, text[:, 0], impl="triton")
    with pytest.raises(ValueError, match="impl"):
        nce(video, text[:, 0], impl="fast")
