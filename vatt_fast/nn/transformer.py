"""Pre-LayerNorm Transformer blocks and the VATT encoder.

``Mlp`` and ``Block`` use timm's ViT parameter names (``norm1``, ``attn.qkv``,
``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``), so a timm ViT block's
state_dict loads into ``Block`` and gives the same output. ``Encoder`` prepends
VATT's learned aggregation token, runs the blocks, applies a final LayerNorm, and
returns the aggregation token's final state as the pooled feature.

Each of ``Mlp``, ``Block`` and ``Encoder`` has an ``impl`` (``"auto"`` | ``"triton"`` |
``"reference"``, fixed when built or set, ``None`` = ``$VATT_FAST_KERNELS``; as the layers of
:mod:`.embed`). ``"reference"``, and ``"auto"`` off CUDA, run the plain module path. ``"triton"``,
and ``"auto"`` on CUDA with Triton, run the fused path with the same parameters (state_dicts load
either way), flash-attention's pre-LN ``Block`` pattern:

- ``Mlp``: ``F.linear(x, fc1.weight)`` then :func:`~vatt_fast.kernels.bias_gelu.bias_gelu_dropout`
  (``fc1.bias`` + exact GELU + ``drop1`` in one kernel), then ``fc2``.
- ``Encoder``: each block takes and returns ``(x, pending)``, ``pending`` being the previous block's
  ``fc2`` output not yet added; the residual add, its dropout and the next LayerNorm are one
  :func:`~vatt_fast.kernels.layer_norm.dropout_add_layer_norm`::

      y1, x = dropout_add_layer_norm(pending, x, norm1)   # block 0: y1 = norm1(x)
      y2, x = dropout_add_layer_norm(attn(y1), x, norm2)  # attn without its proj_drop
      pending = mlp(y2)                                    # fc2 output without drop2
      ...
      states = dropout_add_layer_norm(pending, x, norm, prenorm=False)  # the final norm

Dropout masks of the fused path come from seeds drawn from torch's generator, one vector per
encoder forward for all its fused ops (``torch.manual_seed`` reproduces them; activation
checkpointing passes the same ones to the recomputation), not from ``nn.Dropout``; the
modules' ``p`` values are still read from the ``nn.Dropout`` attributes.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vatt_fast.kernels._dispatch import resolve_impl
from vatt_fast.kernels.bias_gelu import bias_gelu_dropout
from vatt_fast.kernels.layer_norm import MAX_TRITON_DIM, dropout_add_layer_norm

from ._init import trunc_normal_
from .attention import Attention, RelativePositionBias, padding_mask_to_bias
from .embed import resolve_layer_impl

__all__ = ["Mlp", "Block", "Encoder", "init_weights"]


def _fused(impl: str, x: Tensor) -> bool:
    """Whether a layer with kernel ``impl`` runs the fused path for ``x``: ``"triton"`` always (the
    ops raise where Triton cannot run, never falling back silently), ``"auto"`` on CUDA with Triton
    and a width the LayerNorm kernel keeps in registers, ``"reference"`` never."""
    if impl == "auto" and x.shape[-1] > MAX_TRITON_DIM:
        return False
    return (
        resolve_impl(impl, x, op="dropout_add_layer_norm") == "triton"
        and resolve_impl(impl, x, op="bias_gelu_dropout") == "triton"
    )


def _layer_norm_fused(norm: nn.LayerNorm, x: Tensor, residual: Optional[Tensor], p: float, training: bool,
                      prenorm: bool, seed: Optional[Tensor] = None):
    """``dropout_add_layer_norm`` with ``norm``'s affine and epsilon, on the Triton kernel."""
    return dropout_add_layer_norm(x, residual, norm.weight, norm.bias, dropout_p=p, eps=norm.eps, training=training,
                                  seed=seed, prenorm=prenorm, impl="triton")


def _seed(seeds: Optional[Tensor], i: int) -> Optional[Tensor]:
    """Element ``i`` of a seed vector as the one-element view the fused ops take (no copy, no kernel)."""
    return None if seeds is None else seeds[i : i + 1]


