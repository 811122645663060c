"""The ``drop_token_gather`` op (``vatt_fast.kernels.drop_token_gather``): its PyTorch reference
against an independent dense one-hot selection matmul (float64, with gradients), ``keep``
index dtypes and empty selections, input checks, and how it dispatches by ``impl``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vatt_fast.kernels import _dispatch, drop_token_gather
from vatt_fast.kernels.drop_token_gather import drop_token_gather_reference


# --------------------------------------------------------------------------------------
# independent computation
# --------------------------------------------------------------------------------------
def dense_gather(x, keep, pos=None):
    """Independent: a one-hot selection matrix times the tokens."""
    B, N, _ = x.shape
    rows = keep if keep.dim() == 2 else keep.expand(B, -1)
    select = F.one_hot(rows, N).to(x.dtype)  # (B, N_keep, N)
    out = select @ x
    return out if pos is None else out + select @ pos.to(x.dtype)


# --------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------
def test_never_falls_back_silently():
    with pytest.raises(NotImplementedError, match="drop_token_gather lands in a later release"):
        drop_token_gather(torch.randn(2, 4, 3), torch.tensor([0, 2]), impl="triton")


def test_registered_triton_kernel_is_called(monkeypatch):
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    calls = []

    def fake_gather(x, keep, pos=None):
        calls.append((keep, pos))
        return "fake-gather-output"

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(_dispatch._TRITON_OPS, "drop_token_gather", fake_gather)
    keep = torch.tensor([1])
    assert drop_token_gather(torch.zeros(1, 3, 2), keep, impl="triton") == "fake-gather-output"
    assert calls[-1] == (keep, None)
    assert _dispatch.has_triton("drop_token_gather")


# --------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------
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


def test_keep_int32_and_empty(device):
    pos = torch.randn(12, 5, device=device)
    for keep in (torch.tensor([11, 0, 4], device=device), torch.tensor([[3, 3], [10, 1]], device=device)):
        tokens = torch.randn(2, 12, 5, device=device)
        torch.testing.assert_close(drop_token_gather(tokens, keep.int(), pos), drop_token_gather(tokens, keep, pos), rtol=0, atol=0)
    for empty in (torch.zeros(0, dtype=torch.long, device=device), torch.zeros(2, 0, dtype=torch.long, device=device)):
        assert drop_token_gather(torch.randn(2, 12, 5, device=device), empty).shape == (2, 0, 5)


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
