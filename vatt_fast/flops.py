"""FLOP count of a VATT training step, for throughput and model FLOPs utilisation (MFU).

What is counted (per clip, one forward pass), following the usual MFU convention
(PaLM, appendix B): every matrix multiply, ``2 * M * N * K`` FLOPs, and nothing
else (LayerNorm, GELU, softmax, bias adds, embedding look-ups are left out; they
are a few per cent at most). A training step costs 3 forward passes (forward, and
backward = 2x forward), whatever the activation checkpointing: recomputation is
not "model" FLOPs.

Per Transformer layer on ``n`` tokens of width ``d`` with MLP width ``m``:

    qkv projection      2 * n * d * 3d  = 6 n d^2
    attention scores    2 * n * n * d   (Q K^T over all heads)
    attention x values  2 * n * n * d
    output projection   2 * n * d * d
    MLP                 2 * n * d * m * 2
    total               8 n d^2 + 4 n^2 d + 4 n d m

Tokens: video ``N_v = T/t * H/h * W/w`` tubelets, audio ``N_a = S / patch``; in
training DropToken keeps ``max(1, floor(N * (1 - rate)))`` of each (the patch
embedding computes only the kept tokens), and every sequence gets one aggregation
token. Text: ``K`` captions of ``L`` words, each a sequence of ``L + 1`` tokens
(padding is attended over with a mask, so it costs the same). Tokenizers: video
``2 * N_kept * (t*h*w*3) * d``, audio ``2 * N_kept * patch * d``, text ``2 * K * L *
word_dim * d`` when a narrower word table is followed by a dense layer (0 otherwise).
Heads: video ``2 (Dv*va + va*va + va*vt)``, audio ``2 Da va``, text ``2 K Dt vt``;
the modality-agnostic model adds its ``d x d`` input projection on every token and
output projection on every pooled state. The loss (similarities against the global
batch) is ``2 * G * (va + K * vt)`` per clip for a global batch of ``G`` clips, and
is added only when ``global_batch`` is given.

Checked against the paper's arithmetic: the MBS model (``medium`` preset) with
DropToken 0.5 comes to 391 GFLOPs per clip forward (VATT_SPEC.md: "about 396"),
865 without DropToken ("855").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch

from vatt_fast.models.config import EncoderConfig, VATTConfig, get_config
from vatt_fast.nn.embed import num_kept_tokens

__all__ = [
    "ClipFlops",
    "encoder_layer_flops",
    "encoder_flops",
    "kept_tokens",
    "clip_flops",
    "train_step_flops",
    "tokens_per_clip",
    "peak_flops",
    "measure_cpu_peak",
]


def encoder_layer_flops(n: int, dim: int, mlp_dim: int) -> int:
    """FLOPs of one pre-LN Transformer layer on ``n`` tokens: ``8 n d^2 + 4 n^2 d + 4 n d m``."""
    return 8 * n * dim * dim + 4 * n * n * dim + 4 * n * dim * mlp_dim


def encoder_flops(n: int, enc: EncoderConfig) -> int:
    """FLOPs of a ``depth``-layer encoder on one sequence of ``n`` tokens (aggregation token included)."""
    return enc.depth * encoder_layer_flops(n, enc.dim, enc.mlp_dim)


def kept_tokens(num_tokens: int, drop_rate: float) -> int:
    """Tokens that survive DropToken (the rule of :class:`vatt_fast.nn.embed.DropToken`)."""
    return num_kept_tokens(num_tokens, drop_rate)


@dataclass(frozen=True)
class ClipFlops:
    """Forward FLOPs of one clip, by part. ``total`` is their sum."""

    video: int
    audio: int
    text: int
    heads: int
    loss: int

    @property
    def total(self) -> int:
        return self.video + self.audio + self.text + self.heads + self.loss

    def as_dict(self) -> Dict[str, int]:
        return {
            "video": self.video,
            "audio": self.audio,
            "text": self.text,
            "heads": self.heads,
            "loss": self.loss,
            "total": self.total,
        }


def _config(cfg: Union[str, VATTConfig]) -> VATTConfig:
    return get_config(cfg) if isinstance(cfg, str) else cfg


def tokens_per_clip(cfg: Union[str, VATTConfig], train: bool = True) -> Dict[str, int]:
    """Tokens the encoders see per clip (without aggregation tokens): video, audio, text, total.

    Args:
        cfg: preset name or config.
        train: apply DropToken (training) or not (evaluation).
    """
    cfg = _config(cfg)
    rate = cfg.drop_token if train else 0.0
    video = kept_tokens(cfg.num_video_tokens, rate)
    audio = kept_tokens(cfg.num_audio_tokens, rate)
    text = cfg.num_captions * cfg.caption_len
    return {"video": video, "audio": audio, "text": text, "total": video + audio + text}


def clip_flops(cfg: Union[str, VATTConfig], train: bool = True, global_batch: Optional[int] = None) -> ClipFlops:
    """Forward FLOPs of one clip through VATT (see the module docstring for the formula).

    Args:
        cfg: preset name or :class:`VATTConfig`.
        train: count DropToken's reduced video/audio sequences (training) or full ones.
        global_batch: when given, add the loss's similarity FLOPs against ``global_batch`` clips.

    Returns:
        A :class:`ClipFlops` with the per-part counts.
    """
    cfg = _config(cfg)
    shared = cfg.shared_backbone
    v_enc = cfg.video_encoder
    a_enc = cfg.video_encoder if shared else cfg.audio_encoder
    t_enc = cfg.video_encoder if shared else cfg.text_encoder
    tok = tokens_per_clip(cfg, train)
    t, h, w = cfg.video_patch

    nv, na = tok["video"], tok["audio"]
    video = 2 * nv * (t * h * w * 3) * v_enc.dim + encoder_flops(nv + 1, v_enc)
    audio = 2 * na * cfg.audio_patch * a_enc.dim + encoder_flops(na + 1, a_enc)
    K, L = cfg.num_captions, cfg.caption_len
    text = K * encoder_flops(L + 1, t_enc)
    if cfg.word_dim:
        text += 2 * K * L * cfg.word_dim * t_enc.dim
    if shared:  # input projection on every token, output projection on every pooled state (d x d)
        d = v_enc.dim
        video += 2 * nv * d * d + 2 * d * d
        audio += 2 * na * d * d + 2 * d * d
        text += K * (2 * L * d * d + 2 * d * d)
    va, vt = cfg.va_dim, cfg.vt_dim
    heads = 2 * (v_enc.dim * va + va * va + va * vt) + 2 * a_enc.dim * va + 2 * K * t_enc.dim * vt
    loss = 2 * global_batch * (va + K * vt) if global_batch else 0
    return ClipFlops(video=video, audio=audio, text=text, heads=heads, loss=loss)


def train_step_flops(cfg: Union[str, VATTConfig], global_batch: int) -> int:
    """Model FLOPs of one training step over ``global_batch`` clips: ``3 * forward`` (forward + backward)."""
    return 3 * global_batch * clip_flops(cfg, train=True, global_batch=global_batch).total


# Dense (no sparsity) peak rates in FLOP/s, from the vendors' data sheets, by dtype.
_GPU_PEAKS = (
    # (substring of the device name, bf16/fp16 tensor-core peak, tf32 peak, fp32 peak)
    ("H200", 989e12, 494e12, 67e12),
    ("H100 PCIe", 756e12, 378e12, 51e12),
    ("H100", 989e12, 494e12, 67e12),  # SXM
    ("GH200", 989e12, 494e12, 67e12),
    ("B200", 2250e12, 1100e12, 80e12),
    ("A100", 312e12, 156e12, 19.5e12),
    ("A10G", 125e12, 62.5e12, 31.2e12),
    ("L40S", 362e12, 183e12, 91.6e12),
    ("L4", 121e12, 60e12, 30e12),
    ("V100", 125e12, 15.7e12, 15.7e12),
    ("RTX 4090", 165e12, 82.6e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12, 35.6e12),
)


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Optional[float]:
    """Peak dense FLOP/s of ``device`` for matmuls in ``dtype``, or None when unknown.

    CUDA devices are looked up by name in a table of data-sheet figures (bf16/fp16
    tensor cores; tf32 for fp32 when TF32 matmuls are allowed, else plain fp32). For
    a CPU there is no reliable data sheet figure: the trainer measures what a large fp32
    matmul achieves instead (see ``vatt_fast.train``), or takes ``--peak-tflops``.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, lowp, tf32, fp32 in _GPU_PEAKS:
        if key in name:
            if dtype in (torch.bfloat16, torch.float16):
                return lowp
            return tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
    return None


def measure_cpu_peak(seconds: float = 0.25) -> float:
    """FLOP/s a 512x512 fp32 matmul reaches on this CPU (stands in for a data-sheet peak)."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 512 ** 3 * n / (time.perf_counter() - t0)
