"""VATT's contrastive losses as drop-in modules: NCE (video-audio), MIL-NCE (video-text)
and their sum.

The formulas are the released ones (``VATT_SPEC.md`` "Losses"; the per-clip math lives in
:mod:`vatt_fast.kernels.nce`): embeddings L2-normalised in fp32, ``s = x . y / tau``; for
clip ``i``, ``loss_i = logsumexp(row_i U column_i) - logsumexp(positives_i)`` where the
row is ``v_i`` against every candidate of the global batch and the column every video
of the global batch against clip ``i``'s positives; the loss is the mean over clips that
have at least one positive.

Distributed semantics (``gather=True`` inside a process group of ``N`` ranks, each with
``b`` local clips): every rank gathers the embeddings of all ranks with gradients and
computes its own rows against the ``N * b`` global candidates. The module returns the
GLOBAL loss (the same value on every rank), and the gradient it sends to each rank's
local inputs equals the gradient of the single-process loss over the concatenated batch
of ``N * b`` clips with respect to those rows. It does this by back-propagating only the
local part ``sum(local valid rows) / global valid count`` (the gather's backward
all-reduces the candidates' gradients), while the returned value adds the other ranks'
parts as a constant.

Implementation (``impl``, see :mod:`vatt_fast.kernels.nce`): the default ``"auto"`` runs the
fused Triton kernels on CUDA tensors and the chunked PyTorch path on the CPU, both with
memory linear in the batch (no ``[B, N*K]`` similarity matrix); ``"reference"`` is the
materialising plain PyTorch definition, ``"chunked"`` and ``"triton"`` force a path.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vatt_fast.distributed import all_gather_no_grad, all_gather_with_grad, all_reduce_value, get_world_size
from vatt_fast.kernels._dispatch import default_impl
from vatt_fast.kernels.nce import DEFAULT_TAU, MIL_NCE_IMPLS, mil_nce

__all__ = ["MILNCELoss", "NCELoss", "VATTLoss"]


def _normalize(x: Tensor) -> Tensor:
    """L2-normalise the last dim in fp32 (fp64 stays fp64)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return F.normalize(x.to(dtype), dim=-1)


def _check_tau(tau: float) -> float:
    tau = float(tau)
    if not tau > 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    return tau


def _contrastive(
    video: Tensor,
    cand: Tensor,
    mask: Optional[Tensor],
    tau: float,
    gather: bool,
    impl: Optional[str],
) -> Tensor:
    """Shared body of the two losses: normalise, gather, per-clip loss, global mean.

    Args:
        video: ``[b, D]`` local videos (not yet normalised).
        cand: ``[b, K, D]`` local positives (not yet normalised).
        mask: ``[b, K]`` bool or None.

    Returns:
        Scalar: the global mean over valid clips, gradient only through the local rows.
    """
    if mask is not None:
        # Zero masked captions before anything else (normalisation, gather), so that
        # garbage there (even inf/NaN) reaches neither the loss nor any gradient.
        cand = torch.where(mask[..., None], cand, 0.0)
    v = _normalize(video)
    t = _normalize(cand)
    distributed = gather and get_world_size() > 1
    if distributed:
        # One size check suffices: t and mask have the same leading size as v on every rank.
        v_all = all_gather_with_grad(v)
        t_all = all_gather_with_grad(t, check_sizes=False)
        mask_all = None if mask is None else all_gather_no_grad(mask, check_sizes=False)
    else:
        v_all = t_all = mask_all = None
    per_clip = mil_nce(v, t, mask, v_all, t_all, mask_all, tau=tau, impl=impl)  # (b,), 0 where invalid

    local_sum = per_clip.sum()
    if mask is None:
        local_count = torch.tensor(float(video.shape[0]), dtype=local_sum.dtype, device=local_sum.device)
    else:
        local_count = mask.any(dim=1).sum().to(local_sum.dtype)
    if not distributed:
        # No valid clip: per_clip is all zeros with zero gradient, so the loss is 0, not NaN.
        return local_sum / local_count.clamp_min(1.0)
    stats = all_reduce_value(torch.stack([local_sum.detach(), local_count]), op="sum")
    total, count = stats[0], stats[1].clamp_min(1.0)
    part = local_sum / count
    return part + (total / count - part).detach()


class _ContrastiveBase(nn.Module):
    def __init__(self, tau: float, gather: bool, impl: Optional[str]) -> None:
        super().__init__()
        self.tau = _check_tau(tau)
        self.gather = bool(gather)
        if impl is not None and impl not in MIL_NCE_IMPLS:
            raise ValueError(f"impl={impl!r} is not one of {list(MIL_NCE_IMPLS)} (or None for $VATT_FAST_KERNELS)")
        # None takes the process default now, once, never inside a traced call.
        self.impl = default_impl() if impl is None else impl

    def extra_repr(self) -> str:
        return f"tau={self.tau}, gather={self.gather}, impl={self.impl!r}"


