"""Patch embedding: raw pixels / waveform -> tokens, DropToken-aware.

``patch_embed`` maps non-overlapping video tubelets (or waveform segments) to tokens with
one linear map, the same arithmetic as a strided Conv3d (Conv1d) whose kernel equals its
stride, plus an optional position embedding, computing only the tokens DropToken keeps.

Trade-off of the reference (the definition of correct, plain PyTorch):
- the per-channel input affine (VATT maps pixels to [-1, 1]) is folded into the weight and
  bias, ``w' = w * scale[c]``, ``b' = b + sum(w * shift[c])``, so the video is never
  normalised into a float copy; the raw ``uint8`` tensor is cut into patches through a
  view/permute, and with ``keep`` only the kept patches are gathered (still ``uint8``) and
  converted to the compute dtype (the uint8 video is reordered patch-major first, one byte per
  pixel, because ``index_select`` on contiguous rows is far faster than indexing the 8-d view
  on CPU; a fused kernel can read the kept tubelets straight from ``x``). Integers 0..255 are
  exact in bf16/fp16, so the conversion loses nothing.
- one matmul ``[B * N_keep, K] @ [K, D]`` with ``K = C * t * h * w``; it moves
  ``B * N_keep * K`` input bytes (1 per pixel for uint8), ``K * D`` weights and writes
  ``B * N_keep * D`` outputs, ``2 * B * N_keep * K * D`` FLOPs.

Token ``n`` of the ``(Tp, Hp, Wp)`` grid is ``(ti * Hp + hi) * Wp + wi``, the order of a
flattened Conv3d output ``[B, D, Tp, Hp, Wp].flatten(2).transpose(1, 2)``.
"""

from __future__ import annotations

import numbers
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

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
from .drop_token_gather import check_keep, select_tokens

__all__ = ["PatchGeometry", "check_patch_embed_args", "patch_embed", "patch_embed_reference"]

Affine = Union[None, float, Sequence[float], torch.Tensor]


class PatchGeometry(NamedTuple):
    """Shapes of a validated ``patch_embed`` call."""

    kind: str  # "video" or "audio"
    batch: int
    grid: Tuple[int, ...]  # (Tp, Hp, Wp) for video, (N,) for audio
    patch: Tuple[int, ...]  # (t, h, w) for video, (p,) for audio
    channels: int  # C (1 for audio)
    num_tokens: int  # N = prod(grid)
    embed_dim: int  # D


def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


def _check_affine(value: Affine, name: str, channels: int, device: torch.device) -> None:
    if value is None or isinstance(value, numbers.Real):
        return
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise ValueError(f"patch_embed: {name} must be a float tensor, got dtype {value.dtype}")
        if value.device != device:
            raise ValueError(f"patch_embed: {name} is on {value.device} but the input is on {device}")
        numel = value.numel()
    else:
        numel = len(value)
    if numel not in (1, channels):
        raise ValueError(
            f"patch_embed: {name} must be a scalar or hold one value per input channel ({channels}), "
            f"got {numel} values"
        )


