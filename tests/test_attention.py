"""Attention backends against an independent fp64 computation, errors, and T5 buckets."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vatt_fast.nn import attention as attn_mod
from vatt_fast.nn.attention import (
    BACKENDS,
    Attention,
    RelativePositionBias,
    available_backends,
    padding_mask_to_bias,
    relative_position_bucket,
    resolve_backend,
    set_attention_backend,
)

FLASH = "flash_attn" in available_backends()
XFORMERS = "xformers" in available_backends()


def servable_backends(device, dtype, has_bias):
    """Every backend (``auto`` included) that can serve a call on this device and dtype."""
    probe = torch.empty(1, 1, 1, 64, device=device, dtype=dtype)
    names = []
    for name in BACKENDS:
        try:
            resolve_backend(name, probe, has_bias)
        except RuntimeError:
            continue
        names.append(name)
    return names


def reference_attention(x, module, bias):
    """softmax(QK^T/sqrt(d) + bias)V and the output projection, written out in fp64."""
    x = x.double()
    B, N, D = x.shape
    H = module.num_heads
    Dh = D // H
    w_qkv, b_qkv = module.qkv.weight.double(), module.qkv.bias.double()
    qkv = torch.einsum("bnd,ed->bne", x, w_qkv) + b_qkv  # (B, N, 3D)
    q, k, v = qkv.split(D, dim=-1)
    q = q.reshape(B, N, H, Dh)
    k = k.reshape(B, N, H, Dh)
    v = v.reshape(B, N, H, Dh)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(Dh)
    if bias is not None:
        scores = scores + bias.double()
    scores = scores - scores.amax(dim=-1, keepdim=True)
    p = scores.exp()
    p = p / p.sum(dim=-1, keepdim=True)
    o = torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, N, D)
    return torch.einsum("bnd,ed->bne", o, module.proj.weight.double()) + module.proj.bias.double()


def make_bias(kind, B, H, N, device):
    if kind is None:
        return None
    parts = []
    if kind in ("rel", "both"):
        parts.append(torch.randn(1, H, N, N, device=device))
    if kind in ("padding", "both"):
        keep = torch.rand(B, N, device=device) > 0.4  # holes anywhere
        keep[:, 0] = True  # every query keeps at least one key
        keep[0, :] = True  # and one sample without padding
        parts.append(padding_mask_to_bias(keep))
    bias = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return bias.requires_grad_(kind != "padding")


ATOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# The math backend itself, relative to the largest reference value: a loose absolute check
# so that a wrong reference path cannot loosen the parity bound of the others.
MATH_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def run(module, x, bias, grad_out):
    x = x.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(bias.requires_grad)
    module.zero_grad(set_to_none=True)
    out = module(x, b)
    out.backward(grad_out.to(out.dtype))
    grads = {"x": x.grad, "qkv.weight": module.qkv.weight.grad, "proj.weight": module.proj.weight.grad}
    if b is not None and b.requires_grad:
        grads["bias"] = b.grad
    return out.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("bias_kind", [None, "rel", "padding", "both"])
def test_backends_match_reference(device, dtype, bias_kind):
    """Output and every gradient of each servable backend vs an fp64 reference, with the
    flash-attention parity rule: err(backend) <= 2 * err(math in the same dtype) + atol."""
    B, N, D, H = 3, 37, 96, 3
    ref_module = Attention(D, H).to(device)
    x = torch.randn(B, N, D, device=device)
    bias = make_bias(bias_kind, B, H, N, device)
    grad_out = torch.randn(B, N, D, device=device)

    ref_module.double()
    ref_out, ref_grads = run(ref_module, x.double(), None if bias is None else bias.double(), grad_out.double())
    torch.testing.assert_close(ref_out, reference_attention(x, ref_module, bias), rtol=1e-12, atol=1e-12)

    def errors(backend):
        module = Attention(D, H, backend=backend).to(device)
        module.load_state_dict(ref_module.state_dict())
        module.to(dtype)
        out, grads = run(module, x.to(dtype), None if bias is None else bias.to(dtype), grad_out)
        errs = {"out": (out.double() - ref_out).abs().max().item()}
        errs.update({k: (g.double() - ref_grads[k]).abs().max().item() for k, g in grads.items()})
        return errs

    baseline = errors("math")
    for key, err in baseline.items():
        scale = (ref_out if key == "out" else ref_grads[key]).abs().max().item()
        assert err <= MATH_RTOL[dtype] * scale, f"math backend {dtype} bias={bias_kind}: {key} error {err:.3g}"
    for backend in servable_backends(device, dtype, bias is not None):
        errs = errors(backend)
        for key, err in errs.items():
            limit = 2 * baseline[key] + ATOL[dtype]
            assert err <= limit, f"backend {backend} {dtype} bias={bias_kind}: {key} error {err:.3g} > {limit:.3g}"


def test_padding_mask_blocks_masked_keys(device):
    """Changing the values of masked keys does not change any output."""
    B, N, D, H = 2, 29, 64, 4
    module = Attention(D, H).to(device)
    keep = torch.ones(B, N, dtype=torch.bool, device=device)
    keep[0, 17:] = False
    keep[1, 3:9] = False
    x = torch.randn(B, N, D, device=device)
    x2 = x.clone()
    x2[~keep] = torch.randn(int((~keep).sum()), D, device=device) * 10
    bias = padding_mask_to_bias(keep)
    for backend in servable_backends(device, torch.float32, True):
        module.backend = backend
        out, out2 = module(x, bias), module(x2, bias)
        torch.testing.assert_close(out[keep], out2[keep], msg=f"backend {backend}")
        assert not torch.allclose(module(x)[keep], module(x2)[keep])  # without the mask it does change


def test_attention_dropout_only_in_training(device):
    D, H, N = 64, 2, 21
    x = torch.randn(2, N, D, device=device)
    plain = Attention(D, H).to(device).eval()
    for backend in servable_backends(device, torch.float32, False):
        dropped = Attention(D, H, attn_drop=0.5, backend=backend).to(device)
        dropped.load_state_dict(plain.state_dict())
        dropped.eval()
        torch.testing.assert_close(dropped(x), plain(x), msg=f"backend {backend} eval")
        dropped.train()
        torch.manual_seed(1)
        a = dropped(x)
        torch.manual_seed(1)
        b = dropped(x)
        torch.testing.assert_close(a, b, msg=f"backend {backend}: dropout not reproducible under a seed")
        assert not torch.allclose(a, plain(x)), f"backend {backend}: attention dropout had no effect in training"


def test_math_dropout_zeroes_and_rescales_probabilities():
    """With every value row one-hot, the math backend's output exposes the dropped probabilities."""
    N, H = 40, 1
    q = torch.zeros(1, N, H, N)  # uniform attention: p = 1/N
    v = torch.eye(N).reshape(1, N, H, N)
    out = attn_mod.attention(q, q, v, dropout_p=0.25, backend="math")  # (1, N, H, N) = dropped probs
    kept = out != 0
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / N / 0.75))


