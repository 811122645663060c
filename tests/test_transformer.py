"""Block against a hand-written timm ViT block, and the VATT Encoder; the fused path (``impl``) of
Mlp, Block and Encoder against the module path."""

import copy
import importlib
import inspect
import math

import pytest
import torch
from torch import nn

from parity import assert_parity
from vatt_fast.kernels._dispatch import triton_available
from vatt_fast.kernels.layer_norm import dropout_keep_mask
from vatt_fast.nn import transformer as transformer_mod
from vatt_fast.nn.attention import Attention, RelativePositionBias, padding_mask_to_bias, set_attention_backend
from vatt_fast.nn.transformer import Block, Encoder, Mlp

TIMM_BLOCK_KEYS = [
    "attn.proj.bias",
    "attn.proj.weight",
    "attn.qkv.bias",
    "attn.qkv.weight",
    "mlp.fc1.bias",
    "mlp.fc1.weight",
    "mlp.fc2.bias",
    "mlp.fc2.weight",
    "norm1.bias",
    "norm1.weight",
    "norm2.bias",
    "norm2.weight",
]


def timm_like_state_dict(dim, hidden, generator):
    """Random weights under the key names of timm's vision_transformer.Block (qkv_bias=True)."""

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=generator) * scale

    return {
        "norm1.weight": 1 + r(dim),
        "norm1.bias": r(dim),
        "attn.qkv.weight": r(3 * dim, dim),
        "attn.qkv.bias": r(3 * dim),
        "attn.proj.weight": r(dim, dim),
        "attn.proj.bias": r(dim),
        "norm2.weight": 1 + r(dim),
        "norm2.bias": r(dim),
        "mlp.fc1.weight": r(hidden, dim),
        "mlp.fc1.bias": r(hidden),
        "mlp.fc2.weight": r(dim, hidden),
        "mlp.fc2.bias": r(dim),
    }


def timm_block_reference(sd, x, num_heads, eps=1e-6, bias=None):
    """timm ViT Block.forward (ls/drop_path identities, eval) written out from its tensors, in fp64."""
    x = x.double()
    sd = {k: v.double() for k, v in sd.items()}
    B, N, D = x.shape
    Dh = D // num_heads

    def layer_norm(t, w, b):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + eps) * w + b

    h = layer_norm(x, sd["norm1.weight"], sd["norm1.bias"])
    qkv = h @ sd["attn.qkv.weight"].T + sd["attn.qkv.bias"]
    qkv = qkv.reshape(B, N, 3, num_heads, Dh).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = (q * Dh ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias.double()
    p = torch.exp(scores - scores.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    a = (p @ v).transpose(1, 2).reshape(B, N, D)
    x = x + a @ sd["attn.proj.weight"].T + sd["attn.proj.bias"]
    h = layer_norm(x, sd["norm2.weight"], sd["norm2.bias"])
    h = h @ sd["mlp.fc1.weight"].T + sd["mlp.fc1.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    return x + h @ sd["mlp.fc2.weight"].T + sd["mlp.fc2.bias"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_block_loads_timm_state_dict_and_matches(device, dtype):
    dim, heads, hidden, N = 96, 3, 200, 37
    g = torch.Generator().manual_seed(123)
    sd = timm_like_state_dict(dim, hidden, g)
    block = Block(dim, heads, mlp_dim=hidden)
    assert sorted(block.state_dict()) == TIMM_BLOCK_KEYS
    block.load_state_dict(sd, strict=True)
    block = block.to(device, dtype).eval()
    x = torch.randn(2, N, dim, dtype=torch.float64, device=device)
    expected = timm_block_reference(sd, x.cpu(), heads).to(device)
    keep = torch.rand(2, N, device=device) > 0.3
    keep[:, 0] = True
    bias = torch.randn(1, heads, N, N, dtype=torch.float64, device=device) + padding_mask_to_bias(keep, torch.float64)
    expected_biased = timm_block_reference(sd, x.cpu(), heads, bias=bias.cpu()).to(device)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for backend in ("sdpa", "math"):
        block.attn.backend = backend
        torch.testing.assert_close(block(x.to(dtype)).double(), expected, **tol, msg=f"backend {backend}")
        got = block(x.to(dtype), bias.to(dtype)).double()
        torch.testing.assert_close(got, expected_biased, **tol, msg=f"backend {backend} with bias")


def test_block_and_mlp_arguments():
    assert Block(64, 2).mlp.fc1.out_features == 256  # mlp_ratio 4 default
    assert Block(64, 2, mlp_ratio=2.0).mlp.fc1.out_features == 128
    assert Block(64, 2, mlp_dim=100).mlp.fc1.out_features == 100
    assert Block(64, 2, norm_eps=1e-5).norm1.eps == 1e-5
    assert Block(64, 2, backend="math").attn.backend == "math"
    assert "attn.qkv.bias" not in Block(64, 2, qkv_bias=False).state_dict()
    with pytest.raises(TypeError):
        Block(64, 2, 128)  # ratio in timm, width here: keyword-only on purpose
    mlp = Mlp(10, 30)
    assert isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"
    assert mlp(torch.randn(2, 3, 10)).shape == (2, 3, 10)


def test_block_dropout_only_in_training():
    block = Block(32, 2, drop=0.5, attn_drop=0.5)
    x = torch.randn(2, 7, 32)
    block.eval()
    ref = Block(32, 2).eval()
    ref.load_state_dict(block.state_dict())
    torch.testing.assert_close(block(x), ref(x))
    block.train()
    assert not torch.allclose(block(x), ref(x))


def small_encoder(**kw):
    args = dict(dim=96, depth=2, num_heads=3, mlp_dim=160)
    args.update(kw)
    return Encoder(**args)


def manual_encoder_forward(enc, x, keep=None):
    """Agg token, blocks with the same bias each layer, final norm: spelled out from the parts."""
    B = x.shape[0]
    h = torch.cat([enc.agg_token.expand(B, 1, -1), x], dim=1)
    L = h.shape[1]
    bias = None
    if enc.rel_pos is not None:
        bias = enc.rel_pos(L, L)
    if keep is not None:
        full = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=x.device), keep], dim=1)
        pad = padding_mask_to_bias(full)
        bias = pad if bias is None else bias + pad
    for blk in enc.blocks:
        h = blk(h, bias)
    return enc.norm(h)


