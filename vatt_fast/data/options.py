"""The options of a loader, in one validated object.

:func:`~vatt_fast.data.loader.build_loader` turns its keywords into one :class:`LoaderOptions`
and hands it to the backend it picks (PyAV or DALI, through
:class:`~vatt_fast.data.base.ClipLoaderBase`) and to the
:class:`~vatt_fast.data.sampler.ShardedSchedule`; none of them takes the keywords again. The
clip geometry is not here: it is :class:`~vatt_fast.data.sampler.ClipSpec`'s, from the model config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

__all__ = ["LoaderOptions"]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@dataclass(frozen=True)
class LoaderOptions:
    """How a loader iterates, shards and delivers batches.

    A field left ``None`` gets the default below when the object is made, so every field of an
    instance holds a value, except ``device`` (``None``: batches stay where the backend makes them).

    Attributes:
        batch_size: clips per batch on this rank.
        split: the manifest split the loader reads; only decides the default of ``train``.
        train: random clips, infinite iteration, reshuffled every epoch; otherwise one ordered
            pass of centred clips per ``iter()``. Default: ``split == "train"``.
        seed: seed of the epoch permutations and of every random window, crop and flip.
        rank, world_size: this process's shard. Default: from ``torch.distributed`` when it is
            initialised, else 0 and 1.
        drop_last: drop the last incomplete batch of an epoch. Default: ``train``.
        num_workers: decoding worker processes (PyAV; 0 decodes in the main process) or threads (DALI).
        decoder_threads: FFmpeg threads per video decode in each PyAV worker. 1 (the default)
            decodes in the worker's own thread: the most frames per core once the workers fill
            the cores (run about one worker per core), as workers x threads beyond the cores
            only adds switching, and a 256p VP9 frame is one tile, which slice threads cannot
            split. ``n > 1``: frame and slice threading with ``n`` threads, for fewer workers
            than cores; 0: FFmpeg's automatic count (cores + 1 threads per decode, PyAV's
            default). The decoded pixels do not depend on it. DALI ignores it.
        device: move batches there (DALI on CUDA decodes there directly).
        pin_memory: pin host batches in page-locked memory (PyAV). Default: when CUDA is
            available and ``device`` is ``None`` or a CUDA device.
        prefetch_factor: batches each PyAV worker, or the DALI pipeline, keeps ready.

    Raises:
        ValueError: a value out of range, named with the fix.
    """

    batch_size: int
    split: str = "train"
    train: Optional[bool] = None
    seed: int = 0
    rank: Optional[int] = None
    world_size: Optional[int] = None
    drop_last: Optional[bool] = None
    num_workers: int = 2
    decoder_threads: int = 1
    device: Optional[Union[str, torch.device]] = None
    pin_memory: Optional[bool] = None
    prefetch_factor: int = 2

    def __post_init__(self) -> None:
        train = (self.split == "train") if self.train is None else bool(self.train)
        device = torch.device(self.device) if self.device is not None else None
        if self.pin_memory is None:
            pin_memory = torch.cuda.is_available() and (device is None or device.type == "cuda")
        else:
            pin_memory = bool(self.pin_memory)
        resolved = dict(
            batch_size=int(self.batch_size),
            train=train,
            seed=int(self.seed),
            rank=int(self.rank if self.rank is not None else (torch.distributed.get_rank() if _distributed() else 0)),
            world_size=int(self.world_size if self.world_size is not None else
                           (torch.distributed.get_world_size() if _distributed() else 1)),
            drop_last=train if self.drop_last is None else bool(self.drop_last),
            num_workers=int(self.num_workers),
            decoder_threads=int(self.decoder_threads),
            device=device,
            pin_memory=pin_memory,
            prefetch_factor=int(self.prefetch_factor),
        )
        for name, value in resolved.items():
            object.__setattr__(self, name, value)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={self.rank}, world_size={self.world_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.decoder_threads < 0:
            raise ValueError(f"decoder_threads must be >= 0 (0: FFmpeg's automatic count), got {self.decoder_threads}")
        if self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be >= 1, got {self.prefetch_factor}")