def test_auto_picks_sdpa_on_cpu(monkeypatch):
    probe = torch.randn(1, 4, 2, 32)  # head_dim 32, as Attention(64, 2): these calls also probe that kind
    assert resolve_backend("auto", probe, has_bias=False) == "sdpa"
    assert resolve_backend("auto", probe, has_bias=True) == "sdpa"
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention", counting)
    Attention(64, 2)(torch.randn(2, 5, 64))
    assert calls == [1]
    Attention(64, 2, backend="math")(torch.randn(2, 5, 64))
    assert calls == [1]


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown attention backend 'cudnn'.*'sdpa'.*'math'"):
        Attention(64, 2, backend="cudnn")
    module = Attention(64, 2)
    with pytest.raises(ValueError, match="valid backends"):
        module.backend = "fast"
    assert module.backend == "auto"


@pytest.mark.skipif(FLASH, reason="checks the message given when flash-attn is missing")
def test_flash_attn_missing_package():
    with pytest.raises(RuntimeError, match=r"flash-attn.*not installed.*sdpa"):
        Attention(64, 2, backend="flash_attn")
    with pytest.raises(RuntimeError, match="flash-attn"):
        set_attention_backend(nn.Sequential(Attention(64, 2)), "flash_attn")


@pytest.mark.skipif(XFORMERS, reason="checks the message given when xformers is missing")
def test_xformers_missing_package():
    with pytest.raises(RuntimeError, match=r"xformers.*not installed"):
        Attention(64, 2, backend="xformers")


