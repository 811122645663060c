"""The ``bias_gelu_dropout`` op (``vatt_fast.kernels.bias_gelu``): the reference against an independent
float64 formula, input checks, dispatch, and the Triton kernels: parity of the output and of dx and
dbias with STYLE.md's rule over ``impl`` (with and without bias, dropout with the reference's mask,
i.e. the project's one Philox seed convention of ``layer_norm.dropout_keep_mask``), odd widths and
row counts that do not fill the tiles, strides, mixed dtypes, poisoned output buffers, determinism,
``opcheck`` on both registered ops and ``fullgraph=True`` compiles. On a CPU-only machine the
kernels run in the Triton interpreter (root conftest.py); on a GPU the same tests run them compiled.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

from parity import assert_parity
from vatt_fast.kernels import _dispatch
from vatt_fast.kernels.layer_norm import dropout_keep_mask

bg = importlib.import_module("vatt_fast.kernels.bias_gelu")
bias_gelu_dropout = bg.bias_gelu_dropout
bias_gelu_dropout_reference = bg.bias_gelu_dropout_reference

IMPLS = ["reference", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Floor of the parity bound, for outputs that plain PyTorch happens to get exactly right.
ATOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def _need_impl(impl, device, dtype=torch.float32):
    """Skip, with the reason, the combinations this machine cannot run."""
    if impl != "triton":
        return
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("the bf16 kernel is tested on CUDA only (bf16 arithmetic is wrong in the Triton interpreter)")
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    if device.type == "cpu" and not bg.INTERPRETING:
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1; this machine tests it on CUDA")


def _seed(device):
    """A fresh random seed tensor (int64, one element) on ``device``."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64).to(device)


def _binomial_ok(kept: int, n: int, p_keep: float) -> bool:
    """``kept`` of ``n`` Bernoulli(p_keep) draws lies within 6 standard deviations (fails ~1e-9 by chance)."""
    return abs(kept - n * p_keep) <= 6 * math.sqrt(n * p_keep * (1 - p_keep))


# --------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------
def test_reference_matches_formula(device):
    """Against the GELU written out in float64 (no F.gelu, no F.dropout), output and both gradients."""
    x = torch.randn(3, 7, 45, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(45, device=device, dtype=torch.float64, requires_grad=True)
    seed = _seed(device)
    out = bias_gelu_dropout(x, b, 0.3, seed=seed, impl="reference")
    z = x + b
    keep = dropout_keep_mask(seed, x.shape, 0.3)
    want = 0.5 * z * (1 + torch.erf(z / math.sqrt(2))) * keep.double() / 0.7
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), (x, b))
    dz = g * keep.double() / 0.7 * (0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-z * z / 2) / math.sqrt(2 * math.pi))
    torch.testing.assert_close(got[0], dz, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], dz.sum((0, 1)), rtol=0, atol=1e-10)


def test_reference_modes():
    x, b = torch.randn(4, 16), torch.randn(16)
    gelu = torch.nn.GELU()  # the model's activation: exact erf GELU
    # eval: no dropout whatever p
    torch.testing.assert_close(bias_gelu_dropout_reference(x, b, 0.5, training=False), gelu(x + b), rtol=0, atol=0)
    torch.testing.assert_close(bias_gelu_dropout_reference(x, None), gelu(x), rtol=0, atol=0)
    # seed=None: F.dropout's mask, drawn from torch's generator (reproducible with manual_seed)
    torch.manual_seed(3)
    a = bias_gelu_dropout_reference(x, b, 0.5)
    torch.manual_seed(3)
    torch.testing.assert_close(a, torch.nn.functional.dropout(gelu(x + b), 0.5), rtol=0, atol=0)
    # bf16 product with an fp32 bias (autocast's layout): fp32 arithmetic, bf16 out, fp32 dbias
    xb = x.bfloat16().requires_grad_()
    bb = b.clone().requires_grad_()
    out = bias_gelu_dropout_reference(xb, bb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, gelu(xb.float() + b).bfloat16(), rtol=0, atol=0)
    out.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and bb.grad.dtype == torch.float32


