"""Drop-in VATT layers: each is a plain ``torch.nn.Module`` usable on its own.

=====================  =====================================================================
``VideoPatchEmbed``    raw uint8 frames (B, T, H, W, 3) -> tubelet tokens + factorised positions
``AudioPatchEmbed``    waveform (B, S) -> 128-sample tokens + learned positions
``TextEmbed``          word ids (..., L) -> vectors (optional frozen table + dense)
``DropToken``          random token dropping in training (shared or per-sample draw)
``Attention``          multi-head attention, backends flash_attn / xformers / sdpa / math / auto
``RelativePositionBias``  T5 relative position buckets (text encoder)
``Block``              pre-LN Transformer block with timm ViT parameter names
``Encoder``            aggregation token + blocks + final LayerNorm
``CommonSpaceHeads``   projections into the video-audio and video-text spaces
``NCELoss``            video-audio NCE as released (row + column denominator)
``MILNCELoss``         video-text MIL-NCE with K captions and masks
``VATTLoss``           (L_vt + L_va) / 2
=====================  =====================================================================
"""

from .attention import Attention, RelativePositionBias, available_backends, padding_mask_to_bias, set_attention_backend
from .embed import AudioPatchEmbed, DropToken, TextEmbed, VideoPatchEmbed
from .heads import CommonSpaceHeads
from .losses import MILNCELoss, NCELoss, VATTLoss
from .transformer import Block, Encoder, Mlp

__all__ = [
    "VideoPatchEmbed",
    "AudioPatchEmbed",
    "TextEmbed",
    "DropToken",
    "Attention",
    "RelativePositionBias",
    "Block",
    "Mlp",
    "Encoder",
    "CommonSpaceHeads",
    "NCELoss",
    "MILNCELoss",
    "VATTLoss",
    "available_backends",
    "padding_mask_to_bias",
    "set_attention_backend",
]
