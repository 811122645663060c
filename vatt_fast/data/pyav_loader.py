"""PyAV backend: torch DataLoader workers that decode clip plans with PyAV (FFmpeg).

:func:`decode_with_pyav` is the reference decode of a :class:`~vatt_fast.data.sampler.ClipPlan`
(backend parity is measured against it):

* video: seek to the nearest keyframe at or before the first frame of the window, decode
  forward to the last one, convert each wanted frame to RGB at the resized size
  (``plan.resized``, swscale bilinear), crop ``plan.crop``, flip when ``plan.flip``;
* audio: decode the FLAC span around the window (with a margin of filter taps on each
  side), mix down to mono, and resample with :func:`resample_audio` (windowed sinc with a
  Hann window, 6 zero crossings, roll-off 0.99: torchaudio's default ``sinc_interp_hann``),
  so the cut is sample-exact against resampling the whole file.

Bad data raises :class:`BadSample` with a ``kind`` (``unreadable``, ``truncated``,
``missing_audio``); the loader replaces the sample by the next record and counts the kind.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from vatt_fast.data.base import ClipLoaderBase
from vatt_fast.data.manifest import VideoRecord
from vatt_fast.data.sampler import ClipPlan, ClipSampler, ClipSpec, ShardedSchedule
from vatt_fast.data.vocab import Vocabulary

__all__ = [
    "BadSample",
    "decode_with_pyav",
    "decode_video_pyav",
    "decode_audio_pyav",
    "resample_audio",
    "ClipDataset",
    "PyAVLoader",
    "collate_clips",
]

# Fraction of the window's audio that must be present before a file counts as truncated.
_AUDIO_MIN_COVERAGE = 0.95
# Consecutive records tried (index, index + 1, ...) before a batch gives up.
MAX_REPLACEMENTS = 64


class BadSample(Exception):
    """A record that cannot give a clip. ``kind`` names the counter it goes to."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


# ------------------------------------------------------------------------------------
# audio resampling
# ------------------------------------------------------------------------------------
_KERNELS: Dict[Tuple[int, int], Tuple[np.ndarray, int]] = {}


def _sinc_kernel(orig: int, new: int, zero_crossings: int = 6, rolloff: float = 0.99) -> Tuple[np.ndarray, int]:
    """Polyphase windowed-sinc kernel ``[new, 2 * width + orig]`` for reduced rates orig -> new.

    Row ``p`` holds the taps of output phase ``p`` over input samples
    ``k * orig - width ... k * orig + width + orig - 1`` (output ``k * new + p``).
    """
    key = (orig, new)
    if key in _KERNELS:
        return _KERNELS[key]
    base = min(orig, new) * rolloff
    width = math.ceil(zero_crossings * orig / base)
    idx = np.arange(-width, width + orig, dtype=np.float64)[None, :] / orig
    t = -np.arange(new, dtype=np.float64)[:, None] / new + idx
    t = np.clip(t * base, -zero_crossings, zero_crossings)
    window = np.cos(t * math.pi / zero_crossings / 2) ** 2
    t = t * math.pi
    sinc = np.sin(t) / np.where(t == 0, 1.0, t)
    sinc[t == 0] = 1.0
    kernel = (sinc * window * (base / orig)).astype(np.float32)
    _KERNELS[key] = (kernel, width)
    return kernel, width