@pytest.mark.skipif(not (FLASH or XFORMERS), reason="needs flash-attn or xformers installed")
def test_cuda_only_backends_reject_cpu_tensors():
    for name in [n for n in ("flash_attn", "xformers") if n in available_backends()]:
        module = Attention(64, 2, backend=name)
        with pytest.raises(RuntimeError, match=r"CUDA tensors only, got a cpu tensor.*sdpa"):
            module(torch.randn(1, 5, 64))


@pytest.mark.skipif(not (FLASH and torch.cuda.is_available()), reason="needs flash-attn and a CUDA device")
def test_flash_attn_rejects_bias_and_fp32():
    module = Attention(128, 2, backend="flash_attn").cuda()
    x = torch.randn(2, 9, 128, device="cuda")
    with pytest.raises(RuntimeError, match=r"float16 or bfloat16.*float32"):
        module(x)
    keep = torch.ones(2, 9, dtype=torch.bool, device="cuda")
    with pytest.raises(RuntimeError, match=r"no additive attention bias.*'xformers' or 'sdpa'"):
        module.bfloat16()(x.bfloat16(), padding_mask_to_bias(keep, torch.bfloat16))


def test_bias_shape_is_checked():
    module = Attention(64, 2)
    with pytest.raises(ValueError, match=r"attn_bias of shape \(1, 2, 7, 6\) does not broadcast"):
        module(torch.randn(1, 7, 64), torch.zeros(1, 2, 7, 6))
    with pytest.raises(ValueError, match="not divisible by num_heads 5"):
        Attention(64, 5)


def test_available_backends_and_set_backend():
    names = available_backends()
    assert names[-2:] == ["sdpa", "math"]
    assert ("flash_attn" in names) == FLASH and ("xformers" in names) == XFORMERS
    model = nn.Sequential(Attention(32, 2), nn.Sequential(Attention(32, 4)), nn.Linear(32, 32))
    assert set_attention_backend(model, "math") is model
    assert [m.backend for m in model.modules() if isinstance(m, Attention)] == ["math", "math"]
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend(model, "nope")
    with pytest.raises(ValueError, match="contains no vatt_fast Attention"):
        set_attention_backend(nn.Linear(3, 3), "sdpa")


def test_padding_mask_to_bias():
    keep = torch.tensor([[True, False, True], [True, True, False]])
    bias = padding_mask_to_bias(keep, torch.float16)
    assert bias.shape == (2, 1, 1, 3) and bias.dtype == torch.float16
    expected = torch.tensor([[0.0, -math.inf, 0.0], [0.0, 0.0, -math.inf]], dtype=torch.float16)
    assert torch.equal(bias[:, 0, 0], expected)
    with pytest.raises(ValueError, match=r"bool tensor \[B, N\].*torch.int64"):
        padding_mask_to_bias(keep.long())


def test_timm_parameter_names():
    assert sorted(Attention(48, 3).state_dict()) == ["proj.bias", "proj.weight", "qkv.bias", "qkv.weight"]
    assert sorted(Attention(48, 3, qkv_bias=False).state_dict()) == ["proj.bias", "proj.weight", "qkv.weight"]
    assert Attention(48, 3).qkv.weight.shape == (144, 48)


# --- T5 relative position buckets ------------------------------------------------------------


@pytest.mark.parametrize(
    "rel, expected",
    [
        # bidirectional, 32 buckets, max distance 64: 16 per direction, exact below 8,
        # then 8 + floor(log(d / 8) / log(64 / 8) * 8), capped at 15; keys after the query +16.
        (0, 0),
        (-1, 1),
        (-7, 7),
        (7, 16 + 7),
        (-8, 8),  # log(1) = 0
        (-16, 10),  # 8 + floor(8/3)
        (16, 26),
        (-32, 13),  # 8 + floor(16/3)
        (-63, 15),  # 8 + floor(7.94)
        (-64, 15),
        (-1000, 15),
        (1000, 31),
    ],
)
def test_relative_position_bucket_bidirectional(rel, expected):
    got = relative_position_bucket(torch.tensor([rel]), bidirectional=True, num_buckets=32, max_distance=64)
    assert got.item() == expected


