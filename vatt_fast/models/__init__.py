"""VATT models and presets."""

from .config import PRESETS, EncoderConfig, VATTConfig, get_config, list_presets

__all__ = ["PRESETS", "EncoderConfig", "VATTConfig", "get_config", "list_presets"]