def test_encoder_shapes_and_agg_pooling(device):
    enc = small_encoder().to(device).eval()
    x = torch.randn(3, 37, 96, device=device)
    pooled, states = enc(x)
    assert pooled.shape == (3, 96) and states.shape == (3, 38, 96)
    torch.testing.assert_close(pooled, states[:, 0])
    torch.testing.assert_close(states, manual_encoder_forward(enc, x))
    with torch.no_grad():
        enc.agg_token.add_(1.0)
    assert not torch.allclose(enc(x)[0], pooled)  # the pooled feature comes from the agg token


def test_encoder_padding_mask_masks(device):
    enc = small_encoder().to(device).eval()
    B, N = 3, 23
    keep = torch.ones(B, N, dtype=torch.bool, device=device)
    keep[0, 15:] = False
    keep[1, 2:6] = False  # holes in the middle
    keep[2, :] = False  # all padding: only the agg token is real
    x = torch.randn(B, N, 96, device=device)
    x2 = x.clone()
    x2[~keep] = 5 * torch.randn(int((~keep).sum()), 96, device=device)
    pooled, states = enc(x, padding_mask=keep)
    pooled2, states2 = enc(x2, padding_mask=keep)
    assert torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled, pooled2)
    real = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=device), keep], dim=1)
    torch.testing.assert_close(states[real], states2[real])
    torch.testing.assert_close(states, manual_encoder_forward(enc, x, keep))
    assert not torch.allclose(enc(x)[0], enc(x2)[0])  # without the mask the padding leaks in
    with pytest.raises(ValueError, match=r"padding_mask must be \[B, N\] = \[3, 23\]"):
        enc(x, padding_mask=keep[:, 1:])


