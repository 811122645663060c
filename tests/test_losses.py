"""The loss modules (vatt_fast.nn.losses: NCELoss, MILNCELoss, VATTLoss): what they add to the
mil_nce / nce ops (fp32 L2 normalisation, masked captions zeroed first, the mean over the
clips that have a positive, tau, input checks, impl) against the op and against an explicit
fp64 computation of the released formula (``nce_helpers.py``). The per-clip math itself is
tested in ``test_kernel_nce.py``.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from nce_helpers import TAU, explicit_mil_nce, grads_of, holey_mask
from vatt_fast import distributed as vdist
from vatt_fast.kernels.nce import mil_nce, mil_nce_reference, nce
from vatt_fast.nn.losses import MILNCELoss, NCELoss, VATTLoss


def test_loss_modules_are_the_op_averaged_over_valid_clips(device):
    """MILNCELoss / NCELoss: the op on the L2-normalised embeddings, summed over the clips that
    have a positive and divided by their count; value and input gradients, bit for bit."""
    b, k, d = 7, 3, 13
    video = torch.randn(b, d, device=device) * 3
    text = torch.randn(b, k, d, device=device)
    audio = torch.randn(b, d, device=device)
    mask = holey_mask(b, k, empty_rows=(1, 4)).to(device)

    loss, (gv, gt) = grads_of(lambda v, t: MILNCELoss()(v, t, mask), video, text)
    per_clip = lambda v, t: mil_nce(F.normalize(v, dim=-1), F.normalize(t, dim=-1), mask)
    valid = b - 2  # rows 1 and 4 have no caption, holey_mask gives every other row one
    want, (wv, wt) = grads_of(lambda v, t: per_clip(v, t).sum() / valid, video, text)
    assert loss.dtype == torch.float32 and loss.device == video.device
    for name, got, ref in (("loss", loss, want), ("video grad", gv, wv), ("text grad", gt, wt)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=lambda m, n=name: f"MILNCELoss {n}: {m}")

    loss, (gv, ga) = grads_of(lambda v, a: NCELoss()(v, a), video, audio)
    want, (wv, wa) = grads_of(lambda v, a: nce(F.normalize(v, dim=-1), F.normalize(a, dim=-1)).sum() / b, video, audio)
    for name, got, ref in (("loss", loss, want), ("video grad", gv, wv), ("audio grad", ga, wa)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=lambda m, n=name: f"NCELoss {n}: {m}")


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


def test_impl_dispatch(monkeypatch):
    """Every impl gives the reference's loss; ``auto`` (the default) is the chunked path on the
    CPU; Triton on CPU tensors needs the interpreter; unknown names raise at construction."""
    from vatt_fast.kernels import _dispatch

    nce_mod = importlib.import_module("vatt_fast.kernels.nce")
    video, text = torch.randn(5, 8), torch.randn(5, 3, 8)
    ref = mil_nce_reference(F.normalize(video, dim=-1), F.normalize(text, dim=-1))
    calls = []
    real_chunked = nce_mod.mil_nce_chunked
    monkeypatch.setattr(nce_mod, "mil_nce_chunked", lambda *a: calls.append("chunked") or real_chunked(*a))
    for env in ("reference", "auto"):
        monkeypatch.setenv("VATT_FAST_KERNELS", env)
        torch.testing.assert_close(MILNCELoss()(video, text), ref.mean())
    assert calls == ["chunked"]  # the default on the CPU
    monkeypatch.delenv("VATT_FAST_KERNELS")
    torch.testing.assert_close(MILNCELoss(impl="chunked")(video, text), ref.mean())
    with pytest.raises(ValueError, match="impl='fast'"):
        NCELoss(impl="fast")
    if not _dispatch.triton_available():
        with pytest.raises(NotImplementedError):
            NCELoss(impl="triton")(video, text[:, 0])
        return
    if nce_mod.INTERPRETING:
        torch.testing.assert_close(MILNCELoss(impl="triton")(video, text), ref.mean())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        NCELoss(impl="triton")(video, text[:, 0])
    monkeypatch.setenv("VATT_FAST_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        MILNCELoss()(video, text)


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


def test_loss_impl_is_resolved_when_built(monkeypatch):
    """``impl=None`` reads ``$VATT_FAST_KERNELS`` once, when the loss is built."""
    from vatt_fast.nn.losses import MILNCELoss, NCELoss, VATTLoss

    monkeypatch.setenv("VATT_FAST_KERNELS", "reference")
    losses = [NCELoss(), MILNCELoss(), VATTLoss()]
    monkeypatch.setenv("VATT_FAST_KERNELS", "triton")
    assert [losses[0].impl, losses[1].impl, losses[2].va.impl, losses[2].vt.impl] == ["reference"] * 4
    monkeypatch.delenv("VATT_FAST_KERNELS")
    assert NCELoss().impl == "auto" and NCELoss(impl="chunked").impl == "chunked"
