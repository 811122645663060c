"""The seeded dropout mask shared by the fused kernels (:mod:`.layer_norm`, :mod:`.bias_gelu`).

One contract for every op and ``impl``: element ``(r, c)`` of ``x`` seen as ``[M, D]`` rows is kept
where ``(philox4x32_10(key=seed, counter=(c, r, 0, 0))[0] >> 8) >= round(p * 2**24)``, kept values
scaled by ``1 / (1 - p)``. The Triton kernels compute it with ``tl.philox``; :func:`dropout_keep_mask`
reproduces it in plain PyTorch, so the references apply the very same mask. Here too: the seed
argument's checks and conversion, shared by the ops' boundaries. Full description in
:mod:`.layer_norm`'s docstring.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["SeedLike", "dropout_keep_mask"]

SeedLike = Union[None, int, torch.Tensor]

# --------------------------------------------------------------------------------------
# The dropout mask contract, in plain PyTorch
# --------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_ROUNDS = 10


def _mul_hi_lo(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(a * b) >> 32`` and ``(a * b) & 0xffffffff`` for a uint32 constant ``a`` and uint32 values
    ``b`` held in int64, without ever overflowing int64 (16-bit halves of ``a``)."""
    t_lo = b * (a & 0xFFFF)  # < 2**48
    t_hi = b * (a >> 16)  # < 2**48
    s = ((t_hi & 0xFFFF) << 16) + t_lo  # < 2**49
    return ((t_hi >> 16) + (s >> 32)) & _M32, s & _M32


def _threshold(p: float) -> int:
    """The 24-bit drop threshold of probability ``p``: drop where ``(philox >> 8) < threshold``."""
    return int(round(p * (1 << 24)))


def _seed_tensor(seed: SeedLike, device: torch.device) -> torch.Tensor:
    """``seed`` as an int64 ``[1]`` tensor on ``device``; ``None`` draws one from torch's generator."""
    if seed is None:
        return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        return seed.reshape(1)
    return torch.tensor([seed], dtype=torch.int64, device=device)


def dropout_keep_mask(seed: Union[int, torch.Tensor], shape: Sequence[int], dropout_p: float,
                      device: Optional[torch.device] = None) -> torch.Tensor:
    """The keep mask the Triton kernels regenerate for ``seed``, computed in plain PyTorch.

    Args:
        seed: an int in ``[0, 2**63)`` or an int64 tensor of one element (its device is used).
        shape: the shape of ``x``; its last dimension is the row width ``D``, the others flatten
            to the rows (``keep[r, c]`` as in the module docstring).
        dropout_p: drop probability in ``[0, 1)``.
        device: where to build the mask when ``seed`` is an int (default: the CPU).

    Returns:
        bool tensor of ``shape``, True where the element is kept.
    """
    _check_seed(seed, None, "dropout_keep_mask")
    _check_p(dropout_p, "dropout_keep_mask")
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        raise ValueError("dropout_keep_mask: shape must have at least one dimension (the row width D)")
    if isinstance(seed, torch.Tensor):
        device = seed.device
    device = torch.device("cpu") if device is None else torch.device(device)
    seed_t = _seed_tensor(seed, device).reshape(())
    D = shape[-1]
    M = 1
    for s in shape[:-1]:
        M *= s
    c0 = torch.arange(D, device=device, dtype=torch.int64).expand(M, D)  # column
    c1 = torch.arange(M, device=device, dtype=torch.int64).unsqueeze(1).expand(M, D)  # row
    c2 = torch.zeros((), device=device, dtype=torch.int64)
    c3 = c2
    k0, k1 = seed_t & _M32, (seed_t >> 32) & _M32
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return ((c0 >> 8) >= _threshold(dropout_p)).reshape(shape)


# --------------------------------------------------------------------------------------
# Checks at the boundary
# --------------------------------------------------------------------------------------
def _shape(t) -> object:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_p(p, what: str) -> None:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{what}: dropout_p must be a float in [0, 1), got {p!r}; use 0.0 for no dropout")


def _check_seed(seed, device: Optional[torch.device], what: str) -> None:
    if seed is None:
        return
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(
                f"{what}: a seed tensor must be int64 with one element, got dtype {seed.dtype} and shape "
                f"{tuple(seed.shape)}; e.g. torch.randint(0, 2**62, (1,), device=x.device)"
            )
        if device is not None and seed.device != device:
            raise ValueError(f"{what}: seed is on {seed.device} but x is on {device}; use seed.to({str(device)!r})")
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < 2**63:
        raise ValueError(f"{what}: seed must be None, an int in [0, 2**63) or an int64 tensor, got {seed!r}")
