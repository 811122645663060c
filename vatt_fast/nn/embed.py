"""Tokenizers of VATT: video tubelets, waveform segments, words; and DropToken.

Drop-in ``nn.Module`` layers over :mod:`vatt_fast.kernels`:

- :class:`VideoPatchEmbed`: raw pixels ``[B, T, H, W, 3]`` (uint8 or float 0..255) -> tokens,
  with VATT's factorised (time, height, width) learned position embedding.
- :class:`AudioPatchEmbed`: waveform ``[B, S]`` -> tokens, one learned position table.
- :class:`TextEmbed`: word ids -> vectors (optionally a frozen word table then a dense layer).
- :class:`DropToken`: draws which tokens to keep during training; the patch embeds take the
  draw (``keep``) and compute only the kept tokens.

Parameter names are stable: ``proj.weight`` / ``proj.bias`` are a real ``nn.Conv3d``
(``nn.Conv1d``) so state_dicts of Conv-based patch embeddings load directly.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from vatt_fast.kernels import IMPLS
from vatt_fast.kernels._dispatch import default_impl
from vatt_fast.kernels.drop_token_gather import drop_token_gather
from vatt_fast.kernels.patch_embed import patch_embed

from ._init import trunc_normal_

__all__ = ["AudioPatchEmbed", "DropToken", "check_word_ids", "num_kept_tokens", "TextEmbed", "VideoPatchEmbed", "interpolate_pos_table", "resolve_layer_impl", "trunc_normal_pos_"]

PixelAffine = Union[None, float, Sequence[float]]


def resolve_layer_impl(impl: Optional[str]) -> str:
    """A layer's kernel implementation, fixed when the layer is built or switched.

    ``None`` takes the process default (``$VATT_FAST_KERNELS``, ``auto`` when unset) now, so a
    traced forward never reads the environment. ``"auto"`` stays ``"auto"``: the device of each
    call still decides between Triton (CUDA) and the reference.
    """
    if impl is None:
        return default_impl()
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {list(IMPLS)} (or None for $VATT_FAST_KERNELS)")
    return impl





def _triple(value: Union[int, Sequence[int]], name: str) -> Tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    out = tuple(int(v) for v in value)
    if len(out) != 3:
        raise ValueError(f"{name} must be an int or three ints (t, h, w), got {value!r}")
    return out  # type: ignore[return-value]


def trunc_normal_pos_(table: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Truncated-normal init at two standard deviations, as TF's ``truncated_normal`` (the release).

    (``trunc_normal_``'s default bounds are absolute, +-2, i.e. no truncation at std 0.02.)
    """
    return trunc_normal_(table, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


def interpolate_pos_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly resample a position table ``[L, D]`` to ``[length, D]`` along its first dim.

    Uses ``F.interpolate(mode="linear", align_corners=False)``; returns ``table`` itself when
    the length already matches. Differentiable.
    """
    if table.shape[0] == length:
        return table
    if length < 1:
        raise ValueError(f"cannot interpolate a position table to {length} entries; need at least 1")
    # (L, D) -> (1, D, L) -> (1, D, length) -> (length, D)
    resized = F.interpolate(table.t().unsqueeze(0), size=length, mode="linear", align_corners=False)
    return resized.squeeze(0).t()


class VideoPatchEmbed(nn.Module):
    """Raw video -> tubelet tokens with VATT's factorised position embedding.

    Tubelets of ``t x h x w`` pixels go through one linear map (stored as an ``nn.Conv3d`` with
    kernel = stride = ``patch_size``); token ``(i, j, k)`` of the ``(Tp, Hp, Wp)`` grid gets
    ``pos_embed_t[i] + pos_embed_h[j] + pos_embed_w[k]``. The tables are learned for
    ``grid_size`` and linearly interpolated when a clip has another grid.

    The layer takes **raw pixels** (0..255), uint8 as decoders give them or float in the same
    range, and applies ``x * pixel_scale + pixel_shift`` (default: to ``[-1, 1]``) by folding
    it into the projection, so no normalised float copy of the video is made. For input that
    is already normalised, pass ``pixel_scale=None, pixel_shift=None``. Per-channel values are
    accepted, e.g. ImageNet-style ``pixel_scale=[1 / (255 * s) for s in std]``,
    ``pixel_shift=[-m / s for m, s in zip(mean, std)]``.

    Args:
        patch_size: tubelet ``(t, h, w)`` (or one int for all three).
        in_chans: input channels ``C``.
        embed_dim: token width ``D``.
        grid_size: ``(Tp, Hp, Wp)`` the position tables are learned for
            (VATT: 32 frames of 224x224 with 4x16x16 tubelets -> ``(8, 14, 14)``).
        pixel_scale, pixel_shift: per-channel affine on the raw input, ``None`` to skip.
        impl: kernel implementation (``"auto"``, ``"triton"``, ``"reference"``; ``None`` =
            ``$VATT_FAST_KERNELS``, read when the layer is built).

    Shapes:
        forward(x ``[B, T, H, W, C]`` uint8 or float, keep ``None`` | ``[N_keep]`` | ``[B, N_keep]``)
        -> ``[B, N, D]`` or ``[B, N_keep, D]`` with ``N = (T/t) * (H/h) * (W/w)``, in the
        projection's dtype (the autocast dtype under autocast).
    """

    def __init__(
        self,
        patch_size: Union[int, Sequence[int]] = (4, 16, 16),
        in_chans: int = 3,
        embed_dim: int = 768,
        grid_size: Union[int, Sequence[int]] = (8, 14, 14),
        pixel_scale: PixelAffine = 1.0 / 127.5,
        pixel_shift: PixelAffine = -1.0,
        impl: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.patch_size = _triple(patch_size, "patch_size")
        self.grid_size = _triple(grid_size, "grid_size")
        if min(self.patch_size) < 1 or min(self.grid_size) < 1:
            raise ValueError(f"patch_size {self.patch_size} and grid_size {self.grid_size} must be positive")
        self.in_chans = int(in_chans)
        self.embed_dim = int(embed_dim)
        self.impl = resolve_layer_impl(impl)
        self.proj = nn.Conv3d(self.in_chans, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        Tp, Hp, Wp = self.grid_size
        self.pos_embed_t = nn.Parameter(torch.empty(Tp, self.embed_dim))
        self.pos_embed_h = nn.Parameter(torch.empty(Hp, self.embed_dim))
        self.pos_embed_w = nn.Parameter(torch.empty(Wp, self.embed_dim))
        # Plain Python floats, not buffers: the affine is configuration (state_dicts hold only
        # learned weights) and must stay exact when the module is cast to bf16/fp16.
        self.pixel_scale = self._affine_value(pixel_scale, "pixel_scale")
        self.pixel_shift = self._affine_value(pixel_shift, "pixel_shift")
        self.reset_position_embedding()

    def _affine_value(self, value: PixelAffine, name: str) -> Union[None, float, Tuple[float, ...]]:
        if value is None:
            return None
        values = (float(value),) if isinstance(value, (int, float)) else tuple(float(v) for v in value)
        if len(values) not in (1, self.in_chans):
            raise ValueError(
                f"{name} must be a float or {self.in_chans} floats (one per input channel), got {len(values)} values"
            )
        return values[0] if len(values) == 1 else values

    def reset_position_embedding(self) -> None:
        """Re-initialise the three position tables (normal, std 0.02, truncated at 2 std)."""
        for table in (self.pos_embed_t, self.pos_embed_h, self.pos_embed_w):
            trunc_normal_pos_(table, std=0.02)

    @property
    def num_patches(self) -> int:
        """Tokens of a clip at ``grid_size``."""
        return math.prod(self.grid_size)

    def grid_for(self, frames: int, height: int, width: int) -> Tuple[int, int, int]:
        """The token grid ``(Tp, Hp, Wp)`` of a ``frames x height x width`` clip.

        Not a check: :func:`~vatt_fast.kernels.patch_embed.patch_embed` is the one place that
        rejects a clip a patch size does not divide, so here each axis is floor-divided (and at
        least 1, so that a position table exists for the op to reject the clip with its message).
        """
        return tuple(max(1, size // p) for size, p in zip((frames, height, width), self.patch_size))  # type: ignore[return-value]

    def position_embedding(self, grid: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
        """The summed position embedding ``[N, D]`` for ``grid`` (default ``grid_size``), in token order.

        Entry ``(i * Hp + j) * Wp + k`` is ``e_t[i] + e_h[j] + e_w[k]``, each table interpolated
        to the grid first when its length differs.
        """
        Tp, Hp, Wp = self.grid_size if grid is None else grid
        e_t = interpolate_pos_table(self.pos_embed_t, Tp)  # (Tp, D)
        e_h = interpolate_pos_table(self.pos_embed_h, Hp)  # (Hp, D)
        e_w = interpolate_pos_table(self.pos_embed_w, Wp)  # (Wp, D)
        pos = e_t[:, None, None, :] + e_h[None, :, None, :] + e_w[None, None, :, :]  # (Tp, Hp, Wp, D)
        return pos.reshape(Tp * Hp * Wp, self.embed_dim)

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embed raw video.

        Args:
            x: ``[B, T, H, W, C]`` uint8 or float raw pixels (0..255), channels last.
            keep: ``None``, ``[N_keep]`` or ``[B, N_keep]`` int64 token indices (from
                :meth:`DropToken.sample_keep`): compute only those tokens.

        Returns:
            ``[B, N, D]`` or ``[B, N_keep, D]``.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"VideoPatchEmbed expects video [B, T, H, W, C={self.in_chans}], got {got}")
        grid = self.grid_for(x.shape[1], x.shape[2], x.shape[3])
        return patch_embed(
            x,
            self.proj.weight,
            self.proj.bias,
            pos=self.position_embedding(grid),
            keep=keep,
            scale=self.pixel_scale,
            shift=self.pixel_shift,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        return (
            f"patch_size={self.patch_size}, in_chans={self.in_chans}, embed_dim={self.embed_dim}, "
            f"grid_size={self.grid_size}, pixel_scale={self.pixel_scale}, pixel_shift={self.pixel_shift}, "
            f"impl={self.impl!r}"
        )


class AudioPatchEmbed(nn.Module):
    """Raw waveform -> segment tokens with one learned position table.

    Non-overlapping segments of ``patch_size`` samples go through one linear map (stored as an
    ``nn.Conv1d(1, D, patch_size, stride=patch_size)``); token ``n`` gets ``pos_embed[n]``,
    the table linearly interpolated when a clip has another number of segments.

    Args:
        patch_size: samples per token ``p`` (VATT: 128 at 48 kHz).
        embed_dim: token width ``D``.
        num_patches: tokens the position table is learned for (VATT: 3.2 s at 48 kHz -> 1200).
        impl: kernel implementation (``"auto"``, ``"triton"``, ``"reference"``; ``None`` =
            ``$VATT_FAST_KERNELS``, read when the layer is built).

    Shapes:
        forward(wave ``[B, S]`` float, keep ``None`` | ``[N_keep]`` | ``[B, N_keep]``)
        -> ``[B, N, D]`` or ``[B, N_keep, D]`` with ``N = S / p``.
    """

    def __init__(
        self, patch_size: int = 128, embed_dim: int = 768, num_patches: int = 1200, impl: Optional[str] = None
    ) -> None:
        super().__init__()
        if patch_size < 1 or num_patches < 1:
            raise ValueError(f"patch_size ({patch_size}) and num_patches ({num_patches}) must be positive")
        self.patch_size = int(patch_size)
        self.embed_dim = int(embed_dim)
        self.num_patches = int(num_patches)
        self.impl = resolve_layer_impl(impl)
        self.proj = nn.Conv1d(1, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.pos_embed = nn.Parameter(torch.empty(self.num_patches, self.embed_dim))
        trunc_normal_pos_(self.pos_embed, std=0.02)

    def position_embedding(self, num_tokens: Optional[int] = None) -> torch.Tensor:
        """The position table ``[N, D]`` for ``num_tokens`` (default ``num_patches``), interpolated if needed."""
        return interpolate_pos_table(self.pos_embed, self.num_patches if num_tokens is None else num_tokens)

    def forward(self, wave: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embed a waveform.

        Args:
            wave: ``[B, S]`` float, ``S`` a multiple of ``patch_size``.
            keep: ``None``, ``[N_keep]`` or ``[B, N_keep]`` int64 token indices.

        Returns:
            ``[B, N, D]`` or ``[B, N_keep, D]``.
        """
        if not isinstance(wave, torch.Tensor) or wave.dim() != 2:
            got = tuple(wave.shape) if isinstance(wave, torch.Tensor) else type(wave).__name__
            raise ValueError(f"AudioPatchEmbed expects a waveform [B, S], got {got}")
        # patch_embed rejects a length S that patch_size does not divide (max(1, .): a table for it to reject)
        num_tokens = max(1, wave.shape[1] // self.patch_size)
        return patch_embed(
            wave,
            self.proj.weight,
            self.proj.bias,
            pos=self.position_embedding(num_tokens),
            keep=keep,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        return (
            f"patch_size={self.patch_size}, embed_dim={self.embed_dim}, num_patches={self.num_patches}, "
            f"impl={self.impl!r}"
        )


_IDS_FIX = (
    "build the model with vocab_size=len(vocabulary) (the loaders check this when they are built) "
    "and map unknown words to the unknown id"
)


def check_word_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Check that word ids are integers in ``[0, vocab_size)``, without a host sync on an accelerator.

    The one validation of word ids (the loaders validate the vocabulary against the model's
    ``vocab_size`` once, when they are built). On CPU in eager mode the ids are read (no device
    sync exists there) and a ``ValueError`` names the offending range. On an accelerator, and
    while ``torch.compile`` traces, the check is ``torch._assert_async``: it stays in the graph
    (no graph break) and costs no host sync; it fails with ``RuntimeError`` on CPU, and as a
    device-side assert on CUDA (which ``nn.Embedding`` would raise anyway).
    """
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"TextEmbed expects int64 word ids, got dtype {ids.dtype}; tokenise with Vocabulary.encode "
            f"(integer ids of another dtype: ids.long())"
        )
    if ids.numel() == 0:
        return
    if ids.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"TextEmbed: word ids must lie in [0, {vocab_size - 1}], got ids from {lo} to max id {hi} "
                f"with vocab_size={vocab_size}; {_IDS_FIX}"
            )
        return
    torch._assert_async(
        ((ids >= 0) & (ids < vocab_size)).all(),
        f"TextEmbed: word ids must lie in [0, {vocab_size - 1}] (vocab_size={vocab_size}); {_IDS_FIX}",
    )


class TextEmbed(nn.Module):
    """Word ids -> vectors: an embedding lookup, optionally a narrower word table then a dense layer.

    With ``word_dim > 0`` the table is ``[vocab_size, word_dim]`` followed by
    ``proj = nn.Linear(word_dim, embed_dim)``, as the VATT release does with a frozen 300-d
    word2vec table; with ``word_dim == 0`` the table is ``[vocab_size, embed_dim]`` and there is
    no projection.

    Args:
        vocab_size: number of ids, padding and unknown included.
        embed_dim: output width ``D``.
        word_dim: width of the word table, ``0`` for ``embed_dim``.
        freeze_word_embedding: keep the word table fixed (no gradient).
        padding_idx: the padding id (its row starts at zero and gets no gradient), or ``None``.

    Shapes:
        forward(ids ``[..., L]`` int64 in ``[0, vocab_size)``) -> ``[..., L, D]``.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        word_dim: int = 0,
        freeze_word_embedding: bool = False,
        padding_idx: Optional[int] = 0,
    ) -> None:
        super().__init__()
        if vocab_size < 1 or embed_dim < 1 or word_dim < 0:
            raise ValueError(
                f"TextEmbed needs vocab_size >= 1, embed_dim >= 1 and word_dim >= 0, got "
                f"vocab_size={vocab_size}, embed_dim={embed_dim}, word_dim={word_dim}"
            )
        self.vocab_size = int(vocab_size)
        self.embed_dim = int(embed_dim)
        self.word_dim = int(word_dim)
        self.word_embedding = nn.Embedding(self.vocab_size, self.word_dim or self.embed_dim, padding_idx=padding_idx)
        self.proj: Optional[nn.Linear] = nn.Linear(self.word_dim, self.embed_dim) if self.word_dim else None
        self.word_embedding.weight.requires_grad_(not freeze_word_embedding)

    @property
    def frozen(self) -> bool:
        """Whether the word table is excluded from training."""
        return not self.word_embedding.weight.requires_grad

    @torch.no_grad()
    def load_pretrained_table(self, weight: torch.Tensor, freeze: bool = True) -> None:
        """Copy a pretrained word table (e.g. word2vec) into ``word_embedding``.

        Args:
            weight: ``[vocab_size, word_dim or embed_dim]`` (tensor or array-like), rows in the
                order of the vocabulary.
            freeze: keep the table fixed afterwards (the VATT release freezes word2vec).
        """
        table = torch.as_tensor(weight)
        expected = tuple(self.word_embedding.weight.shape)
        if tuple(table.shape) != expected:
            raise ValueError(
                f"pretrained word table has shape {tuple(table.shape)} but this TextEmbed expects {expected} "
                f"(vocab_size={self.vocab_size}, width={expected[1]}); build TextEmbed with "
                f"vocab_size={table.shape[0] if table.dim() == 2 else '?'} and "
                f"word_dim={table.shape[1] if table.dim() == 2 else '?'}"
            )
        self.word_embedding.weight.copy_(table)
        self.word_embedding.weight.requires_grad_(not freeze)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Look the ids up.

        Args:
            ids: ``[..., L]`` int64 word ids (0 = padding by default).

        Returns:
            ``[..., L, D]`` in the table's dtype.
        """
        check_word_ids(ids, self.vocab_size)
        out = self.word_embedding(ids)  # (..., L, word_dim or D)
        if self.proj is not None:
            out = self.proj(out)  # (..., L, D)
        return out

    def extra_repr(self) -> str:
        return (
            f"vocab_size={self.vocab_size}, embed_dim={self.embed_dim}, word_dim={self.word_dim}, "
            f"frozen={self.frozen}"
        )


def num_kept_tokens(num_tokens: int, rate: float) -> int:
    """Tokens that survive DropToken at ``rate``: ``max(1, floor(N * (1 - rate)))``, all of them at rate 0."""
    if rate <= 0.0:
        return num_tokens
    # The epsilon keeps exact products (e.g. 50 * 0.9) from flooring one short in floating point.
    return max(1, int(math.floor(num_tokens * (1.0 - rate) + 1e-6)))


class DropToken(nn.Module):
    """VATT's DropToken: keep a random subset of the tokens during training.

    In training, ``N_keep = max(1, floor(N * (1 - rate)))`` tokens survive. By default one
    permutation is drawn per call and shared by the whole batch (as the VATT release does);
    ``per_sample=True`` draws one per sample. Draws use the torch global RNG (seed it with
    ``torch.manual_seed``). In eval mode, or with ``rate == 0``, nothing is dropped.

    The cheap way to use it is to draw first and let the patch embedding compute only the
    kept tokens: ``keep = drop.sample_keep(B, N, device); tokens = embed(x, keep=keep)``.
    ``forward`` does the same on tokens that already exist.

    Args:
        rate: fraction of tokens dropped, in ``[0, 1)`` (VATT: 0.5).
        per_sample: one draw per sample instead of one per batch.
        impl: kernel implementation for the gather (``"auto"``, ``"triton"``, ``"reference"``; ``None``
            = ``$VATT_FAST_KERNELS``, read when the layer is built).

    Shapes:
        forward(x ``[B, N, D]``) -> (``[B, N_keep, D]``, keep ``[N_keep]`` or ``[B, N_keep]``)
        in training; (x, ``None``) otherwise.
    """

    def __init__(self, rate: float = 0.5, per_sample: bool = False, impl: Optional[str] = None) -> None:
        super().__init__()
        if not 0.0 <= float(rate) < 1.0:
            raise ValueError(f"DropToken rate must be in [0, 1), got {rate}; 0 disables it")
        self.rate = float(rate)
        self.per_sample = bool(per_sample)
        self.impl = resolve_layer_impl(impl)

    def num_kept(self, num_tokens: int) -> int:
        """Tokens kept out of ``num_tokens`` in training: ``max(1, floor(N * (1 - rate)))``."""
        return num_kept_tokens(num_tokens, self.rate)

    def sample_keep(
        self, batch_size: int, num_tokens: int, device: Union[torch.device, str, None] = None
    ) -> Optional[torch.Tensor]:
        """Draw the token indices to keep, or ``None`` when nothing is dropped (eval, rate 0).

        Args:
            batch_size: ``B`` (used by per-sample draws).
            num_tokens: ``N``, tokens before dropping.
            device: where the indices live (the device of the tokens).

        Returns:
            int64 ``[N_keep]`` (shared) or ``[B, N_keep]`` (per sample), distinct indices in
            ``[0, N)`` in random order; or ``None``.
        """
        if not self.training or self.rate == 0.0:
            return None
        if num_tokens < 1:
            raise ValueError(f"DropToken needs at least one token, got num_tokens={num_tokens}")
        n_keep = self.num_kept(num_tokens)
        if self.per_sample:
            scores = torch.rand(batch_size, num_tokens, device=device)  # (B, N)
            return scores.argsort(dim=1)[:, :n_keep]  # (B, N_keep)
        return torch.randperm(num_tokens, device=device)[:n_keep]  # (N_keep,)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Drop tokens of ``x [B, N, D]``; returns ``(x_kept, keep)``, ``keep`` is ``None`` when nothing is dropped."""
        if x.dim() != 3:
            raise ValueError(f"DropToken expects tokens [B, N, D], got shape {tuple(x.shape)}")
        keep = self.sample_keep(x.shape[0], x.shape[1], x.device)
        if keep is None:
            return x, None
        return drop_token_gather(x, keep, impl=self.impl), keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}, per_sample={self.per_sample}"
