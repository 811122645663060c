"""The fine-tuning model: one pretrained VATT encoder with a linear head on its pooled feature.

:class:`Classifier` holds the modality's encoder exactly as :class:`~vatt_fast.models.vatt.VATT`
builds it (tokenizer + position embedding, backbone, aggregation token; the shared backbone
and its adapter for ``ma-medium``), so its parameter names are the pretraining ones with
``encoders.<modality>.`` replaced by ``encoder.``. :func:`load_pretrained` loads a
pretraining checkpoint's weights into it: the position tables are interpolated when the
clip geometry changed (VATT_SPEC.md), every key of the checkpoint is either loaded or
listed as not used, and a key the model needs but the checkpoint lacks (other than the new
head), or a shape that does not fit, is an error.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from vatt_fast.flops import clip_flops
from vatt_fast.models.config import VATTConfig
from vatt_fast.models.vatt import VATT
from vatt_fast.nn.attention import set_attention_backend
from vatt_fast.nn.embed import AudioPatchEmbed, DropToken, VideoPatchEmbed, interpolate_pos_table, resolve_layer_impl
from vatt_fast.nn.transformer import Encoder

__all__ = ["MODALITIES", "Classifier", "classifier_flops", "interpolate_positions", "load_pretrained"]

MODALITIES = ("video", "audio")
# Position tables, by their name in the Classifier: interpolated along dim 0 when the grid changes.
POSITION_KEYS = (
    "encoder.patch_embed.pos_embed_t",
    "encoder.patch_embed.pos_embed_h",
    "encoder.patch_embed.pos_embed_w",
    "encoder.patch_embed.pos_embed",
)


class Classifier(nn.Module):
    """A VATT modality encoder with a classification head: clip -> logits.

    Args:
        config: the model config (its clip geometry sizes the position tables; fine-tuning
            sets ``drop_token`` to 0).
        modality: ``"video"`` or ``"audio"``.
        num_classes: outputs of the head.
        head_dropout: dropout on the pooled feature before the head.

    Shapes:
        forward(video uint8/float ``[B, T, H, W, 3]`` (0..255) or audio float ``[B, S]``)
        -> logits ``[B, num_classes]``. The head starts at zero (ViT fine-tuning practice), so
        the first predictions are uniform.
    """

    def __init__(self, config: VATTConfig, modality: str, num_classes: int, head_dropout: float = 0.0) -> None:
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"modality {modality!r} is not one of {MODALITIES}")
        self.config = config
        self.modality = modality
        self.num_classes = int(num_classes)
        # Built through VATT so the encoder is exactly the pretrained one (shared backbone included).
        self.encoder = VATT(config).encoders[modality]
        enc = config.video_encoder if (modality == "video" or config.shared_backbone) else config.audio_encoder
        self.head_dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(enc.dim, self.num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.encoder(x)  # (B, D)
        return self.head(self.head_dropout(pooled))  # (B, C)

    # --- the switches of VATT --------------------------------------------------------
    def set_attention_backend(self, backend: str) -> "Classifier":
        set_attention_backend(self, backend)
        return self

    def set_kernel_impl(self, impl: Optional[str]) -> "Classifier":
        resolved = resolve_layer_impl(impl)
        for m in self.modules():
            if isinstance(m, (VideoPatchEmbed, AudioPatchEmbed, DropToken)):
                m.impl = resolved
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> "Classifier":
        for m in self.modules():
            if isinstance(m, Encoder):
                m.set_grad_checkpointing(enable)
        return self

    def head_parameters(self) -> List[nn.Parameter]:
        return list(self.head.parameters())

    def encoder_parameters(self) -> List[nn.Parameter]:
        return list(self.encoder.parameters())


def classifier_flops(config: VATTConfig, modality: str, num_classes: int) -> Tuple[float, int]:
    """``(training FLOPs per clip, tokens per clip)``: 3x the forward of the encoder (no DropToken) and head."""
    flops = clip_flops(config, train=False)
    forward = flops.video if modality == "video" else flops.audio
    dim = (config.video_encoder if (modality == "video" or config.shared_backbone) else config.audio_encoder).dim
    forward += 2 * dim * num_classes
    tokens = config.num_video_tokens if modality == "video" else config.num_audio_tokens
    return 3.0 * forward, int(tokens)


def interpolate_positions(
    weights: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor]
) -> Dict[str, Tuple[int, int]]:
    """Resample, in place, the position tables of ``weights`` whose length differs from ``own``'s.

    Each table ``[L, D]`` is interpolated linearly to ``[L', D]`` (the video's time, height
    and width tables separately, as the model does at run time for another grid).
    Returns ``{key: (old length, new length)}``.
    """
    changed: Dict[str, Tuple[int, int]] = {}
    for key in POSITION_KEYS:
        if key in weights and key in own:
            old, new = weights[key], own[key]
            if old.dim() == 2 and new.dim() == 2 and old.shape[1] == new.shape[1] and old.shape[0] != new.shape[0]:
                weights[key] = interpolate_pos_table(old.float(), new.shape[0]).to(old.dtype).contiguous()
                changed[key] = (int(old.shape[0]), int(new.shape[0]))
    return changed


def _groups(keys: List[str]) -> Dict[str, int]:
    """Keys counted by their first two name components (``encoders.text``, ``heads.video_va``)."""
    out: Dict[str, int] = {}
    for k in keys:
        g = ".".join(k.split(".")[:2])
        out[g] = out.get(g, 0) + 1
    return out


def load_pretrained(model: Classifier, weights: Dict[str, torch.Tensor], source: str = "checkpoint") -> Dict[str, Any]:
    """Load a pretraining checkpoint's weights (a VATT state dict) into ``model``'s encoder.

    Args:
        model: the classifier (unwrapped).
        weights: the checkpoint's tensors (:func:`vatt_fast.checkpoint.load_weights`).
        source: names the checkpoint in messages.

    Returns:
        A report: ``loaded`` (count), ``missing`` (the model's keys the checkpoint does not
        give: the new head), ``unused`` (every checkpoint key not loaded: the other
        modalities and the common-space heads), ``unused_groups`` (their counts by prefix),
        ``interpolated`` (position tables resized: key -> [old, new]).

    Raises:
        ValueError: the checkpoint lacks a key of the encoder, or a tensor's shape does not
            fit, naming the keys and the fix.
    """
    prefix = f"encoders.{model.modality}."
    mapped = {"encoder." + k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    unused = sorted(k for k in weights if not k.startswith(prefix))
    own = model.state_dict()
    interpolated = interpolate_positions(mapped, own)
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in mapped.items() if k in own and own[k].shape != v.shape]
    if wrong:
        shown = "; ".join(f"{k}: checkpoint {a}, model {b}" for k, a, b in wrong[:4])
        raise ValueError(
            f"{source} does not fit the {model.config.name!r} {model.modality} encoder: {len(wrong)} tensor(s) have "
            f"another shape ({shown}); fine-tune with the preset and model overrides the checkpoint was pretrained "
            f"with (leave --preset out to take the checkpoint's)"
        )
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    lacking = [k for k in missing if not k.startswith("head.")]
    if lacking or unexpected:
        raise ValueError(
            f"{source} does not match the {model.modality} encoder: missing {len(lacking)} key(s) {lacking[:5]}, "
            f"{len(unexpected)} unexpected key(s) {list(unexpected)[:5]}; pass a vatt_fast pretraining checkpoint "
            f"(<run>/checkpoints/step-*, a run folder, or its model.safetensors) of the same preset"
        )
    return {
        "loaded": len(mapped),
        "missing": sorted(missing),
        "unused": unused,
        "unused_groups": _groups(unused),
        "interpolated": {k: list(v) for k, v in interpolated.items()},
    }
