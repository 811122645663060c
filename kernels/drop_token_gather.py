"""DropToken gather: keep a subset of the tokens (and add their position embedding).

``out[b, j] = x[b, keep[j]] (+ pos[keep[j]])`` with ``keep`` shared by the batch
(``[N_keep]``, one draw per step as the VATT release does) or per sample (``[B, N_keep]``).

The op pattern (DESIGN.md, "Kernels and dispatch"): :func:`drop_token_gather` validates once
(:func:`_check_gather_args`), resolves ``impl`` and calls a core that takes plain tensors:
``_gather_core_reference`` (plain PyTorch, left visible to Inductor) or the registered op
``torch.ops.vatt_fast.drop_token_gather`` (the Triton kernels below), whose backward is the op
``vatt_fast::drop_token_gather_backward``. Out-of-range indices are an error raised at the
boundary (a host-side check); the kernels trust ``keep``.

Reference: one gather (``index_select`` on rows) and one add, each a pass over
``B * N_keep * D`` elements; autograd's backward scatters (``index_add``).

Triton forward (``_gather_fwd_kernel``), one pass, each program a block of kept rows of one
sample by up to 128 columns: must move ``B * N_keep * D`` reads of ``x``, ``N_keep * D`` of
``pos`` (re-read for every sample; with a shared ``keep`` the repeats hit L2) and
``B * N_keep * D`` writes, plus the indices. ``x`` and ``pos`` are upcast to fp32 after the
loads, added, and rounded once to ``x``'s dtype (the reference rounds ``pos`` to ``x``'s dtype
first, so in fp16/bf16 the kernel is the closer of the two).

Triton backward (``_gather_bwd_kernel``): reads ``dout`` (``B * N_keep * D``) once; each
program walks the batch for its block of kept rows, adds ``dout[b, j]`` into
``dx[b, keep[j]]`` and sums the batch for ``dpos`` in fp32 registers (shared ``keep``; per
sample, each row goes to ``dpos`` directly). The trade-off: fp32 atomic adds into zero-filled
fp32 buffers, so repeated indices are correct (DropToken's are distinct, but nothing relies
on it) without sorting the indices, at the cost of a zero fill of ``dx`` (``B * N * D``; the
rows not kept need zeros anyway), one cast pass for fp16/bf16 ``x``, and an ``N * D`` fp32
``dpos``. With distinct indices every element gets exactly one add, so the result is
deterministic; where indices repeat (or per-sample draws share a token, for ``dpos``) the
order of the fp32 adds is not fixed on a GPU.

Registration, fixed at import time (the mode is fixed when a kernel is decorated; the
root conftest.py sets ``TRITON_INTERPRET`` before the import):

- compiled Triton (a GPU): the cores are ``torch.library.triton_op`` launching through
  ``wrap_triton``, so ``torch.compile`` traces into the kernels (Inductor sees them);
- ``TRITON_INTERPRET=1`` (CPU tests): the same cores, launched directly, are opaque
  ``torch.library.custom_op``s with a ``register_fake``. A ``triton_op`` under the
  interpreter would launch the kernel on fake tensors (opcheck's fake-tensor test and
  ``torch.compile`` fail: "set the storage of a tensor on device meta to a storage on cpu").

Both get the same ``register_autograd``; no FLOP formula is registered, as the op does no
arithmetic beyond one add per element. Without Triton installed nothing is registered and
``impl="triton"`` raises (``resolve_impl``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._dispatch import INTERPRETING, get_triton, launch, library_op, register_triton, resolve_impl, triton_available

__all__ = ["check_keep", "drop_token_gather", "drop_token_gather_reference", "select_tokens"]


def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


def check_keep(keep: Optional[torch.Tensor], batch: int, num_tokens: int, device: torch.device, what: str) -> None:
    """Validate a DropToken index tensor: ``None``, ``[N_keep]`` or ``[B, N_keep]`` integers in ``[0, N)``.

    The range check reads the indices back on the CPU in eager mode (``ValueError`` naming the
    index); on an accelerator and under ``torch.compile`` it is ``torch._assert_async`` (no host
    sync, no graph break), which fails at the next synchronising call with a ``RuntimeError``.
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
    if keep.numel() == 0:
        return
    if keep.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(keep))
        if lo < 0 or hi >= num_tokens:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{what}: keep holds token index {bad} but there are {num_tokens} tokens; "
                f"indices must lie in [0, {num_tokens - 1}]"
            )
        return
    # On an accelerator, and while torch.compile traces: no host sync and no graph break. The
    # check stays on the device; a bad index fails the next synchronising call with this message.
    torch._assert_async(
        ((keep >= 0) & (keep < num_tokens)).all(),
        f"{what}: keep holds a token index outside [0, {num_tokens - 1}] ({num_tokens} tokens)",
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


def _gather_core_reference(x: torch.Tensor, keep: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    """The reference core: plain PyTorch on checked arguments (Inductor can fuse it)."""
    out = select_tokens(x, keep)  # (B, N_keep, D)
    if pos is not None:
        out = out + pos[keep].to(x.dtype)  # (N_keep, D) or (B, N_keep, D)
    return out


def drop_token_gather_reference(
    x: torch.Tensor, keep: torch.Tensor, pos: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Plain PyTorch DropToken gather; the definition of correct for :func:`drop_token_gather`.

    Args: see :func:`drop_token_gather`.

    Returns:
        ``[B, N_keep, D]`` in ``x``'s dtype.
    """
    _check_gather_args(x, keep, pos)
    return _gather_core_reference(x, keep, pos)


def drop_token_gather(
    x: torch.Tensor, keep: torch.Tensor, pos: Optional[torch.Tensor] = None, impl: Optional[str] = None
) -> torch.Tensor:
    """Gather the tokens DropToken keeps, optionally adding their position embedding.

    Args:
        x: tokens ``[B, N, D]``.
        keep: int64 (or int32) token indices, ``[N_keep]`` shared by the batch or ``[B, N_keep]``
            per sample, each in ``[0, N)`` (checked here: a ``ValueError`` on the CPU, an asynchronous
            device assert on a GPU, with no host sync).
        pos: optional position embedding ``[N, D]``; ``pos[keep[j]]`` is added to token ``j``
            (cast to ``x``'s dtype; the Triton kernel adds in fp32 and rounds once).
        impl: ``"auto"``, ``"triton"``, ``"reference"`` or ``None`` for ``$VATT_FAST_KERNELS``.

    Returns:
        ``[B, N_keep, D]`` in ``x``'s dtype; differentiable in ``x`` and ``pos`` (the backward
        scatters into the kept rows, zeros elsewhere).
    """
    _check_gather_args(x, keep, pos)
    if resolve_impl(impl, x, keep, pos, op="drop_token_gather") == "triton":
        return get_triton("drop_token_gather")(x, keep, pos=pos)
    return _gather_core_reference(x, keep, pos)


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
    def _gather_fwd_kernel(
        x_ptr,  # (B, N, D), any strides
        keep_ptr,  # (N_keep,) or (B, N_keep) int32/int64
        pos_ptr,  # (N, D) or a dummy when not HAS_POS
        out_ptr,  # (B, N_keep, D) contiguous
        B, N_keep, D,
        stride_xb, stride_xn, stride_xd,
        stride_kb, stride_kj,  # stride_kb == 0 for a shared keep
        stride_pn, stride_pd,
        BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, HAS_POS: tl.constexpr,
    ):
        pid_r = tl.program_id(0)  # over B * cdiv(N_keep, BLOCK_J)
        pid_d = tl.program_id(1)  # over cdiv(D, BLOCK_D)
        blocks_j = tl.cdiv(N_keep, BLOCK_J)
        b = (pid_r // blocks_j).to(tl.int64)
        j = (pid_r % blocks_j) * BLOCK_J + tl.arange(0, BLOCK_J)  # (BLOCK_J,)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        mask_j = j < N_keep
        mask = mask_j[:, None] & (d < D)[None, :]
        idx = tl.load(keep_ptr + b * stride_kb + j * stride_kj, mask=mask_j, other=0).to(tl.int64)
        d64 = d.to(tl.int64)
        val = tl.load(
            x_ptr + b * stride_xb + idx[:, None] * stride_xn + d64[None, :] * stride_xd, mask=mask, other=0.0
        ).to(tl.float32)  # upcast after the load (bf16 arithmetic is wrong in the interpreter)
        if HAS_POS:
            val += tl.load(pos_ptr + idx[:, None] * stride_pn + d64[None, :] * stride_pd, mask=mask, other=0.0).to(
                tl.float32
            )
        out_rows = b * N_keep + j.to(tl.int64)
        tl.store(out_ptr + out_rows[:, None] * D + d64[None, :], val.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gather_bwd_kernel(
        grad_ptr,  # (B, N_keep, D), any strides (an expanded gradient has stride 0)
        keep_ptr,  # (N_keep,) or (B, N_keep) int32/int64
        dx_ptr,  # (B, N, D) fp32 contiguous, zero-filled
        dpos_ptr,  # (N, D) fp32 contiguous, zero-filled, or a dummy when not HAS_POS
        B, N, N_keep, D,
        stride_gb, stride_gj, stride_gd,
        stride_kb, stride_kj,
        BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, HAS_POS: tl.constexpr, SHARED: tl.constexpr,
    ):
        pid_j = tl.program_id(0)  # over cdiv(N_keep, BLOCK_J)
        pid_d = tl.program_id(1)  # over cdiv(D, BLOCK_D)
        j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)  # (BLOCK_J,)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        mask_j = j < N_keep
        mask = mask_j[:, None] & (d < D)[None, :]
        j64 = j.to(tl.int64)
        d64 = d.to(tl.int64)
        acc = tl.zeros((BLOCK_J, BLOCK_D), dtype=tl.float32)  # sum over the batch, for dpos
        # Pointers walk the batch (64-bit pointer arithmetic, no int32 offset overflow).
        k_ptrs = keep_ptr + j64 * stride_kj
        g_ptrs = grad_ptr + j64[:, None] * stride_gj + d64[None, :] * stride_gd
        dx_base = dx_ptr
        idx = tl.load(k_ptrs, mask=mask_j, other=0).to(tl.int64)
        for _ in range(0, B):
            if not SHARED:
                idx = tl.load(k_ptrs, mask=mask_j, other=0).to(tl.int64)
            g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.atomic_add(dx_base + idx[:, None] * D + d64[None, :], g, mask=mask)
            if HAS_POS:
                if SHARED:
                    acc += g
                else:
                    tl.atomic_add(dpos_ptr + idx[:, None] * D + d64[None, :], g, mask=mask)
            k_ptrs += stride_kb
            g_ptrs += stride_gb
            dx_base += N * D
        if HAS_POS and SHARED:
            tl.atomic_add(dpos_ptr + idx[:, None] * D + d64[None, :], acc, mask=mask)

    def _blocks(D: int) -> Tuple[int, int]:
        """(BLOCK_J, BLOCK_D): 16 to 128 columns (a power of two) and 2048 elements per program.

        Comparisons only, so a symbolic ``D`` (dynamic shapes under torch.compile) just guards.
        """
        block_d = 16
        while block_d < D and block_d < 128:
            block_d *= 2
        return 2048 // block_d, block_d

    _library_op, _launch = library_op, launch  # module names: the tests patch _launch

    @_library_op("vatt_fast::drop_token_gather")
    def _gather_op(x: torch.Tensor, keep: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
        """The Triton core: ``[B, N_keep, D]`` in ``x``'s dtype, on checked arguments."""
        B, N, D = x.shape
        n_keep = keep.shape[-1]
        if _POISON_OUTPUT:
            out = torch.full((B, n_keep, D), float("nan"), dtype=x.dtype, device=x.device)
        else:
            out = torch.empty((B, n_keep, D), dtype=x.dtype, device=x.device)
        if out.numel() == 0:
            return out
        block_j, block_d = _blocks(D)
        stride_kb = keep.stride(0) if keep.dim() == 2 else 0
        pos_arg = x if pos is None else pos
        grid = (B * triton.cdiv(n_keep, block_j), triton.cdiv(D, block_d))
        _launch(_gather_fwd_kernel)[grid](
            x, keep, pos_arg, out,
            B, n_keep, D,
            x.stride(0), x.stride(1), x.stride(2),
            stride_kb, keep.stride(-1),
            pos_arg.stride(0) if pos is not None else 0, pos_arg.stride(1) if pos is not None else 0,
            BLOCK_J=block_j, BLOCK_D=block_d, HAS_POS=pos is not None,
        )
        return out

    @_library_op("vatt_fast::drop_token_gather_backward")
    def _gather_backward_op(
        grad: torch.Tensor, keep: torch.Tensor, num_tokens: int, with_pos: bool
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(dx [B, N, D] in grad's dtype, dpos [N, D] fp32)``; ``dpos`` is ``[0]`` without ``pos``."""
        B, n_keep, D = grad.shape
        dx = torch.zeros((B, num_tokens, D), dtype=torch.float32, device=grad.device)
        dpos = torch.zeros((num_tokens, D) if with_pos else (0,), dtype=torch.float32, device=grad.device)
        if grad.numel() > 0:
            block_j, block_d = _blocks(D)
            grid = (triton.cdiv(n_keep, block_j), triton.cdiv(D, block_d))
            _launch(_gather_bwd_kernel)[grid](
                grad, keep, dx, dx if not with_pos else dpos,
                B, num_tokens, n_keep, D,
                grad.stride(0), grad.stride(1), grad.stride(2),
                keep.stride(0) if keep.dim() == 2 else 0, keep.stride(-1),
                BLOCK_J=block_j, BLOCK_D=block_d, HAS_POS=with_pos, SHARED=keep.dim() == 1,
            )
        return dx.to(grad.dtype), dpos

    if INTERPRETING:
        @_gather_op.register_fake
        def _(x, keep, pos):
            return x.new_empty((x.shape[0], keep.shape[-1], x.shape[2]))

        @_gather_backward_op.register_fake
        def _(grad, keep, num_tokens, with_pos):
            B, _, D = grad.shape
            dpos = grad.new_empty((num_tokens, D) if with_pos else (0,), dtype=torch.float32)
            return grad.new_empty((B, num_tokens, D)), dpos

    def _setup_context(ctx, inputs, output):
        x, keep, pos = inputs
        ctx.save_for_backward(keep)
        ctx.num_tokens = x.shape[1]
        ctx.pos_dtype = None if pos is None else pos.dtype

    def _backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        with_pos = ctx.pos_dtype is not None
        dx, dpos = _gather_backward_op(grad, keep, ctx.num_tokens, with_pos)
        return dx, None, (dpos.to(ctx.pos_dtype) if with_pos else None)

    _gather_op.register_autograd(_backward, setup_context=_setup_context)

    def _gather_triton(x: torch.Tensor, keep: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The Triton implementation :func:`drop_token_gather` dispatches to (arguments already checked)."""
        return _gather_op(x, keep, pos)

    register_triton("drop_token_gather", _gather_triton)