def test_relative_position_bucket_unidirectional_and_t5_default():
    rel = torch.tensor([5, 0, -5, -15, -16, -20, -200])
    # 32 buckets, exact below 16; future keys all in bucket 0; -20 -> 16 + floor(log(1.25)/log(4)*16) = 18.
    got = relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=64)
    assert got.tolist() == [0, 0, 5, 15, 16, 18, 31]
    # T5 default max distance 128: -100 -> 8 + floor(log(12.5)/log(16)*8) = 15; -40 -> 8 + floor(4.64) = 12
    got = relative_position_bucket(torch.tensor([-40, -100, 40]), True, 32, 128)
    assert got.tolist() == [12, 15, 28]


def test_relative_position_bias_reads_the_table(device):
    H, q_len, k_len = 3, 5, 9
    rpb = RelativePositionBias(H, num_buckets=8, max_distance=10).to(device)
    assert RelativePositionBias.relative_position_bucket is relative_position_bucket
    bias = rpb(q_len, k_len)
    assert bias.shape == (1, H, q_len, k_len)
    table = rpb.relative_attention_bias.weight
    for i in range(q_len):
        for j in range(k_len):
            bucket = relative_position_bucket(torch.tensor(j - i), True, 8, 10).item()
            torch.testing.assert_close(bias[0, :, i, j], table[bucket])
    assert list(rpb.state_dict()) == ["relative_attention_bias.weight"]
    bias.sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_xformers_bias_is_materialised_aligned_and_differentiable():
    """The bias handed to xformers: full [B, H, N, N], row stride a multiple of 8, grads flow back."""
    B, H, N = 3, 2, 13
    rel = torch.randn(1, H, N, N, requires_grad=True)
    pad = padding_mask_to_bias(torch.rand(B, N) > 0.3)
    bias = attn_mod._xformers_bias(rel + pad, B, H, N, torch.float16)
    assert bias.shape == (B, H, N, N) and bias.dtype == torch.float16
    assert bias.stride(-2) % 8 == 0 and bias.stride(-1) == 1
    torch.testing.assert_close(bias.float(), (rel + pad).expand(B, H, N, N).half().float())
    bias.float().masked_fill(torch.isinf(bias), 0).sum().backward()
    assert rel.grad.shape == rel.shape


def test_functional_attention_checks_layout():
    q = torch.randn(2, 5, 3, 8)
    with pytest.raises(ValueError, match=r"\[B, N, H, head_dim\]"):
        attn_mod.attention(q, q, q[:, :4])
    out = attn_mod.attention(q, q, q, backend="math")
    assert out.shape == q.shape


def test_broken_optional_package_is_reported(monkeypatch):
    """An installed package that fails to import is unusable, and the error says why."""
    monkeypatch.setattr(attn_mod, "_KERNELS", {})
    monkeypatch.setattr(attn_mod, "_UNUSABLE", {})
    monkeypatch.setitem(attn_mod._OPTIONAL, "xformers", ("json", "memory_efficient_attention", "xformers"))
    assert "xformers" not in available_backends()
    with pytest.raises(RuntimeError, match=r"'xformers' is unusable: .*failed to import \(AttributeError.*'sdpa'"):
        Attention(64, 2, backend="xformers")
    assert Attention(64, 2)(torch.randn(1, 3, 64)).shape == (1, 3, 64)


# --- probing: auto only picks a backend that ran this kind of call ------------------------------

NO_XFORMERS_OP = (
    "No operator found for `memory_efficient_attention_forward` with inputs:\n"
    "     query       : shape=(2, 17, 2, 32) (torch.float32)\n"
    "`cutlassF-pt` is not supported because:\n"
    "    xFormers wasn't built with CUDA support"
)


def math_kernel(q, k, v, attn_bias=None, p=0.0, scale=None):
    """An xformers-like kernel that works: [B, N, H, d] in and out, via the math backend."""
    out = attn_mod._math_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias, p, scale)
    return out.transpose(1, 2)