def check_patch_embed_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pos: Optional[torch.Tensor] = None,
    keep: Optional[torch.Tensor] = None,
    scale: Affine = None,
    shift: Affine = None,
) -> PatchGeometry:
    """Validate the arguments of :func:`patch_embed` and return the geometry of the call.

    Shared by the reference and the Triton launcher so both reject the same inputs with the
    same messages. Raises ``ValueError`` (``TypeError`` for non-tensors) naming the values
    received, the values expected and the fix.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"patch_embed: x and weight must be tensors, got {type(x).__name__} and {type(weight).__name__}"
        )
    if not weight.is_floating_point():
        raise ValueError(f"patch_embed: weight must be floating point, got dtype {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"patch_embed: x is on {x.device} but weight is on {weight.device}; put both on one device")

    if weight.dim() == 5:
        kind = "video"
        D, C, t, h, w = weight.shape
        if x.dim() != 5:
            raise ValueError(
                f"patch_embed: a Conv3d-layout weight [D, C, t, h, w] = {_shape(weight)} expects video "
                f"x [B, T, H, W, C], got x of shape {_shape(x)}"
            )
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise ValueError(
                f"patch_embed: video x must be uint8 (raw pixels as decoders give them) or floating point, "
                f"got dtype {x.dtype}"
            )
        B, T, H, W, Cx = x.shape
        if Cx != C:
            hint = ""
            if x.shape[1] == C:
                hint = "; x looks channels-first [B, C, T, H, W]: pass x.permute(0, 2, 3, 4, 1)"
            raise ValueError(
                f"patch_embed: x has {Cx} channels in its last dim (shape {_shape(x)}) but weight "
                f"{_shape(weight)} expects C={C}; x must be channels-last [B, T, H, W, C]{hint}"
            )
        for size, p, name in ((T, t, "frames T"), (H, h, "height H"), (W, w, "width W")):
            if size % p:
                raise ValueError(
                    f"patch_embed: patch size {p} does not divide {name}={size} (x shape {_shape(x)}, "
                    f"patch (t, h, w) = {(t, h, w)}); crop or pad x to a multiple of {p}"
                )
        grid: Tuple[int, ...] = (T // t, H // h, W // w)
        patch: Tuple[int, ...] = (t, h, w)
    elif weight.dim() == 3:
        kind = "audio"
        D, C, p = weight.shape
        if C != 1:
            raise ValueError(
                f"patch_embed: a Conv1d-layout audio weight must be [D, 1, p] (mono waveform), "
                f"got {_shape(weight)}"
            )
        if x.dim() != 2:
            raise ValueError(
                f"patch_embed: a Conv1d-layout weight [D, 1, p] = {_shape(weight)} expects a waveform "
                f"x [B, S], got x of shape {_shape(x)}"
                + ("; squeeze the channel dim with x[:, 0]" if x.dim() == 3 and x.shape[1] == 1 else "")
            )
        if not x.is_floating_point():
            raise ValueError(f"patch_embed: waveform x must be floating point, got dtype {x.dtype}; use x.float()")
        B, S = x.shape
        if S % p:
            raise ValueError(
                f"patch_embed: patch size {p} does not divide the waveform length S={S}; crop or pad it "
                f"to a multiple of {p} (e.g. "
                + (f"{S // p * p} or {(S // p + 1) * p}" if S >= p else f"{p}")
                + " samples)"
            )
        grid = (S // p,)
        patch = (p,)
    else:
        raise ValueError(
            f"patch_embed: weight must be [D, C, t, h, w] (Conv3d layout, video) or [D, 1, p] "
            f"(Conv1d layout, audio), got shape {_shape(weight)}"
        )

    N = 1
    for g in grid:
        N *= g
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or _shape(bias) != (D,):
            got = _shape(bias) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"patch_embed: bias must be [D={D}] or None, got {got}")
        if bias.device != x.device:
            raise ValueError(f"patch_embed: bias is on {bias.device} but x is on {x.device}")
    if pos is not None:
        if not isinstance(pos, torch.Tensor) or _shape(pos) != (N, D):
            got = _shape(pos) if isinstance(pos, torch.Tensor) else type(pos).__name__
            raise ValueError(
                f"patch_embed: pos must be [N, D] = {(N, D)} for the token grid {grid} of x {_shape(x)}, "
                f"got {got}; interpolate the position table to the input's grid"
            )
        if pos.device != x.device:
            raise ValueError(f"patch_embed: pos is on {pos.device} but x is on {x.device}")
    check_keep(keep, B, N, x.device, "patch_embed")
    _check_affine(scale, "scale", C, x.device)
    _check_affine(shift, "shift", C, x.device)
    return PatchGeometry(kind, B, grid, patch, C, N, D)


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The weight's dtype, or the autocast dtype when autocast is on for its device."""
    device_type = weight.device.type
    if weight.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _channel_factor(value: Affine, like: torch.Tensor) -> Union[float, torch.Tensor]:
    """A Python float as is (broadcasts, no device copy), else a ``[C]`` vector in ``like``'s dtype."""
    if isinstance(value, numbers.Real):
        return float(value)
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value, device=like.device)
    return t.to(device=like.device, dtype=like.dtype).reshape(-1)


