"""Multi-head self-attention with selectable kernels, and T5 relative position bias.

``Attention`` keeps timm's ViT parameter names (``qkv``, ``proj``) so timm weights
load, and routes the softmax(QK^T)V core to one of four backends:

========== ====================================================== =====================
backend    what runs                                               serves
========== ====================================================== =====================
flash_attn ``flash_attn.flash_attn_func`` (flash-attn package)      CUDA, fp16/bf16, no
                                                                   additive bias, Ampere+
xformers   ``xformers.ops.memory_efficient_attention``              CUDA, any float dtype,
                                                                   additive bias
sdpa       ``torch.nn.functional.scaled_dot_product_attention``     everything (picks
           (FlashAttention / cuDNN / efficient kernels inside)      its own kernel)
math       explicit softmax, fp32 accumulation: the reference      everything
========== ====================================================== =====================

``auto`` takes the first of flash_attn, xformers, sdpa that can serve the call at
hand (device, dtype, bias), so a text encoder with a relative position bias and a
video encoder without one get different kernels from the same module. Asking for a
backend by name that cannot serve the call raises and says why: there are no
silent fallbacks.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from typing import Callable, Dict, List, Optional

import torch

from ._init import trunc_normal_
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BACKENDS",
    "Attention",
    "RelativePositionBias",
    "attention",
    "available_backends",
    "padding_mask_to_bias",
    "relative_position_bucket",
    "resolve_backend",
    "set_attention_backend",
]

# Every name ``backend=`` accepts, ``auto`` first, then from fastest to slowest.
BACKENDS = ("auto", "flash_attn", "xformers", "sdpa", "math")
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256


# backend -> (module to import, attribute, pip name)
_OPTIONAL = {
    "flash_attn": ("flash_attn", "flash_attn_func", "flash-attn"),
    "xformers": ("xformers.ops", "memory_efficient_attention", "xformers"),
}
_KERNELS: Dict[str, Callable[..., Tensor]] = {}
_UNUSABLE: Dict[str, str] = {}  # backend -> why its package cannot be used


def _kernel(backend: str) -> Optional[Callable[..., Tensor]]:
    """The optional package's attention function, imported once; ``None`` if unusable.

    A package that is installed but fails to import (a wheel built against another
    torch is the usual case) counts as unusable, with the import error kept as reason.
    """
    if backend not in _KERNELS and backend not in _UNUSABLE:
        module_name, attr, pip_name = _OPTIONAL[backend]
        if importlib.util.find_spec(module_name.split(".")[0]) is None:
            _UNUSABLE[backend] = f"the {pip_name} package is not installed"
        else:
            try:
                _KERNELS[backend] = getattr(importlib.import_module(module_name), attr)
            except Exception as err:  # noqa: BLE001 - any import failure makes the backend unusable
                _UNUSABLE[backend] = f"the {pip_name} package is installed but failed to import ({type(err).__name__}: {err})"
    return _KERNELS.get(backend)


_CUDA_MAJOR: Dict[int, int] = {}  # device index -> compute capability major


def _cuda_major(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CUDA_MAJOR:
        _CUDA_MAJOR[index] = torch.cuda.get_device_capability(index)[0]
    return _CUDA_MAJOR[index]


def available_backends() -> List[str]:
    """Backends importable in this process, fastest first (``auto`` not included).

    ``flash_attn`` and ``xformers`` appear only when their packages import; they
    still serve CUDA tensors only. ``sdpa`` and ``math`` are always there.
    """
    names = [name for name in _OPTIONAL if _kernel(name) is not None]
    return names + ["sdpa", "math"]


def _check_name(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid backends: {list(BACKENDS)}")
    if backend in _OPTIONAL and _kernel(backend) is None:
        install = "pip install flash-attn --no-build-isolation" if backend == "flash_attn" else "pip install xformers"
        raise RuntimeError(
            f"attention backend {backend!r} is unusable: {_UNUSABLE[backend]}; install a build that "
            f"matches torch {torch.__version__} ({install}) or use backend='auto' or 'sdpa'"
        )
    return backend


def _why_not(backend: str, q: Tensor, has_bias: bool) -> Optional[str]:
    """Why ``backend`` cannot serve attention on ``q`` (``None`` when it can)."""
    if backend == "flash_attn":
        if _kernel("flash_attn") is None:
            return f"{_UNUSABLE['flash_attn']}; use backend='sdpa'"
        if q.device.type != "cuda":
            return f"flash_attn runs on CUDA tensors only, got a {q.device.type} tensor; use backend='sdpa'"
        if q.dtype not in _HALF_DTYPES:
            return (
                f"flash_attn needs float16 or bfloat16 inputs, got {q.dtype}; run under "
                f"torch.autocast('cuda', dtype=torch.bfloat16) or use backend='sdpa'"
            )
        if has_bias:
            return (
                "flash_attn takes no additive attention bias (a padding mask or relative position "
                "bias was given); use backend='xformers' or 'sdpa'"
            )
        if q.shape[-1] > _FLASH_MAX_HEAD_DIM:
            return f"flash_attn supports head_dim <= {_FLASH_MAX_HEAD_DIM}, got {q.shape[-1]}; use backend='sdpa'"
        if _cuda_major(q.device) < 8:
            return (
                f"flash_attn needs an Ampere or newer GPU (compute capability >= 8.0), got "
                f"{torch.cuda.get_device_name(q.device)}; use backend='sdpa'"
            )
        return None
    if backend == "xformers":
        if _kernel("xformers") is None:
            return f"{_UNUSABLE['xformers']}; use backend='sdpa'"
        if q.device.type != "cuda":
            return f"xformers runs on CUDA tensors only, got a {q.device.type} tensor; use backend='sdpa'"
        return None
    return None  # sdpa and math serve every call


def resolve_backend(backend: str, q: Tensor, has_bias: bool) -> str:
    """The concrete backend that will run attention on ``q``.

    Args:
        backend: one of :data:`BACKENDS`.
        q: the query, ``[B, N, H, head_dim]`` (only device, dtype and head_dim are read).
        has_bias: whether an additive bias (mask, relative positions) comes with the call.

    Returns:
        ``backend`` itself when named explicitly, else the fastest one that serves the call.

    Raises:
        ValueError: unknown name. RuntimeError: a named backend cannot serve this call.
    """
    _check_name(backend)
    if backend == "auto":
        for candidate in ("flash_attn", "xformers"):
            if _why_not(candidate, q, has_bias) is None:
                return candidate
        return "sdpa"
    reason = _why_not(backend, q, has_bias)
    if reason is not None:
        raise RuntimeError(f"attention backend {backend!r} cannot serve this call: {reason}")
    return backend


def padding_mask_to_bias(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Turn a key padding mask into an additive attention bias.

    Args:
        mask: ``[B, N]`` bool, ``True`` = real token (attend to it), ``False`` = padding.
        dtype: floating dtype of the bias.

    Returns:
        ``[B, 1, 1, N]``: 0 where ``mask`` is True, ``-inf`` where it is False;
        broadcasts over heads and queries. A query whose keys are all masked gets NaN
        (no distribution over zero keys), so keep at least one real key per row (the
        Encoder's aggregation token is never masked).
    """
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(
            f"padding mask must be a bool tensor [B, N] (True = real token), got dtype {mask.dtype} "
            f"shape {tuple(mask.shape)}; pass e.g. tokens != 0"
        )
    if not dtype.is_floating_point:
        raise ValueError(f"bias dtype must be floating point, got {dtype}")
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    bias = bias.masked_fill(~mask, float("-inf"))
    return bias[:, None, None, :]  # (B, 1, 1, N)


