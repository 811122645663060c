"""Fused ops of vatt_fast (installed as ``vatt_fast.kernels``).

Each op is reachable as ``op(..., impl=None|"auto"|"triton"|"reference")``; ``None`` takes the
process default from ``$VATT_FAST_KERNELS`` (see :mod:`vatt_fast.kernels._dispatch`).
"""

from . import bias_gelu, layer_norm, nce  # modules: vatt_fast.kernels.nce.mil_nce / nce / *_reference
from ._dispatch import IMPLS, has_triton, register_triton, resolve_impl
from .bias_gelu import bias_gelu_dropout, bias_gelu_dropout_reference
from .drop_token_gather import drop_token_gather, drop_token_gather_reference
from .layer_norm import dropout_add_layer_norm, dropout_add_layer_norm_reference, dropout_keep_mask
from .patch_embed import patch_embed, patch_embed_reference

__all__ = [
    "IMPLS",
    "bias_gelu",
    "bias_gelu_dropout",
    "bias_gelu_dropout_reference",
    "drop_token_gather",
    "drop_token_gather_reference",
    "dropout_add_layer_norm",
    "dropout_add_layer_norm_reference",
    "dropout_keep_mask",
    "has_triton",
    "layer_norm",
    "nce",
    "patch_embed",
    "patch_embed_reference",
    "register_triton",
    "resolve_impl",
]
