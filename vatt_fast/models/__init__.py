"""VATT models and presets: ``create_model(name, **overrides)``."""

from .config import PRESETS, EncoderConfig, VATTConfig, get_config, list_presets
from .vatt import VATT, AudioEncoder, TextEncoder, VideoEncoder, create_model

__all__ = [
    "PRESETS",
    "EncoderConfig",
    "VATTConfig",
    "get_config",
    "list_presets",
    "VATT",
    "VideoEncoder",
    "AudioEncoder",
    "TextEncoder",
    "create_model",
]