@pytest.fixture
def fake_xformers(monkeypatch):
    """Empty verdict cache, and an "installed" xformers that serves CPU tensors and ranks first in auto.

    ``fake_xformers(kernel)`` installs ``kernel`` as xformers' entry point; returns the calls' shapes.
    """
    monkeypatch.setattr(attn_mod, "_VERDICTS", {})
    monkeypatch.setattr(attn_mod, "_KERNELS", dict(attn_mod._KERNELS))
    monkeypatch.setattr(attn_mod, "_UNUSABLE", {k: v for k, v in attn_mod._UNUSABLE.items() if k != "xformers"})
    monkeypatch.setitem(attn_mod._DEVICE_TYPES, "xformers", ("cuda", "cpu"))
    monkeypatch.setattr(attn_mod, "AUTO_ORDER", ("xformers", "sdpa", "math"))  # the order that picked it before

    def install(kernel):
        calls = []

        def counted(q, k, v, attn_bias=None, p=0.0, scale=None):
            calls.append(tuple(q.shape))
            return kernel(q, k, v, attn_bias=attn_bias, p=p, scale=scale)

        attn_mod._KERNELS["xformers"] = counted
        return calls

    return install


def broken_kernel(q, k, v, attn_bias=None, p=0.0, scale=None):
    raise NotImplementedError(NO_XFORMERS_OP)


def test_auto_skips_a_backend_that_imports_but_cannot_run(fake_xformers):
    """The issue's case: xformers imports, its op raises; auto must fall through to sdpa."""
    calls = fake_xformers(broken_kernel)
    assert "xformers" in available_backends()  # importable, as before: nothing was run
    module = Attention(64, 2)
    x = torch.randn(2, 5, 64)
    out = module(x)
    assert len(calls) == 1  # the probe, on its own tiny input
    assert resolve_backend("auto", torch.randn(2, 5, 2, 32), has_bias=False) == "sdpa"
    module.backend = "sdpa"
    torch.testing.assert_close(out, module(x), rtol=0, atol=0)
    module.backend = "auto"
    for _ in range(3):
        module(x)
    assert len(calls) == 1  # the verdict is cached
    why = available_backends(reasons=True)["xformers"]
    assert why.startswith("refused on cpu float32 head_dim 32: its probe")
    assert "NotImplementedError: No operator found" in why and "xFormers wasn't built with CUDA support" in why
    assert available_backends(reasons=True)["sdpa"] is None
    report = available_backends("cpu", torch.float32, head_dim=32, reasons=True)
    assert report["xformers"].startswith("its probe (forward and backward on a tiny input) failed with NotImpl")
    assert report["sdpa"] is None and report["math"] is None
    assert "flash-attn" in report["flash_attn"] or "CUDA" in report["flash_attn"]
    assert available_backends("cpu", torch.float32, head_dim=32) == ["sdpa", "math"]
    assert len(calls) == 1


def test_explicit_request_for_a_failing_backend_says_why(fake_xformers):
    fake_xformers(broken_kernel)
    module = Attention(64, 2, backend="xformers")  # importable: accepted until it is called
    with pytest.raises(
        RuntimeError,
        match=r"'xformers' cannot serve this call \(cpu float32 head_dim 32\): its probe .* failed with "
        r"NotImplementedError: No operator found.*wasn't built with CUDA support; use backend='auto' or 'sdpa' "
        r"\(train.py: --attention auto or sdpa\)",
    ):
        module(torch.randn(1, 3, 64))


def test_probe_runs_once_per_kind(fake_xformers):
    """A verdict holds for one (device, dtype, head_dim, bias, dropout); each new kind probes once."""
    calls = fake_xformers(math_kernel)
    probe_n = attn_mod._PROBE_SHAPE[1]
    x = torch.randn(2, 5, 64)
    module, module64 = Attention(64, 2), Attention(64, 2).double()
    bias = padding_mask_to_bias(torch.ones(2, 5, dtype=torch.bool))
    steps = [
        (module, x, None, 2),  # new kind: probe + call
        (module, x, None, 1),
        (module, x, bias, 2),  # with a bias
        (module, x, bias, 1),
        (Attention(64, 4), x, None, 2),  # head_dim 16
        (module64, x.double(), None, 2),  # float64
        (module64, x.double(), None, 1),
        (Attention(64, 2, attn_drop=0.1).train(), x, None, 2),  # dropout
    ]
    for i, (layer, inp, b, new_calls) in enumerate(steps):
        before = len(calls)
        layer(inp, b)
        assert len(calls) - before == new_calls, f"step {i}"
    probes = [shape for shape in calls if shape[1] == probe_n]
    assert len(probes) == 5 and len(calls) - len(probes) == len(steps)


