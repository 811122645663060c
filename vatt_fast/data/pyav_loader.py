"""PyAV backend: torch DataLoader workers that decode clip plans with PyAV (FFmpeg).

:func:`decode_with_pyav` is the reference decode of a :class:`~vatt_fast.data.sampler.ClipPlan`
(backend parity is measured against it):

* video: seek to the nearest keyframe at or before the first frame of the window (from the
  start when the demuxer cannot seek there), decode forward to the last one and stop there
  (FFmpeg threads per decode: ``decoder_threads``, 1 by default), convert each wanted frame,
  and only those, to RGB at the resized size (``plan.resized``, swscale bilinear; a frame with an
  odd side is converted to RGB at its own size first, as swscale's one pass shifts its
  colours), crop ``plan.crop``, flip when ``plan.flip``;
* audio: decode the FLAC span around the window (with a margin of filter taps on each
  side), mix down to mono, and resample with :func:`resample_audio` (windowed sinc with a
  Hann window, 6 zero crossings, roll-off 0.99: torchaudio's default ``sinc_interp_hann``),
  so the cut is sample-exact against resampling the whole file. Any sample rate and
  channel count the file declares is resampled and mixed down.

Bad data. Before a record's first clip, :func:`probe_media` reads its files' headers once
(both backends use it, so they judge records alike): the video must open, have a video
stream of the manifest's frame size, and its frame times must lie on the constant
``spec.fps`` grid (variable frame rate or another rate is ``frame_rate``: frame ``k`` must be
shown at ``k / fps``); the audio must open with libsndfile, declare a positive sample rate
and channel count, and hold the samples its header declares (a seek to the last one).
:func:`window_problem` then checks the plan's window against the probed lengths. What
fails raises or returns a kind: ``unreadable`` (cannot open, garbage, empty, no stream,
impossible header), ``truncated`` (shorter than its header or manifest says),
``missing_audio``, ``frame_rate``, ``frame_size``; any other exception while decoding a
record counts as ``error:<ExceptionType>``. The loader replaces such a record (see
:func:`vatt_fast.data.base.fill_batch`) and counts the kind.
"""

from __future__ import annotations

import math
import os
import traceback
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from vatt_fast.data.base import (
    MAX_REPLACEMENTS,
    ClipLoaderBase,
    Problem,
    fill_batch,
    kept_problems,
    summarize_problems,
)
from vatt_fast.data.manifest import VideoRecord
from vatt_fast.data.options import LoaderOptions
from vatt_fast.data.sampler import ClipPlan, ClipSampler, ClipSpec, ShardedSchedule
from vatt_fast.data.vocab import Vocabulary

__all__ = [
    "BadSample",
    "MediaInfo",
    "probe_media",
    "window_problem",
    "classify_error",
    "decode_with_pyav",
    "decode_video_pyav",
    "decode_audio_pyav",
    "set_decoder_threads",
    "resample_audio",
    "ClipDataset",
    "PyAVLoader",
    "collate_clips",
    "MAX_REPLACEMENTS",
    "MAX_AUDIO_RATE",
]

# Fraction of the window's audio that must be present before a file counts as truncated.
_AUDIO_MIN_COVERAGE = 0.95
# Highest audio sample rate accepted (FLAC's limit); a header above it is corrupt.
MAX_AUDIO_RATE = 1_048_575
# A frame time off the k / fps grid by more than this (in frames) is a variable or wrong frame rate.
_FRAME_GRID_TOLERANCE = 0.25


