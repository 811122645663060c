"""Choosing an op's implementation (``vatt_fast.kernels._dispatch``): ``resolve_impl``,
``register_triton`` and the ``VATT_FAST_KERNELS`` process default. How each op calls a
registered kernel is tested in that op's own file (``test_kernel_<op>.py``).
"""

from __future__ import annotations

import pytest
import torch

from vatt_fast.kernels import _dispatch, patch_embed, resolve_impl
from vatt_fast.kernels.patch_embed import patch_embed_reference


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


# An op name that no file registers (patch_embed and drop_token_gather have their kernels; see their tests).
def test_triton_without_kernel_raises_not_implemented():
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    with pytest.raises(NotImplementedError, match=r"op_without_a_kernel, but no Triton kernel is registered for it "
                       r"\(ops with a Triton kernel: \[.*'patch_embed'.*\]\); use impl='reference'"):
        resolve_impl("triton", torch.zeros(1), op="op_without_a_kernel")


def test_env_var_sets_process_default(monkeypatch):
    x = torch.randint(0, 256, (1, 2, 4, 4, 3), dtype=torch.uint8)
    w, b = torch.randn(5, 3, 2, 2, 2), torch.randn(5)
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    assert _dispatch.default_impl() == "triton"
    with pytest.raises(NotImplementedError, match="no Triton kernel is registered"):
        resolve_impl(None, x, op="op_without_a_kernel")
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


def test_register_triton_validates():
    with pytest.raises(ValueError, match="non-empty string"):
        _dispatch.register_triton("", lambda: None)
    with pytest.raises(TypeError, match="must be callable, got int"):
        _dispatch.register_triton("some_op", 3)
    assert not _dispatch.has_triton("some_op")