def _math_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], dropout_p: float, scale: float) -> Tensor:
    # q, k, v: (B, H, N, head_dim); softmax and both matmuls accumulate in fp32 (fp64 stays fp64).
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(acc) * scale) @ k.to(acc).transpose(-2, -1)  # (B, H, N, N)
    if bias is not None:
        scores = scores + bias.to(acc)
    probs = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return (probs @ v.to(acc)).to(q.dtype)  # (B, H, N, head_dim)


def _xformers_bias(bias: Tensor, B: int, H: int, N: int, dtype: torch.dtype) -> Tensor:
    # xformers wants a materialised [B, H, N, N] bias whose row stride is a multiple of 8:
    # allocate padded rows and view the first N columns.
    padded = torch.empty(B, H, N, N + (-N) % 8, dtype=dtype, device=bias.device)[..., :N]
    padded.copy_(bias.to(dtype).expand(B, H, N, N))
    return padded


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_bias: Optional[Tensor] = None,
    *,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """softmax(q k^T * scale + attn_bias) v, on the chosen backend.

    Args:
        q, k, v: ``[B, N, H, head_dim]`` (the flash-attn layout), same dtype and device.
        attn_bias: additive bias broadcastable to ``[B, H, N, N]`` (``-inf`` masks a key),
            or ``None``. Cast to the dtype of ``q``; gradients flow into it.
        dropout_p: dropout on the attention probabilities; pass 0 in eval.
        scale: softmax scale, default ``head_dim ** -0.5``.
        backend: one of :data:`BACKENDS`.

    Returns:
        ``[B, N, H, head_dim]``.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must all be [B, N, H, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, N, H, head_dim = q.shape
    if scale is None:
        scale = head_dim ** -0.5
    if attn_bias is not None:
        try:
            torch.broadcast_shapes(attn_bias.shape, (B, H, N, N))
        except RuntimeError:
            raise ValueError(
                f"attn_bias of shape {tuple(attn_bias.shape)} does not broadcast to [B, H, N, N] = "
                f"{[B, H, N, N]}; build it as [B or 1, H or 1, N, N] (a padding mask: [B, 1, 1, N])"
            ) from None
        if attn_bias.dim() < 4:
            attn_bias = attn_bias.reshape((1,) * (4 - attn_bias.dim()) + tuple(attn_bias.shape))
    impl = resolve_backend(backend, q, attn_bias is not None)

    if impl == "flash_attn":
        return _KERNELS["flash_attn"](q, k, v, dropout_p=dropout_p, softmax_scale=scale)
    if impl == "xformers":
        bias = None if attn_bias is None else _xformers_bias(attn_bias, B, H, N, q.dtype)
        return _KERNELS["xformers"](q, k, v, attn_bias=bias, p=dropout_p, scale=scale)

    # sdpa and math work in (B, H, N, head_dim); the transposes are views.
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if impl == "sdpa":
        bias = None if attn_bias is None else attn_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    else:
        out = _math_attention(qt, kt, vt, attn_bias, dropout_p, scale)
    return out.transpose(1, 2)  # (B, N, H, head_dim)


class Attention(nn.Module):
    """Multi-head self-attention, timm ViT compatible (``qkv``, ``proj``).

    Args:
        dim: token width D; must be divisible by ``num_heads``.
        num_heads: number of heads H (head_dim = D / H).
        qkv_bias: bias on the fused qkv projection (timm default for ViT: True).
        attn_drop: dropout on attention probabilities, training only.
        proj_drop: dropout after the output projection, training only.
        backend: attention kernel, one of :data:`BACKENDS`; changeable later through
            the ``backend`` attribute or :func:`set_attention_backend`.

    Shapes:
        forward(x ``[B, N, D]``, attn_bias ``None`` or broadcastable to ``[B, H, N, N]``)
        -> ``[B, N, D]``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}; pick num_heads that divides dim")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        available_backends()  # import the optional kernels now, not inside a torch.compile trace
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = _check_name(value)

    def forward(self, x: Tensor, attn_bias: Optional[Tensor] = None) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, head_dim)
        q, k, v = qkv.unbind(2)  # each (B, N, H, head_dim)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = attention(q, k, v, attn_bias, dropout_p=dropout_p, scale=self.scale, backend=self._backend)
        x = self.proj(out.reshape(B, N, D))  # (B, N, D)
        return self.proj_drop(x)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self._backend!r}"


