"""Fused residual add + dropout + LayerNorm for the pre-LN Transformer block.

``h = residual + dropout(x)`` (``h = dropout(x)`` without a residual), ``y = LayerNorm(h) * weight + bias``;
:func:`dropout_add_layer_norm` returns ``(y, h)`` with ``prenorm=True`` (``h`` is the new residual
stream, the input of the next block) and ``y`` otherwise. Semantics as flash-attention's
``ops/triton/layer_norm.py`` ``layer_norm_fn(x, weight, bias, residual=, dropout_p=, prenorm=)``.
Statistics are fp32; ``y`` has ``x``'s dtype, ``h`` the residual's dtype (``x``'s without one), so a
bf16 branch output can be added to an fp32 residual stream.

The dropout mask is a function of a seed, never a stored tensor. Its contract (the same for every
``impl``, so the kernel is checked against the reference exactly):

    keep[r, c] = (philox4x32_10(key=seed, counter=(c, r, 0, 0))[0] >> 8) >= round(p * 2**24)

for element ``(r, c)`` of ``x`` seen as ``[M, D]`` rows (``r`` the row of the flattened leading
dimensions, ``c`` the column; strides do not matter). Philox-4x32-10 is Triton's ``tl.philox``
(for row 0 it is ``tl.randint(seed, c)``); :func:`dropout_keep_mask` reproduces it in plain PyTorch
(integer arithmetic, no overflow), and the reference uses that mask whenever a ``seed`` is given.
The keep probability is ``1 - round(p * 2**24) / 2**24`` (within ``3e-8`` of ``1 - p``); kept
values are scaled by ``1 / (1 - p)`` as ``F.dropout`` does.

The seed: an int64 tensor of one element on ``x``'s device (preferred: under ``torch.compile`` and
in CUDA graphs it is data, not a constant, so a new seed per step neither recompiles nor is baked
into a graph), or a Python int (copied to the device each call; under compile each new value is a
new constant). ``seed=None`` draws a fresh one with ``torch.randint`` on ``x``'s device from torch's
generator (no host sync; ``torch.manual_seed`` makes it reproducible; traced as an ordinary random
op under compile). With ``seed=None`` the reference does not need the seed's mask and runs plain
``F.dropout`` (the path a model takes today, and the fair baseline); with a seed it reproduces
the kernel's mask.

Reference (``impl="reference"``, plain PyTorch visible to Inductor): dropout, add, ``F.layer_norm``
in the promoted dtype of ``h`` and the affine parameters, cast to ``x``'s dtype. Eager it makes
about five passes over ``M * D`` elements forward and more backward, plus a stored mask.

Triton forward (``_fwd_kernel``), one pass, each program ``BLOCK_M`` whole rows (``D <= 8192`` fits
in registers): reads ``x`` and ``residual`` once, regenerates the mask, writes ``h`` and ``y`` and
two fp32 statistics per row: ``M * D * (2 + 2)`` elements moved with a residual. ``y`` is
computed from the fp32 ``h`` before it is rounded to its dtype (as flash-attention does).

Triton backward (``_bwd_kernel``): a fixed grid of programs (a few per SM on a GPU), each walking
row blocks ``pid, pid + G, ...``: reads ``dy``, ``dh`` (the gradient of the returned ``h``, with
``prenorm``), ``h`` and the statistics, regenerates the mask from the seed, writes ``dresidual``
(the gradient of ``h``) and ``dx``: ``M * D * (3 + 2)`` elements. ``dweight`` and ``dbias`` are summed
in fp32 registers per program and the ``[G, D]`` partial sums are reduced by one small ``sum(0)``,
the flash-attention trade-off (no atomics, deterministic; fast up to ``D`` of about 8k). ``xhat``
is recomputed from the stored ``h`` (rounded to its dtype) and the saved fp32 mean and rstd.

Registration as in :mod:`drop_token_gather` (fixed at import): ``triton_op`` + ``wrap_triton``
with compiled Triton, ``custom_op`` + ``register_fake`` under ``TRITON_INTERPRET=1``; the same
``register_autograd``. Ops: ``vatt_fast::dropout_add_layer_norm`` and
``vatt_fast::dropout_add_layer_norm_backward``. No FLOP formula: the op is memory-bound.
"""