class NCELoss(_ContrastiveBase):
    """Video-audio NCE as released in VATT: one positive (the clip's own audio) per clip.

    ``loss = mean_i [ logsumexp(row_i U column_i) - s(v_i, a_i) ]`` with
    ``s = v . a / tau`` on L2-normalised (fp32) embeddings, row ``i`` = ``v_i`` against
    every audio of the global batch, column ``i`` = every video of the global batch
    against ``a_i`` (the positive counts in both halves, as released).

    Distributed: with ``gather=True`` inside a process group, candidates come from all
    ranks (gathered with gradients) and the module returns the global loss, identical on
    every rank; the gradient reaching each rank's inputs is that of the single-process
    loss over the concatenated global batch. DDP AVERAGES parameter gradients over the
    ``N`` ranks, so multiply the loss by ``N`` (``vatt_fast.distributed.get_world_size()``)
    before ``backward()``, or scale the learning rate, to train with the single-process
    gradient. With ``gather=False`` each rank computes the loss of its own batch only.

    Args:
        tau: temperature (VATT: 0.07, fixed).
        gather: gather candidates from every rank when a process group is initialised.
        impl: kernel implementation: ``"auto"`` (Triton on CUDA, the chunked PyTorch path
            elsewhere), ``"triton"``, ``"chunked"``, ``"reference"``, or None for
            ``$VATT_FAST_KERNELS`` (default ``auto``); see :mod:`vatt_fast.kernels.nce`.

    Shape:
        - video: ``[B, D]``, audio: ``[B, D]`` (any float dtype; not normalised yet).
        - output: scalar, fp32 (fp64 for fp64 inputs).

    Example:
        >>> loss = NCELoss()(torch.randn(8, 512), torch.randn(8, 512))
    """

    def __init__(self, tau: float = DEFAULT_TAU, gather: bool = True, impl: Optional[str] = None) -> None:
        super().__init__(tau, gather, impl)

    def forward(self, video: Tensor, audio: Tensor) -> Tensor:
        if video.dim() != 2 or audio.shape != video.shape:
            raise ValueError(
                f"NCELoss expects video [B, D] and audio [B, D] of the same shape, got video "
                f"{tuple(video.shape)} and audio {tuple(audio.shape)}; project both into the same "
                f"common space (S_va) and pass one row per clip"
            )
        return _contrastive(video, audio[:, None], None, self.tau, self.gather, self.impl)


class MILNCELoss(_ContrastiveBase):
    """Video-text MIL-NCE as released in VATT: the clip's K captions are all positives.

    ``loss = mean_{i valid} [ logsumexp(row_i U column_i) - logsumexp_{t in P_i} s(v_i, t) ]``
    with ``P_i`` the valid captions of clip ``i``, row ``i`` = ``v_i`` against every valid
    caption of the global batch, column ``i`` = every video of the global batch against
    ``P_i``. Embeddings are L2-normalised in fp32, ``s = x . y / tau``.

    Masks (``text_mask``, True = caption present): a masked caption is removed from every
    candidate set and from the positives; a clip with no valid caption (e.g. AudioSet)
    is left out of the mean, which is rescaled by the number of valid clips (global
    count when gathering); its video still serves as a candidate in the other clips'
    columns. If no clip anywhere has a caption the loss is 0 with zero gradients.

    Distributed: as :class:`NCELoss` (global value on every rank, single-process
    gradients on the local inputs; multiply by the world size before ``backward()``
    under DDP, which averages parameter gradients).

    Args:
        tau: temperature (VATT: 0.07).
        gather: gather candidates from every rank when a process group is initialised.
        impl: kernel implementation, see :class:`NCELoss`.

    Shape:
        - video: ``[B, D]``, text: ``[B, K, D]``, text_mask: ``[B, K]`` bool or None (all present).
        - output: scalar.

    Example:
        >>> text_mask = torch.tensor([[True, True, False], [False, False, False]])
        >>> loss = MILNCELoss()(torch.randn(2, 256), torch.randn(2, 3, 256), text_mask)
    """

    def __init__(self, tau: float = DEFAULT_TAU, gather: bool = True, impl: Optional[str] = None) -> None:
        super().__init__(tau, gather, impl)

    def forward(self, video: Tensor, text: Tensor, text_mask: Optional[Tensor] = None) -> Tensor:
        if video.dim() != 2 or text.dim() != 3 or text.shape[0] != video.shape[0] or text.shape[2] != video.shape[1]:
            raise ValueError(
                f"MILNCELoss expects video [B, D] and text [B, K, D], got video {tuple(video.shape)} and text "
                f"{tuple(text.shape)}; pass the K caption embeddings of each clip (text[:, None] for one caption)"
            )
        if text_mask is not None:
            if text_mask.dtype != torch.bool or text_mask.shape != text.shape[:2]:
                raise ValueError(
                    f"text_mask must be bool {list(text.shape[:2])} (True = caption present), got "
                    f"{text_mask.dtype} {tuple(text_mask.shape)}; use text_mask.bool() or None for all present"
                )
            text_mask = text_mask.to(text.device)
        else:
            # Always pass a mask, so every rank runs the same collectives whether or not
            # its caller gave one.
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        return _contrastive(video, text, text_mask, self.tau, self.gather, self.impl)


