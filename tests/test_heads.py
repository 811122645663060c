"""Common-space heads against a functional re-computation of the VATT release's FAC head."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vatt_fast.nn.heads import CommonSpaceHeads

DV, DA, DT, VA, VT = 48, 40, 36, 24, 20


def batch_norm_train(x, bn):
    """BatchNorm1d in training mode from its definition: biased batch variance."""
    mean = x.mean(0)
    var = x.var(0, unbiased=False)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias


def reference(heads, video, audio, text):
    w1, bn1, w2, bn2 = heads.video_to_va[0].weight, heads.video_to_va[1], heads.video_to_va[3].weight, heads.video_to_va[4]
    video_va = batch_norm_train(torch.relu(batch_norm_train(video @ w1.T, bn1)) @ w2.T, bn2)
    w3, bn3 = heads.va_to_vt[1].weight, heads.va_to_vt[2]
    video_vt = batch_norm_train(torch.relu(video_va) @ w3.T, bn3)
    audio_va = audio @ heads.audio_to_va.weight.T + heads.audio_to_va.bias
    text_vt = text @ heads.text_to_vt.weight.T + heads.text_to_vt.bias
    return {"video_va": video_va, "video_vt": video_vt, "audio_va": audio_va, "text_vt": text_vt}


def make_inputs(device, B=6, K=3):
    return (
        torch.randn(B, DV, device=device),
        torch.randn(B, DA, device=device),
        torch.randn(B, K, DT, device=device),
    )


def test_heads_match_reference_in_training(device):
    heads = CommonSpaceHeads(DV, DA, DT, va_dim=VA, vt_dim=VT).to(device).train()
    video, audio, text = make_inputs(device)
    out = heads(video, audio, text)
    expected = reference(heads, video, audio, text)
    assert out.keys() == expected.keys()
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {"video_va": (6, VA), "video_vt": (6, VT), "audio_va": (6, VA), "text_vt": (6, 3, VT)}
    for key in expected:
        torch.testing.assert_close(out[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    # BatchNorm is really there: in training, every video_va feature has zero batch mean, bias-shifted
    torch.testing.assert_close(out["video_va"].mean(0), heads.video_to_va[4].bias.expand(VA), atol=1e-5, rtol=0)


def test_heads_structure_follows_release():
    heads = CommonSpaceHeads(DV, DA, DT)
    assert (heads.va_dim, heads.vt_dim) == (512, 256)
    kinds = [type(m) for m in heads.video_to_va]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert [type(m) for m in heads.va_to_vt] == [nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert heads.video_to_va[0].bias is None and heads.video_to_va[3].bias is None and heads.va_to_vt[1].bias is None
    assert heads.audio_to_va.bias is not None and heads.text_to_vt.bias is not None
    assert heads.text_to_vt.weight.shape == (256, DT) and heads.va_to_vt[1].weight.shape == (256, 512)
    bn = heads.video_to_va[1]
    assert (bn.momentum, bn.eps) == (0.1, 1e-5)
    custom = CommonSpaceHeads(DV, DA, DT, bn_momentum=0.01, bn_eps=1e-3)
    assert all((m.momentum, m.eps) == (0.01, 1e-3) for m in custom.modules() if isinstance(m, nn.BatchNorm1d))


def test_heads_eval_uses_running_statistics(device):
    heads = CommonSpaceHeads(DV, DA, DT, va_dim=VA, vt_dim=VT).to(device)
    video, _, _ = make_inputs(device)
    heads.train()
    for _ in range(3):
        heads(video=video)
    heads.eval()
    single = heads(video=video[:1])["video_va"]  # batch of one is fine in eval
    bn1, bn2 = heads.video_to_va[1], heads.video_to_va[4]
    h = F.batch_norm(video[:1] @ heads.video_to_va[0].weight.T, bn1.running_mean, bn1.running_var, bn1.weight, bn1.bias, eps=bn1.eps)
    h = torch.relu(h) @ heads.video_to_va[3].weight.T
    h = F.batch_norm(h, bn2.running_mean, bn2.running_var, bn2.weight, bn2.bias, eps=bn2.eps)
    torch.testing.assert_close(single, h)
    assert bn1.num_batches_tracked.item() == 3


def test_text_is_projected_per_caption(device):
    heads = CommonSpaceHeads(DV, DA, DT, va_dim=VA, vt_dim=VT).to(device)
    text = torch.randn(4, 5, DT, device=device)
    out = heads(text=text)
    assert list(out) == ["text_vt"] and out["text_vt"].shape == (4, 5, VT)
    for k in range(5):
        torch.testing.assert_close(out["text_vt"][:, k], heads(text=text[:, k])["text_vt"])


def test_partial_inputs_give_partial_outputs():
    heads = CommonSpaceHeads(DV, DA, DT, va_dim=VA, vt_dim=VT)
    video, audio, _ = make_inputs("cpu")
    assert sorted(heads(audio=audio)) == ["audio_va"]
    assert sorted(heads(video=video)) == ["video_va", "video_vt"]


def test_heads_errors():
    heads = CommonSpaceHeads(DV, DA, DT, va_dim=VA, vt_dim=VT)
    with pytest.raises(ValueError, match=r"video must be \[B, 48\], got shape \(4, 47\)"):
        heads(video=torch.randn(4, DV - 1))
    with pytest.raises(ValueError, match=r"text must be \[B, K, 36\] or \[B, 36\]"):
        heads(text=torch.randn(2, 3, 4, DT))
    with pytest.raises(ValueError, match="at least 2 clips per batch in training, got 1"):
        heads(video=torch.randn(1, DV))
    with pytest.raises(ValueError, match="no input"):
        heads()


def test_convert_sync_batchnorm():
    heads = CommonSpaceHeads(DV, DA, DT, va_dim=VA, vt_dim=VT)
    video, audio, text = make_inputs("cpu")
    heads.eval()
    before = heads(video, audio, text)
    converted = heads.convert_sync_batchnorm()
    assert converted is heads
    kinds = [type(m) for m in heads.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [nn.SyncBatchNorm] * 3
    after = heads(video, audio, text)  # no process group: plain BN behaviour, same weights and stats
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)


def test_heads_state_dict_round_trip():
    heads = CommonSpaceHeads(DV, DA, DT, va_dim=VA, vt_dim=VT).train()
    video, audio, text = make_inputs("cpu")
    heads(video, audio, text)  # move the running statistics
    other = CommonSpaceHeads(DV, DA, DT, va_dim=VA, vt_dim=VT)
    other.load_state_dict(heads.state_dict())
    heads.eval()
    other.eval()
    a, b = heads(video, audio, text), other(video, audio, text)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert "video_to_va.1.running_mean" in heads.state_dict()