def test_encoder_relative_position_bias(device):
    plain = small_encoder().to(device)
    assert plain.rel_pos is None and not any("rel_pos" in k for k in plain.state_dict())
    enc = small_encoder(rel_pos_bias=True, rel_pos_buckets=16, rel_pos_max_distance=20).to(device).eval()
    assert isinstance(enc.rel_pos, RelativePositionBias)
    assert enc.rel_pos.relative_attention_bias.weight.shape == (16, 3)
    assert enc.rel_pos.max_distance == 20
    keep = torch.ones(2, 11, dtype=torch.bool, device=device)
    keep[1, 7:] = False
    x = torch.randn(2, 11, 96, device=device)
    pooled, states = enc(x, padding_mask=keep)
    torch.testing.assert_close(states, manual_encoder_forward(enc, x, keep))
    # the bias matters, and its one table (shared by every layer) gets gradients
    with torch.no_grad():
        enc.rel_pos.relative_attention_bias.weight.mul_(50)
    assert not torch.allclose(enc(x, padding_mask=keep)[0], pooled)
    enc(x, padding_mask=keep)[0].sum().backward()
    assert enc.rel_pos.relative_attention_bias.weight.grad.abs().sum() > 0


def test_encoder_extra_attn_bias_and_backends(device):
    enc = small_encoder(rel_pos_bias=True).to(device).eval()
    x = torch.randn(2, 9, 96, device=device)
    extra = torch.randn(2, 3, 10, 10, device=device)
    ref_pooled, ref_states = enc(x, attn_bias=extra)
    L = 10
    h = torch.cat([enc.agg_token.expand(2, 1, -1), x], dim=1)
    for blk in enc.blocks:
        h = blk(h, extra + enc.rel_pos(L, L))
    torch.testing.assert_close(ref_states, enc.norm(h))
    set_attention_backend(enc, "math")
    assert all(m.backend == "math" for m in enc.modules() if isinstance(m, Attention))
    torch.testing.assert_close(enc(x, attn_bias=extra)[1], ref_states, rtol=1e-4, atol=1e-5)


def test_encoder_without_agg_token_mean_pools_real_tokens():
    enc = small_encoder(use_agg_token=False).eval()
    assert enc.agg_token is None and "agg_token" not in enc.state_dict()
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, 5:] = False
    x = torch.randn(2, 8, 96)
    pooled, states = enc(x, padding_mask=keep)
    assert states.shape == (2, 8, 96)
    torch.testing.assert_close(pooled[0], states[0, :5].mean(0))
    torch.testing.assert_close(pooled[1], states[1].mean(0))


def test_grad_checkpointing_same_gradients(device, monkeypatch):
    calls = []
    real_checkpoint = transformer_mod.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformer_mod, "checkpoint", counting_checkpoint)
    torch.manual_seed(3)
    enc = small_encoder(drop=0.1, attn_drop=0.1, rel_pos_bias=True).to(device).train()
    x = torch.randn(2, 13, 96, device=device)
    keep = torch.ones(2, 13, dtype=torch.bool, device=device)
    keep[0, 9:] = False

    def grads(checkpointing):
        enc.zero_grad(set_to_none=True)
        enc.set_grad_checkpointing(checkpointing)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(11)  # same dropout masks in both runs
        pooled, states = enc(xi, padding_mask=keep)
        (pooled.square().sum() + states.sum()).backward()
        return pooled.detach(), xi.grad, {n: p.grad.clone() for n, p in enc.named_parameters()}

    p0, gx0, g0 = grads(False)
    assert calls == []
    p1, gx1, g1 = grads(True)
    assert calls == [False, False]  # one non-reentrant checkpoint per block
    torch.testing.assert_close(p1, p0)
    torch.testing.assert_close(gx1, gx0)
    assert g0.keys() == g1.keys() and len(g0) == 2 * 12 + 4
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], msg=name)


def test_encoder_init():
    enc = Encoder(256, 2, 4, 1024, rel_pos_bias=True)
    for name, p in enc.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
    for m in enc.modules():
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0) and m.eps == 1e-6
        if isinstance(m, nn.Linear):
            assert 0.017 < m.weight.std().item() < 0.023
    assert 0.005 < enc.agg_token.std().item() < 0.04
    assert enc.rel_pos.relative_attention_bias.weight.abs().max() < 0.2


