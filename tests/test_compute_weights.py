"""bf16 compute copies of the Linear weights (vatt_fast.training.compute_weights).

The copies must change nothing in the arithmetic of a bf16 autocast step (same loss, same fp32
gradients, bit for bit: the copy is exactly autocast's rounding of the weight, the gradient
exactly autocast's cast of the same bf16 gradient), and they must remove the per-Linear casts,
which is counted here: every ``aten._to_copy`` of a step, with and without the copies.
"""

from __future__ import annotations

import collections
import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vatt_fast.models import create_model
from vatt_fast.nn.losses import VATTLoss
from vatt_fast.training.compute_weights import ComputeWeights, linear_parameter_names, resolve_compute_weights

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class _CountCasts(TorchDispatchMode):
    """Counts dtype casts (``_to_copy``, dtype-changing ``copy_``) and multi-tensor copies."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default:
            self.counts["cast"] += 1
        elif func is torch.ops.aten.copy_.default and args[0].dtype != args[1].dtype:
            self.counts["cast"] += 1
        elif func is torch.ops.aten._foreach_copy_.default:
            self.counts["foreach_copy"] += 1
        return out


def _batch(cfg, B, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, cfg.num_captions, dtype=torch.bool)
    mask[1::3, 1:] = False
    batch = {
        "video": torch.randint(0, 256, (B, cfg.num_frames, cfg.frame_size, cfg.frame_size, 3), dtype=torch.uint8,
                               generator=g),
        "audio": torch.randn(B, cfg.audio_samples, generator=g),
        "text": torch.randint(1, cfg.vocab_size, (B, cfg.num_captions, cfg.caption_len), generator=g),
        "text_mask": mask,
    }
    return {k: v.to(device) for k, v in batch.items()}


def _step(model, batch, cw=None, count=False):
    """Loss and fp32 gradients (by name) of one bf16 autocast step, and the cast counts."""
    counter = _CountCasts()
    torch.manual_seed(0)  # DropToken and dropout draws
    with counter if count else contextlib.nullcontext():
        with torch.autocast(batch["video"].device.type, dtype=torch.bfloat16):
            out = cw(batch) if cw is not None else model(batch)
        loss = VATTLoss()({**out, "text_mask": batch["text_mask"]})["loss"]
        loss.backward()
        if cw is not None:
            cw.grads_to_params()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, counter.counts


def _with_random_biases(model):
    """Biases away from their zero init, so that a bias rounded to bf16 where autocast keeps it fp32
    (the fused path's fc1.bias) changes the numbers."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
    return model


# The module path everywhere; the fused block path (Triton; under the interpreter on the CPU).
IMPL_CASES = [(d, "reference") for d in DEVICES] + [(d, "triton") for d in DEVICES]


def _adamw_step(model, opt, cw, batch) -> float:
    """One bf16 autocast training step (on the copies ``cw`` when given, refreshed after the update),
    with seed 0 for the random draws; returns the loss."""
    torch.manual_seed(0)
    with torch.autocast(batch["video"].device.type, dtype=torch.bfloat16):
        out = cw(batch) if cw is not None else model(batch)
    loss = VATTLoss()({**out, "text_mask": batch["text_mask"]})["loss"]
    loss.backward()
    if cw is not None:
        cw.grads_to_params()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cw is not None:
        cw.refresh()
    return loss.item()


@pytest.mark.parametrize("device_type, impl", IMPL_CASES, ids=[f"{d}-{i}" for d, i in IMPL_CASES])
def test_same_loss_and_gradients_as_autocast_bit_for_bit(device_type, impl):
    device = torch.device(device_type)
    torch.manual_seed(0)
    model = _with_random_biases(create_model("tiny", dropout=0.1, attn_dropout=0.1)).to(device)
    model.set_kernel_impl(impl)
    batch = _batch(model.config, 6, device)
    plain = copy.deepcopy(model)
    loss_ref, grads_ref, _ = _step(plain, batch)
    loss, grads, _ = _step(model, batch, ComputeWeights(model))
    assert set(grads) == set(grads_ref) and len(grads) == len(list(model.parameters()))
    assert torch.equal(loss, loss_ref)
    for name, g in grads.items():
        assert g.dtype == torch.float32, name
        assert torch.equal(g, grads_ref[name]), f"{name}: max diff {(g - grads_ref[name]).abs().max().item():.3g}"


@pytest.mark.parametrize("device_type, impl", IMPL_CASES, ids=[f"{d}-{i}" for d, i in IMPL_CASES])
def test_removes_two_casts_per_linear_parameter(device_type, impl):
    device = torch.device(device_type)
    torch.manual_seed(0)
    model = create_model("tiny").to(device)
    model.set_kernel_impl(impl)
    batch = _batch(model.config, 4, device)
    _, _, plain = _step(copy.deepcopy(model), batch, count=True)
    cw = ComputeWeights(model)
    _, _, fast = _step(model, batch, cw, count=True)
    n = len(cw.copies)
    assert n == sum(1 for _ in linear_parameter_names(model).values())
    # autocast: one cast of each weight and bias in the forward, one of its gradient in the backward;
    # the copies: none of those, and one multi-tensor copy for all the gradients.
    assert plain["cast"] - fast["cast"] == 2 * n, (plain, fast, n)
    assert fast["foreach_copy"] == 1 and plain["foreach_copy"] == 0


def test_steps_refresh_and_match_autocast_training():
    """Three AdamW steps: the fp32 weights after them equal those of plain autocast training, so
    each step ran on the refreshed copies."""
    torch.manual_seed(0)
    model = create_model("tiny").to("cpu")
    plain = copy.deepcopy(model)
    batch = _batch(model.config, 4, torch.device("cpu"))
    cw = ComputeWeights(model)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (plain, model)]
    for _ in range(3):
        _adamw_step(plain, opts[0], None, batch)
        _adamw_step(model, opts[1], cw, batch)
        assert not cw.stale()
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    for p, c in zip(cw.params, cw.copies):
        assert c.dtype == torch.bfloat16 and torch.equal(c, p.detach().to(torch.bfloat16))