class VATTLoss(nn.Module):
    """VATT's pretraining objective: ``(w_vt * L_vt + w_va * L_va) / 2``.

    ``L_va`` is :class:`NCELoss` on (``video_va``, ``audio_va``) in the video-audio space,
    ``L_vt`` is :class:`MILNCELoss` on (``video_vt``, ``text_vt``, ``text_mask``) in the
    video-text space. With the default weights this is the released ``(L_vt + L_va) / 2``.
    A term is computed when both of its embeddings are in ``outputs``; when one term is
    missing (a batch without audio, or without text) only the present term is used and
    the divisor becomes 1, i.e. the loss is the weighted sum of the present terms
    divided by their number. At least one term must be computable.

    Distributed semantics: as :class:`NCELoss` (global value on every rank, gradients of
    the single-process loss over the global batch; multiply by the world size before
    ``backward()`` under DDP). Every rank must compute the same terms (the same keys
    present), since each term runs its own collectives.

    Args:
        tau: temperature of both losses (VATT: 0.07).
        vt_weight: weight of the video-text MIL-NCE term.
        va_weight: weight of the video-audio NCE term.
        gather: gather candidates from every rank when a process group is initialised.
        impl: kernel implementation, see :class:`NCELoss`.

    Shape:
        outputs: a mapping (the model's output dict) with
        ``video_va [B, D_va]``, ``audio_va [B, D_va]``, ``video_vt [B, D_vt]``,
        ``text_vt [B, K, D_vt]`` and optionally ``text_mask [B, K]`` bool (or pass it
        as the ``text_mask`` argument: the model's output dict does not carry it).
        Returns a dict with ``loss`` (scalar) and ``loss_va`` / ``loss_vt`` for the
        terms that were computed.

    Example:
        >>> loss_fn = VATTLoss()
        >>> losses = loss_fn(model(batch), text_mask=batch["text_mask"])
        >>> losses["loss"].backward()
    """

    def __init__(
        self,
        tau: float = DEFAULT_TAU,
        vt_weight: float = 1.0,
        va_weight: float = 1.0,
        gather: bool = True,
        impl: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.vt_weight = float(vt_weight)
        self.va_weight = float(va_weight)
        self.va = NCELoss(tau=tau, gather=gather, impl=impl)
        self.vt = MILNCELoss(tau=tau, gather=gather, impl=impl)

    def extra_repr(self) -> str:
        return f"vt_weight={self.vt_weight}, va_weight={self.va_weight}"

    def forward(self, outputs: Mapping[str, Tensor], text_mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Compute the terms whose two embeddings are both in ``outputs``.

        Args:
            outputs: the model's output dict (see the class docstring).
            text_mask: ``[B, K]`` bool; the batch's caption mask, for when ``outputs``
                (a model's output) does not carry it. Give it in one place only.
        """
        if text_mask is not None and outputs.get("text_mask") is not None:
            raise ValueError("text_mask was given both as an argument and in outputs; pass it once")
        if text_mask is None:
            text_mask = outputs.get("text_mask")
        has_va = outputs.get("video_va") is not None and outputs.get("audio_va") is not None
        has_vt = outputs.get("video_vt") is not None and outputs.get("text_vt") is not None
        if not (has_va or has_vt):
            raise ValueError(
                f"VATTLoss needs video_va + audio_va and/or video_vt + text_vt in outputs, got keys "
                f"{sorted(outputs)}; run the model on video plus audio and/or text"
            )
        result: Dict[str, Tensor] = {}
        terms = []
        if has_vt:
            result["loss_vt"] = self.vt(outputs["video_vt"], outputs["text_vt"], text_mask)
            terms.append(self.vt_weight * result["loss_vt"])
        if has_va:
            result["loss_va"] = self.va(outputs["video_va"], outputs["audio_va"])
            terms.append(self.va_weight * result["loss_va"])
        result["loss"] = sum(terms) / len(terms)
        return result
