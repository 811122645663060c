"""Model configurations and named presets.

A preset fixes the architecture *and* the clip geometry that feeds it (frames,
frame size, audio samples, captions), so that a loader built for a preset feeds
the model of the same preset. Numbers follow ../shared/VATT_SPEC.md (the authors'
release); ``tiny`` is ours, sized to train in minutes on two CPU cores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

__all__ = ["EncoderConfig", "VATTConfig", "PRESETS", "get_config", "list_presets"]


@dataclass(frozen=True)
class EncoderConfig:
    """One Transformer backbone: ``depth`` pre-LN blocks of width ``dim``."""

    depth: int
    dim: int
    num_heads: int
    mlp_dim: int

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(
                f"encoder width {self.dim} is not divisible by num_heads {self.num_heads}; "
                f"pick num_heads that divides the width (VATT uses head dim 64)"
            )


# Backbones of VATT_SPEC.md ("Backbone" table). Head dimension is 64 everywhere.
TINY = EncoderConfig(depth=2, dim=128, num_heads=2, mlp_dim=512)
SMALL = EncoderConfig(depth=6, dim=512, num_heads=8, mlp_dim=2048)  # text, T5-Small style
BASE = EncoderConfig(depth=12, dim=768, num_heads=12, mlp_dim=3072)
MEDIUM = EncoderConfig(depth=12, dim=1024, num_heads=16, mlp_dim=4096)
LARGE = EncoderConfig(depth=24, dim=1024, num_heads=16, mlp_dim=4096)


@dataclass
class VATTConfig:
    """Everything that defines a VATT model and the clips it eats.

    Attributes are grouped as: backbones, clip geometry, text, heads,
    regularisation, loss and optimisation defaults (used by the trainer).
    """

    name: str
    video_encoder: EncoderConfig
    audio_encoder: EncoderConfig
    text_encoder: EncoderConfig
    # Modality-agnostic: one backbone (``video_encoder``) shared by all three modalities.
    shared_backbone: bool = False

    # --- clip geometry ---------------------------------------------------------------
    num_frames: int = 32  # frames per clip at ``fps``
    fps: float = 10.0
    frame_size: int = 224  # square crop, pixels
    video_patch: Tuple[int, int, int] = (4, 16, 16)  # tubelet (t, h, w)
    audio_sample_rate: int = 48_000
    audio_patch: int = 128  # waveform samples per audio token

    # --- text ------------------------------------------------------------------------
    num_captions: int = 5  # K captions per clip (MIL-NCE positives)
    caption_len: int = 16  # L words per caption
    vocab_size: int = 2 ** 16  # word-level vocabulary incl. padding (0) and unknown (1)
    word_dim: int = 300  # width of the word table (300 = word2vec as released); 0 = text width
    freeze_word_embedding: bool = False  # True when a pretrained table is loaded
    rel_pos_buckets: int = 32
    rel_pos_max_distance: int = 64

    # --- common spaces ---------------------------------------------------------------
    va_dim: int = 512
    vt_dim: int = 256

    # --- regularisation --------------------------------------------------------------
    drop_token: float = 0.5  # fraction of video/audio tokens dropped in training
    dropout: float = 0.1
    attn_dropout: float = 0.1

    # --- loss ------------------------------------------------------------------------
    tau: float = 0.07

    # --- optimisation defaults (VATT_SPEC.md "Optimisation") --------------------------
    batch_size: int = 2048
    lr: float = 1e-4
    end_lr: float = 5e-5
    warmup_steps: int = 5_000
    total_steps: int = 500_000
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-7
    weight_decay: float = 0.0

    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.video_patch = tuple(int(p) for p in self.video_patch)
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        for key in ("video_encoder", "audio_encoder", "text_encoder"):
            value = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, EncoderConfig(**value))
        self.validate()

    # --- derived geometry --------------------------------------------------------------
    @property
    def clip_seconds(self) -> float:
        return self.num_frames / self.fps

    @property
    def audio_samples(self) -> int:
        """Waveform samples per clip: the audio spans the same time as the frames."""
        return int(round(self.clip_seconds * self.audio_sample_rate))

    @property
    def video_grid(self) -> Tuple[int, int, int]:
        t, h, w = self.video_patch
        return (self.num_frames // t, self.frame_size // h, self.frame_size // w)

    @property
    def num_video_tokens(self) -> int:
        t, h, w = self.video_grid
        return t * h * w

    @property
    def num_audio_tokens(self) -> int:
        return self.audio_samples // self.audio_patch

    def validate(self) -> None:
        t, h, w = self.video_patch
        if self.num_frames % t:
            raise ValueError(
                f"preset {self.name!r}: tubelet length {t} does not divide num_frames {self.num_frames}; "
                f"use a multiple of {t} frames"
            )
        if self.frame_size % h or self.frame_size % w:
            raise ValueError(
                f"preset {self.name!r}: patch {h}x{w} does not divide frame_size {self.frame_size}; "
                f"use a multiple of {h}"
            )
        if self.audio_samples % self.audio_patch:
            raise ValueError(
                f"preset {self.name!r}: audio clip of {self.audio_samples} samples is not a multiple of "
                f"audio_patch {self.audio_patch}; change num_frames, fps or audio_sample_rate"
            )
        if not 0.0 <= self.drop_token < 1.0:
            raise ValueError(f"drop_token must be in [0, 1), got {self.drop_token}")
        if self.vocab_size < 3:
            raise ValueError(f"vocab_size must be at least 3 (padding, unknown, one word), got {self.vocab_size}")

    def replace(self, **overrides: Any) -> "VATTConfig":
        """A copy with ``overrides`` applied; unknown keys raise with the valid names."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown config field(s) {unknown}; valid fields: {sorted(names)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "VATTConfig":
        return cls(**d)