def test_forward_refreshes_after_a_checkpoint_load():
    """Weights loaded in place (a resumed run) reach the next forward without an explicit refresh."""
    lin = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3))
    cw = ComputeWeights(lin)
    x = torch.randn(2, 5)
    other = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3))
    lin.load_state_dict(other.state_dict())
    assert cw.stale()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cw(x)
        want = other(x)
    assert torch.equal(got, want)


def test_unused_and_shared_parameters():
    """A Linear the forward skips keeps ``.grad = None``; a weight shared by two Linears has one copy
    whose gradient sums both uses; a parameter outside any Linear keeps its own gradient."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight  # tied
            self.unused = nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            return self.b(self.a(x)) * self.scale

    torch.manual_seed(0)
    net = Net()
    plain = copy.deepcopy(net)
    x = torch.randn(3, 4)
    cw = ComputeWeights(net)
    assert len(cw.copies) == 5  # a.weight (= b.weight), a.bias, b.bias, unused.weight, unused.bias
    for m, w in ((plain, None), (net, cw)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = w(x) if w is not None else m(x)
        out.float().square().sum().backward()
        if w is not None:
            w.grads_to_params()
    assert net.unused.weight.grad is None and net.unused.bias.grad is None
    for (name, p), q in zip(plain.named_parameters(), net.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name
    assert all(c.grad is None for c in cw.copies)


def test_fp32_gradients_are_not_held_between_steps():
    """The fp32 ``.grad`` the copies' gradients go to is allocated per step: zero_grad(set_to_none)
    releases it, so between steps only the bf16 copies are held."""
    import weakref

    net = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    cw = ComputeWeights(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cw(torch.randn(3, 4))
    out.float().sum().backward()
    cw.grads_to_params()
    refs = [weakref.ref(p.grad) for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    assert all(r() is None for r in refs)
    assert cw.extra_bytes() == 2 * sum(p.numel() for p in net.parameters())


def test_activation_checkpointing_is_refused():
    """The recomputation of a checkpointed block runs after the copies were swapped out: refused at
    build and at a forward after checkpointing was switched on."""
    model = create_model("tiny")
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="activation checkpointing"):
        ComputeWeights(model)
    model.set_grad_checkpointing(False)
    cw = ComputeWeights(model)
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="--bf16-weights off, or no --activation-checkpointing"):
        cw(_batch(model.config, 2, torch.device("cpu")))


def test_mlp_fc1_bias_keeps_fp32():
    """The fused path feeds fc1.bias to bias_gelu_dropout itself (in fp32, as under autocast), so it
    has no bf16 copy; the other Linear parameters do."""
    from vatt_fast.nn.transformer import Mlp

    mlp = Mlp(8, 16)
    assert set(linear_parameter_names(mlp)) == {"fc1.weight", "fc2.weight", "fc2.bias"}


def test_model_without_linear_is_refused():
    with pytest.raises(ValueError, match="no nn.Linear parameter"):
        ComputeWeights(nn.Sequential(nn.LayerNorm(4)))
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        ComputeWeights(nn.Linear(2, 2), dtype=torch.float32)


@pytest.mark.parametrize("mode, precision, world, ckpt, expect", [
    ("auto", "bf16", 1, False, True),
    ("auto", "fp32", 1, False, False),
    ("auto", "bf16", 2, False, False),
    ("auto", "bf16", 1, True, False),
    ("off", "bf16", 1, False, False),
    ("on", "bf16", 1, False, True),
    ("on", "fp32", 1, False, "--precision resolves to fp32"),
    ("on", "bf16", 4, False, "4 processes"),
    ("on", "bf16", 1, True, "--activation-checkpointing recomputes"),
    ("sometimes", "bf16", 1, False, "not one of"),
])
def test_resolve_flag(mode, precision, world, ckpt, expect):
    import argparse

    args = argparse.Namespace(bf16_weights=mode, activation_checkpointing=ckpt)
    model = nn.Linear(3, 3)
    if isinstance(expect, str):
        with pytest.raises(ValueError, match=expect):
            resolve_compute_weights(args, model, precision, world)
    else:
        assert (resolve_compute_weights(args, model, precision, world) is not None) == expect


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_model_on_the_copies_matches_compiled_autocast(scope):
    """``torch.compile`` (in place, as the trainer's --compile and --compile-scope do) and the copies:
    three steps give the same losses as the same compiled model under plain autocast."""
    from vatt_fast.training.setup import compile_model

    torch.manual_seed(0)
    model = create_model("tiny")
    batch = _batch(model.config, 4, torch.device("cpu"))

    def losses(m, use_copies):
        compile_model(m, m, scope, "aot_eager")
        cw = ComputeWeights(m) if use_copies else None
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        return [_adamw_step(m, opt, cw, batch) for _ in range(3)]

    torch._dynamo.reset()
    assert losses(copy.deepcopy(model), True) == losses(copy.deepcopy(model), False)