def test_encoder_state_dict_round_trip(device):
    enc = small_encoder(rel_pos_bias=True).to(device).eval()
    other = small_encoder(rel_pos_bias=True).to(device).eval()
    x = torch.randn(2, 7, 96, device=device)
    assert not torch.allclose(enc(x)[0], other(x)[0])
    other.load_state_dict(enc.state_dict())
    torch.testing.assert_close(other(x)[0], enc(x)[0], rtol=0, atol=0)
    expected = {"agg_token", "norm.weight", "norm.bias", "rel_pos.relative_attention_bias.weight"}
    assert expected <= set(enc.state_dict())
    assert {k.split(".", 2)[2] for k in enc.state_dict() if k.startswith("blocks.0.")} == set(TIMM_BLOCK_KEYS)


# --------------------------------------------------------------------------------------
# The fused path (impl="triton"): dropout_add_layer_norm + bias_gelu_dropout
# --------------------------------------------------------------------------------------
FUSED_ATOL = 1e-5  # fp32 floor of STYLE.md's parity rule (tests/parity.py)


def _fused_device():
    """Where the fused path runs here: CUDA (compiled kernels) or the CPU (Triton interpreter)."""
    if not triton_available():
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not importlib.import_module("vatt_fast.kernels.layer_norm").INTERPRETING:
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set")
    return torch.device("cpu")


class SeededDropout(nn.Dropout):
    """``nn.Dropout`` whose mask is the fused ops' for a fixed seed (``dropout_keep_mask``), so that the
    module path replays the fused path's masks exactly (test only)."""

    def __init__(self, p: float, seed: torch.Tensor) -> None:
        super().__init__(p)
        self.seed = seed

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = dropout_keep_mask(self.seed, x.shape, self.p, device=x.device)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


