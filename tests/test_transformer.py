"""Block against a hand-written timm ViT block, and the VATT Encoder."""

import math

import pytest
import torch
from torch import nn

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
