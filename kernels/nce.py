"""NCE and MIL-NCE as the VATT release computes them: per-clip losses, local rows
against globally gathered candidates.

Definition (``VATT_SPEC.md`` "Losses", the released form). Embeddings are already
L2-normalised here (the loss modules in :mod:`vatt_fast.nn.losses` normalise);
``s(x, y) = x . y / tau``. For local clip ``i`` with video ``v_i`` and positives
``P_i`` (its own audio for NCE; its valid captions for MIL-NCE)::

    numerator_i   = logsumexp_{t in P_i} s(v_i, t)
    denominator_i = logsumexp( row_i  U  column_i )
        row_i     = { s(v_i, t)   : t any valid candidate of any clip in the global batch }
        column_i  = { s(v_j, t)   : v_j any video in the global batch, t in P_i }
    loss_i        = denominator_i - numerator_i

The positives ``s(v_i, t), t in P_i`` appear in both halves (once in the row, once in
the column, through ``v_j = v_i``), exactly as released. NCE is MIL-NCE with
``K = 1`` and no mask; the two share one implementation.

Masks (``text_mask [B, K]`` bool, True = caption present):

- a masked caption is removed from every candidate set (every row and its own
  clip's column) and from its clip's positives;
- a clip with no valid caption has no loss: its entry in the returned ``[B]``
  vector is ``0`` with zero gradient (the caller excludes it from the mean and
  rescales by the count of valid clips); its video still serves as a candidate in
  the columns of the other clips;
- masked embeddings are zeroed before any product, so whatever the encoder wrote
  there (even inf/NaN) cannot leak into the loss or the gradients of this op
  (the loss modules also zero them before normalising).

Distributed use: pass the local rows (``video``, ``text``, ``text_mask`` of this
rank) and the gathered global batch (``video_all``, ``text_all``, ``text_mask_all``,
rank-major, local rows included). The positives are read from the local tensors,
the row half from ``text_all`` and the column half from ``video_all``, so no row
offset is needed. Gradients flow into both the local and the gathered tensors;
:func:`vatt_fast.distributed.all_gather_with_grad` routes the latter back to the
rank that owns them.

Cost of the reference (it materialises the similarities, it is the definition of
correct): two matmuls of ``B x (N*K) x D`` forward and four backward, and two
``[B, N*K]`` fp32 matrices kept for backward (``N`` = global batch). A fused
kernel (the Triton half, later) streams candidate blocks and keeps only the
running max/sum per row and column: reads ``B*D + N*K*D + N*D`` elements, writes
``B`` losses.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._dispatch import get_triton, resolve_impl

__all__ = ["mil_nce", "mil_nce_reference", "nce", "nce_reference"]

DEFAULT_TAU = 0.07


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32 for half inputs, fp64 stays fp64 (gradcheck)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_inputs(
    video: Tensor,
    text: Tensor,
    text_mask: Optional[Tensor],
    video_all: Optional[Tensor],
    text_all: Optional[Tensor],
    text_mask_all: Optional[Tensor],
    tau: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Validate shapes/dtypes/devices and fill in the single-process defaults."""
    if video.dim() != 2:
        raise ValueError(f"video must be [B, D], got shape {tuple(video.shape)}")
    if text.dim() != 3:
        raise ValueError(
            f"text must be [B, K, D] (K captions per clip), got shape {tuple(text.shape)}; "
            f"for one positive per clip (NCE) use nce() or text[:, None]"
        )
    b, d = video.shape
    if text.shape[0] != b or text.shape[2] != d:
        raise ValueError(
            f"text {tuple(text.shape)} does not match video {tuple(video.shape)}: expected [{b}, K, {d}] "
            f"(same clips, same embedding width)"
        )
    k = text.shape[1]
    if not (video.is_floating_point() and text.is_floating_point()):
        raise TypeError(f"embeddings must be floating point, got video {video.dtype} and text {text.dtype}")
    if not tau > 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")

    if text_mask is None:
        if text_mask_all is not None:
            raise ValueError("text_mask_all was given without text_mask; pass both or neither")
        text_mask = torch.ones(b, k, dtype=torch.bool, device=text.device)
    elif text_mask.shape != (b, k) or text_mask.dtype != torch.bool:
        raise ValueError(
            f"text_mask must be bool [{b}, {k}] (True = caption present), got {text_mask.dtype} "
            f"{tuple(text_mask.shape)}"
        )

    if video_all is None:
        video_all = video
    if text_all is None:
        if text_mask_all is not None:
            raise ValueError("text_mask_all was given without text_all; pass both or neither")
        text_all, text_mask_all = text, text_mask
    elif text_mask_all is None:
        text_mask_all = torch.ones(text_all.shape[:2], dtype=torch.bool, device=text_all.device)
    if video_all.dim() != 2 or video_all.shape[1] != d:
        raise ValueError(f"video_all must be [N, {d}] (the gathered videos), got {tuple(video_all.shape)}")
    if text_all.dim() != 3 or text_all.shape[1:] != (k, d):
        raise ValueError(
            f"text_all must be [N, {k}, {d}] (the gathered captions), got {tuple(text_all.shape)}"
        )
    if text_mask_all.shape != text_all.shape[:2] or text_mask_all.dtype != torch.bool:
        raise ValueError(
            f"text_mask_all must be bool {list(text_all.shape[:2])}, got {text_mask_all.dtype} "
            f"{tuple(text_mask_all.shape)}"
        )
    n = video_all.shape[0]
    if n < b or text_all.shape[0] < b:
        raise ValueError(
            f"the gathered batch (video_all {n} rows, text_all {text_all.shape[0]} rows) is smaller than the "
            f"local batch {b}; the gathered tensors must contain the local rows"
        )
    devices = {t.device for t in (video, text, text_mask, video_all, text_all, text_mask_all)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(x) for x in devices)}")
    return video, text, text_mask, video_all, text_all, text_mask_all