class Mlp(nn.Module):
    """Linear -> GELU (exact) -> dropout -> Linear -> dropout, timm names ``fc1``/``act``/``fc2``.

    Args:
        in_features: input and output width D.
        hidden_features: inner width (VATT: 4 D).
        drop: dropout after the activation and after ``fc2``, training only.
        impl: kernel implementation (module docstring); the fused path computes
            ``fc1.bias`` + GELU + ``drop1`` in one kernel after a bias-free ``fc1`` product.

    Shapes:
        ``[..., D]`` -> ``[..., D]``.
    """

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0, impl: Optional[str] = None) -> None:
        super().__init__()
        self.impl = resolve_layer_impl(impl)
        self.fc1 = nn.Linear(in_features, hidden_features)
        # The fused path feeds fc1.bias to bias_gelu_dropout itself, in fp32: bf16 compute copies of the
        # Linear weights (vatt_fast.training.compute_weights) must leave it alone.
        self.fc1.keep_fp32 = ("bias",)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward_fused(self, x: Tensor, seed: Optional[Tensor] = None) -> Tensor:
        """The fused path up to ``fc2``, without ``drop2`` (``[..., D]`` -> ``[..., D]``); ``seed``: the
        dropout seed of ``drop1`` (int64 ``[1]``), ``None`` to draw one."""
        if not (isinstance(self.act, nn.GELU) and self.act.approximate == "none"):
            raise ValueError(f"the fused Mlp path computes the exact GELU, but act is {self.act}; use impl='reference'")
        h = F.linear(x, self.fc1.weight)  # (..., hidden), the bias goes into the fused op
        h = bias_gelu_dropout(h, self.fc1.bias, dropout_p=self.drop1.p, training=self.training, seed=seed,
                              impl="triton")
        return self.fc2(h)

    def forward(self, x: Tensor) -> Tensor:
        if _fused(self.impl, x):
            return self.drop2(self.forward_fused(x))
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"


