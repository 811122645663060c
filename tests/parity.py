"""STYLE.md's parity rule, shared by the tests and the benchmarks.

    max|out - ref| <= 2 * max|plain - ref| + atol

``ref`` is computed in float64 (on the CPU, or on the device: float64 has no TF32 mode).
``plain`` is the plain PyTorch computation in the same dtype, on the same device and
under the same global settings as ``out`` (autocast, ``torch.backends.cuda.matmul`` and
``torch.backends.cudnn`` TF32 flags). Its error is the noise that dtype, device and
settings admit, so the bound adapts: tight in fp32 on a CPU, wider where cuDNN runs an
fp32 convolution in TF32 (PyTorch's default on Ampere and newer), wider still in bf16.
``atol`` is the floor for the case where ``plain`` happens to be (nearly) exact.

The project never changes the TF32 flags inside the library: a layer runs in TF32 exactly
when the user's PyTorch settings say so (the trainer turns TF32 on for ``--precision fp32``
on CUDA). A test therefore does not pin the flags; it compares against a plain PyTorch
computation run under the same ones.
"""

from __future__ import annotations

from typing import Optional

import torch


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|x - ref|`` in float64 on the CPU, for tensors of any dtype on any devices."""
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs reference {tuple(ref.shape)}")
    if x.numel() == 0:
        return 0.0
    return (x.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item()


def assert_parity(
    out: torch.Tensor,
    ref: torch.Tensor,
    plain: torch.Tensor,
    atol: float,
    name: str = "output",
    plain_rtol: Optional[float] = None,
) -> float:
    """Assert ``max|out - ref| <= 2 * max|plain - ref| + atol`` (NaN anywhere fails).

    Args:
        out: the implementation under test.
        ref: float64 reference (any device).
        plain: plain PyTorch in the dtype, device and settings of ``out``.
        atol: absolute floor of the bound.
        name: what is compared, for the message.
        plain_rtol: when given, also require ``max|plain - ref| <= plain_rtol * max|ref|``, so
            that a wrong comparator cannot loosen the bound unnoticed.

    Returns:
        The bound that was applied.
    """
    err, base = max_error(out, ref), max_error(plain, ref)
    if plain_rtol is not None:
        scale = ref.detach().abs().max().item() if ref.numel() else 0.0
        assert base <= plain_rtol * scale, (
            f"{name}: the plain PyTorch comparator is off the float64 reference by {base:.3g}, more than "
            f"{plain_rtol:g} x max|ref| = {plain_rtol * scale:.3g}; the comparator does not compute the same thing"
        )
    limit = 2 * base + atol
    assert err <= limit, (
        f"{name}: max error {err:.3g} > 2 * {base:.3g} (plain PyTorch, same dtype and device) + {atol:g} = {limit:.3g}"
    )
    return limit
