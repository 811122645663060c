"""The fine-tuning recipe: augmentation, the classification loss, the optimizer, gradient clipping.

VATT_SPEC.md and the release (``vatt/configs/experiment.py`` ``Finetune``, DMVR's processors):
SGD with momentum 0.9, lr 5e-3, linear warmup then cosine (the trainer's
:func:`~vatt_fast.training.schedule.lr_at`, ending at 0), the encoder's gradient clipped to a
global norm of 0.75 (the head's not clipped: ``gradient_clip_norm_cls = 0``), label smoothing
0.1. Augmentation, on the device, after the loader's random window, random square crop and
horizontal flip:

- video, scale jitter (DMVR ``scale_jitter_augm``): with probability 0.8 the frames are
  resized by independent height and width factors in [0.8, 1.2] (never below the crop), then a
  random ``frame_size`` square is cut;
- video, colour (DMVR ``color_default_augm``): with probability 0.8, the same for every frame
  of a clip: brightness +-32/255, saturation x[0.6, 1.4], contrast x[0.6, 1.4], hue +-0.2 of a
  turn (in that order), clipped to the pixel range. Saturation blends with the luma and hue
  rotates the chroma in YIQ: the usual closed forms of the HSV operations;
- audio, the release's counterparts: mixup (Beta(5, 2) weights, clips and targets mixed with a
  permutation of the batch; on for audio by default) and Gaussian noise of ``--audio-noise``
  times the clip's peak (0 by default).

Every random draw of a clip comes from a generator seeded by ``(seed, step, record index)``,
so a clip is augmented the same way whatever the number of ranks, and a resumed run
continues exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "AudioAugment",
    "VideoAugment",
    "classification_loss",
    "clip_generator",
    "clip_grad_groups",
    "smooth_targets",
]

# ITU-R BT.601 luma and the YIQ chroma basis (rows: Y, I, Q).
_LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def clip_generator(seed: int, step: int, index: int) -> torch.Generator:
    """A CPU generator for one clip's draws, seeded by ``(seed, step, record index)``."""
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + int(index) * 0x94D049BB133111EB)
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


def _uniform(g: torch.Generator, n: int) -> List[float]:
    return torch.rand(n, generator=g, dtype=torch.float64).tolist()


