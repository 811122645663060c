"""NCE and MIL-NCE as the VATT release computes them: per-clip losses, local rows
against globally gathered candidates, with memory linear in the batch.

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

Implementations (``impl`` of :func:`mil_nce` / :func:`nce`):

- ``"reference"`` (:func:`mil_nce_reference`): plain PyTorch, the definition of correct.
  It materialises the similarities: two matmuls of ``B x (N*K) x D`` forward and four
  backward, and two ``[B, N*K]`` fp32 matrices (plus their softmax and gradient) alive
  at once (``N`` = global batch): 6.4 GiB of extra peak memory at ``B = N = 8192, K = 5,
  D = 256`` (benchmarks/test_bench_nce.py, 2-core CPU), against 0.36 GiB for the chunked path.
- ``"chunked"``: plain PyTorch with custom backwards (:class:`_ChunkedLSE`,
  :class:`_ChunkedSymmetricLSE`), for the CPU. The decomposition below, a block of anchor
  rows at a time (``_CHUNK_ELEMENTS`` = 16M logits, 64 MiB in fp32: blocks above glibc's
  32 MiB mmap ceiling go back to the system when freed, smaller ones fragmented the heap
  to 1.4 GiB in a measurement); the backward recomputes each block from the saved
  logsumexps, so nothing ``[B, N*K]``-sized is ever held. In one process (no gathered
  tensors, or the local ones passed again) both halves come from one product per block,
  with a running max and sum per column: one product forward and three backward, against
  the reference's two and four. An ``autograd.Function`` of plain ops, so ``torch.compile``
  traces it (``fullgraph=True``), unrolling the loop over blocks.
- ``"triton"``: the Triton kernels below (``TRITON_INTERPRET=1`` on the CPU).
- ``"auto"`` (the default): Triton when every tensor is on a CUDA device and Triton is
  installed (``resolve_impl``), and the chunked path otherwise, the CPU included (and
  float64 inputs, which the kernels do not take). ``$VATT_FAST_KERNELS`` accepts
  ``auto``, ``triton`` and ``reference``; ``"chunked"`` is chosen through ``impl``.

The decomposition shared by the chunked and the Triton paths. Both halves are a
logsumexp over the rows of a product that is never stored:

- ``row_lse [B]``      = logsumexp over the rows of ``v @ text_all^T / tau``
  (``B`` anchors, ``N*K`` candidates, ``text_mask_all`` drops candidates);
- ``col_lse [B, K]``   = logsumexp over the rows of ``text @ video_all^T / tau``
  (``B*K`` anchors, ``N`` candidates); ``column_i = logsumexp_{k valid} col_lse[i, k]``;
- ``pos [B, K]``       = ``v_i . t_ik / tau`` (a ``B*K*D`` product).

The op ``lse(anchors [R, D], cands [C, D], cand_mask [C] | None, scale) -> [R]`` is the
only part that touches ``R x C`` similarities; the ``O(B*K)`` combination
(``_combine``: the numerator, ``logaddexp`` of the halves, the valid-clip ``where``) is
plain PyTorch, and autograd carries the gradient of each ``lse`` back through it. The
two halves run as separate products even in a single process, where the column half is
the transpose of the row half (one ``N x N*K x D`` product could serve both, through a
running max/sum per column): a column logsumexp needs either a second pass or
cross-program atomics, and keeping one op for both halves makes the local-vs-global
case (where the two matrices differ) the only case. The kernels' forward therefore does
the reference's two matmuls; the backward recomputes them and does the reference's four
(the chunked path shares the product in one process, see above).

Triton kernels (``_lse_fwd_kernel``, ``_lse_bwd_anchor_kernel``, ``_lse_bwd_cand_kernel``),
flash-attention style. Each program holds ``BLOCK_R`` anchors (all ``D`` columns, padded
to a power of two) and streams ``BLOCK_C`` candidates at a time: ``tl.dot`` with fp32
accumulation (fp16/bf16 operands as they are, fp32 operands in ``tf32x3``, which keeps
fp32 accuracy on tensor cores), an online max and sum per anchor. Forward: reads
``R*D + ceil(R/BLOCK_R)*C*D`` elements, writes ``R`` fp32 logsumexps, so the whole loss
writes ``B + B*K`` values. Backward: two kernels, one over anchor blocks (``d anchors``,
each program loops over the candidates) and one over candidate blocks (``d cands``,
each program loops over the anchors); each recomputes ``p = exp(s - lse)`` from the saved
logsumexps and accumulates ``p @ cands`` or ``p^T @ anchors`` in fp32 registers. Two
kernels rather than one with atomics: every gradient element is written by exactly one
program, so the result is deterministic (bitwise run to run) and needs no zero fill or
fp32 scratch, at the price of computing the ``R x C`` products twice in the backward
(five products in all, against the reference's six passes over a stored matrix);
atomics would save one product but make the fp32 sums order-dependent. The probability
tile stays in fp32 for the second product (``tf32x3``): rounding it to fp16 would
underflow the small probabilities of a large batch. Blocks: 64 anchors x 64 candidates
for ``D <= 128``, 32 x 32 above (the whole-``D`` tiles live in registers), 16 x 16 in
the interpreter; untuned until a GPU run measures them.

Registration (as :mod:`vatt_fast.kernels.drop_token_gather`): compiled Triton makes
``vatt_fast::mil_nce_lse`` and ``vatt_fast::mil_nce_lse_backward`` ``triton_op``s
launching through ``wrap_triton`` (``torch.compile`` traces into the kernels); under
``TRITON_INTERPRET=1`` they are opaque ``custom_op``s with a ``register_fake``. Both get
``register_autograd`` and a FLOP formula (``2 R C D`` forward, ``8 R C D`` backward).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ._dispatch import (
    INTERPRETING,
    default_impl,
    get_triton,
    launch,
    library_op,
    register_triton,
    resolve_impl,
    triton_available,
)

__all__ = ["MIL_NCE_IMPLS", "mil_nce", "mil_nce_chunked", "mil_nce_reference", "nce", "nce_reference"]

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



# ----------------------------------------------------------------------------------------
# The decomposition shared by the chunked and the Triton paths
# ----------------------------------------------------------------------------------------
LseFn = Callable[[Tensor, Tensor, Optional[Tensor], float], Tensor]


def _combine(pos: Tensor, row_lse: Tensor, col_lse: Tensor, text_mask: Tensor, has_mask: bool) -> Tensor:
    """Per-clip losses from the positives ``[B, K]``, ``row_lse [B]`` and ``col_lse [B, K]``.

    The reference's last lines on ``O(B*K)`` values; masked entries get the most negative
    finite value, exactly as there.
    """
    if has_mask:
        fill = torch.finfo(pos.dtype).min
        pos = pos.masked_fill(~text_mask, fill)
        col_lse = col_lse.masked_fill(~text_mask, fill)
    numerator = torch.logsumexp(pos, dim=1)
    denominator = torch.logaddexp(row_lse, torch.logsumexp(col_lse, dim=1))
    loss = denominator - numerator
    if has_mask:
        loss = torch.where(text_mask.any(dim=1), loss, 0.0)
    return loss


def _mil_nce_decomposed(
    lse: LseFn,
    dtype: torch.dtype,
    video: Tensor,
    text: Tensor,
    text_mask: Tensor,
    video_all: Tensor,
    text_all: Tensor,
    text_mask_all: Tensor,
    tau: float,
    has_mask: bool,
    symmetric: Optional[Callable[..., Tuple[Tensor, Tensor]]] = None,
) -> Tensor:
    """MIL-NCE through two row-logsumexp ops (see the module docstring), on checked inputs.

    ``symmetric(video [B, D], text [B*K, D], cand_mask [B*K] | None, scale) -> (row_lse [B],
    col_lse [B*K])``, when given, replaces the two ``lse`` calls in a single process.

    ``dtype``: what the ``lse`` op gets (the chunked path: fp32/fp64; the kernels: the
    inputs' common dtype); the combination always runs in at least fp32.
    """
    b, k, d = text.shape
    n = text_all.shape[0]
    scale = 1.0 / tau
    # One process (the gathered tensors are the local ones): the column half is the
    # transpose of the row half, and a symmetric op can serve both from one product.
    shared = symmetric is not None and video_all is video and text_all is text
    video, text = video.to(dtype), text.to(dtype)
    video_all, text_all = video_all.to(dtype), text_all.to(dtype)
    if has_mask:
        text = torch.where(text_mask[..., None], text, 0.0)  # (B, K, D)
        text_all = torch.where(text_mask_all[..., None], text_all, 0.0)  # (N, K, D)
    acc = _compute_dtype(video)
    pos = torch.einsum("bd,bkd->bk", video.to(acc), text.to(acc)) * scale  # (B, K)
    cand_mask = text_mask_all.reshape(n * k) if has_mask else None
    if shared:
        row_lse, col_lse = symmetric(video, text.reshape(b * k, d), cand_mask, scale)
        col_lse = col_lse.reshape(b, k)
    else:
        # Row half: B anchors (local videos) against the N*K gathered captions.
        row_lse = lse(video, text_all.reshape(n * k, d), cand_mask, scale)  # (B,)
        # Column half: B*K anchors (local captions) against the gathered videos.
        col_lse = lse(text.reshape(b * k, d), video_all, None, scale).reshape(b, k)  # (B, K)
    return _combine(pos, row_lse.to(acc), col_lse.to(acc), text_mask, has_mask)


# ----------------------------------------------------------------------------------------
# Chunked PyTorch path (CPU default)
# ----------------------------------------------------------------------------------------
# Logits computed at once per block of anchor rows: 4M, 16 MiB in fp32. A few such blocks
# are alive at a time (the logits, their exp in place, the gradient products).
_CHUNK_ELEMENTS = 1 << 24


def _chunk_rows(num_cands: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, num_cands))


def _lse_rows_(s: Tensor) -> Tensor:
    """``logsumexp(s, dim=1)``, overwriting ``s`` (no temporaries of its size); ``-inf`` rows
    give ``-inf``."""
    m = s.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    return s.sub_(m).exp_().sum(dim=1).log_().add_(m[:, 0])


class _ChunkedSymmetricLSE(torch.autograd.Function):
    """Both halves in one process: ``s = scale * video @ text^T`` (``[B, B*K]``, a block of rows
    at a time) gives ``row_lse [B]`` (over the unmasked columns) and ``col_lse [B*K]`` (over all
    rows, with a running max and sum per column across the blocks). Backward: one product to
    recompute each block and two for the gradients, against four and eight for two separate
    :class:`_ChunkedLSE` calls."""

    @staticmethod
    def forward(ctx, video: Tensor, text: Tensor, cand_mask: Optional[Tensor], scale: float):
        rows, cols = video.shape[0], text.shape[0]
        step = _chunk_rows(cols)
        text_t = text.t()
        dropped = None if cand_mask is None else ~cand_mask
        col_max = video.new_full((cols,), float("-inf"))
        col_sum = video.new_zeros((cols,))
        parts = []
        for r0 in range(0, rows, step):
            s = torch.mm(video[r0 : r0 + step] * scale, text_t)  # (rows, B*K)
            new_max = torch.maximum(col_max, s.amax(dim=0))
            col_sum = col_sum * torch.exp(col_max - new_max) + torch.sub(s, new_max).exp_().sum(dim=0)
            col_max = new_max
            if dropped is not None:
                s.masked_fill_(dropped, float("-inf"))
            parts.append(_lse_rows_(s))
        row_lse = torch.cat(parts) if parts else video.new_empty((0,))
        col_lse = col_sum.log() + col_max if rows else video.new_full((cols,), float("-inf"))
        ctx.save_for_backward(video, text, dropped, row_lse, col_lse)
        ctx.scale = scale
        return row_lse, col_lse

    @staticmethod
    def backward(ctx, grad_row: Tensor, grad_col: Tensor):
        video, text, dropped, row_lse, col_lse = ctx.saved_tensors
        scale = ctx.scale
        rows, cols = video.shape[0], text.shape[0]
        step = _chunk_rows(cols)
        text_t = text.t()
        grad_row = (grad_row * scale)[:, None]
        grad_col = grad_col * scale
        d_text = torch.zeros_like(text)
        parts = []
        for r0 in range(0, rows, step):
            v = video[r0 : r0 + step]
            s = torch.mm(v * scale, text_t)  # (rows, B*K): the logits again
            g = torch.sub(s, col_lse).exp_().mul_(grad_col)  # column softmax, weighted
            p = s.sub_(row_lse[r0 : r0 + step, None]).exp_()  # row softmax, in place
            if dropped is not None:
                p.masked_fill_(dropped, 0.0)
            g.addcmul_(p, grad_row[r0 : r0 + step])
            parts.append(torch.mm(g, text))
            d_text.addmm_(g.t(), v)
        d_video = torch.cat(parts) if parts else torch.zeros_like(video)
        return d_video, d_text, None, None


def _symmetric_chunked(video: Tensor, text: Tensor, cand_mask: Optional[Tensor], scale: float):
    return _ChunkedSymmetricLSE.apply(video, text, cand_mask, scale)


class _ChunkedLSE(torch.autograd.Function):
    """``lse[r] = logsumexp_c (scale * anchors[r] . cands[c])`` over unmasked ``c``, a block of
    rows at a time; the backward recomputes each block from the saved ``lse``.

    Memory beyond inputs and gradients: one ``[rows, C]`` block (``_CHUNK_ELEMENTS``) and the
    ``[R]`` logsumexps. A row whose candidates are all masked gets ``-inf`` and zero gradient.
    """

    @staticmethod
    def forward(ctx, anchors: Tensor, cands: Tensor, cand_mask: Optional[Tensor], scale: float) -> Tensor:
        rows = anchors.shape[0]
        step = _chunk_rows(cands.shape[0])
        cands_t = cands.t()
        dropped = None if cand_mask is None else ~cand_mask
        parts = []
        for r0 in range(0, rows, step):
            s = torch.mm(anchors[r0 : r0 + step] * scale, cands_t)  # (rows, C)
            if dropped is not None:
                s.masked_fill_(dropped, float("-inf"))
            parts.append(_lse_rows_(s))
        lse = torch.cat(parts) if parts else anchors.new_empty((0,))
        ctx.save_for_backward(anchors, cands, dropped, lse)
        ctx.scale = scale
        return lse

    @staticmethod
    def backward(ctx, grad: Tensor):
        anchors, cands, dropped, lse = ctx.saved_tensors
        scale = ctx.scale
        need_a, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = anchors.shape[0]
        step = _chunk_rows(cands.shape[0])
        cands_t = cands.t()
        grad = grad * scale
        d_cands = torch.zeros_like(cands) if need_c else None
        parts = []
        for r0 in range(0, rows, step):
            a = anchors[r0 : r0 + step]
            p = torch.mm(a * scale, cands_t)  # (rows, C): the logits again
            p.sub_(lse[r0 : r0 + step, None]).exp_()  # softmax over the row
            if dropped is not None:
                p.masked_fill_(dropped, 0.0)  # also clears the NaN of an all-masked row
            p.mul_(grad[r0 : r0 + step, None])
            if need_a:
                parts.append(torch.mm(p, cands))
            if need_c:
                d_cands.addmm_(p.t(), a)
        d_anchors = (torch.cat(parts) if parts else torch.zeros_like(anchors)) if need_a else None
        return d_anchors, d_cands, None, None


def _lse_chunked(anchors: Tensor, cands: Tensor, cand_mask: Optional[Tensor], scale: float) -> Tensor:
    return _ChunkedLSE.apply(anchors, cands, cand_mask, scale)


def mil_nce_chunked(
    video: Tensor,
    text: Tensor,
    text_mask: Optional[Tensor] = None,
    video_all: Optional[Tensor] = None,
    text_all: Optional[Tensor] = None,
    text_mask_all: Optional[Tensor] = None,
    tau: float = DEFAULT_TAU,
) -> Tensor:
    """Per-clip MIL-NCE loss in plain PyTorch without the ``[B, N*K]`` matrix; arguments and
    result as :func:`mil_nce_reference` (computed in fp32, fp64 for fp64 inputs)."""
    has_mask = text_mask is not None or text_mask_all is not None
    args = _check_inputs(video, text, text_mask, video_all, text_all, text_mask_all, tau)
    dtype = _compute_dtype(*args[:2], *args[3:5])
    return _mil_nce_decomposed(_lse_chunked, dtype, *args, tau, has_mask, symmetric=_symmetric_chunked)


# ----------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------
MIL_NCE_IMPLS = ("auto", "triton", "reference", "chunked")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernel_dtype(*tensors: Tensor) -> Optional[torch.dtype]:
    """The dtype the kernels run in: the inputs' own when they share one of fp16/bf16/fp32,
    fp32 for a mix of those, None for anything else (float64)."""
    dtypes = {t.dtype for t in tensors}
    if not dtypes <= set(_KERNEL_DTYPES):
        return None
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


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
    """Per-clip MIL-NCE loss ``[B]``; arguments and result as :func:`mil_nce_reference`.

    Args:
        impl: ``"auto"``, ``"triton"``, ``"reference"``, ``"chunked"``, or None for
            ``$VATT_FAST_KERNELS`` (default ``auto``). ``"auto"``: the Triton kernels on
            CUDA tensors, the chunked PyTorch path elsewhere (and for float64 inputs).
            ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1`` and raises otherwise;
            it takes fp16, bf16 and fp32 embeddings (a mix runs in fp32).
    """
    if impl is not None and impl not in MIL_NCE_IMPLS:
        raise ValueError(f"impl={impl!r} for mil_nce is not one of {list(MIL_NCE_IMPLS)} (or None for the default)")
    args = (video, text, text_mask, video_all, text_all, text_mask_all, tau)
    if impl == "chunked":
        return mil_nce_chunked(*args)
    requested = default_impl() if impl is None else impl
    chosen = resolve_impl(requested, *[t for t in args[:-1] if t is not None], op="mil_nce")
    if chosen == "triton":
        floats = [t for t in (video, text, video_all, text_all) if t is not None]
        if requested != "auto" or _kernel_dtype(*floats) is not None:
            return get_triton("mil_nce")(*args)
    elif requested == "reference":
        return mil_nce_reference(*args)
    return mil_nce_chunked(*args)


def nce(
    video: Tensor,
    audio: Tensor,
    video_all: Optional[Tensor] = None,
    audio_all: Optional[Tensor] = None,
    tau: float = DEFAULT_TAU,
    impl: Optional[str] = None,
) -> Tensor:
    """Per-clip NCE loss ``[B]``; arguments as :func:`nce_reference`, ``impl`` as :func:`mil_nce`.

    NCE is MIL-NCE with one positive (K = 1), so it runs the ``mil_nce`` kernels.
    """
    return mil_nce(*_as_mil_nce(video, audio, video_all, audio_all), tau, impl)


# ----------------------------------------------------------------------------------------
# Triton kernels, launchers and their registration
# ----------------------------------------------------------------------------------------
TRITON_AVAILABLE = triton_available()
# Test hook: fill the forward output with NaN before the launch, so an unwritten element shows.
_POISON_OUTPUT = False

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _load_tile(ptr, rows, cols, row_ok, col_ok, stride_r, stride_c, UPCAST: tl.constexpr):
        """A ``[len(rows), len(cols)]`` tile, zeros outside; fp32 when UPCAST (the interpreter)."""
        x = tl.load(
            ptr + rows[:, None].to(tl.int64) * stride_r + cols[None, :] * stride_c,
            mask=row_ok[:, None] & col_ok[None, :], other=0.0,
        )
        if UPCAST:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _lse_fwd_kernel(
        a_ptr,  # (R, D) anchors, any strides
        c_ptr,  # (C, D) candidates, any strides
        cmask_ptr,  # (C,) bool, True = candidate present; a dummy when not HAS_MASK
        lse_ptr,  # (R,) fp32 out
        R, C, D,
        stride_ar, stride_ad, stride_cr, stride_cd,
        scale,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # read R*D + cdiv(R, BLOCK_R)*C*D elements, write R fp32
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        r_ok, d_ok = r < R, d < D
        a = _load_tile(a_ptr, r, d, r_ok, d_ok, stride_ar, stride_ad, UPCAST)  # (BLOCK_R, BLOCK_D)
        m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)  # running max
        l_i = tl.zeros((BLOCK_R,), tl.float32)  # running sum of exp(s - m_i)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < C
            if HAS_MASK:
                c_ok = c_ok & (tl.load(cmask_ptr + c, mask=c < C, other=0) != 0)
            cc = _load_tile(c_ptr, c, d, c_ok, d_ok, stride_cr, stride_cd, UPCAST)  # (BLOCK_C, BLOCK_D)
            s = tl.dot(a, tl.trans(cc), input_precision=PRECISION) * scale  # (BLOCK_R, BLOCK_C) fp32
            s = tl.where(c_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: no inf - inf
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
            m_i = m_new
        lse = tl.where(l_i > 0.0, m_i + tl.log(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + r, lse, mask=r_ok)

    @triton.jit
    def _lse_bwd_anchor_kernel(
        a_ptr,  # (R, D) anchors, any strides
        c_ptr,  # (C, D) candidates, any strides
        cmask_ptr,  # (C,) bool or a dummy when not HAS_MASK
        lse_ptr,  # (R,) fp32, from the forward
        g_ptr,  # (R,) fp32 upstream gradient, contiguous
        da_ptr,  # (R, D) out, contiguous, the anchors' dtype
        R, C, D,
        stride_ar, stride_ad, stride_cr, stride_cd,
        scale,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BWD_PRECISION: tl.constexpr,
    ):
        # d anchors[r] = g[r] * scale * sum_c p[r, c] cands[c];  p = exp(scale * a.c - lse[r])
        # read R*D + cdiv(R, BLOCK_R)*C*D elements, write R*D
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        r_ok, d_ok = r < R, d < D
        a = _load_tile(a_ptr, r, d, r_ok, d_ok, stride_ar, stride_ad, UPCAST)
        lse = tl.load(lse_ptr + r, mask=r_ok, other=0.0)
        g = tl.load(g_ptr + r, mask=r_ok, other=0.0)
        acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < C
            if HAS_MASK:
                c_ok = c_ok & (tl.load(cmask_ptr + c, mask=c < C, other=0) != 0)
            cc = _load_tile(c_ptr, c, d, c_ok, d_ok, stride_cr, stride_cd, UPCAST)
            s = tl.dot(a, tl.trans(cc), input_precision=PRECISION) * scale
            p = tl.where(c_ok[None, :], tl.exp(s - lse[:, None]), 0.0)  # (BLOCK_R, BLOCK_C) fp32
            acc += tl.dot(p, cc.to(tl.float32), input_precision=BWD_PRECISION)
        acc = acc * (g * scale)[:, None]
        out = da_ptr + r[:, None].to(tl.int64) * D + d[None, :]
        tl.store(out, acc.to(da_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _lse_bwd_cand_kernel(
        a_ptr,  # (R, D) anchors, any strides
        c_ptr,  # (C, D) candidates, any strides
        cmask_ptr,  # (C,) bool or a dummy when not HAS_MASK
        lse_ptr,  # (R,) fp32, from the forward
        g_ptr,  # (R,) fp32 upstream gradient, contiguous
        dc_ptr,  # (C, D) out, contiguous, the candidates' dtype
        R, C, D,
        stride_ar, stride_ad, stride_cr, stride_cd,
        scale,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BWD_PRECISION: tl.constexpr,
    ):
        # d cands[c] = scale * sum_r g[r] p[r, c] anchors[r]  (0 for a masked candidate)
        # read C*D + cdiv(C, BLOCK_C)*R*(D + 2) elements, write C*D
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        d = tl.arange(0, BLOCK_D)
        c_ok, d_ok = c < C, d < D
        if HAS_MASK:
            c_ok = c_ok & (tl.load(cmask_ptr + c, mask=c < C, other=0) != 0)
        cc = _load_tile(c_ptr, c, d, c_ok, d_ok, stride_cr, stride_cd, UPCAST)  # (BLOCK_C, BLOCK_D)
        acc = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            r_ok = r < R
            a = _load_tile(a_ptr, r, d, r_ok, d_ok, stride_ar, stride_ad, UPCAST)
            lse = tl.load(lse_ptr + r, mask=r_ok, other=0.0)
            g = tl.load(g_ptr + r, mask=r_ok, other=0.0)
            s = tl.dot(a, tl.trans(cc), input_precision=PRECISION) * scale  # (BLOCK_R, BLOCK_C)
            p = tl.where(r_ok[:, None] & c_ok[None, :], tl.exp(s - lse[:, None]), 0.0) * (g * scale)[:, None]
            acc += tl.dot(tl.trans(p), a.to(tl.float32), input_precision=BWD_PRECISION)
        out = dc_ptr + c[:, None].to(tl.int64) * D + d[None, :]
        tl.store(out, acc.to(dc_ptr.dtype.element_ty), mask=(c < C)[:, None] & d_ok[None, :])

    def _config(D: int, dtype: torch.dtype):
        """Launch constants: blocks, warps and the dot precisions (see the module docstring)."""
        block_d = max(16, triton.next_power_of_2(D))
        if INTERPRETING:
            block = 16  # small tiles: the tests' odd sizes span several of them
        else:
            block = 64 if block_d <= 128 else 32
        fp32 = "ieee" if INTERPRETING else "tf32x3"
        return dict(
            BLOCK_R=block, BLOCK_C=block, BLOCK_D=block_d, UPCAST=INTERPRETING,
            PRECISION=fp32 if dtype == torch.float32 or INTERPRETING else None,
        ), fp32, (4 if block_d <= 128 else 8)

    _library_op, _launch = library_op, launch  # module names: the tests patch _launch

    def _strides(anchors: torch.Tensor, cands: torch.Tensor) -> Tuple[int, int, int, int]:
        return anchors.stride(0), anchors.stride(1), cands.stride(0), cands.stride(1)

    @_library_op("vatt_fast::mil_nce_lse")
    def _lse_op(anchors: torch.Tensor, cands: torch.Tensor, cand_mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
        """``[R]`` fp32: ``logsumexp_c(scale * anchors[r] . cands[c])`` over the candidates with
        ``cand_mask[c]`` (all when None); ``-inf`` for a row without candidates."""
        R, D = anchors.shape
        C = cands.shape[0]
        fill = float("nan") if _POISON_OUTPUT else float("-inf")
        lse = torch.full((R,), fill, dtype=torch.float32, device=anchors.device)
        if R == 0 or C == 0:
            return lse.fill_(float("-inf"))
        mask = anchors if cand_mask is None else cand_mask.contiguous()
        consts, _, warps = _config(D, anchors.dtype)
        _launch(_lse_fwd_kernel)[(triton.cdiv(R, consts["BLOCK_R"]),)](
            anchors, cands, mask, lse, R, C, D, *_strides(anchors, cands), scale,
            HAS_MASK=cand_mask is not None, num_warps=warps, **consts,
        )
        return lse

    @_library_op("vatt_fast::mil_nce_lse_backward")
    def _lse_backward_op(
        grad: torch.Tensor, anchors: torch.Tensor, cands: torch.Tensor, cand_mask: Optional[torch.Tensor],
        lse: torch.Tensor, scale: float,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(d anchors [R, D], d cands [C, D])`` in the inputs' dtypes, for ``grad [R]`` on the
        output of ``mil_nce_lse``."""
        R, D = anchors.shape
        C = cands.shape[0]
        if R == 0 or C == 0 or D == 0:
            return anchors.new_zeros((R, D)), cands.new_zeros((C, D))
        d_anchors = torch.empty((R, D), dtype=anchors.dtype, device=anchors.device)  # every element written
        d_cands = torch.empty((C, D), dtype=cands.dtype, device=cands.device)
        grad = grad.to(torch.float32).contiguous()
        mask = anchors if cand_mask is None else cand_mask.contiguous()
        consts, bwd_precision, warps = _config(D, anchors.dtype)
        common = (R, C, D, *_strides(anchors, cands), scale)
        _launch(_lse_bwd_anchor_kernel)[(triton.cdiv(R, consts["BLOCK_R"]),)](
            anchors, cands, mask, lse, grad, d_anchors, *common,
            HAS_MASK=cand_mask is not None, BWD_PRECISION=bwd_precision, num_warps=warps, **consts,
        )
        _launch(_lse_bwd_cand_kernel)[(triton.cdiv(C, consts["BLOCK_C"]),)](
            anchors, cands, mask, lse, grad, d_cands, *common,
            HAS_MASK=cand_mask is not None, BWD_PRECISION=bwd_precision, num_warps=warps, **consts,
        )
        return d_anchors, d_cands

    if INTERPRETING:
        @_lse_op.register_fake
        def _(anchors, cands, cand_mask, scale):
            return anchors.new_empty((anchors.shape[0],), dtype=torch.float32)

        @_lse_backward_op.register_fake
        def _(grad, anchors, cands, cand_mask, lse, scale):
            return torch.empty_like(anchors, memory_format=torch.contiguous_format), torch.empty_like(
                cands, memory_format=torch.contiguous_format
            )

    def _setup_context(ctx, inputs, output):
        anchors, cands, cand_mask, scale = inputs
        ctx.save_for_backward(anchors, cands, cand_mask, output)
        ctx.scale = scale

    def _backward(ctx, grad):
        anchors, cands, cand_mask, lse = ctx.saved_tensors
        d_anchors, d_cands = _lse_backward_op(grad, anchors, cands, cand_mask, lse, ctx.scale)
        return d_anchors, d_cands, None, None

    _lse_op.register_autograd(_backward, setup_context=_setup_context)

    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.vatt_fast.mil_nce_lse)
    def _lse_flops(anchors_shape, cands_shape, *args, **kwargs) -> int:
        return 2 * anchors_shape[0] * cands_shape[0] * anchors_shape[1]

    @register_flop_formula(torch.ops.vatt_fast.mil_nce_lse_backward)
    def _lse_backward_flops(grad_shape, anchors_shape, cands_shape, *args, **kwargs) -> int:
        return 8 * anchors_shape[0] * cands_shape[0] * anchors_shape[1]  # two recomputes, two gradient products

    def _lse_triton(anchors: torch.Tensor, cands: torch.Tensor, cand_mask: Optional[torch.Tensor], scale: float):
        return _lse_op(anchors, cands, cand_mask, scale)

    def _mil_nce_triton(
        video: Tensor,
        text: Tensor,
        text_mask: Optional[Tensor] = None,
        video_all: Optional[Tensor] = None,
        text_all: Optional[Tensor] = None,
        text_mask_all: Optional[Tensor] = None,
        tau: float = DEFAULT_TAU,
    ) -> Tensor:
        """The Triton implementation :func:`mil_nce` dispatches to; arguments as :func:`mil_nce_reference`."""
        has_mask = text_mask is not None or text_mask_all is not None
        args = _check_inputs(video, text, text_mask, video_all, text_all, text_mask_all, tau)
        dtype = _kernel_dtype(*args[:2], *args[3:5])
        if dtype is None:
            raise TypeError(
                f"impl='triton' for mil_nce takes fp16, bf16 or fp32 embeddings, got "
                f"{sorted({str(t.dtype) for t in (*args[:2], *args[3:5])})}; use impl='chunked' or "
                f"'reference' for float64"
            )
        return _mil_nce_decomposed(_lse_triton, dtype, *args, tau, has_mask)

    register_triton("mil_nce", _mil_nce_triton)
