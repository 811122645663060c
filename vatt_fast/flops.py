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

import logging
import re
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

from vatt_fast.models.config import EncoderConfig, VATTConfig, get_config
from vatt_fast.nn.embed import num_kept_tokens

log = logging.getLogger("vatt_fast.flops")

__all__ = [
    "ClipFlops",
    "encoder_layer_flops",
    "encoder_flops",
    "kept_tokens",
    "clip_flops",
    "train_step_flops",
    "tokens_per_clip",
    "gpu_peak_flops",
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


# Dense (no sparsity) peak rates in FLOP/s from the vendors' data sheets and whitepapers:
# (bf16 tensor, fp16 tensor, tf32 tensor, fp32), both 16-bit rates with fp32 accumulation
# (what PyTorch's matmuls use; GeForce cards run fp16 accumulation twice as fast). None
# where the card has no such unit (V100: no bf16 tensor cores; its fp32 matmuls run at the
# fp32 rate whatever TF32 says). Keyed by (model, form factor) as _parse_gpu_name reads
# the name CUDA reports; form factor "" where the name gives none.
_A100 = (312e12, 312e12, 156e12, 19.5e12)  # SXM4 and PCIe, 40 and 80 GB: the same rates
_H100_SXM = (989e12, 989e12, 494e12, 67e12)
_H100_PCIE = (756e12, 756e12, 378e12, 51e12)
_HOPPER_NVL = (835e12, 835e12, 417.5e12, 60e12)  # H100 NVL and H200 NVL (PCIe cards)
_GPU_PEAKS: Dict[Tuple[str, str], Tuple[Optional[float], ...]] = {
    ("B200", ""): (2250e12, 2250e12, 1100e12, 80e12),  # HGX B200 (1000 W)
    ("H200", ""): _H100_SXM,  # "NVIDIA H200" is the SXM board
    ("H200", "SXM"): _H100_SXM,
    ("H200", "NVL"): _HOPPER_NVL,
    ("GH200", ""): _H100_SXM,  # "NVIDIA GH200 480GB"
    ("GH200", "HBM3"): _H100_SXM,
    ("GH200", "HBM3E"): _H100_SXM,
    ("H100", "SXM"): _H100_SXM,
    ("H100", "HBM3"): _H100_SXM,  # "NVIDIA H100 80GB HBM3" is the SXM5 board
    ("H100", "PCIE"): _H100_PCIE,
    ("H100", "NVL"): _HOPPER_NVL,
    ("A100", ""): _A100,
    ("A100", "SXM"): _A100,
    ("A100", "PCIE"): _A100,
    ("A10", ""): (125e12, 125e12, 62.5e12, 31.2e12),
    ("L40S", ""): (362.05e12, 362.05e12, 183e12, 91.6e12),
    ("L40", ""): (181.05e12, 181.05e12, 90.5e12, 90.5e12),
    ("L4", ""): (121e12, 121e12, 60e12, 30.3e12),
    ("V100", "SXM"): (None, 125e12, 15.7e12, 15.7e12),
    ("V100", "PCIE"): (None, 112e12, 14e12, 14e12),
    ("V100S", "PCIE"): (None, 130e12, 16.4e12, 16.4e12),
    ("RTX 4090", ""): (165.2e12, 165.2e12, 82.6e12, 82.6e12),
    ("RTX 3090", ""): (71e12, 71e12, 35.6e12, 35.6e12),
}
_VENDOR_WORDS = ("NVIDIA", "TESLA", "GEFORCE")
_MEMORY_TYPES = ("HBM2", "HBM2E", "HBM3", "HBM3E")


def _parse_gpu_name(name: str) -> Optional[Tuple[str, str]]:
    """``(model, form factor)`` of a CUDA device name, or None when a word is not understood.

    The name is upper-cased and split at spaces, ``-`` and ``_``; the vendor words
    (NVIDIA, Tesla, GeForce) and memory sizes (``80GB``, ``144G``) are dropped. The first
    word is the model (``RTX`` takes the next word with it), the rest may only be a form
    factor (``SXM2``..``SXM5`` read as ``SXM``, ``PCIE``, ``NVL``) or a memory type
    (``HBM3``, which stands for the form factor when none is given). Anything else
    (``Ti``, ``D``, ``Laptop``, a MIG slice ``MIG 1g.5gb``) makes the name unknown, so a
    variant never inherits another card's peak: "NVIDIA GeForce RTX 4090 D" -> None.
    """
    words = [w for w in re.split(r"[\s_-]+", name.upper()) if w]
    while words and words[0] in _VENDOR_WORDS:
        words.pop(0)
    if not words:
        return None
    model, rest = words[0], words[1:]
    if model == "RTX" and rest:
        model, rest = f"RTX {rest[0]}", rest[1:]
    form = memory = ""
    for w in rest:
        if re.fullmatch(r"\d+GB?", w):
            continue
        if re.fullmatch(r"SXM\d?", w) or w in ("PCIE", "NVL"):
            if form:
                return None
            form = "SXM" if w.startswith("SXM") else w
        elif w in _MEMORY_TYPES:
            memory = w
        else:
            return None
    return model, form or memory


def gpu_peak_flops(name: str, dtype: torch.dtype = torch.bfloat16, allow_tf32: bool = True) -> Optional[float]:
    """Data-sheet dense peak FLOP/s of the CUDA device called ``name`` for ``dtype`` matmuls.

    Args:
        name: the device name as ``torch.cuda.get_device_name`` gives it, e.g.
            ``"NVIDIA H100 80GB HBM3"``, ``"NVIDIA A100-SXM4-40GB"``, ``"NVIDIA L40S"``.
        dtype: bfloat16, float16 or float32 (the matmul input type).
        allow_tf32: for float32, whether matmuls may use TF32 tensor cores.

    Returns:
        FLOP/s, or None for a name not in the table (exact model and form factor; see
        :func:`_parse_gpu_name`), a MIG slice, a dtype the card has no rate for, or a dtype
        other than the three above.
    """
    key = _parse_gpu_name(name)
    if key is None or key not in _GPU_PEAKS:
        return None
    bf16, fp16, tf32, fp32 = _GPU_PEAKS[key]
    if dtype == torch.bfloat16:
        return bf16
    if dtype == torch.float16:
        return fp16
    if dtype == torch.float32:
        return tf32 if allow_tf32 else fp32
    return None


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Optional[float]:
    """Peak dense FLOP/s of ``device`` for matmuls in ``dtype``, or None when unknown.

    CUDA devices are looked up by name with :func:`gpu_peak_flops` (for float32, TF32
    counts when ``torch.backends.cuda.matmul.allow_tf32`` is set); an unknown name logs a
    warning that MFU needs ``--peak-tflops``. For a CPU there is no reliable data-sheet
    figure: this returns None and the trainer uses :func:`measure_cpu_peak` instead, or
    ``--peak-tflops``.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    peak = gpu_peak_flops(name, dtype, allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    if peak is None:
        log.warning(
            "no data-sheet peak for %r with %s matmuls in vatt_fast.flops: MFU is not reported; pass "
            "--peak-tflops (the card's dense TFLOP/s for that dtype) to get it", name, str(dtype).replace("torch.", "")
        )
    return peak


def measure_cpu_peak(seconds: float = 0.25, size: int = 512) -> float:
    """FLOP/s that ``size x size`` fp32 matmuls reach on this CPU (stands in for a data-sheet peak).

    Runs matmuls (at least one, after one warm-up) until ``seconds`` have passed and
    returns ``2 * size**3 * count / elapsed``, with the current torch thread count. The
    operands come from a private generator: the global random stream (a training run's
    seed) is left as it was.
    """
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    torch.mm(a, b)
    n, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    return 2 * size ** 3 * n / elapsed