@dataclass(frozen=True)
class VideoAugment:
    """Scale jitter, random crop and colour jitter of a batch of clips (see the module docstring).

    Args:
        frame_size: side of the output crop.
        scale_prob, scale_min, scale_max: scale jitter (probability, factor range).
        color_prob, brightness, saturation, contrast, hue: colour jitter (probability; brightness
            as a fraction of the pixel range; saturation/contrast as +- around 1; hue in turns).
    """

    frame_size: int
    scale_prob: float = 0.8
    scale_min: float = 0.8
    scale_max: float = 1.2
    color_prob: float = 0.8
    brightness: float = 32.0 / 255.0
    saturation: float = 0.4
    contrast: float = 0.4
    hue: float = 0.2

    def __call__(self, video: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """``video`` ``[B, T, H, W, 3]`` (uint8 or float, 0..255, ``H, W >= frame_size``) ->
        float ``[B, T, frame_size, frame_size, 3]`` in 0..255."""
        return torch.stack([self.clip(c, g) for c, g in zip(video, generators)])

    def clip(self, clip: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """One clip ``[T, H, W, 3]``; the draws are made in a fixed order, whatever is switched off."""
        u_scale, u_h, u_w, u_y, u_x, u_color, u_b, u_s, u_c, u_hue = _uniform(g, 10)
        size = self.frame_size
        x = clip.float()
        T, H, W, _ = x.shape
        if u_scale < self.scale_prob:
            nh = max(size, round(H * (self.scale_min + (self.scale_max - self.scale_min) * u_h)))
            nw = max(size, round(W * (self.scale_min + (self.scale_max - self.scale_min) * u_w)))
            if (nh, nw) != (H, W):
                x = F.interpolate(x.permute(0, 3, 1, 2), size=(nh, nw), mode="bilinear", align_corners=False)
                x = x.permute(0, 2, 3, 1)  # (T, nh, nw, 3)
                H, W = nh, nw
        y0 = min(H - size, int(u_y * (H - size + 1)))
        x0 = min(W - size, int(u_x * (W - size + 1)))
        x = x[:, y0 : y0 + size, x0 : x0 + size]  # (T, size, size, 3)
        if u_color < self.color_prob:
            x = self.color(x, 2 * u_b - 1, 2 * u_s - 1, 2 * u_c - 1, 2 * u_hue - 1)
        return x

    def color(self, x: torch.Tensor, b: float, s: float, c: float, h: float) -> torch.Tensor:
        """Colour jitter of ``x`` ``[T, H, W, 3]`` (0..255) with draws ``b, s, c, h`` in [-1, 1]."""
        x = x + 255.0 * self.brightness * b
        luma = x @ x.new_tensor(_LUMA)[:, None]  # (T, H, W, 1)
        x = luma + (1.0 + self.saturation * s) * (x - luma)
        mean = x.mean(dim=(1, 2), keepdim=True)  # per frame and channel, as tf.image.adjust_contrast
        x = mean + (1.0 + self.contrast * c) * (x - mean)
        if self.hue:
            yiq = x.new_tensor(_RGB_TO_YIQ)
            angle = 2.0 * math.pi * self.hue * h
            rot = x.new_tensor([[1.0, 0.0, 0.0], [0.0, math.cos(angle), -math.sin(angle)],
                                [0.0, math.sin(angle), math.cos(angle)]])  # fmt: skip
            x = x @ (torch.linalg.inv(yiq) @ rot @ yiq).T
        return x.clamp(0.0, 255.0)


@dataclass(frozen=True)
class AudioAugment:
    """Gaussian noise and mixup of a batch of waveforms (see the module docstring).

    Args:
        noise: noise standard deviation as a fraction of each clip's peak (0: off).
        mixup: mix clips and targets with a permutation of the batch.
        mixup_alpha, mixup_beta: the Beta distribution of the mixing weight of the clip itself.
    """

    noise: float = 0.0
    mixup: bool = True
    mixup_alpha: float = 5.0
    mixup_beta: float = 2.0

    def __call__(
        self, audio: torch.Tensor, targets: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> "tuple[torch.Tensor, torch.Tensor]":
        """``audio`` float ``[B, S]``, ``targets`` float ``[B, C]`` (distributions or multi-hot) ->
        both augmented. The batch's permutation and weights come from the first clip's generator."""
        x = audio.float()
        if self.noise > 0:
            peak = x.abs().amax(dim=1, keepdim=True)
            eps = torch.stack([torch.randn(x.shape[1], generator=g) for g in generators]).to(x.device)
            x = x + self.noise * peak * eps
        if self.mixup and x.shape[0] > 1:
            g = generators[0]
            perm = torch.randperm(x.shape[0], generator=g).to(x.device)
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))
            lam = torch.from_numpy(rng.beta(self.mixup_alpha, self.mixup_beta, (x.shape[0], 1))).float().to(x.device)
            x = lam * x + (1 - lam) * x[perm]
            targets = lam * targets + (1 - lam) * targets[perm]
        return x, targets


def smooth_targets(targets: torch.Tensor, num_classes: int, smoothing: float, multi_label: bool) -> torch.Tensor:
    """Float ``[B, C]`` targets from class positions ``[B]`` (one-hot) or multi-hot ``[B, C]``,
    smoothed: ``(1 - eps) * y + eps / C`` (softmax), ``(1 - eps) * y + eps / 2`` (per-class sigmoid)."""
    y = F.one_hot(targets, num_classes).float() if targets.dim() == 1 else targets.float()
    if smoothing:
        y = (1.0 - smoothing) * y + smoothing / (2.0 if multi_label else num_classes)
    return y


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Per-clip loss ``[B]``: cross-entropy against the target distribution (softmax), or the
    mean over classes of the binary cross-entropy (multi-label)."""
    logits = logits.float()
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)


def clip_grad_groups(groups: Iterable[tuple]) -> torch.Tensor:
    """Clip each ``(parameters, max_norm)`` group to its own global norm (``max_norm <= 0``: no clip);
    returns the norm of all gradients together, before clipping."""
    norms = []
    for params, max_norm in groups:
        params = [p for p in params if p.grad is not None]
        if not params:
            continue
        limit = max_norm if max_norm and max_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        if hasattr(norm, "full_tensor"):  # FSDP2: a replicated DTensor
            norm = norm.full_tensor()
        norms.append(norm.float())
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