BAD = [
    ("x_int", dict(x=torch.zeros(2, 8, dtype=torch.long)), r"x must be a floating tensor \[\.\.\., H\] \(the fc1 product without bias\), got torch.int64"),
    ("x_scalar", dict(x=torch.tensor(1.0)), r"x must be a floating tensor \[\.\.\., H\].*got torch.float32 \(\)"),
    ("bias_shape", dict(bias=torch.randn(9)), r"bias must be a floating \[H\] = \(8,\) tensor for x \(2, 8\), got \(9,\) torch.float32; or None"),
    ("bias_int", dict(bias=torch.zeros(8, dtype=torch.long)), r"bias must be a floating \[H\] = \(8,\).*got \(8,\) torch.int64"),
    ("bias_meta", dict(bias=torch.zeros(8, device="meta")), r"bias is on meta but x is on cpu"),
    ("p_one", dict(dropout_p=1.0), r"dropout_p must be a float in \[0, 1\), got 1.0; use 0.0 for no dropout"),
    ("p_bool", dict(dropout_p=True), r"dropout_p must be a float in \[0, 1\), got True"),
    ("seed_float", dict(seed=torch.tensor([1.0])), r"seed tensor must be int64 with one element, got dtype torch.float32"),
    ("seed_negative", dict(seed=-3), r"seed must be None, an int in \[0, 2\*\*63\) or an int64 tensor, got -3"),
    ("seed_meta", dict(seed=torch.zeros(1, dtype=torch.long, device="meta")), r"seed is on meta but x is on cpu; use seed.to\('cpu'\)"),
]


@pytest.mark.parametrize("name,override,message", BAD, ids=[c[0] for c in BAD])
@pytest.mark.parametrize("fn", [bias_gelu_dropout, bias_gelu_dropout_reference], ids=["public", "reference"])
def test_bad_inputs(fn, name, override, message):
    args = dict(x=torch.randn(2, 8), bias=torch.randn(8))
    args.update(override)
    with pytest.raises(ValueError, match=message):
        fn(**args)


# --------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = (torch.randn(2, 8), torch.randn(8))
    if not _dispatch.triton_available():
        with pytest.raises(NotImplementedError, match="no Triton kernel is registered for it"):
            bias_gelu_dropout(*args, impl="triton")
        return
    assert _dispatch.has_triton("bias_gelu_dropout")
    with pytest.raises(RuntimeError, match=r"needs CUDA tensors, got tensors on \['cpu'\].*TRITON_INTERPRET=1"):
        bias_gelu_dropout(*args, impl="triton")


def test_auto_runs_the_kernel_only_on_cuda(monkeypatch, device):
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed: nothing is registered for 'auto' to pick")
    calls = []
    real = _dispatch.get_triton("bias_gelu_dropout")
    monkeypatch.setitem(_dispatch._TRITON_OPS, "bias_gelu_dropout", lambda *a, **k: calls.append(k) or real(*a, **k))
    x, b = torch.randn(3, 8, device=device), torch.randn(8, device=device)
    out = bias_gelu_dropout(x, b, 0.2, training=False, impl="auto")
    torch.testing.assert_close(out, torch.nn.functional.gelu(x + b))
    assert len(calls) == (1 if device.type == "cuda" else 0)  # the CPU stays on the reference
    if calls:
        assert calls[0] == dict(dropout_p=0.2, training=False, seed=None)
    monkeypatch.setenv("VATT_FAST_KERNELS", "reference")  # impl=None reads the environment
    bias_gelu_dropout(x, b)
    assert len(calls) == (1 if device.type == "cuda" else 0)


# --------------------------------------------------------------------------------------
# Triton kernels (parity over impl, opcheck, compile)
# --------------------------------------------------------------------------------------
# [..., H]: H = 100 (one 128-column tile, 15 of 32 rows), H = 33 (64-column tiles, 37 rows), H = 300
# (two 256-column tiles, the second partial; 70 rows = 5 row blocks of 16, so the backward's three row
# programs walk two blocks each and the dbias partials are summed).
SHAPES = [(3, 5, 100), (37, 33), (2, 35, 300)]


def _check_parity(x, bias, p, impl, seed, grad=None):
    """The output and dx, dbias of ``impl`` against float64 with STYLE.md's rule (plain = the reference
    in the inputs' dtypes); dropout with the reference's mask for ``seed``."""
    atol = ATOL[x.dtype]
    inputs = [x] + ([bias] if bias is not None else [])

    def run(fn, cast):
        ts = [cast(t).detach().clone().requires_grad_() for t in inputs]
        return ts, fn(ts[0], ts[1] if bias is not None else None, p, True, seed)

    ts, out = run(lambda *a: bias_gelu_dropout(*a, impl=impl), lambda t: t)
    pts, plain = run(lambda *a: bias_gelu_dropout(*a, impl="reference"), lambda t: t)
    rts, ref = run(bias_gelu_dropout_reference, lambda t: t.double())
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_parity(out, ref, plain, atol, name="out")
    g = torch.randn_like(out) if grad is None else grad
    got = torch.autograd.grad((out * g).sum(), ts)
    want_plain = torch.autograd.grad((plain * g).sum(), pts)
    want = torch.autograd.grad((ref * g.double()).sum(), rts)
    for name, t, a, pl, r in zip(("dx", "dbias"), inputs, got, want_plain, want):
        assert a.dtype == t.dtype and a.shape == t.shape, name
        assert_parity(a, r, pl, atol, name=name)
    return out, got


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_parity_over_impl(device, impl, dtype, shape, p, with_bias):
    _need_impl(impl, device, dtype)
    x = 2 * torch.randn(shape, device=device, dtype=dtype)  # both GELU tails and the bend at 0
    bias = torch.randn(shape[-1], device=device, dtype=dtype) if with_bias else None
    _check_parity(x, bias, p, impl, _seed(device))