def test_auto_takes_a_working_backend_that_ranks_first(fake_xformers):
    calls = fake_xformers(math_kernel)
    module = Attention(64, 2)
    x = torch.randn(2, 7, 64)
    assert resolve_backend("auto", torch.randn(2, 7, 2, 32), has_bias=False) == "xformers"
    out = module(x)
    assert [shape[1] for shape in calls] == [attn_mod._PROBE_SHAPE[1], 7]  # probe, then the call itself
    module.backend = "math"
    torch.testing.assert_close(out, module(x), rtol=0, atol=0)  # the fake computes with the math backend


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("No operator found for `memory_efficient_attention_backward`")


def test_probe_covers_backward_and_dropout(fake_xformers):
    """A kernel whose backward fails is refused; one that fails only with dropout is refused for dropout only."""
    fake_xformers(lambda q, k, v, **kw: _NoBackward.apply(math_kernel(q, k, v, **kw)))
    with pytest.raises(RuntimeError, match=r"failed with NotImplementedError: .*memory_efficient_attention_backward"):
        resolve_backend("xformers", torch.randn(1, 3, 2, 32), has_bias=False)

    def no_dropout(q, k, v, attn_bias=None, p=0.0, scale=None):
        if p > 0:
            raise NotImplementedError("dropout is not supported")
        return math_kernel(q, k, v, attn_bias=attn_bias, p=p, scale=scale)

    fake_xformers(no_dropout)
    q = torch.randn(1, 3, 2, 16)
    assert resolve_backend("auto", q, has_bias=False, dropout=False) == "xformers"
    assert resolve_backend("auto", q, has_bias=False, dropout=True) == "sdpa"
    assert available_backends("cpu", head_dim=16, dropout=True) == ["sdpa", "math"]


def test_no_backend_left_lists_every_reason(fake_xformers, monkeypatch):
    fake_xformers(broken_kernel)
    monkeypatch.setattr(attn_mod, "AUTO_ORDER", ("flash_attn", "xformers"))
    with pytest.raises(RuntimeError, match=r"no attention backend can serve cpu float32 head_dim 32: flash_attn: .*"
                       r"\| xformers: its probe .*NotImplementedError"):
        Attention(64, 2)(torch.randn(1, 3, 64))


def test_probe_does_not_shift_the_rng(fake_xformers):
    """The first call of a kind (which probes, with dropout) draws the same dropout mask as later calls."""
    fake_xformers(math_kernel)
    module = Attention(64, 2, attn_drop=0.5).train()
    x = torch.randn(2, 9, 64)
    torch.manual_seed(3)
    first = module(x)  # probes xformers with dropout first
    torch.manual_seed(3)
    torch.testing.assert_close(module(x), first, rtol=0, atol=0)
    state = torch.get_rng_state()
    usable = available_backends("cpu", torch.float32, head_dim=8, dropout=True, has_bias=True)  # probes with dropout
    assert usable == ["xformers", "sdpa", "math"]
    assert torch.equal(torch.get_rng_state(), state)


