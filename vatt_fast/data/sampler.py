"""Clip sampling shared by every loader backend.

A :class:`ClipSampler` turns one manifest record into a :class:`ClipPlan`: which frames
to decode (T frames at the dataset frame rate), the audio span over the same time, the
crop and flip, and the K tokenised captions nearest the window. Backends (PyAV, DALI)
only execute plans, so both give the same clips for the same seed.

Geometry of a plan (all backends must follow it):

* Frame ``k`` of a video is shown at ``k / fps`` seconds; a video of ``duration``
  seconds has ``n = floor(duration * fps)`` frames. The window is frames
  ``f0 .. f0 + T - 1``, so it spans ``[f0 / fps, (f0 + T) / fps)``. Training draws
  ``f0`` uniformly in ``[0, n - T]``; evaluation takes the centred ``(n - T) // 2``.
* A video shorter than the window (``n < T``) starts at 0 and repeats its last frame
  (``plan.short`` is True); its audio is zero-padded. The loader counts it as ``short``.
* Frames are resized so that their short side is ``spec.resize_to`` (the long side is
  ``round(long * resize_to / short)``, see :func:`resized_size`), then a square of
  ``crop[2]`` pixels is cut at ``(crop[0], crop[1])`` (random in training, centred in
  evaluation) and flipped horizontally when ``flip``. The crop size is always
  ``spec.frame_size``.
* Audio covers ``[audio_start, audio_start + audio_length)`` seconds at
  ``spec.audio_sample_rate``: samples ``round(audio_start * sr) + j`` for
  ``j < spec.audio_samples``.
* Captions: among the captions with at least one word, the K nearest the window
  (distance 0 when they overlap it; ties: larger overlap, then earlier start), in that
  order; slots without a caption are padding with ``text_mask`` False.

:class:`ShardedSchedule` fixes which records each batch of each epoch holds on each rank,
so every backend iterates, shards and resumes identically.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, fields
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from vatt_fast.data.manifest import Caption, VideoRecord
from vatt_fast.data.options import LoaderOptions
from vatt_fast.data.vocab import Vocabulary
from vatt_fast.models.config import VATTConfig, get_config

__all__ = [
    "ClipSpec",
    "ClipPlan",
    "ClipSampler",
    "ShardedSchedule",
    "resized_size",
    "probe_video_size",
    "select_captions",
]


@dataclass(frozen=True)
class ClipSpec:
    """The geometry of one training clip: what the loaders and :class:`ClipPlan` s follow.

    The first six fields are the model config's (:class:`~vatt_fast.models.config.VATTConfig`),
    which is where their values come from (:meth:`from_preset`); ClipSpec declares no defaults
    of its own for them. It stays a separate record because a loader's clips may differ from
    what a model preset allows (``build_loader(..., num_frames=6)``); the last two fields are
    derived from the others unless given.

    Attributes:
        num_frames: T, frames per clip (at ``fps``).
        fps: frame rate of the stored videos and of the clips (VATT: 10).
        frame_size: side of the square crop fed to the model, pixels.
        audio_sample_rate: sample rate of the clip's waveform, Hz.
        num_captions: K captions per clip.
        caption_len: L words per caption.
        resize_to: short side the frames are resized to before cropping (>= frame_size).
            Default: ``round(frame_size * 8 / 7)`` (224 -> 256, 32 -> 37).
        audio_samples: S, waveform samples per clip. Default:
            ``round(num_frames / fps * audio_sample_rate)`` (the audio spans the frames' time).
    """

    num_frames: int
    fps: float
    frame_size: int
    audio_sample_rate: int
    num_captions: int
    caption_len: int
    resize_to: Optional[int] = None
    audio_samples: Optional[int] = None

    def __post_init__(self) -> None:
        for f in fields(self):  # in order: a derived field sees the others checked
            value = getattr(self, f.name)
            if f.name == "resize_to" and not value:
                value = round(self.frame_size * 8 / 7)
            elif f.name == "audio_samples" and not value:
                value = round(self.num_frames / self.fps * self.audio_sample_rate)
            value = float(value) if f.name == "fps" else int(value)
            if not value > 0:
                raise ValueError(f"ClipSpec.{f.name} must be positive, got {value}")
            object.__setattr__(self, f.name, value)
        if self.resize_to < self.frame_size:
            raise ValueError(
                f"ClipSpec.resize_to ({self.resize_to}) is smaller than frame_size ({self.frame_size}); "
                f"the crop must fit in the resized frame: use resize_to >= frame_size"
            )

    @property
    def clip_seconds(self) -> float:
        return self.num_frames / self.fps

    @classmethod
    def from_preset(cls, name_or_config: Union[str, VATTConfig] = "tiny", **overrides: Any) -> "ClipSpec":
        """The clip geometry of a model preset (or config), with ``overrides`` of any ClipSpec field.

        The fields ClipSpec shares with the config are read from it by name; the derived fields
        (``resize_to``, ``audio_samples``) follow the overridden values.

        Example:
            >>> ClipSpec.from_preset("tiny").audio_samples
            6400
        """
        cfg = name_or_config if isinstance(name_or_config, VATTConfig) else get_config(name_or_config)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown ClipSpec field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**{**{name: getattr(cfg, name) for name in _CONFIG_FIELDS}, **overrides})


# The ClipSpec fields a model config declares (all but the derived resize_to and audio_samples).
_CONFIG_FIELDS = tuple(f.name for f in fields(ClipSpec) if f.name in {g.name for g in fields(VATTConfig)})


@dataclass
class ClipPlan:
    """Everything a backend needs to produce one clip (see the module docstring).

    Attributes:
        index: index of the record in the loader's record list.
        video, audio: absolute media paths.
        start_time: window start in seconds (``frame_indices[0] / fps``).
        frame_indices: the T frame numbers to decode, at the dataset fps (repeats the last
            frame when the video is shorter than the window).
        audio_start, audio_length: the audio span in seconds.
        resized: (height, width) of the frame after the short-side resize.
        crop: (y, x, size) of the square crop in the resized frame.
        flip: horizontal flip after the crop.
        text: int64 ``[K, L]`` caption ids (0 = padding).
        text_mask: bool ``[K]``, False for missing captions.
        label: the record's label, -1 when it has none.
        short: True when the video has fewer than T frames.
        epoch: the epoch the plan was drawn for.
    """

    index: int
    video: str
    audio: str
    start_time: float
    frame_indices: List[int]
    audio_start: float
    audio_length: float
    resized: Tuple[int, int]
    crop: Tuple[int, int, int]
    flip: bool
    text: np.ndarray
    text_mask: np.ndarray
    label: int = -1
    short: bool = False
    epoch: int = 0


def resized_size(height: int, width: int, short_side: int) -> Tuple[int, int]:
    """(height, width) after resizing so that the short side is ``short_side`` (aspect kept)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    if height <= width:
        return short_side, max(short_side, int(round(width * short_side / height)))
    return max(short_side, int(round(height * short_side / width))), short_side


_SIZE_CACHE: Dict[str, Tuple[int, int]] = {}
_SIZE_LOCK = threading.Lock()


def probe_video_size(path: str) -> Tuple[int, int]:
    """(height, width) of the first video stream of ``path``, read from the file header (cached)."""
    with _SIZE_LOCK:
        if path in _SIZE_CACHE:
            return _SIZE_CACHE[path]
    import av

    with av.open(path) as c:
        if not c.streams.video:
            raise ValueError(f"{path} has no video stream")
        s = c.streams.video[0]
        hw = (int(s.codec_context.height), int(s.codec_context.width))
    with _SIZE_LOCK:
        _SIZE_CACHE[path] = hw
    return hw


def select_captions(captions: List[Caption], t0: float, t1: float, k: int) -> List[Caption]:
    """The ``k`` captions nearest the window ``[t0, t1)`` (overlapping first; see module docstring)."""
    scored = []
    for c in captions:
        if not Vocabulary.words(c.text):
            continue
        dist = max(0.0, c.start - t1, t0 - c.end)
        overlap = max(0.0, min(c.end, t1) - max(c.start, t0))
        scored.append(((dist, -overlap, c.start, c.end), c))
    scored.sort(key=lambda s: s[0])
    return [c for _, c in scored[:k]]


class ClipSampler:
    """Draws clip plans, deterministically in ``(seed, epoch, index)``.

    Args:
        spec: the clip geometry.
        vocab: tokenises the captions.
        train: random window, crop and flip when True; centred window and crop, no flip otherwise.
        seed: base seed of every random draw.

    Example:
        >>> sampler = ClipSampler(ClipSpec.from_preset("tiny"), vocab, train=True, seed=0)
        >>> plan = sampler.plan(records[3], index=3, epoch=0)
    """

    def __init__(self, spec: ClipSpec, vocab: Vocabulary, train: bool, seed: int = 0) -> None:
        self.spec = spec
        self.vocab = vocab
        self.train = bool(train)
        self.seed = int(seed)

    def num_frames_of(self, record: VideoRecord) -> int:
        """Frames of the video at the dataset fps: ``floor(duration * fps)`` (at least 1)."""
        return max(1, int(math.floor(record.duration * self.spec.fps + 1e-3)))

    def frame_size_of(self, record: VideoRecord) -> Tuple[int, int]:
        """(height, width) of the stored frames (from the manifest, else from the file header)."""
        if record.width is not None and record.height is not None:
            return int(record.height), int(record.width)
        return probe_video_size(record.video)

    def plan(self, record: VideoRecord, index: int, epoch: int = 0) -> ClipPlan:
        """The clip of ``record`` for this ``index`` and ``epoch``.

        Args:
            record: the manifest record.
            index: its index in the loader's record list (part of the seed).
            epoch: the epoch (part of the seed; ignored in evaluation).
        """
        spec = self.spec
        T = spec.num_frames
        n = self.num_frames_of(record)
        h, w = self.frame_size_of(record)
        rh, rw = resized_size(h, w, spec.resize_to)
        size = spec.frame_size
        max_start = max(0, n - T)
        if self.train:
            rng = np.random.default_rng([self.seed, int(epoch), int(index)])
            f0 = int(rng.integers(0, max_start + 1))
            y = int(rng.integers(0, rh - size + 1))
            x = int(rng.integers(0, rw - size + 1))
            flip = bool(rng.random() < 0.5)
        else:
            f0, y, x, flip = max_start // 2, (rh - size) // 2, (rw - size) // 2, False
        frames = [min(f0 + i, n - 1) for i in range(T)]
        t0 = f0 / spec.fps
        t1 = t0 + T / spec.fps
        chosen = select_captions(record.captions, t0, t1, spec.num_captions)
        text = np.zeros((spec.num_captions, spec.caption_len), dtype=np.int64)
        mask = np.zeros((spec.num_captions,), dtype=bool)
        if chosen:
            text[: len(chosen)] = self.vocab.encode_batch([c.text for c in chosen], spec.caption_len)
            mask[: len(chosen)] = True
        return ClipPlan(
            index=int(index),
            video=record.video,
            audio=record.audio,
            start_time=t0,
            frame_indices=frames,
            audio_start=t0,
            audio_length=T / spec.fps,
            resized=(rh, rw),
            crop=(y, x, size),
            flip=flip,
            text=text,
            text_mask=mask,
            label=-1 if record.label is None else int(record.label),
            short=n < T,
            epoch=int(epoch),
        )


class ShardedSchedule:
    """Which records each batch holds, per epoch and rank (shared by every backend).

    Training: epoch ``e`` uses a permutation of all records drawn from ``(seed, e)``;
    rank ``r`` takes ``perm[r::world_size]`` cut to ``num_records // world_size`` items
    (so every rank has the same number of batches and the shards are disjoint).
    Evaluation: records in order, rank ``r`` takes ``arange(N)[r::world_size]`` (every
    record exactly once over all ranks; ranks may differ by one record).

    Args:
        num_records: records in the split.
        options: the loader's options; the schedule reads ``batch_size``, ``train`` (shuffled,
            equal shards when True), ``seed`` (of the permutations), ``rank``, ``world_size``
            and ``drop_last`` (drop the last incomplete batch of every epoch).
    """

    def __init__(self, num_records: int, options: LoaderOptions) -> None:
        if num_records < 1:
            raise ValueError("the split has no records; check the manifest's split names")
        self.num_records = int(num_records)
        self.options = o = options
        n = self.shard_size
        self.batches_per_epoch = n // o.batch_size if o.drop_last else -(-n // o.batch_size)
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"rank {o.rank} gets {n} records of {num_records} (world_size {o.world_size}), fewer than one "
                f"batch of {o.batch_size} with drop_last=True; lower batch_size or use drop_last=False"
            )

    @property
    def shard_size(self) -> int:
        """Records this rank sees per epoch."""
        o = self.options
        if o.train:
            return self.num_records // o.world_size
        return len(range(o.rank, self.num_records, o.world_size))

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.options.seed, int(epoch), 0x5EED]).permutation(self.num_records)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """int64 record indices of this rank for ``epoch``, in batch order."""
        o = self.options
        if o.train:
            return self._permutation(epoch)[o.rank :: o.world_size][: self.shard_size].astype(np.int64)
        return np.arange(o.rank, self.num_records, o.world_size, dtype=np.int64)

    def batch(self, epoch: int, b: int) -> np.ndarray:
        """Record indices of batch ``b`` of ``epoch``."""
        if not 0 <= b < self.batches_per_epoch:
            raise IndexError(f"batch {b} out of range [0, {self.batches_per_epoch})")
        B = self.options.batch_size
        return self.epoch_indices(epoch)[b * B : (b + 1) * B]

    def global_batch(self, epoch: int, b: int) -> np.ndarray:
        """Record indices of batch ``b`` of ``epoch`` on every rank: the clips one optimizer step sees.

        A replacement for a bad record is drawn from outside this set, so the contrastive loss
        (which gathers features over ranks) never sees the same record twice in a step.
        """
        B, w = self.options.batch_size, self.options.world_size
        if self.options.train:
            # column r of the (shard_size, world_size) table is rank r's shard
            shards = self._permutation(epoch)[: w * self.shard_size].reshape(self.shard_size, w)
            return shards[b * B : (b + 1) * B].reshape(-1).astype(np.int64)
        return np.concatenate(
            [np.arange(r, self.num_records, w, dtype=np.int64)[b * B : (b + 1) * B] for r in range(w)]
        )

    def iterate(self, epoch: int = 0, batch: int = 0) -> Iterator[Tuple[int, int, np.ndarray]]:
        """``(epoch, batch, indices)`` from a position on: forever when training, else to the epoch end."""
        e, b = int(epoch), int(batch)
        B = self.options.batch_size
        while True:
            idx = self.epoch_indices(e)
            while b < self.batches_per_epoch:
                yield e, b, idx[b * B : (b + 1) * B]
                b += 1
            if not self.options.train:
                return
            e, b = e + 1, 0

    def identity(self) -> Dict[str, Any]:
        """What a saved position is only valid for (stored in loader state dicts)."""
        o = self.options
        return {
            "seed": o.seed,
            "num_records": self.num_records,
            "batch_size": o.batch_size,
            "rank": o.rank,
            "world_size": o.world_size,
            "train": o.train,
        }

    def check_identity(self, state: Dict[str, Any]) -> None:
        """Raise when ``state`` was saved by a loader over different data or sharding."""
        mine = self.identity()
        diff = {k: (state.get(k), v) for k, v in mine.items() if k in state and state[k] != v}
        if diff:
            raise ValueError(
                "loader state does not match this loader: "
                + ", ".join(f"{k}: saved {a!r}, here {b!r}" for k, (a, b) in diff.items())
                + "; build the loader with the same dataset, split, batch size, seed and world size"
            )
