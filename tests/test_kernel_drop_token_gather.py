"""The ``drop_token_gather`` op (``vatt_fast.kernels.drop_token_gather``): its PyTorch reference
against an independent dense one-hot selection matmul (float64, with gradients), ``keep``
index dtypes and empty selections, input checks, how it dispatches by ``impl``, and the Triton
kernels: parity of the output and every gradient with STYLE.md's rule over ``impl``, odd
shapes, repeated indices, a poisoned output buffer, ``opcheck`` on both registered ops and a
``fullgraph=True`` compile. On a CPU-only machine the kernels run in the Triton interpreter
(root conftest.py); on a GPU the same tests run them compiled on CUDA tensors.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from parity import assert_parity
from vatt_fast.kernels import _dispatch, drop_token_gather
from vatt_fast.kernels.drop_token_gather import drop_token_gather_reference

# The module itself: the package attribute ``vatt_fast.kernels.drop_token_gather`` is the function.
dtg = importlib.import_module("vatt_fast.kernels.drop_token_gather")


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
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = (torch.randn(2, 4, 3), torch.tensor([0, 2]))
    if not _dispatch.triton_available():
        with pytest.raises(NotImplementedError, match="no Triton kernel is registered for it"):
            drop_token_gather(*args, impl="triton")
        return
    assert _dispatch.has_triton("drop_token_gather")  # registered by importing the kernels
    with pytest.raises(RuntimeError, match=r"needs CUDA tensors, got tensors on \['cpu'\].*TRITON_INTERPRET=1"):
        drop_token_gather(*args, impl="triton")


def test_auto_runs_the_kernel_only_on_cuda(monkeypatch, device):
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed: nothing is registered for 'auto' to pick")
    calls = []
    real = _dispatch.get_triton("drop_token_gather")
    monkeypatch.setitem(_dispatch._TRITON_OPS, "drop_token_gather", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, keep = torch.randn(2, 5, 3, device=device), torch.tensor([4, 0], device=device)
    torch.testing.assert_close(drop_token_gather(x, keep, impl="auto"), x[:, [4, 0]], rtol=0, atol=0)
    assert len(calls) == (1 if device.type == "cuda" else 0)  # the CPU stays on the reference


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


# --------------------------------------------------------------------------------------
# Triton kernels (parity over impl, opcheck, compile)
# --------------------------------------------------------------------------------------
IMPLS = ["reference", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Floor of the parity bound, for outputs that plain PyTorch happens to get exactly right.
ATOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
# (B, N, D, N_keep): one sample, one kept token, D = 33 and 130 not multiples of the block
# (130 spans two column blocks), every token kept.
SHAPES = [(1, 7, 33, 1), (3, 7, 33, 7), (2, 9, 130, 5)]


def _need_impl(impl, device, dtype=torch.float32):
    """Skip, with the reason, the combinations this machine cannot run."""
    if impl != "triton":
        return
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("the bf16 kernel is tested on CUDA only (bf16 arithmetic is wrong in the Triton interpreter)")
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    if device.type == "cpu" and not dtg.INTERPRETING:
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1; this machine tests it on CUDA")


def _keep(B, N, n, per_sample, device):
    if per_sample:
        return torch.rand(B, N, device=device).argsort(dim=1)[:, :n]  # (B, n)
    return torch.randperm(N, device=device)[:n]  # (n,)


def _check_parity(x, keep, pos, impl, grad_out=None):
    """Output, dx and dpos of ``impl`` against float64 with STYLE.md's rule (plain = reference in x's dtype)."""
    atol = ATOL[x.dtype]
    leaves = [x.detach().clone().requires_grad_()] + ([] if pos is None else [pos.detach().clone().requires_grad_()])
    plain_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]

    def run(fn, ts):
        return fn(ts[0], keep, ts[1] if len(ts) > 1 else None)

    out = run(lambda a, k, p: drop_token_gather(a, k, p, impl=impl), leaves)
    plain = run(lambda a, k, p: drop_token_gather(a, k, p, impl="reference"), plain_leaves)
    ref = run(drop_token_gather_reference, ref_leaves)
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert_parity(out, ref, plain, atol, name="out")
    g = torch.randn_like(out) if grad_out is None else grad_out
    grads = torch.autograd.grad(out, leaves, g)
    plain_grads = torch.autograd.grad(plain, plain_leaves, g)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g.double())
    for name, got, p, r, leaf in zip(("dx", "dpos"), grads, plain_grads, ref_grads, leaves):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        assert_parity(got, r, p, atol, name=name)


@pytest.mark.parametrize("with_pos", [False, True], ids=["no_pos", "pos"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}_N{n}_D{d}_keep{k}" for b, n, d, k in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_parity_over_impl(device, impl, dtype, shape, per_sample, with_pos):
    _need_impl(impl, device, dtype)
    B, N, D, n = shape
    x = torch.randn(B, N, D, device=device, dtype=dtype)
    pos = torch.randn(N, D, device=device, dtype=dtype) if with_pos else None
    _check_parity(x, _keep(B, N, n, per_sample, device), pos, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_parity_repeated_indices_and_strides(device, impl):
    """Repeated indices accumulate (dx and dpos); fp32 pos with fp16 x; non-contiguous x, keep and grad."""
    _need_impl(impl, device)
    x = torch.randn(3, 40, 10, device=device).transpose(1, 2)  # (3, 10, 40) strided
    pos = torch.randn(10, 40, device=device)
    keep = torch.tensor([4, 4, 9, 0, 4], device=device)
    _check_parity(x, keep, pos, impl)
    per_sample = torch.tensor([[1, 1, 2], [2, 2, 2], [9, 1, 1]], device=device)  # samples share tokens too
    _check_parity(x, per_sample.t().contiguous().t(), pos, impl)  # column-major keep
    # an expanded gradient (stride 0), as ``out.sum().backward()`` sends
    _check_parity(x, keep, pos, impl, grad_out=torch.ones(1, 1, 1, device=device).expand(3, 5, 40))
    xh = x.half()
    _check_parity(xh, keep, pos, impl)  # pos stays fp32: added in fp32, rounded once to fp16


def test_kernel_writes_every_output_element(device, monkeypatch):
    """A NaN-filled output buffer (the test hook) must come back fully written and right."""
    _need_impl("triton", device)
    x = torch.randn(2, 9, 130, device=device)
    pos = torch.randn(9, 130, device=device)
    monkeypatch.setattr(dtg, "_POISON_OUTPUT", True)
    for keep in (_keep(2, 9, 5, False, device), _keep(2, 9, 9, True, device)):
        out = drop_token_gather(x, keep, pos, impl="triton")
        assert not out.isnan().any()
        torch.testing.assert_close(out, drop_token_gather_reference(x, keep, pos), rtol=0, atol=0)
    # The hook is live: without the launch the buffer is all NaN.
    class NoLaunch:  # ``_launch(kernel)[grid](*args)`` that launches nothing
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(dtg, "_launch", lambda kernel: NoLaunch())
    assert drop_token_gather(x, keep, pos, impl="triton").isnan().all()


def test_empty_selection_triton(device):
    _need_impl("triton", device)
    x = torch.randn(2, 6, 5, device=device, requires_grad=True)
    for keep in (torch.zeros(0, dtype=torch.long, device=device), torch.zeros(2, 0, dtype=torch.long, device=device)):
        out = drop_token_gather(x, keep, torch.randn(6, 5, device=device), impl="triton")
        assert out.shape == (2, 0, 5)
        (dx,) = torch.autograd.grad(out.sum(), x)
        assert torch.equal(dx, torch.zeros_like(x))


def test_opcheck_registered_ops(device):
    _need_impl("triton", device)
    x = torch.randn(2, 7, 33, device=device, requires_grad=True)
    pos = torch.randn(7, 33, device=device, requires_grad=True)
    shared, per_sample = _keep(2, 7, 4, False, device), _keep(2, 7, 3, True, device)
    fwd = torch.ops.vatt_fast.drop_token_gather.default
    bwd = torch.ops.vatt_fast.drop_token_gather_backward.default
    for args in ((x, shared, pos), (x, per_sample, None), (x.half().detach(), shared.int(), pos)):
        torch.library.opcheck(fwd, args)
    torch.library.opcheck(bwd, (torch.randn(2, 4, 33, device=device), shared, 7, True))
    torch.library.opcheck(bwd, (torch.randn(2, 3, 33, device=device).half(), per_sample, 7, False))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(device, backend):
    _need_impl("triton", device)
    if backend == "inductor" and device.type != "cuda":
        pytest.skip("inductor with the Triton kernel is tested on CUDA (on the CPU the op is an opaque custom_op)")
    torch._dynamo.reset()

    def step(x, keep, pos):
        return (drop_token_gather(x, keep, pos, impl="triton") * 2).sin().sum()

    x = torch.randn(2, 7, 33, device=device, requires_grad=True)
    pos = torch.randn(7, 33, device=device, requires_grad=True)
    keep = _keep(2, 7, 4, False, device)
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss = compiled(x, keep, pos)
    got = torch.autograd.grad(loss, (x, pos))
    ref_loss = (drop_token_gather_reference(x, keep, pos) * 2).sin().sum()
    want = torch.autograd.grad(ref_loss, (x, pos))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


_TRACE_GPU_REGISTRATION = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import importlib
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch._subclasses.functional_tensor import dispatch_functionalize

dtg = importlib.import_module("vatt_fast.kernels.drop_token_gather")
assert not dtg.INTERPRETING


def step(x, keep, pos):
    out = torch.ops.vatt_fast.drop_token_gather(x, keep, pos)
    return (out,) + tuple(torch.ops.vatt_fast.drop_token_gather_backward(out, keep, 7, True))


x, pos = torch.empty(2, 7, 33, device="meta"), torch.empty(7, 33, device="meta")
keep = torch.empty(2, 4, dtype=torch.long, device="meta")
gm = make_fx(dispatch_functionalize(step), tracing_mode="symbolic")(x, keep, pos)
print("kernels traced:", gm.code.count("triton_kernel_wrapper_functional("))
print("opaque ops left:", gm.code.count("vatt_fast."))
"""


def test_compiled_mode_registration_traces_into_the_kernels():
    """Without the interpreter the ops are ``triton_op``s: functionalization (as AOTAutograd and
    Inductor run it) must see both kernel launches, with symbolic shapes, on meta tensors, so
    a CPU-only machine checks the GPU registration too."""
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, "-c", _TRACE_GPU_REGISTRATION], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "kernels traced: 2" in run.stdout and "opaque ops left: 0" in run.stdout, run.stdout