def test_first_call_under_inference_mode_autocast_and_flop_counting(fake_xformers):
    """The probe runs forward and backward whatever the caller's mode, and no mode sees it."""
    from torch.utils.flop_counter import FlopCounterMode

    calls = fake_xformers(broken_kernel)
    module = Attention(64, 2).eval()
    x = torch.randn(2, 5, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)  # probes the bfloat16 kind inside inference mode
    assert out.dtype == torch.bfloat16 and len(calls) == 1
    assert "NotImplementedError" in available_backends("cpu", torch.bfloat16, head_dim=32, reasons=True)["xformers"]
    module.backend = "math"
    counts = []
    for _ in range(2):  # the first call probes math for float64, the second does not
        with FlopCounterMode(display=False) as counter:
            module.double()(x.double())
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_first_call_under_activation_checkpointing(fake_xformers):
    """A probe inside a non-reentrant checkpointed forward must not be caught by its saved-tensor hooks."""
    from torch.utils.checkpoint import checkpoint

    calls = fake_xformers(math_kernel)
    module = Attention(64, 2)
    x = torch.randn(2, 5, 64)

    def grads(checkpointed):
        module.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = checkpoint(module, xi, use_reentrant=False) if checkpointed else module(xi)
        out.square().sum().backward()
        return out.detach(), xi.grad, module.qkv.weight.grad

    first = grads(True)  # probes xformers here
    assert calls[0][1] == attn_mod._PROBE_SHAPE[1] and len(calls) == 3  # probe, forward, recomputation
    for a, b in zip(first, grads(False)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _AttendInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        attn_mod.attention(grad, grad, grad)
        return grad


def test_first_call_inside_backward_is_refused_clearly(fake_xformers):
    x = torch.randn(1, 3, 2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"not been tried on cpu float32 head_dim 8 yet and cannot be inside a"):
        _AttendInBackward.apply(x).sum().backward()
    attn_mod.attention(x, x, x)  # probed outside backward: now fine inside
    _AttendInBackward.apply(x).sum().backward()


def test_compiled_model_probes_outside_the_graph(fake_xformers):
    """Under torch.compile the choice is made while tracing, by a real probe, and baked into the graph."""
    calls = fake_xformers(broken_kernel)
    module = Attention(64, 2)
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    out = compiled(x)
    assert len(calls) == 1
    for _ in range(2):
        compiled(x)
    assert len(calls) == 1
    module.backend = "sdpa"
    torch.testing.assert_close(out, module(x), rtol=0, atol=0)
    broken = torch.compile(Attention(64, 2, backend="xformers"), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=r"'xformers' cannot serve this call.*NotImplementedError: No operator found"):
        broken(x)


def test_auto_picks_the_first_backend_that_passed_its_probe(device):
    """On this machine, as installed: auto's choice is the first of AUTO_ORDER whose probe passed."""
    for dtype in (torch.float32, torch.bfloat16):
        for has_bias in (False, True):
            q = torch.randn(2, 5, 3, 32, device=device, dtype=dtype)
            report = available_backends(device, dtype, head_dim=32, has_bias=has_bias, reasons=True)
            usable = [name for name in attn_mod.AUTO_ORDER if report[name] is None]
            assert usable, report
            assert resolve_backend("auto", q, has_bias=has_bias) == usable[0]
            assert report["sdpa"] is None and report["math"] is None, report


# --- flash-attn-4 (flash_attn.cute): routed through a stand-in with its calling convention ----------


@pytest.fixture
def fake_flash_attn_4(monkeypatch):
    """A "flash_attn.cute" module that serves CPU tensors with flash-attn-4's calling convention:
    ``flash_attn_func(q, k, v, softmax_scale=...) -> (out, lse)``, no dropout or bias argument."""
    import sys
    import types

    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, return_lse=False):
        assert not causal
        calls.append(dict(shape=tuple(q.shape), scale=softmax_scale))
        out = attn_mod._math_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, 0.0,
                                       softmax_scale)
        lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1])
        return out.transpose(1, 2), lse

    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setattr(attn_mod, "_installed", lambda name: name == "flash_attn.cute" or attn_mod.importlib.util
                        .find_spec(name.split(".")[0]) is not None)
    monkeypatch.setattr(attn_mod, "_VERDICTS", {})
    monkeypatch.setattr(attn_mod, "_KERNELS", {k: v for k, v in attn_mod._KERNELS.items() if k != "flash_attn_4"})
    monkeypatch.setattr(attn_mod, "_UNUSABLE", {k: v for k, v in attn_mod._UNUSABLE.items() if k != "flash_attn_4"})
    monkeypatch.setitem(attn_mod._DEVICE_TYPES, "flash_attn_4", ("cuda", "cpu"))
    monkeypatch.setattr(attn_mod, "_HALF_DTYPES", (torch.float16, torch.bfloat16, torch.float32))  # CPU fp32 stand-in
    return calls


def test_flash_attn_4_is_called_with_its_convention(fake_flash_attn_4):
    calls = fake_flash_attn_4
    assert "flash_attn_4" in available_backends()
    module = Attention(64, 4, backend="flash_attn_4")
    x = torch.randn(2, 7, 64)
    out = module(x)
    assert [c["shape"][1] for c in calls] == [attn_mod._PROBE_SHAPE[1], 7]  # probe, then the call
    assert calls[-1]["scale"] == pytest.approx(16 ** -0.5)
    module.backend = "math"
    torch.testing.assert_close(out, module(x), rtol=0, atol=0)  # the stand-in computes with math