def mil_nce_reference(
    video: Tensor,
    text: Tensor,
    text_mask: Optional[Tensor] = None,
    video_all: Optional[Tensor] = None,
    text_all: Optional[Tensor] = None,
    text_mask_all: Optional[Tensor] = None,
    tau: float = DEFAULT_TAU,
) -> Tensor:
    """Per-clip MIL-NCE loss, plain PyTorch (materialises the similarities).

    Args:
        video: ``[B, D]`` local clips' video embeddings, L2-normalised.
        text: ``[B, K, D]`` their K caption embeddings, L2-normalised.
        text_mask: ``[B, K]`` bool, True = caption present; None = all present.
        video_all: ``[N, D]`` every video of the global batch (rank-major, local rows
            included); None = ``video`` (single process).
        text_all: ``[N, K, D]`` every caption of the global batch; None = ``text``.
        text_mask_all: ``[N, K]`` bool mask of ``text_all``; None = all present
            (or ``text_mask`` when ``text_all`` is None).
        tau: temperature, ``s = x . y / tau``.

    Returns:
        ``[B]`` per-clip loss ``denominator_i - numerator_i`` in fp32 (fp64 for fp64
        inputs); exactly ``0`` with zero gradient for clips without a valid caption.
    """
    has_mask = text_mask is not None or text_mask_all is not None
    video, text, text_mask, video_all, text_all, text_mask_all = _check_inputs(
        video, text, text_mask, video_all, text_all, text_mask_all, tau
    )
    dtype = _compute_dtype(video, text, video_all, text_all)
    b, k, d = text.shape
    n = text_all.shape[0]
    inv_tau = 1.0 / tau
    text = text.to(dtype)
    text_all = text_all.to(dtype)
    if has_mask:
        # Zero masked captions so that non-finite garbage there cannot reach any product.
        text = torch.where(text_mask[..., None], text, 0.0)  # (B, K, D)
        text_all = torch.where(text_mask_all[..., None], text_all, 0.0)  # (N, K, D)
    video = video.to(dtype)
    video_all = video_all.to(dtype)

    nv = video_all.shape[0]
    # Masked logits get the most negative finite value rather than -inf: a valid clip
    # always has a finite entry (its positive), so they vanish in its logsumexp exactly
    # as -inf would, and a clip with nothing valid gets finite logsumexps whose result
    # is dropped by the final `where` (zero gradient, no (-inf) - (-inf) anywhere).
    fill = torch.finfo(dtype).min
    video = video * inv_tau  # fold 1/tau into the [B, D] side, not the [B, N*K] logits
    video_all = video_all * inv_tau
    # Positives: s(v_i, t_ik).
    pos = torch.einsum("bd,bkd->bk", video, text)  # (B, K)
    # Row half: v_i against every caption of the global batch.
    row = video @ text_all.reshape(n * k, d).T  # (B, N*K)
    # Column half: every global video against clip i's captions.
    col = (text.reshape(b * k, d) @ video_all.T).reshape(b, k, nv)  # (B, K, N_video)
    if has_mask:
        pos = pos.masked_fill(~text_mask, fill)
        row = row.masked_fill(~text_mask_all.reshape(1, n * k), fill)
        col = col.masked_fill(~text_mask[:, :, None], fill)
    col = col.reshape(b, k * nv)
    numerator = torch.logsumexp(pos, dim=1)
    # logsumexp over the union of the two halves, without concatenating them.
    denominator = torch.logaddexp(torch.logsumexp(row, dim=1), torch.logsumexp(col, dim=1))
    loss = denominator - numerator
    if has_mask:
        loss = torch.where(text_mask.any(dim=1), loss, 0.0)
    return loss


