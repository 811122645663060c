"""DropToken gather: keep a subset of the tokens (and add their position embedding).

``out[b, j] = x[b, keep[j]] (+ pos[keep[j]])`` with ``keep`` shared by the batch
(``[N_keep]``, one draw per step as the VATT release does) or per sample (``[B, N_keep]``).

Trade-off of the reference: one gather (``index_select`` on rows) and one add,
each a pass over ``B * N_keep * D`` elements; it reads ``B * N_keep * D`` of ``x`` (plus
``N_keep * D`` of ``pos``) and writes ``B * N_keep * D``. Autograd's backward scatters
(``index_add``), so repeated indices accumulate correctly.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._dispatch import get_triton, resolve_impl

__all__ = ["check_keep", "drop_token_gather", "drop_token_gather_reference", "select_tokens"]


def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


def check_keep(keep: Optional[torch.Tensor], batch: int, num_tokens: int, device: torch.device, what: str) -> None:
    """Validate a DropToken index tensor: ``None``, ``[N_keep]`` or ``[B, N_keep]`` integers in ``[0, N)``.

    The range check reads the indices back (a device sync); it is skipped while
    ``torch.compile`` traces.
    """
    if keep is None:
        return
    if not isinstance(keep, torch.Tensor):
        raise TypeError(
            f"{what}: keep must be an int64 tensor [N_keep] or [B, N_keep] or None, got {type(keep).__name__}"
        )
    if keep.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{what}: keep must hold int64 token indices, got dtype {keep.dtype}; "
            f"use keep.long() (a bool mask converts with mask.nonzero().squeeze(1))"
        )
    if keep.device != device:
        raise ValueError(f"{what}: keep is on {keep.device} but the input is on {device}; use keep.to({str(device)!r})")
    if keep.dim() == 2:
        if keep.shape[0] != batch:
            raise ValueError(
                f"{what}: per-sample keep of shape {_shape(keep)} has {keep.shape[0]} rows but the batch has "
                f"{batch} samples; pass [B={batch}, N_keep] or a shared [N_keep]"
            )
    elif keep.dim() != 1:
        raise ValueError(
            f"{what}: keep must be [N_keep] (shared by the batch) or [B, N_keep] (per sample), "
            f"got shape {_shape(keep)}"
        )
    if keep.numel() and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(keep))
        if lo < 0 or hi >= num_tokens:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{what}: keep holds token index {bad} but there are {num_tokens} tokens; "
                f"indices must lie in [0, {num_tokens - 1}]"
            )


def select_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x [B, N, K]`` rows at ``keep`` (``[N_keep]`` shared or ``[B, N_keep]``) -> ``[B, N_keep, K]``.

    Uses ``index_select`` (per sample: on the flattened ``[B * N, K]`` rows), which is much faster
    than advanced indexing or ``torch.gather`` on CPU; its backward is ``index_add``. No checks.
    """
    if keep.dim() == 1:
        return x.index_select(1, keep)
    B, N, K = x.shape
    offsets = torch.arange(B, device=keep.device, dtype=keep.dtype).unsqueeze(1) * N  # (B, 1)
    rows = (keep + offsets).reshape(-1)  # (B * N_keep,)
    return x.reshape(B * N, K).index_select(0, rows).view(B, keep.shape[1], K)


def _check_gather_args(x: torch.Tensor, keep: torch.Tensor, pos: Optional[torch.Tensor]) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        got = _shape(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"drop_token_gather: x must be tokens [B, N, D], got {got}")
    if keep is None:
        raise ValueError(
            "drop_token_gather: keep is required ([N_keep] or [B, N_keep] int64); with no drop, use x itself"
        )
    B, N, D = x.shape
    check_keep(keep, B, N, x.device, "drop_token_gather")
    if pos is not None:
        if not isinstance(pos, torch.Tensor) or _shape(pos) != (N, D):
            got = _shape(pos) if isinstance(pos, torch.Tensor) else type(pos).__name__
            raise ValueError(f"drop_token_gather: pos must be [N, D] = {(N, D)} for x {_shape(x)}, got {got}")
        if pos.device != x.device:
            raise ValueError(f"drop_token_gather: pos is on {pos.device} but x is on {x.device}")


def drop_token_gather_reference(
    x: torch.Tensor, keep: torch.Tensor, pos: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Plain PyTorch DropToken gather; the definition of correct for :func:`drop_token_gather`.

    Args: see :func:`drop_token_gather`.

    Returns:
        ``[B, N_keep, D]`` in ``x``'s dtype.
    """
    _check_gather_args(x, keep, pos)
    out = select_tokens(x, keep)  # (B, N_keep, D)
    if pos is not None:
        out = out + pos[keep].to(x.dtype)  # (N_keep, D) or (B, N_keep, D)
    return out


def drop_token_gather(
    x: torch.Tensor, keep: torch.Tensor, pos: Optional[torch.Tensor] = None, impl: Optional[str] = None
) -> torch.Tensor:
    """Gather the tokens DropToken keeps, optionally adding their position embedding.

    Args:
        x: tokens ``[B, N, D]``.
        keep: int64 token indices, ``[N_keep]`` shared by the batch or ``[B, N_keep]`` per sample,
            each in ``[0, N)``.
        pos: optional position embedding ``[N, D]``; ``pos[keep[j]]`` is added to token ``j``
            (cast to ``x``'s dtype).
        impl: ``"auto"``, ``"triton"``, ``"reference"`` or ``None`` for ``$VATT_FAST_KERNELS``.

    Returns:
        ``[B, N_keep, D]`` in ``x``'s dtype; differentiable in ``x`` and ``pos`` (the backward
        scatters into the kept rows, zeros elsewhere).
    """
    if resolve_impl(impl, x, keep, pos, op="drop_token_gather") == "triton":
        return get_triton("drop_token_gather")(x, keep, pos=pos)
    return drop_token_gather_reference(x, keep, pos=pos)
