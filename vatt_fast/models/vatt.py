"""VATT: video, audio and text Transformers with common-space heads.

One readable file. A clip goes through three modality encoders, each made of a
tokenizer (+ position embedding), DropToken (video, audio; training only) and a
Transformer backbone whose aggregation-token state is the pooled feature; the
common-space heads map the pooled features into S_va and S_vt (VATT_SPEC.md).

    batch["video"]  uint8 (B, T, H, W, 3) -> VideoEncoder -> (B, Dv) -> heads -> video_va (B, 512), video_vt (B, 256)
    batch["audio"]  float (B, S)          -> AudioEncoder -> (B, Da) -> heads -> audio_va (B, 512)
    batch["text"]   int64 (B, K, L)       -> TextEncoder  -> (B, K, Dt) -> heads -> text_vt (B, K, 256)

In the modality-agnostic variant (``shared_backbone``) the three encoders hold the
same backbone module; each keeps its own tokenizer, position embedding,
aggregation token and small input/output projections, and the modalities go
through the shared backbone in separate passes.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from vatt_fast.nn._init import trunc_normal_
from vatt_fast.nn.attention import RelativePositionBias, set_attention_backend
from vatt_fast.nn.embed import AudioPatchEmbed, DropToken, TextEmbed, VideoPatchEmbed, resolve_layer_impl
from vatt_fast.nn.heads import CommonSpaceHeads
from vatt_fast.nn.transformer import Block, Encoder, Mlp

from .config import EncoderConfig, VATTConfig, get_config

__all__ = ["VATT", "VideoEncoder", "AudioEncoder", "TextEncoder", "create_model"]


def _backbone(enc: EncoderConfig, cfg: VATTConfig, *, agg_token: bool, rel_pos: bool = False) -> Encoder:
    return Encoder(
        dim=enc.dim,
        depth=enc.depth,
        num_heads=enc.num_heads,
        mlp_dim=enc.mlp_dim,
        drop=cfg.dropout,
        attn_drop=cfg.attn_dropout,
        use_agg_token=agg_token,
        rel_pos_bias=rel_pos,
        rel_pos_buckets=cfg.rel_pos_buckets,
        rel_pos_max_distance=cfg.rel_pos_max_distance,
    )


class _SharedBackboneAdapter(nn.Module):
    """Per-modality parts around a shared backbone: aggregation token, input and output projections.

    The shared backbone is built without an aggregation token; this adapter prepends
    the modality's own token, projects tokens in before the backbone and the pooled
    state out after it (both ``dim -> dim``, as the modality-agnostic release does).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.agg_token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.agg_token, std=0.02)
        self.input_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def run(
        self,
        backbone: Encoder,
        tokens: torch.Tensor,  # (B, N, D)
        padding_mask: Optional[torch.Tensor] = None,  # (B, N) True = real token
        attn_bias: Optional[torch.Tensor] = None,  # broadcastable to (B, H, N + 1, N + 1)
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.input_proj(tokens)
        x = torch.cat([self.agg_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # (B, N + 1, D)
        if padding_mask is not None:
            padding_mask = torch.cat([padding_mask.new_ones(padding_mask.shape[0], 1), padding_mask], dim=1)
        _, states = backbone(x, padding_mask=padding_mask, attn_bias=attn_bias)  # (B, N + 1, D)
        return self.output_proj(states[:, 0]), states


class _ModalityEncoder(nn.Module):
    """Shared plumbing: run ``tokens`` through the backbone (own or shared)."""

    def __init__(self, backbone: Encoder, shared: bool, dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = _SharedBackboneAdapter(dim) if shared else None

    def _encode(
        self,
        tokens: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        attn_bias: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.adapter is not None:
            return self.adapter.run(self.backbone, tokens, padding_mask, attn_bias)
        return self.backbone(tokens, padding_mask=padding_mask, attn_bias=attn_bias)


class VideoEncoder(_ModalityEncoder):
    """Raw frames -> pooled feature.

    Args:
        cfg: model configuration (tubelet size, grid, DropToken rate).
        backbone: the Transformer (its own, or the shared one of the modality-agnostic model).
        shared: whether ``backbone`` is shared between modalities.

    Shapes: ``video`` uint8 or float (B, T, H, W, 3) in raw pixel range [0, 255]
    -> pooled (B, D), states (B, 1 + N_kept, D).
    """

    def __init__(self, cfg: VATTConfig, backbone: Encoder, shared: bool = False) -> None:
        dim = cfg.video_encoder.dim
        super().__init__(backbone, shared, dim)
        self.patch_embed = VideoPatchEmbed(
            patch_size=cfg.video_patch, in_chans=3, embed_dim=dim, grid_size=cfg.video_grid
        )
        self.drop_token = DropToken(cfg.drop_token)

    def forward(self, video: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if video.dim() != 5 or video.shape[-1] != 3:
            raise ValueError(
                f"video must be (B, T, H, W, 3) channels-last RGB, got shape {tuple(video.shape)}; "
                f"decoders give channels-last frames, permute (B, 3, T, H, W) input with .permute(0, 2, 3, 4, 1)"
            )
        B, T, H, W, _ = video.shape
        num_tokens = math.prod(self.patch_embed.grid_for(T, H, W))  # the op checks the geometry
        keep = self.drop_token.sample_keep(B, num_tokens, video.device)
        tokens = self.patch_embed(video, keep=keep)  # (B, N_kept, D)
        return self._encode(tokens)


class AudioEncoder(_ModalityEncoder):
    """Raw waveform -> pooled feature. ``audio`` float (B, S) -> pooled (B, D), states (B, 1 + N_kept, D)."""

    def __init__(self, cfg: VATTConfig, backbone: Encoder, shared: bool = False) -> None:
        dim = cfg.audio_encoder.dim if not shared else cfg.video_encoder.dim
        super().__init__(backbone, shared, dim)
        self.patch_embed = AudioPatchEmbed(
            patch_size=cfg.audio_patch, embed_dim=dim, num_patches=cfg.num_audio_tokens
        )
        self.drop_token = DropToken(cfg.drop_token)

    def forward(self, audio: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if audio.dim() != 2:
            raise ValueError(
                f"audio must be a mono waveform (B, S), got shape {tuple(audio.shape)}; "
                f"downmix channels (e.g. audio.mean(1)) before the model"
            )
        B, S = audio.shape
        keep = self.drop_token.sample_keep(B, S // self.patch_embed.patch_size, audio.device)
        tokens = self.patch_embed(audio, keep=keep)  # (B, N_kept, D)
        return self._encode(tokens)


class TextEncoder(_ModalityEncoder):
    """Word ids -> pooled feature per caption.

    ``text`` int64 (B, K, L) or (B, L), 0 = padding -> pooled (B, K, D) or (B, D).
    Padding words are masked out of attention; the aggregation token never is, so a
    fully padded (missing) caption still gives a finite feature, which the loss masks.
    The first layer's T5 relative position bias is shared by all layers.
    """

    def __init__(self, cfg: VATTConfig, backbone: Encoder, shared: bool = False) -> None:
        enc = cfg.text_encoder if not shared else cfg.video_encoder
        super().__init__(backbone, shared, enc.dim)
        self.vocab_size = cfg.vocab_size
        self.embed = TextEmbed(
            cfg.vocab_size,
            enc.dim,
            word_dim=cfg.word_dim,
            freeze_word_embedding=cfg.freeze_word_embedding,
        )
        # With its own backbone the relative bias lives in it (Encoder(rel_pos_bias=True));
        # a shared backbone serves video and audio too, so text keeps its bias here.
        self.rel_pos = (
            RelativePositionBias(enc.num_heads, cfg.rel_pos_buckets, cfg.rel_pos_max_distance) if shared else None
        )

    def forward(self, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        lead = text.shape[:-1]
        ids = text.reshape(-1, text.shape[-1])  # (B * K, L); TextEmbed checks dtype and range
        padding_mask = ids != 0  # (B * K, L)
        tokens = self.embed(ids)  # (B * K, L, D)
        attn_bias = None
        if self.rel_pos is not None:
            n = ids.shape[1] + 1  # + aggregation token
            attn_bias = self.rel_pos(n, n, device=ids.device).to(tokens.dtype)  # (1, H, L + 1, L + 1)
        pooled, states = self._encode(tokens, padding_mask=padding_mask, attn_bias=attn_bias)
        return pooled.reshape(*lead, -1), states


class VATT(nn.Module):
    """The full VATT model.

    Args:
        cfg: a :class:`VATTConfig` (see :func:`create_model` for the presets).

    ``forward(batch)`` takes the batch dict of the data loaders (``video`` uint8
    (B, T, H, W, 3), ``audio`` float (B, S), ``text`` int64 (B, K, L); any subset) and
    returns a dict with the pooled features ``video_features`` (B, Dv),
    ``audio_features`` (B, Da), ``text_features`` (B, K, Dt) and the common-space
    embeddings ``video_va`` (B, va_dim), ``audio_va`` (B, va_dim), ``video_vt``
    (B, vt_dim), ``text_vt`` (B, K, vt_dim) of the modalities present. The
    embeddings are not normalised: the losses normalise.
    """

    def __init__(self, cfg: VATTConfig) -> None:
        super().__init__()
        self.config = cfg
        if cfg.shared_backbone:
            shared = _backbone(cfg.video_encoder, cfg, agg_token=False)
            backbones = {"video": shared, "audio": shared, "text": shared}
        else:
            backbones = {
                "video": _backbone(cfg.video_encoder, cfg, agg_token=True),
                "audio": _backbone(cfg.audio_encoder, cfg, agg_token=True),
                "text": _backbone(cfg.text_encoder, cfg, agg_token=True, rel_pos=True),
            }
        s = cfg.shared_backbone
        self.encoders = nn.ModuleDict(
            {
                "video": VideoEncoder(cfg, backbones["video"], s),
                "audio": AudioEncoder(cfg, backbones["audio"], s),
                "text": TextEncoder(cfg, backbones["text"], s),
            }
        )
        dims = {k: (cfg.video_encoder if s else getattr(cfg, f"{k}_encoder")).dim for k in ("video", "audio", "text")}
        self.heads = CommonSpaceHeads(dims["video"], dims["audio"], dims["text"], va_dim=cfg.va_dim, vt_dim=cfg.vt_dim)

    # --- switches -------------------------------------------------------------------
    def set_attention_backend(self, backend: str) -> "VATT":
        """Use attention ``backend`` (auto, flash_attn, xformers, sdpa, math) everywhere."""
        set_attention_backend(self, backend)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> "VATT":
        """Recompute each block's activations in backward (activation checkpointing)."""
        for m in self.modules():
            if isinstance(m, Encoder):
                m.set_grad_checkpointing(enable)
        return self

    def set_kernel_impl(self, impl: Optional[str]) -> "VATT":
        """Use kernel ``impl`` (auto, triton, reference) in every fused op of the model: the patch
        embeddings, DropToken and the Transformer stacks (the fused residual + dropout + LayerNorm
        and bias + GELU + dropout path of ``Encoder``, ``Block`` and ``Mlp``).

        ``None`` takes the process default from ``$VATT_FAST_KERNELS`` now (``auto`` when unset):
        the choice is made here, never inside a traced forward.
        """
        resolved = resolve_layer_impl(impl)
        for m in self.modules():
            if isinstance(m, (VideoPatchEmbed, AudioPatchEmbed, DropToken, Encoder, Block, Mlp)):
                m.impl = resolved
        return self

    # --- forward --------------------------------------------------------------------
    def _check_batch(self, batch: Dict[str, torch.Tensor]) -> int:
        present = {k: batch[k] for k in ("video", "audio", "text") if batch.get(k) is not None}
        if not present:
            raise ValueError(f"batch has none of 'video', 'audio', 'text' (keys: {sorted(batch)}); pass at least one modality")
        sizes = {k: int(v.shape[0]) for k, v in present.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"modalities have different batch sizes {sizes}; every modality must hold the same B clips")
        if "text" in present:
            text = present["text"]
            if text.dim() != 3:
                raise ValueError(f"text must be (B, K, L) word ids, got shape {tuple(text.shape)}; add a K axis with text[:, None]")
            # dtype and range: TextEmbed (check_word_ids), with no host sync on an accelerator
        return next(iter(sizes.values()))

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        self._check_batch(batch)
        out: Dict[str, torch.Tensor] = {}
        if batch.get("video") is not None:
            out["video_features"], _ = self.encoders["video"](batch["video"])
        if batch.get("audio") is not None:
            out["audio_features"], _ = self.encoders["audio"](batch["audio"])
        if batch.get("text") is not None:
            out["text_features"], _ = self.encoders["text"](batch["text"])
        out.update(
            self.heads(
                video=out.get("video_features"),
                audio=out.get("audio_features"),
                text=out.get("text_features"),
            )
        )
        return out

    # --- bookkeeping ----------------------------------------------------------------
    def num_params(self, part: str = "all", exclude_word_table: bool = False) -> int:
        """Parameters of ``part`` (all, video, audio, text, heads), each shared tensor counted once."""
        module = self if part == "all" else (self.heads if part == "heads" else self.encoders[part])
        skip = set()
        if exclude_word_table:
            skip = {id(self.encoders["text"].embed.word_embedding.weight)}
        seen = set()
        total = 0
        for p in module.parameters():
            if id(p) in seen or id(p) in skip:
                continue
            seen.add(id(p))
            total += p.numel()
        return total


def create_model(name: Union[str, VATTConfig] = "tiny", **overrides: Any) -> VATT:
    """Build a VATT model from a preset name (tiny, base, medium, large, ma-medium) or a config.

    ``overrides`` replace config fields, e.g. ``create_model("tiny", vocab_size=len(vocab))``.
    Build on the meta device (``with torch.device("meta"):``) to inspect a large model for free.
    """
    cfg = get_config(name, **overrides)
    return VATT(cfg)