from __future__ import annotations

import numbers
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
from ._philox import (  # noqa: F401  (dropout_keep_mask is public here, where the contract is documented)
    SeedLike,
    _check_p,
    _check_seed,
    _seed_tensor,
    _shape,
    _threshold,
    dropout_keep_mask,
)

__all__ = ["MAX_TRITON_DIM", "dropout_add_layer_norm", "dropout_add_layer_norm_reference", "dropout_keep_mask"]

# Widest row the Triton kernels keep in registers (flash-attention's limit, 64 KB of fp32).
MAX_TRITON_DIM = 8192

def _check_args(x, residual, weight, bias, dropout_p, eps, seed, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what}: x must be a floating tensor [..., D], got {got}")
    D = x.shape[-1]
    if D == 0:
        raise ValueError(f"{what}: x has an empty last dimension (D=0), shape {tuple(x.shape)}; LayerNorm needs D >= 1")
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.shape != x.shape or not residual.is_floating_point():
            raise ValueError(
                f"{what}: residual must be a floating tensor of x's shape {tuple(x.shape)}, got {_shape(residual)}"
                f"{'' if not isinstance(residual, torch.Tensor) else ' ' + str(residual.dtype)}; or None for h = dropout(x)"
            )
        if residual.device != x.device:
            raise ValueError(f"{what}: residual is on {residual.device} but x is on {x.device}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (D,) or not t.is_floating_point():
            raise ValueError(f"{what}: {name} must be a floating [D] = ({D},) tensor for x {tuple(x.shape)}, got {_shape(t)}")
        if t.device != x.device:
            raise ValueError(f"{what}: {name} is on {t.device} but x is on {x.device}")
    _check_p(dropout_p, what)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not float(eps) > 0.0:
        raise ValueError(f"{what}: eps must be a positive float (VATT uses 1e-6), got {eps!r}")
    _check_seed(seed, x.device, what)


# --------------------------------------------------------------------------------------
# Reference and public functions
# --------------------------------------------------------------------------------------
def _core_reference(x, residual, weight, bias, p: float, eps: float, seed: SeedLike):
    """The reference core on checked arguments: ``(y, h)`` (plain PyTorch, Inductor can fuse it)."""
    if p > 0.0:
        if seed is None:
            x = F.dropout(x, p, training=True)
        else:
            x = x * dropout_keep_mask(seed, x.shape, p, device=x.device).to(x.dtype) * (1.0 / (1.0 - p))
    h = x if residual is None else (residual + x).to(residual.dtype)
    dtype = h.dtype
    for t in (weight, bias):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    y = F.layer_norm(
        h.to(dtype), (h.shape[-1],), None if weight is None else weight.to(dtype),
        None if bias is None else bias.to(dtype), eps,
    )
    return y.to(x.dtype), h


def dropout_add_layer_norm_reference(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    dropout_p: float = 0.0, eps: float = 1e-6, training: bool = True, seed: SeedLike = None, prenorm: bool = True,
):
    """Plain PyTorch :func:`dropout_add_layer_norm`; the definition of correct (same arguments, no ``impl``).

    With a ``seed`` the dropout mask is :func:`dropout_keep_mask` (the kernel's, bit for bit); with
    ``seed=None`` it is ``F.dropout``'s.
    """
    _check_args(x, residual, weight, bias, dropout_p, eps, seed, "dropout_add_layer_norm_reference")
    p = float(dropout_p) if training else 0.0
    y, h = _core_reference(x, residual, weight, bias, p, float(eps), seed)
    return (y, h) if prenorm else y


def dropout_add_layer_norm(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    dropout_p: float = 0.0, eps: float = 1e-6, training: bool = True, seed: SeedLike = None, prenorm: bool = True,
    impl: Optional[str] = None,
):
    """``h = residual + dropout(x)``, ``y = LayerNorm(h) * weight + bias``, fused.

    Args:
        x: the branch output ``[..., D]`` (e.g. ``attn.proj`` or ``mlp.fc2``), any float dtype.
        residual: the residual stream, x's shape (its dtype may differ, e.g. fp32), or ``None``
            for ``h = dropout(x)`` (the first block).
        weight, bias: LayerNorm affine ``[D]`` or ``None``.
        dropout_p: drop probability on ``x`` in ``[0, 1)``; applied only when ``training``.
        eps: LayerNorm epsilon.
        training: dropout on or off (``module.training``).
        seed: ``None`` (a fresh draw from torch's generator), an int, or an int64 tensor of one
            element on x's device (best under ``torch.compile`` and CUDA graphs). The same seed
            gives the same mask on every ``impl`` (module docstring).
        prenorm: return ``(y, h)`` when True (pre-LN blocks need ``h`` as the next residual), else ``y``.
        impl: ``"auto"``, ``"triton"``, ``"reference"`` or ``None`` for ``$VATT_FAST_KERNELS``.

    Returns:
        ``y`` in x's dtype, and with ``prenorm`` also ``h`` in the residual's dtype (x's without one);
        differentiable in x, residual, weight and bias (gradients flow into ``h`` from both outputs).
    """
    _check_args(x, residual, weight, bias, dropout_p, eps, seed, "dropout_add_layer_norm")
    seed_t = seed if isinstance(seed, torch.Tensor) else None
    if resolve_impl(impl, x, residual, weight, bias, seed_t, op="dropout_add_layer_norm") == "triton":
        if x.shape[-1] > MAX_TRITON_DIM:
            raise ValueError(
                f"dropout_add_layer_norm: impl='triton' keeps a row in registers, up to D={MAX_TRITON_DIM}, "
                f"got D={x.shape[-1]}; use impl='reference'"
            )
        return get_triton("dropout_add_layer_norm")(
            x, residual, weight, bias, dropout_p=dropout_p, eps=eps, training=training, seed=seed, prenorm=prenorm
        )
    p = float(dropout_p) if training else 0.0
    y, h = _core_reference(x, residual, weight, bias, p, float(eps), seed)
    return (y, h) if prenorm else y


# ----------------------------------------------------------------------------------------
# Triton kernels, launchers and their registration
# ----------------------------------------------------------------------------------------
TRITON_AVAILABLE = triton_available()
# Test hook: fill every output buffer with NaN before the launch, so an unwritten element shows.
_POISON_OUTPUT = False

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _keep_mask(seed, rows, cols, threshold):
        """Philox-4x32-10 keep mask for rows ``(BLOCK_M, 1)`` by cols ``(1, BLOCK_D)`` (the contract)."""
        c0 = (cols + rows * 0).to(tl.uint32)  # (BLOCK_M, BLOCK_D) column counter
        c1 = (rows + cols * 0).to(tl.uint32)  # row counter
        zero = c0 * 0
        r, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
        return (r >> 8).to(tl.int32) >= threshold

    @triton.jit
    def _fwd_kernel(
        x_ptr,  # (M, D), any strides
        res_ptr,  # (M, D), any strides, or a dummy when not HAS_RES
        w_ptr,  # (D,) or a dummy when not HAS_W
        b_ptr,  # (D,) or a dummy when not HAS_B
        seed_ptr,  # (1,) int64, or a dummy when not HAS_DROPOUT
        y_ptr,  # (M, D) contiguous, x's dtype
        h_ptr,  # (M, D) contiguous, the residual's dtype
        mean_ptr,  # (M,) fp32
        rstd_ptr,  # (M,) fp32
        M, D,
        stride_xm, stride_xd,
        stride_rm, stride_rd,
        threshold, scale, eps,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ):
        pid = tl.program_id(0)  # over cdiv(M, BLOCK_M)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        mask_m = rows < M
        mask_d = cols < D
        mask = mask_m[:, None] & mask_d[None, :]
        r64 = rows.to(tl.int64)
        # Upcast right after the loads (bf16 arithmetic is wrong in the interpreter).
        x = tl.load(x_ptr + r64[:, None] * stride_xm + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep = _keep_mask(tl.load(seed_ptr), rows[:, None], cols[None, :], threshold)
            x = tl.where(keep, x * scale, 0.0)
        if HAS_RES:
            x += tl.load(res_ptr + r64[:, None] * stride_rm + cols[None, :] * stride_rd, mask=mask, other=0.0).to(
                tl.float32
            )
        offs = r64[:, None] * D + cols[None, :]
        tl.store(h_ptr + offs, x.to(h_ptr.dtype.element_ty), mask=mask)
        mean = tl.sum(x, axis=1) / D  # (BLOCK_M,)
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / D
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(mean_ptr + rows, mean, mask=mask_m)
        tl.store(rstd_ptr + rows, rstd, mask=mask_m)
        y = xc * rstd[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y += tl.load(b_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_kernel(
        dy_ptr,  # (M, D), any strides (an expanded gradient has stride 0)
        dh_ptr,  # (M, D), any strides: the gradient of the returned h, or a dummy when not HAS_DH
        h_ptr,  # (M, D) contiguous
        w_ptr,  # (D,) or a dummy when not HAS_W
        seed_ptr,  # (1,) int64, or a dummy when not HAS_DROPOUT
        mean_ptr,  # (M,) fp32
        rstd_ptr,  # (M,) fp32
        dx_ptr,  # (M, D) contiguous, x's dtype
        dres_ptr,  # (M, D) contiguous, the residual's dtype, or a dummy when not HAS_RES
        dw_ptr,  # (G, D) fp32 partial sums, or a dummy when not HAS_W
        db_ptr,  # (G, D) fp32 partial sums, or a dummy when not HAS_B
        M, D,
        stride_dym, stride_dyd,
        stride_dhm, stride_dhd,
        threshold, scale,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_DH: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        HAS_DROPOUT: tl.constexpr,
    ):
        pid = tl.program_id(0)  # over G programs, each walking row blocks pid, pid + G, ...
        num_programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        mask_d = cols < D
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
        dw_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for blk in range(pid, tl.cdiv(M, BLOCK_M), num_programs):
            rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
            mask_m = rows < M
            mask = mask_m[:, None] & mask_d[None, :]
            r64 = rows.to(tl.int64)
            offs = r64[:, None] * D + cols[None, :]
            mean = tl.load(mean_ptr + rows, mask=mask_m, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=mask_m, other=0.0)
            h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
            dy = tl.load(dy_ptr + r64[:, None] * stride_dym + cols[None, :] * stride_dyd, mask=mask, other=0.0).to(
                tl.float32
            )
            if HAS_W:
                dw_acc += dy * xhat
                wdy = dy * w[None, :]
            else:
                wdy = dy
            if HAS_B:
                db_acc += dy
            c1 = tl.sum(xhat * wdy, axis=1) / D  # (BLOCK_M,)
            c2 = tl.sum(wdy, axis=1) / D
            dh = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_DH:
                dh += tl.load(dh_ptr + r64[:, None] * stride_dhm + cols[None, :] * stride_dhd, mask=mask, other=0.0).to(
                    tl.float32
                )
            if HAS_RES:
                tl.store(dres_ptr + offs, dh.to(dres_ptr.dtype.element_ty), mask=mask)
            if HAS_DROPOUT:
                keep = _keep_mask(seed, rows[:, None], cols[None, :], threshold)
                dh = tl.where(keep, dh * scale, 0.0)
            tl.store(dx_ptr + offs, dh.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_W:
            tl.store(dw_ptr + pid * D + cols, tl.sum(dw_acc, axis=0), mask=mask_d)
        if HAS_B:
            tl.store(db_ptr + pid * D + cols, tl.sum(db_acc, axis=0), mask=mask_d)

    def _blocks(D: int) -> Tuple[int, int, int]:
        """(BLOCK_M, BLOCK_D, num_warps): a whole row (a power of two >= 16) and about 4096 elements
        per program. Comparisons only, so a symbolic ``D`` (dynamic shapes) just guards."""
        block_d = 16
        while block_d < D:
            block_d *= 2
        block_m = max(1, min(16, 4096 // block_d))
        num_warps = max(1, min(8, block_m * block_d // 512))
        return block_m, block_d, num_warps

    def _backward_programs(device: torch.device, row_blocks: int) -> int:
        """G of the backward grid: a few programs per SM on a GPU (so the ``[G, D]`` partials stay
        small), a handful in the interpreter."""
        per_device = 4 * sm_count(device) \
            if device.type == "cuda" else 4
        return max(1, min(row_blocks, per_device))

    def _empty(shape, dtype, device) -> torch.Tensor:
        if _POISON_OUTPUT:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.empty(shape, dtype=dtype, device=device)

    _library_op, _launch = library_op, launch  # module names: the tests patch _launch

    @_library_op("vatt_fast::dropout_add_layer_norm")
    def _fwd_op(
        x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor], seed: Optional[torch.Tensor], dropout_p: float, eps: float,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The Triton core on checked ``[M, D]`` arguments: ``(y, h, mean, rstd)``; dropout when
        ``seed`` is given and ``dropout_p > 0``."""
        M, D = x.shape
        h_dtype = x.dtype if residual is None else residual.dtype
        y = _empty((M, D), x.dtype, x.device)
        h = _empty((M, D), h_dtype, x.device)
        mean = _empty((M,), torch.float32, x.device)
        rstd = _empty((M,), torch.float32, x.device)
        if M == 0:
            return y, h, mean, rstd
        block_m, block_d, num_warps = _blocks(D)
        dropout = seed is not None and dropout_p > 0.0
        res = x if residual is None else residual
        _launch(_fwd_kernel)[(triton.cdiv(M, block_m),)](
            x, res, x if weight is None else weight, x if bias is None else bias, seed if dropout else x,
            y, h, mean, rstd,
            M, D,
            x.stride(0), x.stride(1),
            res.stride(0), res.stride(1),
            _threshold(dropout_p), 1.0 / (1.0 - dropout_p), eps,
            BLOCK_M=block_m, BLOCK_D=block_d,
            HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, HAS_DROPOUT=dropout,
            num_warps=num_warps,
        )
        return y, h, mean, rstd

    @_library_op("vatt_fast::dropout_add_layer_norm_backward")
    def _bwd_op(
        dy: torch.Tensor, dh: Optional[torch.Tensor], h: torch.Tensor, weight: Optional[torch.Tensor],
        mean: torch.Tensor, rstd: torch.Tensor, seed: Optional[torch.Tensor], dropout_p: float,
        x_dtype: torch.dtype, has_residual: bool, has_bias: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dx [M, D] x_dtype, dresidual [M, D] h's dtype, dweight [D] fp32, dbias [D] fp32)``; each of
        the last three is ``[0]`` when there is no residual, weight or bias."""
        M, D = h.shape
        dev = h.device
        dx = _empty((M, D), x_dtype, dev)
        dres = _empty((M, D) if has_residual else (0,), h.dtype, dev)
        block_m, block_d, num_warps = _blocks(D)
        G = _backward_programs(dev, triton.cdiv(M, block_m)) if M > 0 else 0
        dw_part = _empty((G, D) if weight is not None else (0,), torch.float32, dev)
        db_part = _empty((G, D) if has_bias else (0,), torch.float32, dev)
        if M > 0:
            dropout = seed is not None and dropout_p > 0.0
            dh_arg = dy if dh is None else dh
            _launch(_bwd_kernel)[(G,)](
                dy, dh_arg, h, h if weight is None else weight, seed if dropout else h, mean, rstd,
                dx, dres if has_residual else dx, dw_part if weight is not None else dx, db_part if has_bias else dx,
                M, D,
                dy.stride(0), dy.stride(1),
                dh_arg.stride(0), dh_arg.stride(1),
                _threshold(dropout_p), 1.0 / (1.0 - dropout_p),
                BLOCK_M=block_m, BLOCK_D=block_d,
                HAS_DH=dh is not None, HAS_RES=has_residual, HAS_W=weight is not None, HAS_B=has_bias,
                HAS_DROPOUT=dropout,
                num_warps=num_warps,
            )
        dw = dw_part.sum(0) if weight is not None else dw_part.clone()
        db = db_part.sum(0) if has_bias else db_part.clone()
        return dx, dres, dw, db

    if INTERPRETING:
        @_fwd_op.register_fake
        def _(x, residual, weight, bias, seed, dropout_p, eps):
            M, D = x.shape
            h_dtype = x.dtype if residual is None else residual.dtype
            stat = x.new_empty((M,), dtype=torch.float32)
            return x.new_empty((M, D)), x.new_empty((M, D), dtype=h_dtype), stat, stat.new_empty((M,))

        @_bwd_op.register_fake
        def _(dy, dh, h, weight, mean, rstd, seed, dropout_p, x_dtype, has_residual, has_bias):
            M, D = h.shape
            return (
                h.new_empty((M, D), dtype=x_dtype),
                h.new_empty((M, D) if has_residual else (0,)),
                h.new_empty((D,) if weight is not None else (0,), dtype=torch.float32),
                h.new_empty((D,) if has_bias else (0,), dtype=torch.float32),
            )

    def _setup_context(ctx, inputs, output):
        x, residual, weight, bias, seed, dropout_p, eps = inputs
        _, h, mean, rstd = output
        ctx.save_for_backward(h, weight, mean, rstd, seed)
        ctx.dropout_p = dropout_p
        ctx.x_dtype = x.dtype
        ctx.has_residual = residual is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, rstd)
        # An unused output (h without prenorm) then sends None, not a zero tensor to read.
        ctx.set_materialize_grads(False)

    def _backward(ctx, dy, dh, _dmean, _drstd):
        h, weight, mean, rstd, seed = ctx.saved_tensors
        has_bias = ctx.bias_dtype is not None
        if dy is None:  # only h was used
            dy = torch.zeros_like(h, dtype=ctx.x_dtype)
        dx, dres, dw, db = _bwd_op(dy, dh, h, weight, mean, rstd, seed, ctx.dropout_p, ctx.x_dtype,
                                   ctx.has_residual, has_bias)
        return (
            dx,
            dres if ctx.has_residual else None,
            None if weight is None else dw.to(weight.dtype),
            db.to(ctx.bias_dtype) if has_bias else None,
            None, None, None,
        )

    _fwd_op.register_autograd(_backward, setup_context=_setup_context)

    def _dropout_add_layer_norm_triton(
        x, residual, weight, bias, dropout_p=0.0, eps=1e-6, training=True, seed=None, prenorm=True
    ):
        """The Triton implementation :func:`dropout_add_layer_norm` dispatches to (arguments checked)."""
        shape = x.shape
        D = shape[-1]
        p = float(dropout_p) if training else 0.0
        seed_t = _seed_tensor(seed, x.device) if p > 0.0 else None
        y, h, _, _ = _fwd_op(
            x.reshape(-1, D), None if residual is None else residual.reshape(-1, D), weight, bias, seed_t, p,
            float(eps),
        )
        y = y.view(shape)
        return (y, h.view(shape)) if prenorm else y

    register_triton("dropout_add_layer_norm", _dropout_add_layer_norm_triton)