PRESETS: Dict[str, VATTConfig] = {
    # CPU-sized: 8 frames of 32x32 at 10 fps (0.8 s), audio at 8 kHz, tubelets 2x8x8.
    # 64 video tokens, 50 audio tokens, 2 captions of 8 words. Trains in minutes on 2 cores.
    "tiny": VATTConfig(
        name="tiny",
        video_encoder=TINY,
        audio_encoder=TINY,
        text_encoder=TINY,
        num_frames=8,
        frame_size=32,
        video_patch=(2, 8, 8),
        audio_sample_rate=8_000,
        num_captions=2,
        caption_len=8,
        vocab_size=1024,
        word_dim=0,
        va_dim=128,
        vt_dim=64,
        dropout=0.0,
        attn_dropout=0.0,
        batch_size=32,
        lr=1e-3,
        end_lr=1e-4,
        warmup_steps=20,
        total_steps=400,
    ),
    # Base video, Base audio, Small text.
    "base": VATTConfig(name="base", video_encoder=BASE, audio_encoder=BASE, text_encoder=SMALL),
    # The paper's default "MBS": Medium video, Base audio, Small text.
    "medium": VATTConfig(name="medium", video_encoder=MEDIUM, audio_encoder=BASE, text_encoder=SMALL),
    # "LBS": Large video, Base audio, Small text.
    "large": VATTConfig(name="large", video_encoder=LARGE, audio_encoder=BASE, text_encoder=SMALL),
    # Modality-agnostic Medium: one backbone shared by video, audio and text.
    "ma-medium": VATTConfig(
        name="ma-medium",
        video_encoder=MEDIUM,
        audio_encoder=MEDIUM,
        text_encoder=MEDIUM,
        shared_backbone=True,
    ),
}


def list_presets() -> list:
    return sorted(PRESETS)


def get_config(name: str, **overrides: Any) -> VATTConfig:
    """The preset ``name`` with ``overrides`` applied (a fresh copy)."""
    if isinstance(name, VATTConfig):
        return name.replace(**overrides)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list_presets()}")
    return PRESETS[name].replace(**overrides)