def set_attention_backend(module: nn.Module, backend: str) -> nn.Module:
    """Set ``backend`` on every :class:`Attention` inside ``module``; returns ``module``.

    Raises:
        ValueError: unknown backend name, or ``module`` holds no ``Attention``.
        RuntimeError: the backend's package is not installed.
    """
    _check_name(backend)
    layers = [m for m in module.modules() if isinstance(m, Attention)]
    if not layers:
        raise ValueError(f"{type(module).__name__} contains no vatt_fast Attention layer to set a backend on")
    for layer in layers:
        layer.backend = backend
    return module


def relative_position_bucket(
    relative_position: Tensor,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Tensor:
    """T5's bucketing of ``key_position - query_position`` (Raffel et al. 2020).

    Half the buckets (per direction when bidirectional) hold exact distances
    0 .. max_exact-1; the rest are log-spaced up to ``max_distance``, and farther
    distances share the last bucket. Bidirectional: keys after the query
    (positive relative position) use buckets ``num_buckets // 2 ..``. Unidirectional:
    keys after the query all fall into bucket 0.

    Args:
        relative_position: int tensor of any shape, ``key_pos - query_pos``.

    Returns:
        int64 tensor of the same shape with values in ``[0, num_buckets)``.
    """
    relative_position = relative_position.long()
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # clamp(min=1) only avoids log(0) in lanes that is_small discards anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    if_large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    if_large = if_large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, if_large)


class RelativePositionBias(nn.Module):
    """Learned T5 relative position bias, one scalar per (bucket, head).

    Args:
        num_heads: heads H of the attention it feeds.
        num_buckets: buckets of relative distance (T5 and VATT: 32).
        max_distance: distance beyond which all positions share the last bucket
            (T5: 128, VATT release: 64).
        bidirectional: encoder-style (True) or causal (False) bucketing.

    Shapes:
        forward(q_len, k_len) -> ``[1, H, q_len, k_len]``, to add to attention scores.
    """

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 64, bidirectional: bool = True) -> None:
        super().__init__()
        if num_buckets < 4 or (bidirectional and num_buckets % 2):
            raise ValueError(
                f"num_buckets must be >= 4 (and even when bidirectional), got {num_buckets} "
                f"with bidirectional={bidirectional}"
            )
        self.num_heads = num_heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)
        trunc_normal_(self.relative_attention_bias.weight, std=0.02)

    relative_position_bucket = staticmethod(relative_position_bucket)

    def forward(self, q_len: int, k_len: int, device: Optional[torch.device] = None) -> Tensor:
        """Bias for ``q_len`` queries against ``k_len`` keys, ``[1, H, q_len, k_len]``.

        ``device`` defaults to the table's device; the result is moved there if it differs.
        """
        weight_device = self.relative_attention_bias.weight.device
        context = torch.arange(q_len, device=weight_device)[:, None]
        memory = torch.arange(k_len, device=weight_device)[None, :]
        buckets = relative_position_bucket(
            memory - context, self.bidirectional, self.num_buckets, self.max_distance
        )  # (q_len, k_len)
        values = self.relative_attention_bias(buckets)  # (q_len, k_len, H)
        values = values.permute(2, 0, 1).unsqueeze(0)  # (1, H, q_len, k_len)
        return values if device is None else values.to(device)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_buckets={self.num_buckets}, "
            f"max_distance={self.max_distance}, bidirectional={self.bidirectional}"
        )
