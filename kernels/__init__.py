"""Fused ops of vatt_fast (installed as ``vatt_fast.kernels``).

Each op is reachable as ``op(..., impl=None|"auto"|"triton"|"reference")``; ``None`` takes the
process default from ``$VATT_FAST_KERNELS`` (see :mod:`vatt_fast.kernels._dispatch`).
"""

from . import nce  # the module: vatt_fast.kernels.nce.mil_nce / nce / *_reference
from ._dispatch import IMPLS, has_triton, register_triton, resolve_impl
from .drop_token_gather import drop_token_gather, drop_token_gather_reference
from .patch_embed import patch_embed, patch_embed_reference

__all__ = [
    "IMPLS",
    "drop_token_gather",
    "drop_token_gather_reference",
    "has_triton",
    "nce",
    "patch_embed",
    "patch_embed_reference",
    "register_triton",
    "resolve_impl",
]