def resample_audio(x: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Resample a mono waveform (windowed sinc, Hann window; torchaudio's default method).

    Output sample ``m`` is the band-limited value of the input at time ``m / new_rate``,
    with zeros assumed outside the input. Same taps as ``torchaudio.functional.resample``
    (``lowpass_filter_width=6``, ``rolloff=0.99``, ``sinc_interp_hann``), in numpy.

    Args:
        x: float32 ``[N]`` waveform at ``orig_rate``.
        orig_rate, new_rate: sample rates in Hz.

    Returns:
        float32 ``[ceil(N * new_rate / orig_rate)]``.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"resample_audio expects a 1-D waveform, got shape {x.shape}")
    if orig_rate == new_rate:
        return x.copy()
    g = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // g, int(new_rate) // g
    kernel, width = _sinc_kernel(orig, new)
    n = x.shape[0]
    xpad = np.concatenate([np.zeros(width, np.float32), x, np.zeros(width + orig, np.float32)])
    windows = np.lib.stride_tricks.sliding_window_view(xpad, kernel.shape[1])[::orig]  # (frames, taps)
    out = (windows @ kernel.T).reshape(-1)  # (frames * new,)
    return np.ascontiguousarray(out[: math.ceil(new * n / orig)], dtype=np.float32)


# ------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------
def _frame_index(frame: Any, fps: float) -> Optional[int]:
    """Frame number of a decoded frame from its timestamp (None when it has none)."""
    if frame.pts is None or frame.time is None:
        return None
    return int(round(float(frame.time) * fps))


def decode_video_pyav(plan: ClipPlan, spec: ClipSpec) -> np.ndarray:
    """uint8 ``[T, frame_size, frame_size, 3]`` frames of ``plan`` (RGB).

    Raises:
        BadSample: ``unreadable`` (cannot open, no video stream) or ``truncated`` (a wanted
            frame is missing or the stream breaks before it).
    """
    import av
    from av.video.reformatter import VideoReformatter

    wanted_set = set(plan.frame_indices)
    wanted = sorted(wanted_set)
    first, last = wanted[0], wanted[-1]
    rh, rw = plan.resized
    y, x, size = plan.crop
    if size != spec.frame_size or y < 0 or x < 0 or y + size > rh or x + size > rw:
        raise ValueError(
            f"plan crop {plan.crop} does not fit a {spec.frame_size}-pixel crop in the resized {rh}x{rw} frame; "
            f"plans must come from ClipSampler with the same ClipSpec"
        )
    try:
        container = av.open(plan.video)
    except (av.FFmpegError, OSError) as e:
        raise BadSample("unreadable", f"cannot open video {plan.video}: {e}") from None
    got: Dict[int, np.ndarray] = {}
    reformatter = VideoReformatter()  # one swscale context for the whole clip
    with container:
        if not container.streams.video:
            raise BadSample("unreadable", f"{plan.video} has no video stream")
        stream = container.streams.video[0]
        tb = stream.time_base
        for attempt in range(2):
            # First try: nearest keyframe at or before the window; second: from the start.
            target = int(math.floor(first / spec.fps / tb)) if (tb and not attempt) else 0
            try:
                container.seek(target, stream=stream, backward=True, any_frame=False)
                count = 0
                lowest = None
                for frame in container.decode(stream):
                    k = _frame_index(frame, spec.fps)
                    if k is None:  # no timestamps: count frames, which is only right from the start
                        if not attempt:
                            lowest = first + 1
                            break
                        k = count
                    count += 1
                    lowest = k if lowest is None else min(lowest, k)
                    if k in got or k < first:
                        continue
                    if k > last:
                        break
                    if k in wanted_set:
                        img = reformatter.reformat(
                            frame, width=rw, height=rh, format="rgb24", interpolation="BILINEAR"
                        ).to_ndarray()
                        got[k] = img[y : y + size, x : x + size]
                    if len(got) == len(wanted):
                        break
            except (av.FFmpegError, OSError) as e:
                raise BadSample("truncated", f"decoding {plan.video} failed near frame {first}: {e}") from None
            if len(got) == len(wanted) or lowest is None or lowest <= first:
                break
    missing = [k for k in wanted if k not in got]
    if missing:
        raise BadSample(
            "truncated",
            f"{plan.video}: frames {missing[:4]}{'...' if len(missing) > 4 else ''} of the window are missing "
            f"(file shorter than its manifest duration?)",
        )
    clip = np.stack([got[k] for k in plan.frame_indices])
    if plan.flip:
        clip = clip[:, :, ::-1]
    return np.ascontiguousarray(clip)


def _to_mono_float(frame: Any) -> np.ndarray:
    arr = frame.to_ndarray()
    fmt = frame.format
    ch = len(frame.layout.channels)
    if fmt.is_planar:
        arr = arr.reshape(ch, -1)
    else:
        arr = arr.reshape(-1, ch).T
    name = fmt.name.rstrip("p")
    if name == "s16":
        arr = arr.astype(np.float32) / 32768.0
    elif name == "s32":
        arr = arr.astype(np.float32) / 2147483648.0
    elif name == "u8":
        arr = (arr.astype(np.float32) - 128.0) / 128.0
    else:
        arr = arr.astype(np.float32)
    return arr.mean(axis=0)


def decode_audio_pyav(plan: ClipPlan, spec: ClipSpec) -> np.ndarray:
    """float32 ``[spec.audio_samples]`` mono waveform of ``plan`` at ``spec.audio_sample_rate``.

    Samples past the end of the file are zeros; the file counts as truncated only when
    less than 95% of the part of the window covered by video frames is present.

    Raises:
        BadSample: ``missing_audio`` (no file / no audio stream), ``unreadable`` (cannot
            open), ``truncated`` (too little audio in the window, or a decode error).
    """
    import av

    if not os.path.isfile(plan.audio):
        raise BadSample("missing_audio", f"audio file {plan.audio} does not exist")
    try:
        container = av.open(plan.audio)
    except (av.FFmpegError, OSError) as e:
        raise BadSample("unreadable", f"cannot open audio {plan.audio}: {e}") from None
    sr_out = int(spec.audio_sample_rate)
    S = int(spec.audio_samples)
    with container:
        if not container.streams.audio:
            raise BadSample("missing_audio", f"{plan.audio} has no audio stream")
        stream = container.streams.audio[0]
        sr_in = int(stream.codec_context.sample_rate)
        g = math.gcd(sr_in, sr_out)
        orig, new = sr_in // g, sr_out // g
        _, width = _sinc_kernel(orig, new) if orig != new else (None, 0)
        out0 = int(round(plan.audio_start * sr_out))
        # Output block start m0: a multiple of `new`, at least `margin` input samples early.
        margin_in = width + orig + 1
        pad_out = math.ceil(margin_in * new / orig) + 1
        m0 = ((out0 - pad_out) // new) * new
        i0 = (m0 // new) * orig
        i1 = i0 + math.ceil((out0 - m0 + S) * orig / new) + margin_in
        buf = np.zeros(i1 - i0, dtype=np.float32)
        filled = np.zeros(i1 - i0, dtype=bool)
        tb = stream.time_base
        for attempt in range(2):
            start_s = 0.0 if attempt else max(0, i0) / sr_in
            lowest = None
            try:
                container.seek(int(start_s / tb) if tb else 0, stream=stream, backward=True, any_frame=False)
                pos = None
                for frame in container.decode(stream):
                    if frame.pts is not None and frame.time is not None:
                        pos = int(round(float(frame.time) * sr_in))
                    elif pos is None:
                        pos = 0
                    data = _to_mono_float(frame)
                    lowest = pos if lowest is None else min(lowest, pos)
                    a, b = max(pos, i0), min(pos + data.shape[0], i1)
                    if b > a:
                        buf[a - i0 : b - i0] = data[a - pos : b - pos]
                        filled[a - i0 : b - i0] = True
                    pos += data.shape[0]
                    if pos >= i1:
                        break
            except (av.FFmpegError, OSError) as e:
                raise BadSample("truncated", f"decoding audio {plan.audio} failed near {start_s:.2f}s: {e}") from None
            if lowest is None or lowest <= max(0, i0):
                break
    # Coverage check over the span that real video frames cover.
    video_end = (max(plan.frame_indices) + 1) / spec.fps
    span_a = int(round(plan.audio_start * sr_in)) - i0
    span_b = int(round(min(plan.audio_start + plan.audio_length, video_end) * sr_in)) - i0
    if span_b > span_a and filled[span_a:span_b].mean() < _AUDIO_MIN_COVERAGE:
        raise BadSample(
            "truncated",
            f"{plan.audio}: only {filled[span_a:span_b].mean():.0%} of the audio in "
            f"[{plan.audio_start:.2f}, {plan.audio_start + plan.audio_length:.2f}) s is present",
        )
    res = resample_audio(buf, sr_in, sr_out)
    off = out0 - m0
    return np.ascontiguousarray(res[off : off + S])


def decode_with_pyav(plan: ClipPlan, spec: ClipSpec) -> Tuple[np.ndarray, np.ndarray]:
    """Reference decode of one plan.

    Returns:
        video uint8 ``[T, frame_size, frame_size, 3]`` and audio float32 ``[audio_samples]``.
    """
    return decode_video_pyav(plan, spec), decode_audio_pyav(plan, spec)


# ------------------------------------------------------------------------------------
# dataset and loader
# ------------------------------------------------------------------------------------
class ClipDataset(torch.utils.data.Dataset):
    """Map-style dataset over keys ``(epoch, index)`` producing one decoded clip each.

    A record that fails is replaced by the next one (``index + 1``, ... modulo the number
    of records, at most :data:`MAX_REPLACEMENTS` tries); every failure kind is listed in
    the sample's ``"bad"`` entry, plus ``short`` / ``no_captions`` for clips that are kept
    but padded.
    """

    def __init__(self, records: Sequence[VideoRecord], sampler: ClipSampler, with_label: bool) -> None:
        if not records:
            raise ValueError("ClipDataset needs at least one record; the split is empty")
        self.records = list(records)
        self.sampler = sampler
        self.spec = sampler.spec
        self.with_label = with_label

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: Tuple[int, int]) -> Dict[str, Any]:
        import av

        epoch, index = key
        n = len(self.records)
        bad: List[str] = []
        errors: List[str] = []
        for j in range(min(n, MAX_REPLACEMENTS)):
            i = (int(index) + j) % n
            try:
                plan = self.sampler.plan(self.records[i], i, epoch)
                video, audio = decode_with_pyav(plan, self.spec)
            except BadSample as e:
                bad.append(e.kind)
                errors.append(str(e))
                continue
            except (av.FFmpegError, OSError) as e:  # header probe in the sampler
                bad.append("unreadable")
                errors.append(f"unreadable: {self.records[i].video}: {e}")
                continue
            if plan.short:
                bad.append("short")
            if not plan.text_mask.any():
                bad.append("no_captions")
            sample = {
                "video": video,
                "audio": audio,
                "text": plan.text,
                "text_mask": plan.text_mask,
                "index": i,
                "bad": bad,
            }
            if self.with_label:
                sample["label"] = plan.label
            return sample
        raise RuntimeError(
            f"{min(n, MAX_REPLACEMENTS)} consecutive records from index {index} could not be decoded; "
            f"first errors: {errors[:3]}; check the dataset (e.g. re-run the prepare tool)"
        )


def collate_clips(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack samples into the batch dict; the bad-data kinds go to ``"_bad"`` (a dict of counts)."""
    batch: Dict[str, Any] = {
        "video": torch.from_numpy(np.stack([s["video"] for s in samples])),
        "audio": torch.from_numpy(np.stack([s["audio"] for s in samples]).astype(np.float32, copy=False)),
        "text": torch.from_numpy(np.stack([s["text"] for s in samples]).astype(np.int64, copy=False)),
        "text_mask": torch.from_numpy(np.stack([s["text_mask"] for s in samples]).astype(bool, copy=False)),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
    }
    if "label" in samples[0]:
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.int64)
    batch["_bad"] = dict(Counter(k for s in samples for k in s["bad"]))
    return batch


class _BatchKeys(torch.utils.data.Sampler):
    """Batches of ``(epoch, index)`` keys from a schedule position on (infinite when training)."""

    def __init__(self, schedule: ShardedSchedule, epoch: int, batch: int) -> None:
        self.schedule, self.epoch, self.batch = schedule, epoch, batch

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for epoch, _, idx in self.schedule.iterate(self.epoch, self.batch):
            yield [(epoch, int(i)) for i in idx]


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class PyAVLoader(ClipLoaderBase):
    """Loader over torch DataLoader workers decoding with PyAV (see ``build_loader`` for the API).

    Args (beyond :class:`~vatt_fast.data.base.ClipLoaderBase`'s):
        num_workers: decoding processes (0 decodes in the main process).
        pin_memory: pin batches in page-locked memory (for fast host-to-GPU copies).
        device: when set, batches are moved there (``non_blocking``).
        prefetch_factor: batches each worker keeps ready.
    """

    backend = "pyav"

    def __init__(
        self,
        records: Sequence[VideoRecord],
        spec: ClipSpec,
        vocab: Vocabulary,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        num_workers: int = 2,
        pin_memory: bool = False,
        device: Optional[torch.device] = None,
        bad_data: Optional[Dict[str, int]] = None,
        prefetch_factor: int = 2,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        super().__init__(records, spec, vocab, batch_size, train=train, seed=seed, rank=rank,
                         world_size=world_size, drop_last=drop_last, bad_data=bad_data)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.device = torch.device(device) if device is not None else None
        self.prefetch_factor = prefetch_factor
        self.dataset = ClipDataset(self.records, self.sampler, self.with_label)
        self._it: Any = None

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        self._shutdown()
        self._restart_eval_pass()
        keys = _BatchKeys(self.schedule, self._epoch, self._batch)
        kwargs: Dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs = dict(worker_init_fn=_worker_init, prefetch_factor=self.prefetch_factor)
        dl = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=keys,
            num_workers=self.num_workers,
            collate_fn=collate_clips,
            pin_memory=self.pin_memory,
            **kwargs,
        )
        self._it = iter(dl)
        return self._generate(self._it)

    def _generate(self, it: Iterator[Dict[str, Any]]) -> Iterator[Dict[str, torch.Tensor]]:
        nb = self.schedule.batches_per_epoch
        for batch in it:
            self._bad.update(batch.pop("_bad"))
            self._batch += 1
            if self._batch >= nb and self.train:
                self._epoch, self._batch = self._epoch + 1, 0
            if self.device is not None:
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            yield batch
        if it is self._it:
            self._it = None

    def _shutdown(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self) -> None:
        try:
            self._shutdown()
        except Exception:
            pass