class BadSample(Exception):
    """A record that cannot give a clip. ``kind`` names the counter it goes to."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


# ------------------------------------------------------------------------------------
# audio resampling
# ------------------------------------------------------------------------------------
_KERNELS: Dict[Tuple[int, int], Tuple[np.ndarray, int]] = {}
# Largest polyphase table kept (elements); rate pairs with a bigger one (e.g. 44099 -> 8000 Hz:
# 8000 phases x 44167 taps) compute the same taps per output sample instead.
_MAX_POLYPHASE = 1 << 21
_ZERO_CROSSINGS, _ROLLOFF = 6, 0.99


def _kernel_width(orig: int, new: int) -> Tuple[float, int]:
    """(cut-off ``base`` in reduced units, half-width in input samples) of the sinc kernel."""
    if orig < 1 or new < 1:
        raise ValueError(f"sample rates must be positive, got {orig} -> {new}")
    base = min(orig, new) * _ROLLOFF
    return base, math.ceil(_ZERO_CROSSINGS * orig / base)


def _taps(t: np.ndarray, base: float, orig: int) -> np.ndarray:
    """Windowed-sinc weights at offsets ``t`` (input time minus output time, in reduced block units)."""
    t = np.clip(t * base, -_ZERO_CROSSINGS, _ZERO_CROSSINGS)
    window = np.cos(t * math.pi / _ZERO_CROSSINGS / 2) ** 2
    t = t * math.pi
    sinc = np.sin(t) / np.where(t == 0, 1.0, t)
    sinc[t == 0] = 1.0
    return sinc * window * (base / orig)


def _sinc_kernel(orig: int, new: int) -> Tuple[np.ndarray, int]:
    """Polyphase windowed-sinc kernel ``[new, 2 * width + orig]`` for reduced rates orig -> new.

    Row ``p`` holds the taps of output phase ``p`` over input samples
    ``k * orig - width ... k * orig + width + orig - 1`` (output ``k * new + p``).
    """
    key = (orig, new)
    if key in _KERNELS:
        return _KERNELS[key]
    base, width = _kernel_width(orig, new)
    idx = np.arange(-width, width + orig, dtype=np.float64)[None, :] / orig
    t = -np.arange(new, dtype=np.float64)[:, None] / new + idx
    kernel = _taps(t, base, orig).astype(np.float32)
    _KERNELS[key] = (kernel, width)
    return kernel, width


def _resample_direct(x: np.ndarray, orig: int, new: int, out_len: int) -> np.ndarray:
    """The polyphase resampler's taps, computed per output sample (no ``new x orig`` table).

    Output ``m`` weighs input ``j`` by the tap at ``(j * new - m * orig) / (orig * new)``, an
    exact integer numerator, so a cut that starts on a block boundary gives the same samples
    as the whole file.
    """
    base, width = _kernel_width(orig, new)
    xpad = np.concatenate([np.zeros(width + 1, np.float32), x, np.zeros(width + 2, np.float32)])
    offsets = np.arange(-width, width + 2, dtype=np.int64)[None, :]
    out = np.empty(out_len, dtype=np.float32)
    chunk = max(1, (1 << 20) // offsets.shape[1])
    for a in range(0, out_len, chunk):
        m = np.arange(a, min(out_len, a + chunk), dtype=np.int64)[:, None]
        j = (m * orig) // new + offsets  # (outputs, taps): every input within the kernel's reach
        w = _taps((j * new - m * orig) / (orig * new), base, orig).astype(np.float32)
        out[a : a + m.shape[0]] = (xpad[j + width + 1] * w).sum(axis=1)
    return out


def resample_audio(x: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Resample a mono waveform (windowed sinc, Hann window; torchaudio's default method).

    Output sample ``m`` is the band-limited value of the input at time ``m / new_rate``,
    with zeros assumed outside the input. Same taps as ``torchaudio.functional.resample``
    (``lowpass_filter_width=6``, ``rolloff=0.99``, ``sinc_interp_hann``), in numpy. Any pair
    of positive integer rates works: a pair whose polyphase table would be large (rates with
    a small common divisor) computes the taps per output sample instead.

    Args:
        x: float32 ``[N]`` waveform at ``orig_rate``.
        orig_rate, new_rate: sample rates in Hz.

    Returns:
        float32 ``[ceil(N * new_rate / orig_rate)]``.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"resample_audio expects a 1-D waveform, got shape {x.shape}")
    if int(orig_rate) < 1 or int(new_rate) < 1:
        raise ValueError(f"sample rates must be positive integers, got {orig_rate} -> {new_rate}")
    if orig_rate == new_rate:
        return x.copy()
    g = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // g, int(new_rate) // g
    n = x.shape[0]
    out_len = math.ceil(new * n / orig)
    _, width = _kernel_width(orig, new)
    if new * (2 * width + orig) > _MAX_POLYPHASE:
        return _resample_direct(x, orig, new, out_len)
    kernel, width = _sinc_kernel(orig, new)
    xpad = np.concatenate([np.zeros(width, np.float32), x, np.zeros(width + orig, np.float32)])
    windows = np.lib.stride_tricks.sliding_window_view(xpad, kernel.shape[1])[::orig]  # (frames, taps)
    out = (windows @ kernel.T).reshape(-1)  # (frames * new,)
    return np.ascontiguousarray(out[:out_len], dtype=np.float32)


# ------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------
def _frame_index(frame: Any, fps: float) -> Optional[int]:
    """Frame number of a decoded frame from its timestamp (None when it has none)."""
    if frame.pts is None or frame.time is None:
        return None
    return int(round(float(frame.time) * fps))


def set_decoder_threads(codec_context: Any, threads: int) -> None:
    """Set a PyAV decoder's FFmpeg threads before it decodes: ``1`` decodes in the calling
    thread (no threading); ``n > 1`` uses ``n`` threads of frame and slice threading
    (``thread_type="AUTO"``); ``0`` lets FFmpeg pick the count (cores + 1) with the same types.
    The decoded pixels are the same whatever the setting (FFmpeg's threading is bit-exact)."""
    threads = int(threads)
    if threads < 0:
        raise ValueError(f"decoder threads must be >= 0 (0: FFmpeg's automatic count), got {threads}")
    if threads == 1:
        codec_context.thread_type = "SLICE"  # PyAV's default type; one thread makes it a no-op
        codec_context.thread_count = 1
    else:
        codec_context.thread_type = "AUTO"
        codec_context.thread_count = threads


def _to_rgb(reformatter: Any, frame: Any, width: int, height: int) -> np.ndarray:
    """uint8 ``[height, width, 3]`` RGB of a decoded frame (swscale bilinear), the one conversion
    of a wanted frame; frames outside the window never come here."""
    import av

    if frame.width % 2 or frame.height % 2:
        # swscale's one-pass YUV -> RGB + resize shifts colours by 2-7 grey levels when a
        # side is odd (its chroma plane is rounded up); convert at the native size first
        frame = av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")
    return reformatter.reformat(frame, width=width, height=height, format="rgb24", interpolation="BILINEAR").to_ndarray()


def decode_video_pyav(plan: ClipPlan, spec: ClipSpec, threads: int = 1) -> np.ndarray:
    """uint8 ``[T, frame_size, frame_size, 3]`` frames of ``plan`` (RGB).

    Decodes from the nearest keyframe at or before the window's first frame and stops at its
    last one; only the window's frames are converted to RGB and resized, each once, and their
    crops are written straight into the clip. ``threads``: FFmpeg decoder threads (see
    :func:`set_decoder_threads`; 1, the default, is the fastest per core when every core runs
    a loader worker). The pixels do not depend on it.

    Raises:
        BadSample: ``unreadable`` (cannot open, no video stream, cannot seek even to the
            start) or ``truncated`` (a wanted frame is missing or the stream breaks before it).
    """
    import av
    from av.video.reformatter import VideoReformatter

    slots: Dict[int, List[int]] = {}  # frame number -> its positions in the clip (a frame may repeat)
    for j, k in enumerate(plan.frame_indices):
        slots.setdefault(int(k), []).append(j)
    first, last = min(slots), max(slots)
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
    clip = np.empty((len(plan.frame_indices), size, size, 3), dtype=np.uint8)
    out = torch.from_numpy(clip)  # a view: the crops are written straight into the clip
    got: Set[int] = set()
    reformatter = VideoReformatter()  # one swscale context for the whole clip
    with container:
        if not container.streams.video:
            raise BadSample("unreadable", f"{plan.video} has no video stream")
        stream = container.streams.video[0]
        set_decoder_threads(stream.codec_context, threads)
        tb = stream.time_base
        for attempt in range(2):
            # First try: nearest keyframe at or before the window; second: from the start.
            target = int(math.floor(first / spec.fps / tb)) if (tb and not attempt) else 0
            try:
                container.seek(target, stream=stream, backward=True, any_frame=False)
            except (av.FFmpegError, OSError) as e:
                if not attempt:
                    continue  # the demuxer cannot seek there: decode from the start instead
                raise BadSample("unreadable", f"cannot seek to the start of {plan.video}: {e}") from None
            try:
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
                    if k in slots:
                        img = torch.from_numpy(_to_rgb(reformatter, frame, rw, rh)[y : y + size, x : x + size])
                        if plan.flip:  # torch's 2-D flip: ~10x faster than numpy's copy of a reversed view
                            img = img.flip(1)
                        for j in slots[k]:
                            out[j] = img
                        got.add(k)
                    if len(got) == len(slots):
                        break
            except (av.FFmpegError, OSError) as e:
                raise BadSample("truncated", f"decoding {plan.video} failed near frame {first}: {e}") from None
            if len(got) == len(slots) or lowest is None or lowest <= first:
                break
    missing = sorted(k for k in slots if k not in got)
    if missing:
        raise BadSample(
            "truncated",
            f"{plan.video}: frames {missing[:4]}{'...' if len(missing) > 4 else ''} of the window are missing "
            f"(file shorter than its manifest duration?)",
        )
    return clip


def _to_mono_float(frame: Any) -> np.ndarray:
    """Average of the channels of a decoded audio frame, as float32 in [-1, 1] (any channel count)."""
    arr = frame.to_ndarray()
    fmt = frame.format
    ch = len(frame.layout.channels)
    if ch < 1:
        raise BadSample("unreadable", f"an audio frame has {ch} channels")
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
            open, a header rate outside 1..MAX_AUDIO_RATE, a rate change inside the stream),
            ``truncated`` (too little audio in the window, or a decode error).
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
        sr_in = int(stream.codec_context.sample_rate or 0)
        if not 1 <= sr_in <= MAX_AUDIO_RATE:
            raise BadSample("unreadable", f"{plan.audio}: the audio header gives sample rate {sr_in} Hz (garbage or "
                                          f"a corrupt header; a valid rate is 1..{MAX_AUDIO_RATE} Hz)")
        g = math.gcd(sr_in, sr_out)
        orig, new = sr_in // g, sr_out // g
        width = _kernel_width(orig, new)[1] if orig != new else 0
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
            except (av.FFmpegError, OSError) as e:
                if not attempt:
                    continue  # the demuxer cannot seek there: decode from the start instead
                raise BadSample("unreadable", f"cannot seek to the start of {plan.audio}: {e}") from None
            try:
                pos = None
                for frame in container.decode(stream):
                    if frame.pts is not None and frame.time is not None:
                        pos = int(round(float(frame.time) * sr_in))
                    elif pos is None:
                        pos = 0
                    if frame.sample_rate != sr_in:
                        raise BadSample("unreadable", f"{plan.audio}: the sample rate changes from {sr_in} Hz (header) "
                                                      f"to {frame.sample_rate} Hz inside the stream")
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