@pytest.mark.parametrize("what, kwargs, match", [
    ("dropout", dict(dropout=True), "flash_attn_4 has no attention dropout"),
    ("bias", dict(has_bias=True), "flash_attn_4 takes no additive attention bias"),
])
def test_flash_attn_4_refuses_what_it_lacks(fake_flash_attn_4, what, kwargs, match):
    q = torch.randn(1, 5, 2, 16)
    with pytest.raises(RuntimeError, match=match):
        resolve_backend("flash_attn_4", q, has_bias=kwargs.get("has_bias", False), dropout=kwargs.get("dropout", False))
    # auto goes past it to sdpa, without probing it
    assert resolve_backend("auto", q, has_bias=kwargs.get("has_bias", False), dropout=kwargs.get("dropout", False)) \
        == "sdpa"
    assert fake_flash_attn_4 == []


def test_flash_attn_4_refuses_fp32_and_odd_head_dims(monkeypatch, fake_flash_attn_4):
    monkeypatch.setattr(attn_mod, "_HALF_DTYPES", (torch.float16, torch.bfloat16))
    with pytest.raises(RuntimeError, match="flash_attn_4 needs float16 or bfloat16 inputs, got torch.float32"):
        resolve_backend("flash_attn_4", torch.randn(1, 5, 2, 16), has_bias=False)
    with pytest.raises(RuntimeError, match="head_dim a multiple of 8 and <= 256, got 12"):
        resolve_backend("flash_attn_4", torch.randn(1, 5, 2, 12, dtype=torch.bfloat16), has_bias=False)


def test_flash_attn_4_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(attn_mod, "_KERNELS", {k: v for k, v in attn_mod._KERNELS.items() if k != "flash_attn_4"})
    monkeypatch.setattr(attn_mod, "_UNUSABLE", {})
    monkeypatch.setattr(attn_mod, "_installed", lambda name: False)
    with pytest.raises(RuntimeError, match=r"'flash_attn_4' is unusable: the flash-attn-4 package is not installed.*"
                                           r"pip install flash-attn-4"):
        Attention(64, 2, backend="flash_attn_4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", ["tiny", "base"])
def test_every_tower_reaches_a_fused_sdpa_kernel_on_cuda(preset, monkeypatch):
    """Pretraining's calls (bf16, attention dropout 0.1; the text tower with its T5 bias and padding)
    all run on SDPA with its math kernel switched off, so each tower reaches a fused kernel
    (flash, memory-efficient or cuDNN) and none falls back to an unfused softmax."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vatt_fast.models import create_model

    used = []
    real_run = attn_mod._run
    monkeypatch.setattr(attn_mod, "_run", lambda impl, *a, **kw: used.append(impl) or real_run(impl, *a, **kw))
    monkeypatch.setattr(attn_mod, "_VERDICTS", {})  # probe under the restriction below
    torch.manual_seed(0)
    model = create_model(preset, dropout=0.1, attn_dropout=0.1).cuda().train()
    cfg = model.config
    B = 2
    mask = torch.ones(B, cfg.num_captions, dtype=torch.bool)
    text = torch.randint(1, cfg.vocab_size, (B, cfg.num_captions, cfg.caption_len))
    text[:, :, cfg.caption_len // 2:] = 0  # padded captions: the text tower gets a padding mask
    batch = {
        "video": torch.randint(0, 256, (B, cfg.num_frames, cfg.frame_size, cfg.frame_size, 3), dtype=torch.uint8),
        "audio": torch.randn(B, cfg.audio_samples),
        "text": text,
        "text_mask": mask,
    }
    batch = {k: v.cuda() for k, v in batch.items()}
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch)
        sum(v.float().sum() for v in out.values() if torch.is_tensor(v) and v.is_floating_point()).backward()
    depth = cfg.video_encoder.depth + cfg.audio_encoder.depth + cfg.text_encoder.depth
    assert len(used) >= depth and set(used) == {"sdpa"}, used