def nce_reference(
    video: Tensor,
    audio: Tensor,
    video_all: Optional[Tensor] = None,
    audio_all: Optional[Tensor] = None,
    tau: float = DEFAULT_TAU,
) -> Tensor:
    """Per-clip NCE loss, plain PyTorch: MIL-NCE with one positive per clip.

    Args:
        video: ``[B, D]`` local video embeddings, L2-normalised.
        audio: ``[B, D]`` the same clips' audio embeddings, L2-normalised.
        video_all: ``[N, D]`` gathered videos (local rows included); None = ``video``.
        audio_all: ``[N, D]`` gathered audio; None = ``audio``.
        tau: temperature.

    Returns:
        ``[B]`` per-clip loss.
    """
    return mil_nce_reference(*_as_mil_nce(video, audio, video_all, audio_all), tau)


def _check_pair(video: Tensor, other: Tensor, name: str) -> None:
    if video.dim() != 2 or other.shape != video.shape:
        raise ValueError(
            f"NCE expects video [B, D] and {name} [B, D] of the same shape, got video {tuple(video.shape)} "
            f"and {name} {tuple(other.shape)}"
        )


def _as_k1(x: Tensor, name: str) -> Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} must be [N, D], got {tuple(x.shape)}")
    return x[:, None]


def _as_mil_nce(
    video: Tensor, audio: Tensor, video_all: Optional[Tensor], audio_all: Optional[Tensor]
) -> Tuple[Tensor, Tensor, None, Optional[Tensor], Optional[Tensor], None]:
    """NCE's arguments as MIL-NCE's with one positive per clip and no masks (K = 1)."""
    _check_pair(video, audio, "audio")
    text_all = None if audio_all is None else _as_k1(audio_all, "audio_all")
    return video, audio[:, None], None, video_all, text_all, None


def mil_nce(
    video: Tensor,
    text: Tensor,
    text_mask: Optional[Tensor] = None,
    video_all: Optional[Tensor] = None,
    text_all: Optional[Tensor] = None,
    text_mask_all: Optional[Tensor] = None,
    tau: float = DEFAULT_TAU,
    impl: Optional[str] = None,
) -> Tensor:
    """Per-clip MIL-NCE loss ``[B]``; arguments as :func:`mil_nce_reference`.

    Args:
        impl: ``"reference"``, ``"triton"`` or ``"auto"``; None reads the
            ``VATT_FAST_KERNELS`` environment variable (default ``auto``). Until a Triton
            kernel is registered for op ``"mil_nce"`` (``register_triton``, taking
            the arguments of :func:`mil_nce_reference`), ``"triton"`` raises
            NotImplementedError and ``"auto"`` resolves to the reference.
    """
    tensors = [t for t in (video, text, text_mask, video_all, text_all, text_mask_all) if t is not None]
    chosen = resolve_impl(impl, *tensors, op="mil_nce")
    if chosen == "triton":
        return get_triton("mil_nce")(video, text, text_mask, video_all, text_all, text_mask_all, tau)
    return mil_nce_reference(video, text, text_mask, video_all, text_all, text_mask_all, tau)


def nce(
    video: Tensor,
    audio: Tensor,
    video_all: Optional[Tensor] = None,
    audio_all: Optional[Tensor] = None,
    tau: float = DEFAULT_TAU,
    impl: Optional[str] = None,
) -> Tensor:
    """Per-clip NCE loss ``[B]``; arguments as :func:`nce_reference`, ``impl`` as :func:`mil_nce`.

    NCE is MIL-NCE with one positive (K = 1), so it runs the ``mil_nce`` kernel.
    """
    return mil_nce(*_as_mil_nce(video, audio, video_all, audio_all), tau, impl)