def decode_with_pyav(plan: ClipPlan, spec: ClipSpec, threads: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Reference decode of one plan (``threads``: FFmpeg video decoder threads, see
    :func:`set_decoder_threads`; the result does not depend on it).

    Returns:
        video uint8 ``[T, frame_size, frame_size, 3]`` and audio float32 ``[audio_samples]``.
    """
    return decode_video_pyav(plan, spec, threads), decode_audio_pyav(plan, spec)


# ------------------------------------------------------------------------------------
# probing and classifying bad records (shared with the DALI backend)
# ------------------------------------------------------------------------------------
@dataclass
class MediaInfo:
    """What :func:`probe_media` learnt about one record's files (cached per record)."""

    kind: Optional[str]  # None = usable, else the bad-data kind
    message: str = ""
    num_frames: int = 0  # video packets with data (= frames for the stored layout)
    codec: str = ""
    audio_seconds: float = 0.0
    audio_rate: int = 0


def _probe_video(record: VideoRecord, fps: float) -> MediaInfo:
    import av

    path = record.video
    if not os.path.isfile(path):
        return MediaInfo("unreadable", f"video file {path} does not exist")
    if os.path.getsize(path) == 0:
        return MediaInfo("unreadable", f"video file {path} is empty (0 bytes)")
    pts: List[int] = []
    n = 0
    try:
        with av.open(path) as c:
            if not c.streams.video:
                return MediaInfo("unreadable", f"{path} has no video stream")
            stream = c.streams.video[0]
            codec = stream.codec_context.name
            h, w = int(stream.codec_context.height or 0), int(stream.codec_context.width or 0)
            tb = stream.time_base
            # a video-only file's header duration (WebM, MP4 write it at the start) says how many frames it had
            declared = c.duration / 1e6 if c.duration and len(c.streams) == 1 else None
            for packet in c.demux(stream):
                if packet.size:
                    n += 1
                    if packet.pts is not None:
                        pts.append(int(packet.pts))
    except (av.FFmpegError, OSError) as e:
        return MediaInfo("unreadable", f"cannot read video {path}: {e}")
    if h <= 0 or w <= 0:
        return MediaInfo("unreadable", f"{path}: the video header gives frame size {w}x{h}")
    if record.width is not None and record.height is not None and (int(record.height), int(record.width)) != (h, w):
        return MediaInfo("frame_size", f"{path} has {w}x{h} frames but the manifest says {record.width}x"
                                       f"{record.height}; re-run the prepare tool or fix the manifest's width/height")
    if n == 0:
        return MediaInfo("truncated", f"{path} has no video frames")
    if tb and len(pts) == n:  # frame k must be shown at k / fps (both backends pick frames by number)
        k = np.sort(np.asarray(pts, dtype=np.float64)) * float(tb) * fps
        off = np.abs(k - np.arange(n))
        if off.max() > _FRAME_GRID_TOLERANCE:
            i = int(np.argmax(off > _FRAME_GRID_TOLERANCE))
            return MediaInfo("frame_rate", f"{path}: frame {i} is shown at {k[i] / fps:.3f} s instead of "
                                           f"{i / fps:.3f} s; the file is not at a constant {fps:g} fps (variable "
                                           f"frame rate or another rate): re-run the prepare tool, which re-encodes "
                                           f"at a constant rate")
    if declared is not None and n < round(declared * fps) - 1:
        return MediaInfo("truncated", f"{path} holds {n} frames but its header declares {declared:.2f} s "
                                      f"({round(declared * fps)} frames at {fps:g} fps): a cut or damaged file")
    return MediaInfo(None, num_frames=n, codec=codec)


def _probe_audio(record: VideoRecord) -> MediaInfo:
    import soundfile as sf

    path = record.audio
    if not os.path.isfile(path):
        return MediaInfo("missing_audio", f"audio file {path} does not exist")
    if os.path.getsize(path) == 0:
        return MediaInfo("unreadable", f"audio file {path} is empty (0 bytes)")
    try:
        f = sf.SoundFile(path)
    except (RuntimeError, OSError) as e:  # soundfile raises LibsndfileError (a RuntimeError)
        return MediaInfo("unreadable", f"cannot read audio {path}: {e}")
    with f:
        rate, channels, frames = int(f.samplerate), int(f.channels), int(f.frames)
        if not 1 <= rate <= MAX_AUDIO_RATE or channels < 1:
            return MediaInfo("unreadable", f"{path}: the audio header gives {rate} Hz, {channels} channels (valid: "
                                           f"1..{MAX_AUDIO_RATE} Hz, at least one channel)")
        if frames < 1:
            return MediaInfo("truncated", f"{path} has no audio samples")
        try:  # the data must reach the length the header declares (a cut file fails here)
            f.seek(frames - 1)
            complete = f.read(1, dtype="float32").shape[0] == 1
        except (RuntimeError, OSError):
            complete = False
        if not complete:
            return MediaInfo("truncated", f"{path}: the audio data ends before the {frames} samples "
                                          f"({frames / rate:.2f} s) its header declares (a cut or damaged file)")
    return MediaInfo(None, audio_seconds=frames / rate, audio_rate=rate)


def probe_media(record: VideoRecord, fps: float) -> MediaInfo:
    """Check a record's files from their headers and the video's packet index, without decoding.

    Video: exists, not empty, opens, has a video stream of a positive size equal to the
    manifest's ``width``/``height`` (when given), at least one frame, and frame times on the
    constant ``fps`` grid. Audio: exists, not empty, opens with libsndfile (which DALI's
    decoder uses), a rate in ``1..MAX_AUDIO_RATE`` and at least one channel, and data up to
    the length its header declares. Unusual rates and channel counts are fine.
    """
    info = _probe_video(record, fps)
    if info.kind is not None:
        return info
    audio = _probe_audio(record)
    if audio.kind is not None:
        return audio
    info.audio_seconds, info.audio_rate = audio.audio_seconds, audio.audio_rate
    return info


def window_problem(plan: ClipPlan, spec: ClipSpec, info: MediaInfo) -> Optional[Problem]:
    """(kind, message) when the probed files cannot give this plan's clip, else None."""
    last = max(plan.frame_indices)
    if last >= info.num_frames:
        return "truncated", (f"{plan.video}: frame {last} of the window is past the {info.num_frames} frames in "
                             f"the file (file shorter than its manifest duration?)")
    span_a = plan.audio_start
    span_b = min(plan.audio_start + plan.audio_length, (last + 1) / spec.fps)
    if span_b > span_a:
        covered = max(0.0, min(info.audio_seconds, span_b) - span_a) / (span_b - span_a)
        if covered < _AUDIO_MIN_COVERAGE:
            return "truncated", (f"{plan.audio}: only {covered:.0%} of the audio in "
                                 f"[{span_a:.2f}, {span_b:.2f}) s is present")
    return None


def classify_error(error: BaseException, record: VideoRecord) -> Problem:
    """(kind, message) for an exception raised while preparing or decoding a clip of ``record``.

    :class:`BadSample` gives its kind; FFmpeg, libsndfile and OS errors are ``unreadable``;
    anything else is unexpected and counts as ``error:<ExceptionType>``, its message holding
    the traceback (the loader logs the first one) so a bug is not mistaken for bad data.
    """
    import av
    import soundfile as sf

    if isinstance(error, BadSample):
        return error.kind, error.message
    if isinstance(error, (av.FFmpegError, sf.LibsndfileError, OSError)):
        return "unreadable", f"record {record.id!r} ({record.video}, {record.audio}): {error}"
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return f"error:{type(error).__name__}", (
        f"unexpected {type(error).__name__} on record {record.id!r} ({record.video}, {record.audio}): {error}\n{trace}"
    )


# ------------------------------------------------------------------------------------
# dataset and loader
# ------------------------------------------------------------------------------------
class ClipDataset(torch.utils.data.Dataset):
    """Map-style dataset over keys ``(epoch, batch, index)`` producing one decoded clip each.

    The DataLoader hands each batch's keys to :meth:`__getitems__` in one worker, so a record
    that fails is replaced by a record outside the optimizer step
    (:func:`~vatt_fast.data.base.fill_batch`). Records are probed once per process
    (:func:`probe_media`). The failures, plus ``short`` / ``no_captions`` for clips kept but
    padded, travel as ``(kind, message)`` pairs in the samples' ``"bad"`` entries.

    Args:
        records: the split's records.
        sampler: draws the plans.
        with_label: put ``label`` in the samples.
        schedule: the loader's schedule (the step's records and this rank's shard); None: a
            batch's own records are the step.
        decoder_threads: FFmpeg threads per video decode (:func:`set_decoder_threads`).
    """

    def __init__(self, records: Sequence[VideoRecord], sampler: ClipSampler, with_label: bool,
                 schedule: Optional[ShardedSchedule] = None, decoder_threads: int = 1) -> None:
        if not records:
            raise ValueError("ClipDataset needs at least one record; the split is empty")
        self.records = list(records)
        self.sampler = sampler
        self.spec = sampler.spec
        self.with_label = with_label
        self.schedule = schedule
        self.decoder_threads = int(decoder_threads)
        self._media: Dict[int, MediaInfo] = {}

    def __len__(self) -> int:
        return len(self.records)

    def _attempt(self, epoch: int, i: int) -> Tuple[Any, Optional[Problem]]:
        """((plan, video, audio), None) for record ``i``, or (None, (kind, message))."""
        record = self.records[i]
        try:
            info = self._media.get(i)
            if info is None:
                info = self._media[i] = probe_media(record, self.spec.fps)
            if info.kind is not None:
                return None, (info.kind, info.message)
            plan = self.sampler.plan(record, i, epoch)
            problem = window_problem(plan, self.spec, info)
            if problem is not None:
                return None, problem
            video, audio = decode_with_pyav(plan, self.spec, self.decoder_threads)
        except Exception as e:  # any failure on one record is that record's problem; classify_error names it
            return None, classify_error(e, record)
        return (plan, video, audio), None

    def __getitems__(self, keys: Sequence[Tuple[int, int, int]]) -> List[Dict[str, Any]]:
        """The clips of one batch, ``keys`` = ``[(epoch, batch, index), ...]`` of the same batch."""
        epoch, b = int(keys[0][0]), int(keys[0][1])
        if any((int(k[0]), int(k[1])) != (epoch, b) for k in keys):
            raise ValueError(f"keys of one call must share (epoch, batch), got {list(keys)}")
        indices = [int(k[2]) for k in keys]
        sched = self.schedule
        results, problems = fill_batch(
            indices, lambda i: self._attempt(epoch, i), num_records=len(self.records),
            step_records=(lambda: sched.global_batch(epoch, b)) if sched is not None else (lambda: indices),
            rank=sched.options.rank if sched is not None else 0,
            world_size=sched.options.world_size if sched is not None else 1,
        )
        samples = []
        for plan, video, audio in results:
            bad = kept_problems(plan, self.spec)
            sample = {
                "video": video,
                "audio": audio,
                "text": plan.text,
                "text_mask": plan.text_mask,
                "index": plan.index,
                "bad": bad,
            }
            if self.with_label:
                sample["label"] = plan.label
            samples.append(sample)
        samples[0]["bad"] = problems + samples[0]["bad"]
        return samples

    def __getitem__(self, key: Tuple[int, int, int]) -> Dict[str, Any]:
        return self.__getitems__([key])[0]


def collate_clips(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack samples into the batch dict; the bad-data entries go to ``"_bad"`` (counts per kind)
    and ``"_bad_messages"`` (the first message of each kind)."""
    batch: Dict[str, Any] = {
        "video": torch.from_numpy(np.stack([s["video"] for s in samples])),
        "audio": torch.from_numpy(np.stack([s["audio"] for s in samples]).astype(np.float32, copy=False)),
        "text": torch.from_numpy(np.stack([s["text"] for s in samples]).astype(np.int64, copy=False)),
        "text_mask": torch.from_numpy(np.stack([s["text_mask"] for s in samples]).astype(bool, copy=False)),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
    }
    if "label" in samples[0]:
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.int64)
    batch["_bad"], batch["_bad_messages"] = summarize_problems(p for s in samples for p in s["bad"])
    return batch


class _BatchKeys(torch.utils.data.Sampler):
    """Batches of ``(epoch, batch, index)`` keys from a schedule position on (infinite when training)."""

    def __init__(self, schedule: ShardedSchedule, epoch: int, batch: int) -> None:
        self.schedule, self.epoch, self.batch = schedule, epoch, batch

    def __iter__(self) -> Iterator[List[Tuple[int, int, int]]]:
        for epoch, b, idx in self.schedule.iterate(self.epoch, self.batch):
            yield [(epoch, b, int(i)) for i in idx]


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class PyAVLoader(ClipLoaderBase):
    """Loader over torch DataLoader workers decoding with PyAV (see ``build_loader`` for the API).

    Takes :class:`~vatt_fast.data.base.ClipLoaderBase`'s arguments. Of the options it uses
    ``num_workers`` (decoding processes; 0 decodes in the main process), ``decoder_threads``
    (FFmpeg threads per video decode in each of them), ``pin_memory``
    (page-locked batches for fast host-to-GPU copies), ``device`` (when set, batches are moved
    there, ``non_blocking``) and ``prefetch_factor`` (batches each worker keeps ready).
    """

    backend = "pyav"

    def __init__(self, records: Sequence[VideoRecord], spec: ClipSpec, vocab: Vocabulary, options: LoaderOptions,
                 bad_data: Optional[Dict[str, int]] = None) -> None:
        super().__init__(records, spec, vocab, options, bad_data)
        self.dataset = ClipDataset(self.records, self.sampler, self.with_label, self.schedule,
                                   decoder_threads=options.decoder_threads)
        self._it: Any = None

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        self._shutdown()
        self._restart_eval_pass()
        keys = _BatchKeys(self.schedule, self._epoch, self._batch)
        kwargs: Dict[str, Any] = {}
        if self.options.num_workers > 0:
            kwargs = dict(worker_init_fn=_worker_init, prefetch_factor=self.options.prefetch_factor)
        dl = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=keys,
            num_workers=self.options.num_workers,
            collate_fn=collate_clips,
            pin_memory=self.options.pin_memory,
            **kwargs,
        )
        self._it = iter(dl)
        return self._generate(self._it)

    def _generate(self, it: Iterator[Dict[str, Any]]) -> Iterator[Dict[str, torch.Tensor]]:
        for batch in it:
            self._account(batch.pop("_bad"), batch.pop("_bad_messages"))
            yield self._deliver(batch, self._epoch, self._batch)
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