class Block(nn.Module):
    """Pre-LN Transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    Drop-in for timm's ViT ``Block`` (same parameter names; timm's ``qkv_bias``
    default is False, ours True as in ViT checkpoints). Arguments after
    ``num_heads`` are keyword-only, so ``Block(d, h, 3072)`` cannot silently mean a
    ratio in one library and a width in the other.

    Args:
        dim: token width D.
        num_heads: attention heads.
        mlp_dim: MLP inner width; default ``int(dim * mlp_ratio)``.
        mlp_ratio: used when ``mlp_dim`` is None.
        qkv_bias: bias on the qkv projection.
        drop: dropout on both residual branches (after ``attn.proj`` and ``mlp.fc2``)
            and after the MLP activation, training only.
        attn_drop: dropout on attention probabilities, training only.
        norm_eps: LayerNorm epsilon (VATT and timm ViT: 1e-6).
        backend: attention backend, see :mod:`vatt_fast.nn.attention`.
        impl: kernel implementation of the block and its ``mlp`` (module docstring).

    Shapes:
        forward(x ``[B, N, D]``, attn_bias ``None`` or broadcastable to ``[B, H, N, N]``) -> ``[B, N, D]``.
        forward_fused(x, pending ``None`` or ``[B, N, D]``, attn_bias, pending_drop) -> (x, pending).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_dim: Optional[int] = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        norm_eps: float = 1e-6,
        backend: str = "auto",
        impl: Optional[str] = None,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio) if mlp_dim is None else mlp_dim
        self.impl = resolve_layer_impl(impl)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, backend=backend)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden, drop=drop, impl=self.impl)

    def forward_fused(
        self, x: Tensor, pending: Optional[Tensor] = None, attn_bias: Optional[Tensor] = None, pending_drop: float = 0.0,
        seeds: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """The fused path: ``x`` is the residual stream without ``pending``, the previous block's
        ``fc2`` output not yet added (``None`` for the first block), which is added here with dropout
        ``pending_drop`` (that block's ``mlp.drop2.p``). Returns the new ``(x, pending)``; the caller
        adds the returned ``pending`` (the next block's ``norm1``, or the encoder's final norm).
        ``seeds``: int64 ``[3]``, the dropout seeds of ``norm1``'s add, ``norm2``'s add and ``drop1``
        (the encoder draws one vector for all its blocks); ``None``: each op draws its own."""
        if pending is None:
            y = _layer_norm_fused(self.norm1, x, None, 0.0, self.training, prenorm=False)  # (B, N, D)
        else:
            y, x = _layer_norm_fused(self.norm1, pending, x, pending_drop, self.training, prenorm=True,
                                     seed=_seed(seeds, 0))
        a = self.attn.forward_branch(y, attn_bias)  # (B, N, D), before proj_drop
        y, x = _layer_norm_fused(self.norm2, a, x, self.attn.proj_drop.p, self.training, prenorm=True,
                                 seed=_seed(seeds, 1))
        return x, self.mlp.forward_fused(y, seed=_seed(seeds, 2))

    def forward(self, x: Tensor, attn_bias: Optional[Tensor] = None) -> Tensor:
        if _fused(self.impl, x):
            x, pending = self.forward_fused(x, None, attn_bias)
            return x + self.mlp.drop2(pending)
        x = x + self.attn(self.norm1(x), attn_bias)
        x = x + self.mlp(self.norm2(x))
        return x

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"


def init_weights(module: nn.Module) -> None:
    """ViT/VATT init for one module (use with ``model.apply``): trunc-normal(0.02)
    Linear weights and zero biases, LayerNorm ones and zeros."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Encoder(nn.Module):
    """VATT Transformer encoder: aggregation token + ``depth`` pre-LN blocks + final LayerNorm.

    Args:
        dim: token width D.
        depth: number of blocks.
        num_heads: attention heads per block.
        mlp_dim: MLP inner width.
        drop: residual-branch dropout (VATT pretraining: 0.1).
        attn_drop: attention-probability dropout (VATT pretraining: 0.1).
        norm_eps: LayerNorm epsilon.
        use_agg_token: prepend the learned aggregation token ``agg_token [1, 1, D]`` and
            pool its final state; without it the pooled feature is the mean over real tokens.
        rel_pos_bias: add a T5 relative position bias (text encoder). It is computed
            once per forward from one table (``rel_pos``) and added in every layer,
            as T5 shares the first layer's bias. Positions count the aggregation token
            as position 0.
        rel_pos_buckets: T5 buckets (VATT: 32).
        rel_pos_max_distance: T5 max distance (VATT release: 64).
        backend: attention backend of every block.
        grad_checkpointing: recompute each block in backward instead of storing its
            activations (``torch.utils.checkpoint``, non-reentrant); also
            :meth:`set_grad_checkpointing`.
        impl: kernel implementation of the encoder and its blocks (module docstring). The
            encoder's own ``impl`` picks the path of the whole stack (the fused path calls
            :meth:`Block.forward_fused`); a block's ``impl`` matters when it is called alone.

    Shapes:
        forward(x ``[B, N, D]``, padding_mask ``[B, N]`` bool (True = real token) or None,
        attn_bias broadcastable to ``[B, H, N', N']`` or None, with ``N' = N + 1`` when
        the aggregation token is used) -> (pooled ``[B, D]``, states ``[B, N', D]``).
        Without the aggregation token, a sample whose tokens are all padding gives NaN.
        ``states`` are after the final LayerNorm; with the aggregation token,
        ``pooled == states[:, 0]``.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        norm_eps: float = 1e-6,
        use_agg_token: bool = True,
        rel_pos_bias: bool = False,
        rel_pos_buckets: int = 32,
        rel_pos_max_distance: int = 64,
        backend: str = "auto",
        grad_checkpointing: bool = False,
        impl: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.impl = resolve_layer_impl(impl)
        self.dim = dim
        self.num_heads = num_heads
        self.use_agg_token = use_agg_token
        self.grad_checkpointing = grad_checkpointing
        self.agg_token = nn.Parameter(torch.zeros(1, 1, dim)) if use_agg_token else None
        self.rel_pos = (
            RelativePositionBias(num_heads, num_buckets=rel_pos_buckets, max_distance=rel_pos_max_distance)
            if rel_pos_bias
            else None
        )
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_dim=mlp_dim, drop=drop, attn_drop=attn_drop, norm_eps=norm_eps, backend=backend,
                  impl=self.impl)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise: trunc-normal(0.02) Linear weights, aggregation token and
        relative bias table; zero biases; LayerNorm ones and zeros."""
        self.apply(init_weights)
        if self.agg_token is not None:
            trunc_normal_(self.agg_token, std=0.02)
        if self.rel_pos is not None:
            trunc_normal_(self.rel_pos.relative_attention_bias.weight, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing of the blocks on or off (timm's method name)."""
        self.grad_checkpointing = enable

    def forward(
        self,
        x: Tensor,
        padding_mask: Optional[Tensor] = None,
        attn_bias: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"Encoder expects tokens [B, N, {self.dim}], got {tuple(x.shape)}")
        B, N, _ = x.shape
        if padding_mask is not None and tuple(padding_mask.shape) != (B, N):
            raise ValueError(
                f"padding_mask must be [B, N] = {[B, N]} (True = real token), got {tuple(padding_mask.shape)}"
            )
        if self.agg_token is not None:
            x = torch.cat([self.agg_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, N + 1, D)
            if padding_mask is not None:
                keep_agg = torch.ones(B, 1, dtype=torch.bool, device=padding_mask.device)
                padding_mask = torch.cat([keep_agg, padding_mask], dim=1)  # (B, N + 1)
        L = x.shape[1]

        bias = attn_bias
        if self.rel_pos is not None:
            rel = self.rel_pos(L, L)  # (1, H, L, L), shared by every layer
            bias = rel if bias is None else bias + rel
        if padding_mask is not None:
            pad = padding_mask_to_bias(padding_mask, dtype=torch.float32 if bias is None else bias.dtype)
            bias = pad if bias is None else bias + pad  # (B, H or 1, L or 1, L)

        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        if _fused(self.impl, x):
            x = self._blocks_fused(x, bias, checkpointing)  # (B, L, D), after the final norm
        else:
            for block in self.blocks:
                if checkpointing:
                    x = checkpoint(block, x, bias, use_reentrant=False)
                else:
                    x = block(x, bias)
            x = self.norm(x)  # (B, L, D)

        if self.agg_token is not None:
            pooled = x[:, 0]
        elif padding_mask is None:
            pooled = x.mean(dim=1)
        else:
            weights = padding_mask.to(x.dtype).unsqueeze(-1)  # (B, N, 1)
            pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return pooled, x

    def _blocks_fused(self, x: Tensor, bias: Optional[Tensor], checkpointing: bool) -> Tensor:
        """The blocks and the final norm on the fused path, carrying each block's ``fc2`` output
        (``pending``) into the next LayerNorm; states ``[B, L, D]`` in x's dtype."""
        pending, pending_drop = None, 0.0
        # Every dropout seed of the stack in one draw (3 per block, one for the final norm), instead
        # of one small random kernel per fused op; each op reads its element through a view.
        # Drawn only when some op drops (an unused draw would still advance the generator in eager
        # mode, while a compiled graph may drop it, and the two would then see different DropToken draws).
        seeds = None
        drops = [p for b in self.blocks for p in (b.attn.proj_drop.p, b.mlp.drop1.p, b.mlp.drop2.p)]
        if self.training and any(p > 0 for p in drops):
            seeds = torch.randint(0, 2**62, (3 * len(self.blocks) + 1,), device=x.device, dtype=torch.int64)
        for i, block in enumerate(self.blocks):
            block_seeds = None if seeds is None else seeds[3 * i : 3 * i + 3]
            if checkpointing:
                x, pending = checkpoint(block.forward_fused, x, pending, bias, pending_drop, block_seeds,
                                        use_reentrant=False)
            else:
                x, pending = block.forward_fused(x, pending, bias, pending_drop, block_seeds)
            pending_drop = block.mlp.drop2.p
        if pending is None:  # no blocks
            return _layer_norm_fused(self.norm, x, None, 0.0, self.training, prenorm=False)
        # pending (bf16 under autocast) is cast to the stream's dtype so the states keep it, as self.norm(x) does
        return _layer_norm_fused(self.norm, pending.to(x.dtype), x, pending_drop, self.training, prenorm=False,
                                 seed=_seed(seeds, 3 * len(self.blocks)))
