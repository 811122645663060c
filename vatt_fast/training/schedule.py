"""VATT's learning-rate schedule: linear warmup, then a half-cosine (VATT_SPEC.md)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict

__all__ = ["LRSchedule", "lr_at"]


def lr_at(step: int, *, lr: float, end_lr: float, warmup_steps: int, total_steps: int) -> float:
    """VATT's schedule: linear warmup to ``lr`` then a half-cosine down to ``end_lr``.

    Step ``s`` (0-based, the update about to be made) gets ``lr * (s + 1) / warmup_steps``
    during warmup, then ``end_lr + (lr - end_lr) * (1 + cos(pi * p)) / 2`` with
    ``p = (s - warmup) / (total - warmup)`` clamped to [0, 1].
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return end_lr + (lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LRSchedule:
    """The four numbers of :func:`lr_at`; ``schedule(step)`` is the learning rate of update ``step``."""

    lr: float
    end_lr: float
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        return lr_at(step, **self.as_dict())

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)
