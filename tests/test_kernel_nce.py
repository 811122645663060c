"""The ``mil_nce`` and ``nce`` ops (``vatt_fast.kernels.nce``; one kernel family: ``nce``
runs ``mil_nce`` with K = 1) against an explicit fp64 computation of the released formula,
written independently in ``nce_helpers.py``: per-clip losses, masks, gradients, local rows
against gathered candidates, input checks and dispatch; then the chunked PyTorch path and
the Triton kernels (interpreted on a CPU, compiled on a GPU) against the fp64 reference with
STYLE.md's parity rule over ``impl``, ``opcheck`` of the registered ops, a poisoned output
buffer and ``fullgraph`` compiles.

The ops take L2-normalised embeddings; the tests normalise with ``F.normalize`` and, where
a scalar is compared, reduce the per-clip losses as the loss modules do (the mean over the
clips that have a positive). The modules themselves are tested in ``test_losses.py``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nce_helpers import TAU, explicit_mil_nce, grads_of, holey_mask, normalized_inputs
from parity import assert_parity
from vatt_fast.kernels import _dispatch
from vatt_fast.kernels.nce import mil_nce, mil_nce_chunked, mil_nce_reference, nce, nce_reference

nce_mod = importlib.import_module("vatt_fast.kernels.nce")


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



# --------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------
def test_impl_dispatch(monkeypatch, device):
    """``reference`` and ``chunked`` run as asked; ``auto`` is Triton on CUDA tensors and the
    chunked path elsewhere (and for float64); the env var is the default; bad names raise."""
    video, text = normalized_inputs(5, 3, 8, device=device)
    calls = []
    for name in ("mil_nce_reference", "mil_nce_chunked"):
        real = getattr(nce_mod, name)
        monkeypatch.setattr(nce_mod, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    if _dispatch.has_triton("mil_nce"):
        real_triton = _dispatch.get_triton("mil_nce")
        monkeypatch.setitem(_dispatch._TRITON_OPS, "mil_nce", lambda *a: calls.append("triton") or real_triton(*a))

    def called(**kwargs):
        calls.clear()
        mil_nce(video, text, **kwargs)
        return calls[0] if len(calls) == 1 else calls

    auto = "triton" if device.type == "cuda" and _dispatch.triton_available() else "mil_nce_chunked"
    assert called(impl="reference") == "mil_nce_reference"
    assert called(impl="chunked") == "mil_nce_chunked"
    assert called(impl="auto") == auto
    monkeypatch.setenv("VATT_FAST_KERNELS", "reference")
    assert called() == "mil_nce_reference"
    monkeypatch.setenv("VATT_FAST_KERNELS", "auto")
    assert called() == auto
    calls.clear()
    nce(video, text[:, 0], impl="auto")  # nce runs the mil_nce implementations: no separate registration
    assert calls == [auto]
    calls.clear()
    mil_nce(video.double(), text.double(), impl="auto")  # the kernels take no float64
    assert calls == ["mil_nce_chunked"]
    with pytest.raises(ValueError, match="impl"):
        nce(video, text[:, 0], impl="fast")


def test_triton_needs_cuda_or_interpreter_and_no_float64(monkeypatch):
    video, text = normalized_inputs(5, 3, 8)
    if not _dispatch.triton_available():
        with pytest.raises(NotImplementedError, match="mil_nce"):
            mil_nce(video, text, impl="triton")
        return
    assert _dispatch.has_triton("mil_nce")  # registered by importing the kernels
    if nce_mod.INTERPRETING:
        with pytest.raises(TypeError, match=r"fp16, bf16 or fp32.*torch.float64.*impl='chunked'"):
            mil_nce(video.double(), text.double(), impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"needs CUDA tensors.*TRITON_INTERPRET=1"):
        nce(video, text[:, 0], impl="triton")


# --------------------------------------------------------------------------------------
# chunked path and Triton kernels: parity over impl
# --------------------------------------------------------------------------------------
IMPLS = ["chunked", "triton"]
DTYPES = [torch.float32, torch.float16]
# Floors of the parity bound (plain PyTorch can be exact by chance): about ten ulps of the
# values (losses ~5 in fp32; gradients up to ~1/tau in fp32, or rounded to fp16).
ATOL = {torch.float32: (5e-6, 1e-5), torch.float16: (5e-6, 1e-2)}
PLAIN_RTOL = {torch.float32: 1e-3, torch.float16: 1e-2}
# (B, D): 21 clips x D 13 spans two 16-anchor blocks (the interpreter's tiles) and several
# candidate blocks, none full, D padded to 16; one clip with D = 33 (padded to 64).
SHAPES = [(21, 13), (1, 33)]
# Small row blocks for the chunked path, so that the tests' sizes run several uneven blocks.
TEST_CHUNK_ELEMENTS = 64


def _need_impl(impl, device, dtype=torch.float32):
    """Skip, with the reason, the combinations this machine cannot run."""
    if impl != "triton":
        return
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("the bf16 kernel is tested on CUDA only (bf16 arithmetic is wrong in the Triton interpreter)")
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    if device.type == "cpu" and not nce_mod.INTERPRETING:
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1; this machine tests it on CUDA")


def _outputs(fn, weights, video, text, mask, video_all=None, text_all=None, mask_all=None):
    """Per-clip losses and the gradients of ``sum(weights * losses)`` for every float input."""
    floats = [video, text] + ([] if video_all is None else [video_all, text_all])
    leaves = [x.detach().clone().requires_grad_(True) for x in floats]
    if video_all is None:
        out = fn(leaves[0], leaves[1], mask)
    else:
        out = fn(leaves[0], leaves[1], mask, leaves[2], leaves[3], mask_all)
    grads = torch.autograd.grad((out * weights.to(out.dtype)).sum(), leaves)
    return [out.detach(), *grads]


def assert_impl_parity(impl, video, text, mask, video_all=None, text_all=None, mask_all=None):
    """Per-clip losses and every input gradient of ``impl`` under STYLE.md's rule: float64
    reference, plain = the reference on the same (low-precision) inputs. Returns ``impl``'s."""
    dtype = video.dtype
    weights = torch.rand(video.shape[0], device=video.device) + 0.5  # an arbitrary upstream gradient
    inputs = (video, text, mask, video_all, text_all, mask_all)
    got = _outputs(lambda *a: mil_nce(*a, impl=impl), weights, *inputs)
    plain = _outputs(mil_nce_reference, weights, *inputs)
    as64 = [x.double() if x is not None and x.is_floating_point() else x for x in inputs]
    ref = _outputs(mil_nce_reference, weights.double(), *as64)
    names = ("per-clip loss", "d video", "d text", "d video_all", "d text_all")
    for i, (name, g, r, p) in enumerate(zip(names, got, ref, plain)):
        assert g.dtype == p.dtype and g.shape == p.shape, f"{impl} {name}: {g.dtype} {tuple(g.shape)}"
        atol = ATOL[dtype][min(i, 1)]
        # A batch of one has loss log(2) whatever the inputs: gradients exactly 0, no scale for rtol.
        plain_rtol = PLAIN_RTOL[dtype] if r.abs().max() > atol else None
        assert_parity(g, r, p, atol, f"{impl} {dtype} {name}", plain_rtol=plain_rtol)
    return got