def _record_seeds(monkeypatch):
    """Record the dropout seed of every fused op call with dropout, in call order (drawing one
    explicitly from torch's generator, as the ops do, where the caller passed none)."""
    seeds = []

    def wrap(fn):
        sig = inspect.signature(fn)

        def wrapped(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            if a["dropout_p"] > 0 and a["training"]:
                if a["seed"] is None:
                    a["seed"] = torch.randint(0, 2**62, (1,)).to(a["x"].device)
                seeds.append(a["seed"].clone())
            return fn(*bound.args, **bound.kwargs)

        return wrapped

    monkeypatch.setattr(transformer_mod, "dropout_add_layer_norm", wrap(transformer_mod.dropout_add_layer_norm))
    monkeypatch.setattr(transformer_mod, "bias_gelu_dropout", wrap(transformer_mod.bias_gelu_dropout))
    return seeds


def _set_impl(module, impl):
    for m in module.modules():
        if isinstance(m, (Encoder, Block, Mlp)):
            m.impl = impl
    return module


def _randomize_norms(module):
    """LayerNorm affine away from ones/zeros, so wrong gradients of it show."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(0.2 * torch.randn_like(m.weight))
                m.bias.add_(0.2 * torch.randn_like(m.bias))
    return module


def _grads(module, inputs, gouts):
    """Outputs, and the gradients of sum(out * g) in the input ``inputs[0]`` and every parameter."""
    module.zero_grad(set_to_none=True)
    x = inputs[0].detach().clone().requires_grad_()
    outs = module(x, *inputs[1:])
    outs = outs if isinstance(outs, tuple) else (outs,)
    sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, gouts)).backward()
    return outs, {"x": x.grad, **{n: p.grad for n, p in module.named_parameters()}}


def _assert_fused_parity(fused, module_plain, inputs, gouts):
    """STYLE.md's rule: the fused path's ``(outs, grads)`` (fp32, from :func:`_grads`) against the
    module path in float64, the bound from the module path in fp32; outputs and the gradients of the
    input and of every parameter."""
    outs, grads = fused
    plain, plain_grads = _grads(module_plain, inputs, gouts)
    ref_module = copy.deepcopy(module_plain).double()
    ref, ref_grads = _grads(ref_module, [t.double() if t.is_floating_point() else t for t in inputs], gouts)
    assert len(outs) == len(ref)
    for i, (o, p, r) in enumerate(zip(outs, plain, ref)):
        assert o.dtype == p.dtype
        assert_parity(o, r, p, FUSED_ATOL, name=f"output {i}")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name] is not None, name
        assert_parity(grads[name], ref_grads[name], plain_grads[name], FUSED_ATOL, name=f"d{name}")


def test_attention_branch_is_attention_without_proj_drop():
    """Attention.forward_branch (what the fused path calls) is forward without proj_drop."""
    attn = Attention(48, 2, attn_drop=0.0, proj_drop=0.3)
    x, bias = torch.randn(2, 9, 48), torch.randn(1, 2, 9, 9)
    torch.manual_seed(5)
    out = attn(x, bias)
    torch.manual_seed(5)
    branch = attn.forward_branch(x, bias)
    torch.testing.assert_close(out, torch.nn.functional.dropout(branch, 0.3), rtol=0, atol=0)
    attn.eval()
    torch.testing.assert_close(attn(x, bias), attn.forward_branch(x, bias), rtol=0, atol=0)


def test_impl_is_resolved_at_build(monkeypatch):
    monkeypatch.delenv("VATT_FAST_KERNELS", raising=False)
    assert {m.impl for m in small_encoder().modules() if isinstance(m, (Encoder, Block, Mlp))} == {"auto"}
    monkeypatch.setenv("VATT_FAST_KERNELS", "reference")
    enc = small_encoder()
    assert {m.impl for m in enc.modules() if isinstance(m, (Encoder, Block, Mlp))} == {"reference"}
    monkeypatch.setenv("VATT_FAST_KERNELS", "triton")  # read at build, never inside forward
    enc(torch.randn(1, 3, 96))
    with pytest.raises(ValueError, match=r"impl='fused' is not one of \['auto', 'triton', 'reference'\]"):
        Block(32, 2, impl="fused")


def test_auto_on_cpu_runs_the_module_path(monkeypatch):
    """impl='auto' off CUDA is exactly today's module path: the fused ops are not called."""
    def fail(*args, **kwargs):
        raise AssertionError("a fused op was called on the CPU with impl='auto'")

    monkeypatch.setattr(transformer_mod, "dropout_add_layer_norm", fail)
    monkeypatch.setattr(transformer_mod, "bias_gelu_dropout", fail)
    enc = small_encoder(impl="auto").train()
    enc(torch.randn(2, 5, 96))[0].sum().backward()
    Block(32, 2, impl="auto")(torch.randn(1, 3, 32))


@pytest.mark.parametrize("drop", [0.0, 0.2], ids=["p0", "p0.2"])
def test_fused_mlp_and_block_match_module_path(monkeypatch, drop):
    """Block and Mlp on the fused path against the module path with the same weights; with dropout,
    the module path replays the fused path's masks (SeededDropout); odd widths, an attention bias."""
    device = _fused_device()
    seeds = _record_seeds(monkeypatch)
    dim, hidden = 48, 100
    block = _randomize_norms(Block(dim, 2, mlp_dim=hidden, drop=drop, impl="triton")).to(device).train()
    block.mlp.drop2 = SeededDropout(drop, torch.randint(0, 2**62, (1,)).to(device))  # Block.forward's last add
    x = torch.randn(2, 11, dim, device=device)
    attn_bias = torch.randn(1, 2, 11, 11, device=device)
    gouts = [torch.randn(2, 11, dim, device=device)]
    plain = _set_impl(copy.deepcopy(block), "reference")
    fused = _grads(block, [x, attn_bias], gouts)
    assert len(seeds) == (2 if drop else 0)  # norm2 (the attention branch's dropout), bias_gelu (drop1)
    if drop:
        plain.attn.proj_drop = SeededDropout(drop, seeds[0])
        plain.mlp.drop1 = SeededDropout(drop, seeds[1])
    _assert_fused_parity(fused, plain, [x, attn_bias], gouts)

    mlp, mlp_plain = block.mlp, plain.mlp  # the Mlp on its own
    fused = _grads(mlp, [x], gouts)
    if drop:
        mlp_plain.drop1 = SeededDropout(drop, seeds[2])
    _assert_fused_parity(fused, mlp_plain, [x], gouts)


@pytest.mark.parametrize("drop", [0.0, 0.2], ids=["p0", "p0.2"])
def test_fused_encoder_matches_module_path(monkeypatch, drop):
    """The encoder's fused path (the pending branch carried into the next LayerNorm, the final norm
    with prenorm=False) against the module path: relative position bias, padding with holes, odd
    widths; with dropout, the module path replays each mask (three seeds per block, in call order)."""
    device = _fused_device()
    seeds = _record_seeds(monkeypatch)
    enc = small_encoder(dim=48, depth=2, num_heads=2, mlp_dim=100, drop=drop, rel_pos_bias=True, impl="triton")
    enc = _randomize_norms(enc).to(device).train()
    x = torch.randn(2, 10, 48, device=device)
    keep = torch.ones(2, 10, dtype=torch.bool, device=device)
    keep[0, 3:6] = False
    gouts = [torch.randn(2, 48, device=device), torch.randn(2, 11, 48, device=device)]
    plain = _set_impl(copy.deepcopy(enc), "reference")
    fused = _grads(enc, [x, keep], gouts)
    assert len(seeds) == (6 if drop else 0)
    if drop:
        for i, blk in enumerate(plain.blocks):
            blk.attn.proj_drop = SeededDropout(drop, seeds[3 * i])
            blk.mlp.drop1 = SeededDropout(drop, seeds[3 * i + 1])
            blk.mlp.drop2 = SeededDropout(drop, seeds[3 * i + 2])
    _assert_fused_parity(fused, plain, [x, keep], gouts)


def test_fused_state_dict_round_trip():
    """The impl changes no parameter: state_dicts load across impls both ways, timm's block keys."""
    device = _fused_device()
    kw = dict(dim=48, depth=2, num_heads=2, mlp_dim=100, rel_pos_bias=True)
    fused = _randomize_norms(small_encoder(impl="triton", **kw)).to(device).eval()
    ref = small_encoder(impl="reference", **kw).to(device).eval()
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert {k.split(".", 2)[2] for k in fused.state_dict() if k.startswith("blocks.0.")} == set(TIMM_BLOCK_KEYS)
    x = torch.randn(2, 7, 48, device=device)
    assert not torch.allclose(ref(x)[1], fused(x)[1])
    ref.load_state_dict(fused.state_dict(), strict=True)
    torch.testing.assert_close(ref(x)[1], fused(x)[1])
    back = small_encoder(impl="triton", **kw).to(device).eval()
    back.load_state_dict(ref.state_dict(), strict=True)
    assert torch.equal(back(x)[1], fused(x)[1])


def test_fused_encoder_grad_checkpointing(monkeypatch):
    """Checkpointing on the fused path: one non-reentrant checkpoint per block, the recomputation
    draws the same dropout seeds (checkpoint restores the RNG), so the same loss and gradients."""
    device = _fused_device()
    calls = []
    real_checkpoint = transformer_mod.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformer_mod, "checkpoint", counting_checkpoint)
    enc = small_encoder(dim=48, depth=2, num_heads=2, mlp_dim=100, drop=0.2, attn_drop=0.1, rel_pos_bias=True,
                        impl="triton").to(device).train()
    x = torch.randn(2, 9, 48, device=device)
    gouts = [torch.randn(2, 48, device=device), torch.randn(2, 10, 48, device=device)]

    def run(checkpointing):
        enc.set_grad_checkpointing(checkpointing)
        torch.manual_seed(11)  # the same dropout seeds in both runs
        return _grads(enc, [x], gouts)

    (outs0, g0), (outs1, g1) = run(False), run(True)
    assert calls == [False, False]
    for a, b in zip(outs0, outs1):
        assert torch.equal(a, b)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], msg=name)
    torch.manual_seed(12)
    assert not torch.allclose(_grads(enc, [x], gouts)[1]["x"], g0["x"])  # the masks are live


def test_fused_encoder_draws_its_dropout_seeds_in_one_kernel():
    """All the fused ops of a stack take their seeds from one random draw per forward (views of one
    int64 vector), instead of one small random kernel per op; none without dropout or in eval."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountRandom(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.randint = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.randint:
                self.randint += 1
            return func(*args, **(kwargs or {}))

    device = _fused_device()
    x = torch.randn(2, 9, 48, device=device)
    for drop, train, want in ((0.2, True, 1), (0.0, True, 0), (0.2, False, 0)):
        enc = small_encoder(dim=48, depth=3, num_heads=2, mlp_dim=100, drop=drop, impl="triton").to(device)
        enc.train(train)
        with CountRandom() as counter:
            enc(x)
        assert counter.randint == want, (drop, train, counter.randint)