def _fold_affine(
    weight: torch.Tensor, bias: Optional[torch.Tensor], scale: Affine, shift: Affine, kind: str, dtype: torch.dtype
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Weight as ``[D, K]`` in patch order ``(t, h, w, C)`` / ``(p,)`` and bias ``[D]``, affine folded in.

    ``sum_k w[d, k] * (x_k * scale_c + shift_c) + b_d = sum_k (w * scale_c)[d, k] x_k + (b_d + sum_k w[d, k] shift_c)``.
    The folding is done in at least fp32 and cast to ``dtype`` afterwards; autograd carries the
    gradient back to ``weight`` and ``bias``.
    """
    D = weight.shape[0]
    # Channels last, so the flattened patch reads contiguous runs of x: [D, t, h, w, C] or [D, p, 1].
    w_cl = weight.permute(0, 2, 3, 4, 1) if kind == "video" else weight.permute(0, 2, 1)
    if scale is None and shift is None:
        return w_cl.reshape(D, -1).to(dtype), None if bias is None else bias.to(dtype)
    acc = torch.promote_types(weight.dtype, torch.float32)
    w_acc = w_cl.to(acc)
    w_folded = w_acc if scale is None else w_acc * _channel_factor(scale, w_acc)
    b_folded = None if bias is None else bias.to(acc)
    if shift is not None:
        shift_term = (w_acc * _channel_factor(shift, w_acc)).reshape(D, -1).sum(dim=1)
        b_folded = shift_term if b_folded is None else b_folded + shift_term
    return w_folded.reshape(D, -1).to(dtype), None if b_folded is None else b_folded.to(dtype)


def _patch_embed_core_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pos: Optional[torch.Tensor],
    keep: Optional[torch.Tensor],
    scale: Affine,
    shift: Affine,
    geo: PatchGeometry,
) -> torch.Tensor:
    """The reference core on checked arguments: plain PyTorch, left visible to Inductor."""
    dtype = _compute_dtype(weight)
    w2, b2 = _fold_affine(weight, bias, scale, shift, geo.kind, dtype)  # (D, K), (D,)
    B, K = geo.batch, w2.shape[1]

    if geo.kind == "video":
        Tp, Hp, Wp = geo.grid
        t, h, w = geo.patch
        # (B, Tp, t, Hp, h, Wp, w, C) -> (B, Tp, Hp, Wp, t, h, w, C): a view, nothing is copied yet.
        xv = x.reshape(B, Tp, t, Hp, h, Wp, w, geo.channels).permute(0, 1, 3, 5, 2, 4, 6, 7)
        if keep is None:
            # One pass: read the raw patches, write them contiguous in the compute dtype.
            if x.dtype != dtype:
                xv = xv.to(dtype=dtype, memory_format=torch.contiguous_format)
            patches = xv.reshape(B, geo.num_tokens, K)  # (B, N, K), a view after the conversion
        else:
            # Patch-major in x's own dtype (1 byte per pixel for uint8), then only the kept patches
            # are selected and converted. (Advanced indexing straight into the 8-d view reads less
            # but is ~10x slower on CPU than this reorder + index_select.)
            patches = select_tokens(xv.reshape(B, geo.num_tokens, K), keep).to(dtype)  # (B, N_keep, K)
    else:
        xv = x.reshape(B, geo.num_tokens, K)  # (B, N, p), a view of a contiguous waveform
        patches = (xv if keep is None else select_tokens(xv, keep)).to(dtype)  # (B, N or N_keep, p)

    out = F.linear(patches, w2, b2)  # (B, N or N_keep, D)
    if pos is not None:
        pos_sel = pos if keep is None else pos[keep]  # (N, D), (N_keep, D) or (B, N_keep, D)
        out = out + pos_sel.to(out.dtype)
    return out


def patch_embed_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pos: Optional[torch.Tensor] = None,
    keep: Optional[torch.Tensor] = None,
    scale: Affine = None,
    shift: Affine = None,
) -> torch.Tensor:
    """Plain PyTorch patch embedding; the definition of correct for :func:`patch_embed`.

    Args: see :func:`patch_embed`.

    Returns:
        ``[B, N, D]`` (``[B, N_keep, D]`` with ``keep``) in the weight's dtype, or in the autocast
        dtype when autocast is enabled for the weight's device.
    """
    geo = check_patch_embed_args(x, weight, bias, pos, keep, scale, shift)
    return _patch_embed_core_reference(x, weight, bias, pos, keep, scale, shift, geo)


def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pos: Optional[torch.Tensor] = None,
    keep: Optional[torch.Tensor] = None,
    scale: Affine = None,
    shift: Affine = None,
    impl: Optional[str] = None,
) -> torch.Tensor:
    """Embed non-overlapping video tubelets or waveform segments as tokens.

    Equivalent to ``conv(x * scale + shift).flatten(2).transpose(1, 2) + pos`` with a Conv3d
    (Conv1d) whose kernel equals its stride, restricted to the tokens in ``keep``; but the
    affine is folded into the weights and only kept patches are read.

    Args:
        x: video ``[B, T, H, W, C]`` uint8 (raw pixels) or float, channels last; or audio
            ``[B, S]`` float waveform.
        weight: ``[D, C, t, h, w]`` (``nn.Conv3d`` layout) for video, ``[D, 1, p]``
            (``nn.Conv1d`` layout) for audio. ``t, h, w`` (``p``) must divide ``T, H, W`` (``S``).
        bias: ``[D]`` or ``None``.
        pos: optional position embedding ``[N, D]`` added to every token (gathered at ``keep``),
            ``N = (T/t) * (H/h) * (W/w)`` or ``S/p``.
        keep: ``None`` (all tokens), int64 ``[N_keep]`` (one DropToken draw shared by the batch)
            or ``[B, N_keep]`` (per sample); indices into the token grid, token
            ``(ti * Hp + hi) * Wp + wi``.
        scale, shift: per-channel affine on the raw input (a float, ``C`` floats or a tensor of
            ``C`` values), e.g. ``1 / 127.5`` and ``-1.0`` for pixels -> ``[-1, 1]``.
        impl: ``"auto"``, ``"triton"``, ``"reference"`` or ``None`` for ``$VATT_FAST_KERNELS``
            (see ``vatt_fast.kernels._dispatch``).

    Returns:
        ``[B, N, D]`` or ``[B, N_keep, D]`` in the weight's dtype (the autocast dtype under
        autocast). Differentiable in ``weight``, ``bias`` and ``pos`` (and float ``x``).
    """
    geo = check_patch_embed_args(x, weight, bias, pos, keep, scale, shift)
    if resolve_impl(impl, x, weight, bias, pos, keep, op="patch_embed") == "triton":
        return get_triton("patch_embed")(x, weight, bias, pos=pos, keep=keep, scale=scale, shift=shift)
    return _patch_embed_core_reference(x, weight, bias, pos, keep, scale, shift, geo)


# ----------------------------------------------------------------------------------------
# Triton kernels, launchers and their registration
# ----------------------------------------------------------------------------------------
TRITON_AVAILABLE = triton_available()
# Test hook: fill the forward output with NaN before the launch, so an unwritten element shows.
_POISON_OUTPUT = False


def _flop_formula(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """``2 * M * K * D`` for both registered ops (``M = B * N_keep`` rows, ``[D, K]`` weight)."""
    D, K = w_shape
    return 2 * D * K * (out_shape[0] * out_shape[1] if len(out_shape) == 3 else 0)


def _dw_flop_formula(grad_shape, x_shape, keep_shape, patch, *args, out_shape=None, **kwargs) -> int:
    B, n_keep, D = grad_shape
    return 2 * B * n_keep * D * out_shape[1]


def _scatter_patches(dpatches: torch.Tensor, keep: Optional[torch.Tensor], x_shape, patch) -> torch.Tensor:
    """Patch gradients ``[B, N_keep, K]`` -> the input's gradient ``[B, T, H, W, C]`` (zeros where
    no kept token reads), accumulating repeated indices (``index_add``)."""
    B, T, H, W, C = x_shape
    t, h, w = patch
    Tp, Hp, Wp = T // t, H // h, W // w
    N, K = Tp * Hp * Wp, dpatches.shape[-1]
    if keep is None:
        full = dpatches.reshape(B, N, K)
    else:
        if keep.dim() == 1:
            rows = (torch.arange(B, device=keep.device, dtype=torch.int64)[:, None] * N + keep[None, :].long())
        else:
            rows = torch.arange(B, device=keep.device, dtype=torch.int64)[:, None] * N + keep.long()
        full = dpatches.new_zeros(B * N, K).index_add_(0, rows.reshape(-1), dpatches.reshape(-1, K))
    full = full.reshape(B, Tp, Hp, Wp, t, h, w, C).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return full.reshape(B, T, H, W, C)


def _pos_grad(grad: torch.Tensor, keep: Optional[torch.Tensor], num_tokens: int) -> torch.Tensor:
    """``d pos [N, D]`` in fp32: the output gradient summed over the batch at each kept token."""
    D = grad.shape[-1]
    if keep is None:
        return grad.sum(0, dtype=torch.float32)
    if keep.dim() == 1:
        rows, values = keep.long(), grad.sum(0, dtype=torch.float32)
    else:
        rows, values = keep.reshape(-1).long(), grad.reshape(-1, D).float()
    return values.new_zeros(num_tokens, D).index_add_(0, rows, values)


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _token_rows(
        m, M, N_keep, keep_ptr, stride_kb, stride_kj, Hp, Wp,
        stride_xb, stride_xt, stride_xh, stride_xw,
        PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, HAS_KEEP: tl.constexpr,
    ):
        """For output rows ``m`` (``b * N_keep + j``): the tubelet's first element in ``x``, its token
        index ``n`` (for the position table) and the row mask. 64-bit offsets."""
        mask_m = m < M
        b = m // N_keep
        j = m % N_keep
        if HAS_KEEP:
            n = tl.load(keep_ptr + b.to(tl.int64) * stride_kb + j.to(tl.int64) * stride_kj, mask=mask_m, other=0)
            n = n.to(tl.int64)
        else:
            n = j.to(tl.int64)
        wi = n % Wp
        hi = (n // Wp) % Hp
        ti = n // (Wp * Hp)
        base = b.to(tl.int64) * stride_xb + ti * (PT * stride_xt) + hi * (PH * stride_xh) + wi * (PW * stride_xw)
        return base, n, mask_m

    @triton.jit
    def _patch_offsets(
        k, K, stride_xt, stride_xh, stride_xw, stride_xc, PH: tl.constexpr, PW: tl.constexpr, C: tl.constexpr
    ):
        """Offsets inside a tubelet of the flattened patch positions ``k`` (order ``(t, h, w, C)``)."""
        c = k % C
        kw = (k // C) % PW
        kh = (k // (C * PW)) % PH
        kt = k // (C * PW * PH)
        off = kt.to(tl.int64) * stride_xt + kh * stride_xh + kw * stride_xw + c * stride_xc
        return off, k < K

    @triton.jit
    def _patch_embed_fwd_kernel(
        x_ptr,  # (B, T, H, W, C) uint8 or float, any strides
        w_ptr,  # (D, K) compute dtype, K in (t, h, w, C) order
        b_ptr,  # (D,) or a dummy
        pos_ptr,  # (N, D) or a dummy
        keep_ptr,  # (N_keep,) or (B, N_keep) int32/int64, or a dummy
        out_ptr,  # (M = B * N_keep, D) contiguous, compute dtype
        M, N_keep, D, K, Hp, Wp,
        stride_xb, stride_xt, stride_xh, stride_xw, stride_xc,
        stride_wd, stride_wk, stride_pn, stride_pd, stride_kb, stride_kj,
        PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, C: tl.constexpr,
        HAS_KEEP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        base, n, mask_m = _token_rows(
            m, M, N_keep, keep_ptr, stride_kb, stride_kj, Hp, Wp,
            stride_xb, stride_xt, stride_xh, stride_xw, PT, PH, PW, HAS_KEEP,
        )
        d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_d = d < D
        d64 = d.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            off, mask_k = _patch_offsets(k, K, stride_xt, stride_xh, stride_xw, stride_xc, PH, PW, C)
            # The tubelets are read straight from the clip: dropped ones never are.
            a = tl.load(x_ptr + base[:, None] + off[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0)
            wt = tl.load(
                w_ptr + d64[None, :] * stride_wd + k.to(tl.int64)[:, None] * stride_wk,
                mask=mask_k[:, None] & mask_d[None, :], other=0.0,
            )
            a = a.to(w_ptr.dtype.element_ty)  # exact for uint8 pixels in bf16/fp16/fp32
            if UPCAST:  # the interpreter: fp32 products (its fp16/bf16 arithmetic is not the GPU's)
                a = a.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(a, wt, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + d64, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        mask = mask_m[:, None] & mask_d[None, :]
        if HAS_POS:
            acc += tl.load(pos_ptr + n[:, None] * stride_pn + d64[None, :] * stride_pd, mask=mask, other=0.0).to(
                tl.float32
            )
        tl.store(out_ptr + m.to(tl.int64)[:, None] * D + d64[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _patch_embed_dw_kernel(
        g_ptr,  # (M, D) output gradient, compute dtype, any strides
        x_ptr,  # (B, T, H, W, C) the raw clip again (no stored float copy of the patches)
        keep_ptr,
        dw_ptr,  # (SPLIT, D, K) fp32 partial sums
        M, N_keep, D, K, Hp, Wp, rows_per_split,
        stride_gm, stride_gd,
        stride_xb, stride_xt, stride_xh, stride_xw, stride_xc,
        stride_kb, stride_kj,
        PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, C: tl.constexpr,
        HAS_KEEP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        pid_d = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_s = tl.program_id(2)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_d = d < D
        d64 = d.to(tl.int64)
        off, mask_k = _patch_offsets(k, K, stride_xt, stride_xh, stride_xw, stride_xc, PH, PW, C)
        acc = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
        m_start = pid_s * rows_per_split
        m_end = tl.minimum(m_start + rows_per_split, M)
        for m0 in range(m_start, m_end, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            base, n, mask_m = _token_rows(
                m, m_end, N_keep, keep_ptr, stride_kb, stride_kj, Hp, Wp,
                stride_xb, stride_xt, stride_xh, stride_xw, PT, PH, PW, HAS_KEEP,
            )
            gt = tl.load(
                g_ptr + m.to(tl.int64)[None, :] * stride_gm + d64[:, None] * stride_gd,
                mask=mask_d[:, None] & mask_m[None, :], other=0.0,
            )  # (BLOCK_D, BLOCK_M)
            a = tl.load(x_ptr + base[:, None] + off[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0)
            a = a.to(g_ptr.dtype.element_ty)
            if UPCAST:
                a = a.to(tl.float32)
                gt = gt.to(tl.float32)
            acc = tl.dot(gt, a, acc, input_precision=PRECISION)
        dw_rows = pid_s.to(tl.int64) * D + d64
        tl.store(
            dw_ptr + dw_rows[:, None] * K + k.to(tl.int64)[None, :], acc, mask=mask_d[:, None] & mask_k[None, :]
        )

    _library_op, _launch = library_op, launch  # module names: the tests patch _launch

    def _precision(dtype: torch.dtype) -> str:
        """fp32 products in TF32 exactly when PyTorch's own matmuls are (``allow_tf32``)."""
        if INTERPRETING or dtype != torch.float32:
            return "ieee"
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"

    def _fwd_config(dtype: torch.dtype) -> dict:
        if INTERPRETING:  # small blocks: the odd shapes of the tests cross block edges
            return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)
        if dtype == torch.float32:
            return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)

    def _dw_config(dtype: torch.dtype) -> dict:
        if INTERPRETING:
            return dict(BLOCK_D=32, BLOCK_K=32, BLOCK_M=32)
        if dtype == torch.float32:
            return dict(BLOCK_D=64, BLOCK_K=64, BLOCK_M=32, num_warps=4, num_stages=3)
        return dict(BLOCK_D=128, BLOCK_K=128, BLOCK_M=64, num_warps=8, num_stages=3)

    def _keep_args(keep: Optional[torch.Tensor], x: torch.Tensor):
        if keep is None:
            return x, 0, 0
        return keep, (keep.stride(0) if keep.dim() == 2 else 0), keep.stride(-1)

    @_library_op("vatt_fast::patch_embed")
    def _patch_embed_op(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        pos: Optional[torch.Tensor],
        keep: Optional[torch.Tensor],
        patch: List[int],
    ) -> torch.Tensor:
        """The Triton core: video ``x [B, T, H, W, C]`` (audio as ``[B, 1, 1, S, 1]``), folded
        ``weight [D, K]`` (compute dtype, ``K`` in ``(t, h, w, C)`` order), ``bias [D]``, ``pos [N, D]``,
        checked ``keep`` -> ``[B, N or N_keep, D]`` in ``weight``'s dtype."""
        B, T, H, W, C = x.shape
        t, h, w = patch
        Hp, Wp = H // h, W // w
        D, K = weight.shape
        n_keep = (T // t) * Hp * Wp if keep is None else keep.shape[-1]
        M = B * n_keep
        if _POISON_OUTPUT:
            out = torch.full((B, n_keep, D), float("nan"), dtype=weight.dtype, device=x.device)
        else:
            out = torch.empty((B, n_keep, D), dtype=weight.dtype, device=x.device)
        if out.numel() == 0:
            return out
        cfg = _fwd_config(weight.dtype)
        keep_arg, stride_kb, stride_kj = _keep_args(keep, x)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(D, cfg["BLOCK_N"]))
        _launch(_patch_embed_fwd_kernel)[grid](
            x, weight, weight if bias is None else bias, weight if pos is None else pos, keep_arg, out,
            M, n_keep, D, K, Hp, Wp,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4),
            weight.stride(0), weight.stride(1),
            0 if pos is None else pos.stride(0), 0 if pos is None else pos.stride(1),
            stride_kb, stride_kj,
            PT=t, PH=h, PW=w, C=C,
            HAS_KEEP=keep is not None, HAS_BIAS=bias is not None, HAS_POS=pos is not None,
            UPCAST=INTERPRETING, PRECISION=_precision(weight.dtype),
            **cfg,
        )
        return out

    @_library_op("vatt_fast::patch_embed_weight_grad")
    def _patch_embed_weight_grad_op(
        grad: torch.Tensor, x: torch.Tensor, keep: Optional[torch.Tensor], patch: List[int]
    ) -> torch.Tensor:
        """``d weight [D, K]`` in fp32 from the output gradient ``[B, N_keep, D]`` and the raw clip."""
        B, n_keep, D = grad.shape
        _, T, H, W, C = x.shape
        t, h, w = patch
        K = t * h * w * C
        M = B * n_keep
        if M == 0:
            return torch.zeros((D, K), dtype=torch.float32, device=grad.device)
        g = grad.reshape(M, D)
        cfg = _dw_config(grad.dtype)
        tiles = triton.cdiv(D, cfg["BLOCK_D"]) * triton.cdiv(K, cfg["BLOCK_K"])
        # Split the reduction over rows when the [D, K] tiles alone cannot fill the GPU; the
        # partial sums go to separate slices, summed after (deterministic, no atomics).
        split = max(1, min(triton.cdiv(M, 4 * cfg["BLOCK_M"]), triton.cdiv(2 * sm_count(x.device), tiles)))
        rows_per_split = triton.cdiv(triton.cdiv(M, split), cfg["BLOCK_M"]) * cfg["BLOCK_M"]
        split = triton.cdiv(M, rows_per_split)
        partial = torch.empty((split, D, K), dtype=torch.float32, device=grad.device)
        keep_arg, stride_kb, stride_kj = _keep_args(keep, x)
        grid = (triton.cdiv(D, cfg["BLOCK_D"]), triton.cdiv(K, cfg["BLOCK_K"]), split)
        _launch(_patch_embed_dw_kernel)[grid](
            g, x, keep_arg, partial,
            M, n_keep, D, K, H // h, W // w, rows_per_split,
            g.stride(0), g.stride(1),
            x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4),
            stride_kb, stride_kj,
            PT=t, PH=h, PW=w, C=C,
            HAS_KEEP=keep is not None, UPCAST=INTERPRETING, PRECISION=_precision(grad.dtype),
            **cfg,
        )
        return partial[0] if split == 1 else partial.sum(0)

    if INTERPRETING:
        @_patch_embed_op.register_fake
        def _(x, weight, bias, pos, keep, patch):
            B, T, H, W, _ = x.shape
            t, h, w = patch
            n_keep = (T // t) * (H // h) * (W // w) if keep is None else keep.shape[-1]
            return weight.new_empty((B, n_keep, weight.shape[0]))

        @_patch_embed_weight_grad_op.register_fake
        def _(grad, x, keep, patch):
            t, h, w = patch
            return grad.new_empty((grad.shape[-1], t * h * w * x.shape[-1]), dtype=torch.float32)

    def _setup_context(ctx, inputs, output):
        x, weight, bias, pos, keep, patch = inputs
        ctx.save_for_backward(x, weight, keep)
        ctx.patch = list(patch)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.pos_dtype = None if pos is None else pos.dtype
        ctx.num_tokens = None if pos is None else pos.shape[0]

    def _backward(ctx, grad):
        x, weight, keep = ctx.saved_tensors
        need_x, need_w, need_b, need_pos = ctx.needs_input_grad[:4]
        dx = dw = db = dpos = None
        if need_w:
            dw = _patch_embed_weight_grad_op(grad, x, keep, ctx.patch).to(weight.dtype)
        if need_b and ctx.bias_dtype is not None:
            db = grad.sum((0, 1), dtype=torch.float32).to(ctx.bias_dtype)
        if need_pos and ctx.pos_dtype is not None:
            dpos = _pos_grad(grad, keep, ctx.num_tokens).to(ctx.pos_dtype)
        if need_x and x.is_floating_point():
            # Float input only (raw uint8 pixels have no gradient): one matmul, then the patches
            # are scattered back into the clip's layout.
            dpatches = torch.matmul(grad, weight)  # (B, N_keep, K)
            dx = _scatter_patches(dpatches, keep, x.shape, ctx.patch).to(x.dtype)
        return dx, dw, db, dpos, None, None

    _patch_embed_op.register_autograd(_backward, setup_context=_setup_context)

    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula(torch.ops.vatt_fast.patch_embed)(_flop_formula)
    register_flop_formula(torch.ops.vatt_fast.patch_embed_weight_grad)(_dw_flop_formula)

    def _patch_embed_triton(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        pos: Optional[torch.Tensor] = None,
        keep: Optional[torch.Tensor] = None,
        scale: Affine = None,
        shift: Affine = None,
    ) -> torch.Tensor:
        """The Triton implementation :func:`patch_embed` dispatches to (arguments already checked):
        folds the affine, resolves the compute dtype, views audio as a one-row video."""
        kind = "video" if weight.dim() == 5 else "audio"
        dtype = _compute_dtype(weight)
        w2, b2 = _fold_affine(weight, bias, scale, shift, kind, dtype)
        if kind == "video":
            x5, patch = x, [int(p) for p in weight.shape[2:]]
        else:
            x5, patch = x.reshape(x.shape[0], 1, 1, x.shape[1], 1), [1, 1, int(weight.shape[2])]
        return _patch_embed_op(x5, w2, b2, pos, keep, patch)

    register_triton("patch_embed", _patch_embed_triton)