@pytest.mark.parametrize("impl", IMPLS)
def test_parity_mixed_dtypes_strides_and_int_seed(device, impl):
    """fp16 product with an fp32 bias (autocast's layout); a non-contiguous x; an expanded gradient
    (stride 0); a Python int seed."""
    _need_impl(impl, device, torch.float16)
    x = torch.randn(41, 70, device=device).t()  # (70, 41), strided
    b = torch.randn(41, device=device)
    _check_parity(x.half(), b, 0.1, impl, _seed(device))
    _check_parity(x, b, 0.3, impl, 12345)
    ones = torch.ones(1, 1, device=device).expand(70, 41)
    _check_parity(x, b, 0.0, impl, None, grad=ones)


def test_kernel_dropout_is_the_reference_mask_and_statistics(device):
    """The kernel drops exactly where :func:`dropout_keep_mask` says (the project's one seed convention),
    scales the rest by 1/(1-p), keeps a binomial fraction, repeats for the same seed; seed=None follows
    torch's generator; eval runs no dropout."""
    _need_impl("triton", device)
    shape = (2, 61, 129)
    n = 2 * 61 * 129
    x = torch.ones(shape, device=device)  # gelu(1) = 0.841..., never 0
    b = torch.zeros(129, device=device)
    g1 = torch.nn.functional.gelu(torch.ones((), device=device))
    for p in (0.1, 0.5):
        seed = _seed(device)
        out = bias_gelu_dropout(x, b, p, seed=seed, impl="triton")
        keep = dropout_keep_mask(seed, shape, p)
        assert torch.equal(out != 0, keep.to(device))
        torch.testing.assert_close(out[keep.to(device)], (g1 / (1 - p)).expand(int(keep.sum())))
        assert _binomial_ok(int(keep.sum()), n, 1 - p)
        assert torch.equal(out, bias_gelu_dropout(x, b, p, seed=seed.clone(), impl="triton"))
        assert not torch.equal(out, bias_gelu_dropout(x, b, p, seed=seed + 1, impl="triton"))
    torch.manual_seed(7)
    a = bias_gelu_dropout(x, b, 0.5, impl="triton")
    c = bias_gelu_dropout(x, b, 0.5, impl="triton")
    torch.manual_seed(7)
    assert torch.equal(a, bias_gelu_dropout(x, b, 0.5, impl="triton")) and not torch.equal(a, c)
    torch.testing.assert_close(bias_gelu_dropout(x, b, 0.5, training=False, impl="triton"), g1.expand(shape))


def test_kernel_is_deterministic(device):
    """Same seed, same inputs: bitwise the same output and gradients (dbias has no atomics)."""
    _need_impl("triton", device)
    x = torch.randn(150, 96, device=device, requires_grad=True)
    b = torch.randn(96, device=device, requires_grad=True)
    seed, g = _seed(device), torch.randn(150, 96, device=device)
    runs = []
    for _ in range(2):
        out = bias_gelu_dropout(x, b, 0.25, seed=seed, impl="triton")
        runs.append((out,) + torch.autograd.grad((out * g).sum(), (x, b)))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_kernel_writes_every_output_element(device, monkeypatch):
    """NaN-filled output buffers (forward, backward and the dbias partials: the test hook) must come
    back fully written."""
    _need_impl("triton", device)
    x = torch.randn(70, 300, device=device, requires_grad=True)
    b = torch.randn(300, device=device, requires_grad=True)
    seed, g = _seed(device), torch.randn(70, 300, device=device)

    def run():
        out = bias_gelu_dropout(x, b, 0.2, seed=seed, impl="triton")
        return (out,) + torch.autograd.grad((out * g).sum(), (x, b))

    clean = run()
    monkeypatch.setattr(bg, "_POISON_OUTPUT", True)
    for got, want in zip(run(), clean):
        assert not got.isnan().any()
        assert torch.equal(got, want)

    class NoLaunch:  # ``_launch(kernel)[grid](*args)`` that launches nothing
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(bg, "_launch", lambda kernel: NoLaunch())
    assert bias_gelu_dropout(x, b, 0.2, seed=seed, impl="triton").isnan().all()  # the hook is live