@pytest.mark.parametrize("masked", [False, True], ids=["all_present", "holes"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}_D{d}" for b, d in SHAPES])
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_parity_over_impl(device, monkeypatch, impl, dtype, k, shape, masked):
    _need_impl(impl, device, dtype)
    monkeypatch.setattr(nce_mod, "_CHUNK_ELEMENTS", TEST_CHUNK_ELEMENTS)
    b, d = shape
    video, text = normalized_inputs(b, k, d, dtype, device)
    mask = None
    if masked:
        mask = holey_mask(b, k, empty_rows=(1, 4, 5) if b > 5 else ()).to(device)
    loss, _, d_text = assert_impl_parity(impl, video, text, mask)
    if masked:
        valid = mask.any(dim=1)
        assert torch.all(loss[~valid] == 0) and torch.all(d_text[~mask] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_parity_local_rows_against_gathered(device, monkeypatch, impl, dtype):
    """Rows [9, 16) of a 23-clip global batch as separate tensors (one rank of a gather):
    gradients reach the local and the gathered tensors; the gathered videos are column-major."""
    _need_impl(impl, device, dtype)
    monkeypatch.setattr(nce_mod, "_CHUNK_ELEMENTS", TEST_CHUNK_ELEMENTS)
    n, k, d, lo, hi = 23, 4, 19, 9, 16
    video_all, text_all = normalized_inputs(n, k, d, dtype, device)
    video_all = video_all.t().contiguous().t()  # strides (1, n)
    mask_all = holey_mask(n, k, empty_rows=(3, 11, 20)).to(device)
    got = assert_impl_parity(
        impl, video_all[lo:hi], text_all[lo:hi], mask_all[lo:hi], video_all, text_all, mask_all
    )
    assert torch.all(got[0][11 - lo] == 0)
    assert torch.all(got[4][~mask_all] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_caption_anywhere_is_zero_without_nan(device, impl):
    """Every caption masked: losses 0 and gradients 0 (no -inf - -inf), NaN in the masked slots."""
    _need_impl(impl, device)
    video, text = normalized_inputs(6, 3, 10, device=device)
    text[2, 1] = float("nan")
    mask = torch.zeros(6, 3, dtype=torch.bool, device=device)
    loss, d_video, d_text = _outputs(lambda *a: mil_nce(*a, impl=impl), torch.ones(6, device=device), video, text, mask)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(d_video, torch.zeros_like(d_video)) and torch.equal(d_text, torch.zeros_like(d_text))


def test_nce_runs_the_kernels_with_k1(device):
    """``nce`` = ``mil_nce`` with K = 1 on every path, gathered audio included."""
    for impl in ("chunked", "triton"):
        if impl == "triton" and (not _dispatch.triton_available() or (device.type == "cpu" and not nce_mod.INTERPRETING)):
            continue
        video, text = normalized_inputs(9, 1, 12, device=device)
        audio = text[:, 0]
        torch.testing.assert_close(nce(video[2:5], audio[2:5], video, audio, impl=impl), nce_reference(video, audio)[2:5])


# --------------------------------------------------------------------------------------
# the registered ops
# --------------------------------------------------------------------------------------
def test_kernel_writes_every_output_element(device, monkeypatch):
    """A NaN-filled logsumexp buffer (the test hook) must come back fully written and right."""
    _need_impl("triton", device)
    video, text = normalized_inputs(21, 5, 13, device=device)
    mask = holey_mask(21, 5).to(device)
    monkeypatch.setattr(nce_mod, "_POISON_OUTPUT", True)
    loss = mil_nce(video, text, mask, impl="triton")
    assert not loss.isnan().any()
    torch.testing.assert_close(loss, mil_nce_reference(video, text, mask))

    class NoLaunch:  # ``_launch(kernel)[grid](*args)`` that launches nothing
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(nce_mod, "_launch", lambda kernel: NoLaunch())
    unwritten = mil_nce(video, text, mask, impl="triton")
    assert unwritten[mask.any(dim=1)].isnan().all()  # the hook is live (clips without captions are 0 anyway)


def test_opcheck_registered_ops(device):
    _need_impl("triton", device)
    fwd = torch.ops.vatt_fast.mil_nce_lse.default
    bwd = torch.ops.vatt_fast.mil_nce_lse_backward.default
    a = F.normalize(torch.randn(19, 13, device=device), dim=-1).requires_grad_()
    c = F.normalize(torch.randn(37, 13, device=device), dim=-1).requires_grad_()
    cand_mask = torch.rand(37, device=device) > 0.3
    for args in ((a, c, cand_mask, 1 / TAU), (a, c, None, 2.0), (a.detach().half(), c.detach().half(), cand_mask, 1 / TAU)):
        torch.library.opcheck(fwd, args)
    lse = fwd(a.detach(), c.detach(), cand_mask, 1 / TAU)
    torch.library.opcheck(bwd, (torch.rand(19, device=device), a.detach(), c.detach(), cand_mask, lse, 1 / TAU))
    torch.library.opcheck(bwd, (torch.rand(19, device=device), a.detach().t().contiguous().t(), c.detach(), None, lse, 2.0))


@pytest.mark.parametrize("impl", IMPLS)
def test_compile_fullgraph_loss(device, impl):
    """``torch.compile(fullgraph=True)`` of the loss modules over each path: same loss and input
    gradients as eager (on the CPU the Triton op is an opaque custom_op; on CUDA Inductor traces
    into the kernels)."""
    _need_impl(impl, device)
    from vatt_fast.nn.losses import MILNCELoss, NCELoss

    torch._dynamo.reset()
    mil, nce_loss = MILNCELoss(impl=impl), NCELoss(impl=impl)

    def step(video, text, audio, mask):
        return mil(video, text, mask) + nce_loss(video, audio)

    backend = "inductor" if device.type == "cuda" else "aot_eager"
    video, text = torch.randn(7, 12, device=device), torch.randn(7, 3, 12, device=device)
    audio = torch.randn(7, 12, device=device)
    mask = holey_mask(7, 3, empty_rows=(2,)).to(device)
    want, grads = grads_of(lambda v, t, a: step(v, t, a, mask), video, text, audio)
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    got, got_grads = grads_of(lambda v, t, a: compiled(v, t, a, mask), video, text, audio)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


_TRACE_GPU_REGISTRATION = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import importlib
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch._subclasses.functional_tensor import dispatch_functionalize

nce = importlib.import_module("vatt_fast.kernels.nce")
assert not nce.INTERPRETING


def step(a, c, mask, g):
    lse = torch.ops.vatt_fast.mil_nce_lse(a, c, mask, 14.0)
    return (lse,) + tuple(torch.ops.vatt_fast.mil_nce_lse_backward(g, a, c, mask, lse, 14.0))


a, c = torch.empty(40, 256, device="meta"), torch.empty(200, 256, device="meta")
mask, g = torch.empty(200, dtype=torch.bool, device="meta"), torch.empty(40, device="meta")
gm = make_fx(dispatch_functionalize(step), tracing_mode="symbolic")(a, c, mask, g)
print("kernels traced:", gm.code.count("triton_kernel_wrapper_functional("))
print("opaque ops left:", gm.code.count("vatt_fast."))
"""


def test_compiled_mode_registration_traces_into_the_kernels():
    """Without the interpreter the ops are ``triton_op``s: functionalization (as AOTAutograd and
    Inductor run it) must see the three kernel launches, with symbolic shapes, on meta tensors,
    so a CPU-only machine checks the GPU registration too."""
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, "-c", _TRACE_GPU_REGISTRATION], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "kernels traced: 3" in run.stdout and "opaque ops left: 0" in run.stdout, run.stdout


def test_chunked_matches_reference_bitwise_in_float64():
    """The chunked path in float64 (gradcheck's dtype) against the reference; gradcheck of its
    custom backward with uneven row blocks."""
    video, text = normalized_inputs(6, 2, 5, torch.float64)
    mask = torch.tensor([[True, False], [False, False], [True, True], [False, True], [True, True], [True, False]])
    torch.testing.assert_close(mil_nce_chunked(video, text, mask), mil_nce_reference(video, text, mask), rtol=1e-13, atol=1e-13)
    old = nce_mod._CHUNK_ELEMENTS
    nce_mod._CHUNK_ELEMENTS = 5
    try:
        video.requires_grad_(), text.requires_grad_()
        assert torch.autograd.gradcheck(lambda v, t: mil_nce_chunked(v, t, mask, tau=0.5), (video, text))
    finally:
        nce_mod._CHUNK_ELEMENTS = old


def test_flop_formula_counts_the_products(device):
    """FlopCounterMode sees the registered ops: 2 R C D forward, 8 R C D backward, per half."""
    _need_impl("triton", device)
    from torch.utils.flop_counter import FlopCounterMode

    b, k, d = 6, 3, 16
    video, text = normalized_inputs(b, k, d, device=device)
    video.requires_grad_(), text.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        mil_nce(video, text, impl="triton").sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    products = 2 * b * (b * k) * d  # one B x (B*K) x D product, for each of the two halves
    assert counts["vatt_fast.mil_nce_lse"] == 2 * products
    assert counts["vatt_fast.mil_nce_lse_backward"] == 8 * products
