"""One pre-LN encoder block, forward + backward: the reference module path against the fast one.

Shapes: on CUDA the medium preset's video block (width 1024, 16 heads, MLP 4096) on batch 64 x
785 tokens (DropToken 0.5 plus the aggregation token) under bf16 autocast, residual stream in
fp32 as in the model; on the CPU the tiny preset's block (width 128) on its batch of 32 x 33
tokens in fp32. Dropout 0.1 on the branches and on attention, as in pretraining.

Cases:
- ``reference eager``: ``Block(impl="reference")``, the plain modules (SDPA attention);
- ``reference compiled``: the same under ``torch.compile`` (Inductor), where it works;
- ``fast``: ``Block(impl="auto")``, the default: on CUDA the fused path (residual + dropout +
  LayerNorm and bias + GELU + dropout as Triton kernels); on the CPU the module path, so that
  case shows that the default is no slower than the reference there.

Correctness first, with dropout off (the paths draw their masks differently): the output and
the gradients of the input and of ``qkv``, ``fc1`` and ``norm1`` weights against a float64 run of
the reference, with STYLE.md's parity rule (plain = the reference path in the benchmark's
precision). ``extra_info``: TFLOP/s of the block's matrix work (``3 x`` the forward FLOPs of
``vatt_fast.flops.encoder_layer_flops``), peak extra memory on CUDA, device, dtype, shape.
Run: ``pytest benchmarks/test_bench_block.py --benchmark-only``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from bench_utils import assert_parity, device_name, inductor_error, peak_extra_mb, record, time_it

from vatt_fast.flops import encoder_layer_flops, kept_tokens
from vatt_fast.models.config import get_config
from vatt_fast.nn.transformer import Block

CHECKED = ("attn.qkv.weight", "mlp.fc1.weight", "norm1.weight")
# parity floor relative to max|float64 value|, and sanity bound of the plain path against float64
ATOL_REL = {"fp32": 1e-5, "bf16": 2e-2}
PLAIN_RTOL = {"fp32": 1e-4, "bf16": 0.2}
CASES = ("reference eager", "reference compiled", "fast")


def _case(device: torch.device):
    cfg = get_config("medium" if device.type == "cuda" else "tiny")
    enc = cfg.video_encoder
    batch = 64 if device.type == "cuda" else cfg.batch_size
    n = kept_tokens(cfg.num_video_tokens, cfg.drop_token) + 1
    precision = "bf16" if device.type == "cuda" else "fp32"
    return dict(B=batch, N=n, D=enc.dim, H=enc.num_heads, M=enc.mlp_dim), precision


def _block(shape, impl: str, drop: float, device) -> Block:
    torch.manual_seed(0)
    block = Block(shape["D"], shape["H"], mlp_dim=shape["M"], drop=drop, attn_drop=drop, impl=impl)
    for p in block.parameters():  # LayerNorm affine away from (1, 0), so its gradients are checked
        if p.ndim == 1:
            p.data.add_(0.1 * torch.randn_like(p))
    return block.to(device).train()


def _fwd_bwd(block, x, grad, precision):
    x = x.detach().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = block(x)
    params = dict(block.named_parameters())
    grads = torch.autograd.grad(out, [x] + [params[n] for n in CHECKED], grad.to(out.dtype))
    return (out,) + grads


def _check(block_fn, shape, precision, device):
    """Dropout off: ``block_fn(block)`` (the case's callable) against float64 with the parity rule."""
    B = min(shape["B"], 4)  # the check runs on a few clips: float64 at full size would dominate
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, shape["N"], shape["D"], generator=g).to(device)
    grad = torch.randn(B, shape["N"], shape["D"], generator=g).to(device)
    block = _block(shape, "reference", 0.0, device)
    ref = _fwd_bwd(copy.deepcopy(block).double(), x.double(), grad.double(), "fp32")
    plain = _fwd_bwd(copy.deepcopy(block), x, grad, precision)
    got = _fwd_bwd(block_fn(copy.deepcopy(block)), x, grad, precision)
    for name, o, r, p in zip(("out", "dx") + CHECKED, got, ref, plain):
        scale = r.abs().max().item()
        assert_parity(o.float(), r, p.float(), ATOL_REL[precision] * scale, name=f"block {name}",
                      plain_rtol=PLAIN_RTOL[precision])


@pytest.mark.parametrize("case", CASES)
def test_block_forward_backward(benchmark, device, case):
    shape, precision = _case(device)
    if case == "reference compiled":
        reason = inductor_error(device)
        if reason is not None:
            pytest.skip(f"torch.compile (inductor) does not work on this machine: {reason}")
        torch._dynamo.reset()

    def prepare(block: Block) -> Block:
        if case == "fast":
            block.impl = block.mlp.impl = "auto"
        elif case == "reference compiled":
            block.compile()
        return block

    _check(prepare, shape, precision, device)
    block = prepare(_block(shape, "reference", 0.1, device))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape["B"], shape["N"], shape["D"], generator=g).to(device)
    grad = torch.randn(shape["B"], shape["N"], shape["D"], generator=g).to(device)

    def step():
        return _fwd_bwd(block, x, grad, precision)

    peak = peak_extra_mb(step, device)
    time_it(benchmark, step, device, rounds=10 if device.type == "cuda" else 20, warmup_rounds=2)
    flops = 3 * shape["B"] * encoder_layer_flops(shape["N"], shape["D"], shape["M"])
    record(benchmark, flops=flops, device=device_name(device), impl=case, dtype=precision,
           shape="B={B} N={N} D={D} heads={H} mlp={M} dropout=0.1".format(**shape), peak_extra_mb=peak)