def test_empty_rows_triton(device):
    _need_impl("triton", device)
    x = torch.randn(0, 5, 33, device=device, requires_grad=True)
    b = torch.randn(33, device=device, requires_grad=True)
    out = bias_gelu_dropout(x, b, 0.1, impl="triton")
    assert out.shape == (0, 5, 33)
    dx, db = torch.autograd.grad(out.sum(), (x, b))
    assert dx.shape == x.shape and torch.equal(db, torch.zeros_like(b))


def test_opcheck_registered_ops(device):
    _need_impl("triton", device)
    fwd = torch.ops.vatt_fast.bias_gelu_dropout.default
    bwd = torch.ops.vatt_fast.bias_gelu_dropout_backward.default
    x = torch.randn(19, 33, device=device, requires_grad=True)
    b = torch.randn(33, device=device, requires_grad=True)
    seed = _seed(device)
    for args in ((x, b, seed, 0.2), (x, None, None, 0.0), (x.half().detach(), b, seed, 0.5)):
        torch.library.opcheck(fwd, args)
    dout = torch.randn(19, 33, device=device)
    torch.library.opcheck(bwd, (dout, x.detach(), b.detach(), seed, 0.2))
    torch.library.opcheck(bwd, (dout.half(), x.detach().half(), None, None, 0.0))


@pytest.mark.parametrize("impl", IMPLS)
def test_compile_fullgraph(device, impl):
    """``fullgraph=True`` traces the op with its backward: Inductor on CUDA, aot_eager on the CPU (the
    Triton op is an opaque custom_op there); a seed tensor, and seed=None drawn inside the graph."""
    _need_impl(impl, device)
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    torch._dynamo.reset()

    def step(x, b, seed):
        return (bias_gelu_dropout(x, b, 0.2, seed=seed, impl=impl).sin() * 2).sum()

    x = torch.randn(2, 7, 45, device=device, requires_grad=True)
    b = torch.randn(45, device=device, requires_grad=True)
    seed = _seed(device)
    loss = torch.compile(step, fullgraph=True, backend=backend)(x, b, seed)
    got = torch.autograd.grad(loss, (x, b))
    ref_loss = step(x, b, seed)  # eager, the same mask
    want = torch.autograd.grad(ref_loss, (x, b))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    # seed=None: the seed is drawn inside the graph (no graph break, a fresh mask per call)
    draw = torch.compile(lambda x: bias_gelu_dropout(x, None, 0.5, impl=impl), fullgraph=True, backend=backend)
    big = torch.full((64, 45), 10.0, device=device)  # gelu(10) = 10
    a, c = draw(big), draw(big)
    assert not torch.equal(a, c) and set(a.unique().tolist()) <= {0.0, 20.0}


_TRACE_GPU_REGISTRATION = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import importlib
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch._subclasses.functional_tensor import dispatch_functionalize

bg = importlib.import_module("vatt_fast.kernels.bias_gelu")
assert not bg.INTERPRETING


def step(x, b, seed):
    out = torch.ops.vatt_fast.bias_gelu_dropout(x, b, seed, 0.1)
    return (out,) + tuple(torch.ops.vatt_fast.bias_gelu_dropout_backward(out, x, b, seed, 0.1))


x = torch.empty(50, 4096, device="meta", dtype=torch.bfloat16)
b = torch.empty(4096, device="meta")
seed = torch.empty(1, dtype=torch.long, device="meta")
gm = make_fx(dispatch_functionalize(step), tracing_mode="symbolic")(x, b, seed)
print("kernels traced:", gm.code.count("triton_kernel_wrapper_functional("))
print("opaque ops left:", gm.code.count("vatt_fast."))
"""


def test_compiled_mode_registration_traces_into_the_kernels():
    """Without the interpreter the ops are ``triton_op``s: functionalization (as AOTAutograd and
    Inductor run it) must see both kernel launches, with symbolic shapes, on meta tensors, so a
    CPU-only machine checks the GPU registration too."""
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, "-c", _TRACE_GPU_REGISTRATION], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "kernels traced: 2" in run.stdout and "opaque ops left: 0" in run.stdout, run.stdout
