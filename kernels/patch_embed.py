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
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ._dispatch import get_triton, resolve_impl
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
    if resolve_impl(impl, x, weight, bias, pos, keep, op="patch_embed") == "triton":
        return get_triton("patch_embed")(x, weight, bias, pos=pos, keep=keep, scale=scale, shift=shift)
    return patch_embed_reference(x, weight, bias, pos=pos, keep=keep, scale=scale, shift=shift)
