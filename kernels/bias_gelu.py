"""Fused bias + GELU + dropout on the MLP's hidden activation.

``out = dropout(gelu(x + bias))`` with the exact (erf) GELU of ``nn.GELU()``, where ``x`` is the
``mlp.fc1`` matrix product *without* its bias (``F.linear(h, fc1.weight)``, ``[..., H]``) and
``bias`` is ``fc1.bias``. The output has ``x``'s dtype; the arithmetic is fp32 (in the kernel) or
the promoted dtype of ``x`` and ``bias`` (in the reference), so a bf16 product and an fp32 bias
(autocast's layout) give one rounding at the end.

The dropout mask is the project's one seed convention, that of :mod:`.layer_norm`
(:func:`~.layer_norm.dropout_keep_mask`, shared, not copied):

    keep[r, c] = (philox4x32_10(key=seed, counter=(c, r, 0, 0))[0] >> 8) >= round(p * 2**24)

for element ``(r, c)`` of ``x`` seen as ``[M, H]`` rows. The same seed gives the same mask on
every ``impl``; kept values are scaled by ``1 / (1 - p)``. The seed is ``None`` (a fresh int64
drawn with ``torch.randint`` on ``x``'s device from torch's generator: no host sync, reproducible
with ``torch.manual_seed``, restored by activation checkpointing), a Python int, or an int64
tensor of one element on ``x``'s device (data under ``torch.compile`` / CUDA graphs). Two ops
given the *same* seed for tensors of the same ``[M, width]`` get the same mask on their common
columns: give each call its own seed (``None`` does).

Reference (``impl="reference"``, plain PyTorch visible to Inductor): add, ``F.gelu``, dropout
(``F.dropout`` with ``seed=None``, the seed's mask otherwise), cast. Eager: about four passes over
``M * H`` forward and a stored mask and pre-activation for backward.

Triton forward (``_fwd_kernel``), one pass over ``[BLOCK_M, BLOCK_N]`` tiles: read ``x``, write
``out`` (``2 * M * H`` elements), the mask regenerated from the seed. Nothing is saved but ``x``
(which autograd keeps anyway as the matmul's output), ``bias`` and the seed.

Triton backward (``_bwd_kernel``): recomputes ``z = x + bias`` and
``gelu'(z) = Phi(z) + z * phi(z)`` and regenerates the mask; reads ``dout`` and ``x``, writes ``dx``
(``3 * M * H`` elements). ``dbias = sum_rows dx`` is accumulated from the fp32 ``dx`` in registers:
a grid of ``G`` row programs by the column blocks, each program walking row blocks
``pid, pid + G, ...`` and writing one ``[BLOCK_N]`` slice of a ``[G, H]`` fp32 partial sum, reduced
by one small ``sum(0)`` (no atomics: deterministic; flash-attention's LayerNorm trade-off). The
trade-off against storing ``gelu'(z)`` or the mask: a few more FLOPs per element (one ``erf``, one
``exp``, ten Philox rounds) for ``M * H`` fewer elements stored and read back; the op is
memory-bound, so the recomputation is free.

Registration as in :mod:`.drop_token_gather` / :mod:`.layer_norm` (fixed at import):
``triton_op`` + ``wrap_triton`` with compiled Triton, ``custom_op`` + ``register_fake`` under
``TRITON_INTERPRET=1``; the same ``register_autograd``. Ops: ``vatt_fast::bias_gelu_dropout`` and
``vatt_fast::bias_gelu_dropout_backward``. No FLOP formula: the op is memory-bound.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._dispatch import (
    INTERPRETING,
    get_triton,
    launch,
    library_op,
    register_triton,
    resolve_impl,
    sm_count,
    triton_available,
)
from ._philox import SeedLike, _check_p, _check_seed, _seed_tensor, _shape, _threshold, dropout_keep_mask

__all__ = ["bias_gelu_dropout", "bias_gelu_dropout_reference"]


# --------------------------------------------------------------------------------------
# Checks at the boundary, reference and public functions
# --------------------------------------------------------------------------------------
def _check_args(x, bias, dropout_p, seed, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what}: x must be a floating tensor [..., H] (the fc1 product without bias), got {got}")
    H = x.shape[-1]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (H,) or not bias.is_floating_point():
            raise ValueError(
                f"{what}: bias must be a floating [H] = ({H},) tensor for x {tuple(x.shape)}, got {_shape(bias)}"
                f"{' ' + str(bias.dtype) if isinstance(bias, torch.Tensor) else ''}; or None"
            )
        if bias.device != x.device:
            raise ValueError(f"{what}: bias is on {bias.device} but x is on {x.device}")
    _check_p(dropout_p, what)
    _check_seed(seed, x.device, what)


def _core_reference(x, bias, p: float, seed: SeedLike):
    """The reference core on checked arguments (plain PyTorch, Inductor can fuse it)."""
    dtype = x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)
    z = x.to(dtype) if bias is None else x.to(dtype) + bias.to(dtype)
    g = F.gelu(z)
    if p > 0.0:
        if seed is None:
            g = F.dropout(g, p, training=True)
        else:
            g = g * dropout_keep_mask(seed, g.shape, p, device=g.device).to(dtype) * (1.0 / (1.0 - p))
    return g.to(x.dtype)


def bias_gelu_dropout_reference(
    x: torch.Tensor, bias: Optional[torch.Tensor], dropout_p: float = 0.0, training: bool = True,
    seed: SeedLike = None,
) -> torch.Tensor:
    """Plain PyTorch :func:`bias_gelu_dropout`; the definition of correct (same arguments, no ``impl``).

    With a ``seed`` the dropout mask is :func:`~.layer_norm.dropout_keep_mask` (the kernel's, bit
    for bit); with ``seed=None`` it is ``F.dropout``'s.
    """
    _check_args(x, bias, dropout_p, seed, "bias_gelu_dropout_reference")
    return _core_reference(x, bias, float(dropout_p) if training else 0.0, seed)


def bias_gelu_dropout(
    x: torch.Tensor, bias: Optional[torch.Tensor], dropout_p: float = 0.0, training: bool = True,
    seed: SeedLike = None, impl: Optional[str] = None,
) -> torch.Tensor:
    """``dropout(gelu(x + bias))`` (exact erf GELU), fused, forward and backward.

    Args:
        x: ``[..., H]``, the ``fc1`` product without its bias (``F.linear(h, fc1.weight)``), any float dtype.
        bias: ``[H]`` (``fc1.bias``; its dtype may differ from x's, e.g. fp32 under autocast) or ``None``.
        dropout_p: drop probability in ``[0, 1)``; applied only when ``training``.
        training: dropout on or off (``module.training``).
        seed: ``None`` (a fresh draw from torch's generator), an int, or an int64 tensor of one
            element on x's device. The same seed gives the same mask on every ``impl`` (module docstring).
        impl: ``"auto"``, ``"triton"``, ``"reference"`` or ``None`` for ``$VATT_FAST_KERNELS``.

    Returns:
        ``[..., H]`` in x's dtype; differentiable in x and bias (``dbias`` summed in fp32).
    """
    _check_args(x, bias, dropout_p, seed, "bias_gelu_dropout")
    seed_t = seed if isinstance(seed, torch.Tensor) else None
    if resolve_impl(impl, x, bias, seed_t, op="bias_gelu_dropout") == "triton":
        return get_triton("bias_gelu_dropout")(x, bias, dropout_p=dropout_p, training=training, seed=seed)
    return _core_reference(x, bias, float(dropout_p) if training else 0.0, seed)


# ----------------------------------------------------------------------------------------
# Triton kernels, launchers and their registration
# ----------------------------------------------------------------------------------------
TRITON_AVAILABLE = triton_available()
# Test hook: fill every output buffer with NaN before the launch, so an unwritten element shows.
_POISON_OUTPUT = False

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from .layer_norm import _keep_mask  # the @triton.jit Philox mask of the seed contract

    @triton.jit
    def _fwd_kernel(
        x_ptr,  # (M, H), any strides
        b_ptr,  # (H,) or a dummy when not HAS_BIAS
        seed_ptr,  # (1,) int64, or a dummy when not HAS_DROPOUT
        out_ptr,  # (M, H) contiguous, x's dtype
        M, H,
        stride_xm, stride_xh,
        threshold, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ):
        pid_m = tl.program_id(0)  # over cdiv(M, BLOCK_M)
        pid_n = tl.program_id(1)  # over cdiv(H, BLOCK_N)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        mask_n = cols < H
        mask = (rows < M)[:, None] & mask_n[None, :]
        r64 = rows.to(tl.int64)
        # Upcast right after the load (bf16 arithmetic is wrong in the interpreter).
        z = tl.load(x_ptr + r64[:, None] * stride_xm + cols[None, :] * stride_xh, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        g = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))  # z * Phi(z); 1 / sqrt(2)
        if HAS_DROPOUT:
            keep = _keep_mask(tl.load(seed_ptr), rows[:, None], cols[None, :], threshold)
            g = tl.where(keep, g * scale, 0.0)
        tl.store(out_ptr + r64[:, None] * H + cols[None, :], g.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_kernel(
        dout_ptr,  # (M, H), any strides (an expanded gradient has stride 0)
        x_ptr,  # (M, H), any strides: the saved input
        b_ptr,  # (H,) or a dummy when not HAS_BIAS
        seed_ptr,  # (1,) int64, or a dummy when not HAS_DROPOUT
        dx_ptr,  # (M, H) contiguous, x's dtype
        db_ptr,  # (G, H) fp32 partial sums, or a dummy when not HAS_BIAS
        M, H,
        stride_dm, stride_dh,
        stride_xm, stride_xh,
        threshold, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ):
        pid = tl.program_id(0)  # over G row programs, each walking row blocks pid, pid + G, ...
        num_programs = tl.num_programs(0)
        pid_n = tl.program_id(1)  # over cdiv(H, BLOCK_N)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        mask_n = cols < H
        if HAS_BIAS:
            b = tl.load(b_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
        db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for blk in range(pid, tl.cdiv(M, BLOCK_M), num_programs):
            rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
            mask = (rows < M)[:, None] & mask_n[None, :]
            r64 = rows.to(tl.int64)
            z = tl.load(x_ptr + r64[:, None] * stride_xm + cols[None, :] * stride_xh, mask=mask, other=0.0).to(
                tl.float32
            )
            if HAS_BIAS:
                z += b[None, :]
            # gelu'(z) = Phi(z) + z * phi(z); 1 / sqrt(2) and 1 / sqrt(2 pi)
            dgelu = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
            dz = tl.load(dout_ptr + r64[:, None] * stride_dm + cols[None, :] * stride_dh, mask=mask, other=0.0).to(
                tl.float32
            ) * dgelu  # zero outside the tile's mask (dout loads 0 there)
            if HAS_DROPOUT:
                keep = _keep_mask(seed, rows[:, None], cols[None, :], threshold)
                dz = tl.where(keep, dz * scale, 0.0)
            tl.store(dx_ptr + r64[:, None] * H + cols[None, :], dz.to(dx_ptr.dtype.element_ty), mask=mask)
            if HAS_BIAS:
                db_acc += dz
        if HAS_BIAS:
            tl.store(db_ptr + pid * H + cols, tl.sum(db_acc, axis=0), mask=mask_n)

    def _blocks(H: int) -> Tuple[int, int, int]:
        """(BLOCK_M, BLOCK_N, num_warps): up to 256 columns (a power of two >= 16) and 4096
        elements per tile. Comparisons only, so a symbolic ``H`` (dynamic shapes) just guards."""
        block_n = 16
        while block_n < H and block_n < 256:
            block_n *= 2
        return 4096 // block_n, block_n, 4

    def _backward_programs(device: torch.device, row_blocks: int, col_blocks: int) -> int:
        """G, the row programs of the backward grid ``(G, col_blocks)``: about eight programs per SM
        in all on a GPU (so the ``[G, H]`` partials stay small), three in the interpreter (so the
        walk over row blocks and the partial sums are exercised)."""
        if device.type == "cuda":
            sms = sm_count(device)
            target = max(1, 8 * sms // col_blocks)
        else:
            target = 3
        return max(1, min(row_blocks, target))

    def _empty(shape, dtype, device) -> torch.Tensor:
        if _POISON_OUTPUT:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.empty(shape, dtype=dtype, device=device)

    _library_op, _launch = library_op, launch  # module names: the tests patch _launch

    @_library_op("vatt_fast::bias_gelu_dropout")
    def _fwd_op(
        x: torch.Tensor, bias: Optional[torch.Tensor], seed: Optional[torch.Tensor], dropout_p: float
    ) -> torch.Tensor:
        """The Triton core on checked ``[M, H]`` arguments: ``[M, H]`` in x's dtype; dropout when
        ``seed`` is given and ``dropout_p > 0``."""
        M, H = x.shape
        out = _empty((M, H), x.dtype, x.device)
        if M == 0 or H == 0:
            return out
        block_m, block_n, num_warps = _blocks(H)
        dropout = seed is not None and dropout_p > 0.0
        _launch(_fwd_kernel)[(triton.cdiv(M, block_m), triton.cdiv(H, block_n))](
            x, x if bias is None else bias, seed if dropout else x, out,
            M, H,
            x.stride(0), x.stride(1),
            _threshold(dropout_p), 1.0 / (1.0 - dropout_p),
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=bias is not None, HAS_DROPOUT=dropout,
            num_warps=num_warps,
        )
        return out

    @_library_op("vatt_fast::bias_gelu_dropout_backward")
    def _bwd_op(
        dout: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], seed: Optional[torch.Tensor],
        dropout_p: float,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(dx [M, H] x's dtype, dbias [H] fp32)``; ``dbias`` is ``[0]`` without a bias."""
        M, H = x.shape
        dev = x.device
        dx = _empty((M, H), x.dtype, dev)
        has_bias = bias is not None
        block_m, block_n, num_warps = _blocks(H)
        col_blocks = triton.cdiv(H, block_n)
        G = _backward_programs(dev, triton.cdiv(M, block_m), col_blocks) if M > 0 and H > 0 else 0
        db_part = _empty((G, H) if has_bias else (0,), torch.float32, dev)
        if G > 0:
            dropout = seed is not None and dropout_p > 0.0
            _launch(_bwd_kernel)[(G, col_blocks)](
                dout, x, bias if has_bias else x, seed if dropout else x, dx, db_part if has_bias else dx,
                M, H,
                dout.stride(0), dout.stride(1),
                x.stride(0), x.stride(1),
                _threshold(dropout_p), 1.0 / (1.0 - dropout_p),
                BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=has_bias, HAS_DROPOUT=dropout,
                num_warps=num_warps,
            )
        if not has_bias:
            return dx, db_part.clone()
        return dx, db_part.sum(0)  # (G, H) -> (H,); zeros when G == 0 (no rows)

    if INTERPRETING:
        @_fwd_op.register_fake
        def _(x, bias, seed, dropout_p):
            return x.new_empty(x.shape)

        @_bwd_op.register_fake
        def _(dout, x, bias, seed, dropout_p):
            return x.new_empty(x.shape), x.new_empty((x.shape[1],) if bias is not None else (0,), dtype=torch.float32)

    def _setup_context(ctx, inputs, output):
        x, bias, seed, dropout_p = inputs
        ctx.save_for_backward(x, bias, seed)
        ctx.dropout_p = dropout_p

    def _backward(ctx, dout):
        x, bias, seed = ctx.saved_tensors
        dx, db = _bwd_op(dout, x, bias, seed, ctx.dropout_p)
        return dx, (None if bias is None else db.to(bias.dtype)), None, None

    _fwd_op.register_autograd(_backward, setup_context=_setup_context)

    def _bias_gelu_dropout_triton(x, bias, dropout_p=0.0, training=True, seed=None):
        """The Triton implementation :func:`bias_gelu_dropout` dispatches to (arguments checked)."""
        p = float(dropout_p) if training else 0.0
        seed_t = _seed_tensor(seed, x.device) if p > 0.0 else None
        H = x.shape[-1]
        return _fwd_op(x.reshape(math.prod(x.shape[:-1]), H), bias, seed_t, p).view(x.shape)

    register_triton("bias_gelu_dropout", _bias_gelu_dropout_triton)
