"""Turn raw videos plus caption files into the vatt_fast dataset layout.

::

    python -m vatt_fast.data.prepare --videos RAW_DIR_OR_LIST --captions captions.json --out DATASET \
        [--workers 8] [--fps 10] [--short-side 256] [--codec vp9|h264] [--gop 5] \
        [--vocab-size 65536] [--split-file splits.csv] [--min-seconds 3.2] [--silent-audio]

Every input FFmpeg can read (mp4/h264, mkv, webm, avi, mov...) is decoded with PyAV (whose
wheels bundle FFmpeg with libvpx and libx264, so no system FFmpeg is needed) and written as

- ``videos/<id>.webm`` (VP9, default) or ``videos/<id>.mp4`` (H.264, ``--codec h264``, for
  GPU-only pipelines: DALI's CPU decoder reads VP8/VP9/MJPEG only): constant ``--fps`` (10),
  short side ``--short-side`` (256, aspect ratio kept, even sizes), a keyframe every ``--gop``
  frames (5) and no B-frames / hidden alt-ref frames, so one decoded packet is one frame and a
  random window needs at most ``gop - 1`` extra frames decoded;
- ``audio/<id>.flac``: 48 kHz mono 16-bit FLAC, aligned so that sample 0 is the time of video
  frame 0 and exactly ``duration`` seconds long (zero padded at the end if the track is short).

Captions come from a HowTo100M-style JSON file (``{video_id: {"start": [...], "end": [...],
"text": [...]}}``) or a CSV file with the columns ``video_id,start,end,text`` (a header row is
optional). The word vocabulary (:class:`vatt_fast.data.vocab.Vocabulary`, the ``--vocab-size``
most frequent words of the training captions, with ``<pad>`` = 0 and ``<unk>`` = 1) is written to
``vocab.txt`` and the manifest to ``manifest.jsonl``.

Robustness:

- atomic per video: media are written under temporary names and renamed; a per-video done
  marker (``.prepare/done/<id>.json``, holding the manifest row and the input fingerprint) is
  written last, and the manifest is built from the markers only, so no half-written file is
  ever listed;
- resumable: a rerun skips every video whose marker matches the same input file (path, size,
  mtime) and the same settings, and known failures (``--retry-failed`` tries them again);
  temporary files left by a killed run are removed at start;
- every input that could not be used is listed in ``failed.jsonl`` with a reason:
  ``unreadable``, ``no_video_stream``, ``decode_error``, ``too_short``, ``no_audio_stream``,
  ``no_captions``, ``duplicate_id``, ``encode_error``.

Videos without an audio track are *not* given a silent track by default: VATT's video-audio
loss would learn that silence matches every video. They are listed as ``no_audio_stream``;
``--silent-audio`` keeps them with a silent FLAC instead (counted as ``silent`` in the summary
and flagged in their done marker), for datasets where only video and text matter.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from vatt_fast.io import TMP_MARK, atomic_path, atomic_write

__all__ = [
    "PrepareConfig",
    "PrepareSummary",
    "VIDEO_EXTENSIONS",
    "read_captions",
    "read_splits",
    "list_videos",
    "transcode_video",
    "prepare_dataset",
    "main",
]

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".flv", ".mpg", ".mpeg", ".ts", ".3gp", ".ogv", ".wmv",
)
AUDIO_RATE = 48_000
CODECS = {
    # codec flag -> (PyAV encoder, container extension)
    "vp9": ("libvpx-vp9", ".webm"),
    "h264": ("libx264", ".mp4"),
}
STATE_DIR = ".prepare"
_ID_RE = re.compile(r"[^A-Za-z0-9._-]")


class PrepareError(Exception):
    """A per-video failure with a machine-readable ``reason`` (one of the failed.jsonl reasons)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class PrepareConfig:
    """Settings that determine the stored media; a change re-transcodes every video.

    Attributes:
        fps: output frame rate (frames per second).
        short_side: output short side in pixels (the long side keeps the aspect ratio).
        codec: ``"vp9"`` (DALI CPU and GPU) or ``"h264"`` (DALI GPU only).
        gop: keyframe interval in frames.
        crf: encoder constant-quality level (lower is better; VP9 0-63, H.264 0-51).
        min_seconds: inputs shorter than this are rejected as ``too_short``.
        silent_audio: keep videos without audio, with a silent track.
    """

    fps: float = 10.0
    short_side: int = 256
    codec: str = "vp9"
    gop: int = 5
    crf: int = 32
    min_seconds: float = 3.2
    silent_audio: bool = False

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"codec {self.codec!r} is not supported; choose one of {sorted(CODECS)}")
        if not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.short_side < 16 or self.short_side % 2:
            raise ValueError(f"short_side must be an even number >= 16, got {self.short_side}")
        if self.gop < 1:
            raise ValueError(f"gop must be >= 1 frame, got {self.gop}")
        if self.min_seconds < 0:
            raise ValueError(f"min_seconds must be >= 0, got {self.min_seconds}")

    def key(self) -> str:
        """A short hash of the settings, stored in each done marker."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class PrepareSummary:
    """What a :func:`prepare_dataset` run did."""

    total: int
    done: int
    skipped: int
    failed: int
    failure_reasons: Dict[str, int]
    silent: int
    vocab_size: int
    seconds: float

    def __str__(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.failure_reasons.items())) or "none"
        return (
            f"prepared {self.done} new + {self.skipped} already done of {self.total} inputs; "
            f"{self.failed} failed ({reasons}); {self.silent} with a silent track; vocabulary {self.vocab_size} tokens; {self.seconds:.1f} s"
        )


# ----------------------------------------------------------------------------------------------
# Inputs: videos, captions, splits
# ----------------------------------------------------------------------------------------------
def video_id_for(path: Path) -> str:
    """The dataset id of an input file: its stem, with characters outside ``[A-Za-z0-9._-]`` -> ``_``."""
    return _ID_RE.sub("_", path.stem)


def list_videos(videos: str | os.PathLike) -> List[Path]:
    """The input videos: every file with a video extension under a folder (recursively), or the
    paths listed one per line in a text file (relative to the list file; ``#`` starts a comment).

    Raises:
        FileNotFoundError: ``videos`` does not exist.
    """
    root = Path(videos)
    if root.is_dir():
        return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    if root.is_file():
        out = []
        for line in root.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                p = Path(line)
                out.append(p if p.is_absolute() else root.parent / p)
        return out
    raise FileNotFoundError(f"--videos {str(root)!r} is neither a folder nor a list file; pass a folder of "
                            f"videos or a text file with one video path per line")


def _caption_list(vid: str, starts: Sequence, ends: Sequence, texts: Sequence, source: str) -> List[dict]:
    if not (len(starts) == len(ends) == len(texts)):
        raise ValueError(f"{source}: video {vid!r} has {len(starts)} starts, {len(ends)} ends and {len(texts)} "
                         f"texts; the three lists must have the same length")
    caps = []
    for s, e, t in zip(starts, ends, texts):
        t = " ".join(str(t).split())
        if t:
            caps.append({"start": float(s), "end": float(e), "text": t})
    caps.sort(key=lambda c: (c["start"], c["end"]))
    return caps


def read_captions(path: str | os.PathLike) -> Dict[str, List[dict]]:
    """Read a caption file into ``{video_id: [{"start", "end", "text"}, ...]}`` sorted by start.

    Formats (chosen by extension): ``.json`` HowTo100M style ``{video_id: {"start": [...],
    "end": [...], "text": [...]}}``; ``.csv`` / ``.tsv`` rows ``video_id,start,end,text`` with an
    optional header row. Empty texts are dropped.

    Raises:
        ValueError: malformed content, naming the file and the entry or line.
    """
    path = Path(path)
    out: Dict[str, List[dict]] = {}
    if path.suffix.lower() == ".json":
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object {{video_id: {{start, end, text}}}}, got {type(data).__name__}")
        for vid, entry in data.items():
            if not isinstance(entry, dict) or not {"start", "end", "text"} <= set(entry):
                raise ValueError(f"{path}: entry {vid!r} must be an object with 'start', 'end' and 'text' lists, "
                                 f"got {str(entry)[:80]}")
            out[_ID_RE.sub("_", str(vid))] = _caption_list(vid, entry["start"], entry["end"], entry["text"], str(path))
        return out
    if path.suffix.lower() in (".csv", ".tsv"):
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        with open(path, newline="") as f:
            rows: Dict[str, Tuple[list, list, list]] = {}
            for lineno, row in enumerate(csv.reader(f, delimiter=delimiter), 1):
                if not row or not "".join(row).strip():
                    continue
                if len(row) < 4:
                    raise ValueError(f"{path}:{lineno}: expected 4 columns video_id,start,end,text, got {len(row)}: {row}")
                vid, start, end, text = row[0], row[1], row[2], delimiter.join(row[3:])
                try:
                    s, e = float(start), float(end)
                except ValueError:
                    if lineno == 1:  # header row
                        continue
                    raise ValueError(
                        f"{path}:{lineno}: start/end must be numbers (seconds), got {start!r}, {end!r}"
                    ) from None
                lists = rows.setdefault(_ID_RE.sub("_", vid.strip()), ([], [], []))
                lists[0].append(s), lists[1].append(e), lists[2].append(text)
        return {vid: _caption_list(vid, *lists, str(path)) for vid, lists in rows.items()}
    raise ValueError(f"caption file {str(path)!r}: unknown extension {path.suffix!r}; use .json (HowTo100M style) "
                     f"or .csv/.tsv (video_id,start,end,text)")


def read_splits(path: str | os.PathLike) -> Dict[str, str]:
    """Read ``{video_id: split}`` from a JSON object or a ``video_id,split`` CSV/TSV (header optional)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object {{video_id: split}}, got {type(data).__name__}")
        return {_ID_RE.sub("_", str(k)): str(v) for k, v in data.items()}
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    out = {}
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter=delimiter), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2:
                raise ValueError(f"{path}:{lineno}: expected 2 columns video_id,split, got {len(row)}: {row}")
            if lineno == 1 and row[0].strip().lower() in ("video_id", "id") and row[1].strip().lower() == "split":
                continue
            out[_ID_RE.sub("_", row[0].strip())] = row[1].strip()
    return out


# ----------------------------------------------------------------------------------------------
# One video
# ----------------------------------------------------------------------------------------------
def _output_size(width: int, height: int, sar: Optional[Fraction], short_side: int) -> Tuple[int, int]:
    """Output (width, height): short side ``short_side``, display aspect ratio kept, both even."""
    display_w = width * float(sar) if sar else float(width)
    if display_w <= height:
        ow, oh = short_side, height * short_side / display_w
    else:
        ow, oh = display_w * short_side / height, short_side
    return max(2, int(round(ow / 2)) * 2), max(2, int(round(oh / 2)) * 2)


def _open_encoder(path: str, cfg: PrepareConfig, width: int, height: int, threads: int):
    import av

    encoder, _ = CODECS[cfg.codec]
    container = av.open(path, "w", format="webm" if cfg.codec == "vp9" else "mp4")
    rate = Fraction(cfg.fps).limit_denominator(1001)
    stream = container.add_stream(encoder, rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.time_base = 1 / rate  # the muxer may change it when writing the header
    stream.codec_context.time_base = 1 / rate
    stream.codec_context.gop_size = cfg.gop
    if cfg.codec == "vp9":
        # No hidden alt-ref frames and no look-ahead: one packet = one shown frame, which keeps
        # frame indexing identical in FFmpeg, DALI's CPU decoder and NVDEC.
        opts = {"keyint_min": str(cfg.gop), "auto-alt-ref": "0", "lag-in-frames": "0", "crf": str(cfg.crf),
                "b": "0", "deadline": "good", "cpu-used": "5", "row-mt": "1", "threads": str(threads)}
    else:
        opts = {"keyint_min": str(cfg.gop), "sc_threshold": "0", "bf": "0", "crf": str(cfg.crf),
                "preset": "veryfast", "threads": str(threads)}
    stream.codec_context.options = opts
    return container, stream


def transcode_video(src: str, video_out: str, audio_out: str, cfg: PrepareConfig, threads: int = 1) -> dict:
    """Transcode one input to the stored layout (atomically: temp names, then rename).

    Output frame ``k`` shows the input frame whose timestamp (relative to the first frame) is
    nearest to ``k / fps`` (FFmpeg's ``fps`` filter rule); the output has
    ``floor(input_duration * fps)`` frames. Audio is downmixed, resampled to 48 kHz, shifted so
    that sample 0 is at the first video frame's time, and cut or zero padded to the video
    duration.

    Args:
        src: input video path (any FFmpeg-readable file).
        video_out: final video path (``.webm`` for VP9, ``.mp4`` for H.264).
        audio_out: final FLAC path.
        cfg: settings.
        threads: encoder/decoder threads.

    Returns:
        ``{"duration", "num_frames", "width", "height", "silent_audio", "source_fps"}``.

    Raises:
        PrepareError: with ``reason`` in ``unreadable``, ``no_video_stream``, ``decode_error``,
            ``too_short``, ``no_audio_stream``, ``encode_error``.
    """
    with atomic_path(video_out) as tmp_video, atomic_path(audio_out) as tmp_audio:
        return _transcode(src, tmp_video, tmp_audio, cfg, threads)


def _transcode(src: str, video_out: Path, audio_out: Path, cfg: PrepareConfig, threads: int) -> dict:
    """:func:`transcode_video` writing to the paths given (the temporaries that ``atomic_path`` renames)."""
    import av
    import soundfile as sf

    try:
        container = av.open(src)
    except Exception as e:  # FFmpeg raises many error types for unreadable input
        raise PrepareError("unreadable", f"{src}: {e}") from e
    out_container = None
    try:
        if not container.streams.video:
            raise PrepareError("no_video_stream", f"{src} has no video stream")
        vstream = container.streams.video[0]
        vstream.thread_type = "AUTO"
        astream = container.streams.audio[0] if container.streams.audio else None
        if astream is None and not cfg.silent_audio:
            raise PrepareError("no_audio_stream", f"{src} has no audio stream (pass --silent-audio to keep "
                                                  f"such videos with a silent track)")
        ctx = vstream.codec_context
        if not ctx.width or not ctx.height:
            raise PrepareError("unreadable", f"{src}: video stream has no frame size")
        width, height = _output_size(ctx.width, ctx.height, ctx.sample_aspect_ratio, cfg.short_side)
        out_container, out_stream = _open_encoder(str(video_out), cfg, width, height, threads)
        resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE) if astream else None

        period = 1.0 / cfg.fps
        frame_time_base = 1 / Fraction(cfg.fps).limit_denominator(1001)
        t0: Optional[float] = None  # time of the first video frame
        prev: Optional[Tuple[float, "av.VideoFrame"]] = None
        last_time = None
        in_period = float(1 / vstream.average_rate) if vstream.average_rate else period
        n_out = 0
        audio_chunks: List[np.ndarray] = []
        audio_t0: Optional[float] = None

        def emit(frame) -> None:
            nonlocal n_out
            out = frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
            out.pts = n_out
            out.time_base = frame_time_base  # pts counts output frames
            for packet in out_stream.encode(out):
                out_container.mux(packet)
            n_out += 1

        streams = [vstream] + ([astream] if astream else [])
        try:
            for packet in container.demux(*streams):
                for frame in packet.decode():
                    if packet.stream.type == "video":
                        t = frame.time if frame.time is not None else (last_time + in_period if last_time is not None else 0.0)
                        if last_time is not None and t <= last_time:
                            continue  # duplicate or out-of-order timestamp
                        if t0 is None:
                            t0 = t
                        if prev is not None:
                            # output frames nearer to the previous input frame than to this one
                            midpoint = (prev[0] + t) / 2 - t0
                            while n_out * period <= midpoint + 1e-9:
                                emit(prev[1])
                        prev, last_time = (t, frame), t
                    else:
                        if audio_t0 is None:
                            audio_t0 = frame.time if frame.time is not None else 0.0
                        for rf in resampler.resample(frame):
                            audio_chunks.append(rf.to_ndarray().reshape(-1))
        except (av.FFmpegError, OSError) as e:
            raise PrepareError("decode_error", f"{src}: {e}") from e
        if prev is None:
            raise PrepareError("decode_error", f"{src}: no video frame could be decoded")
        if resampler is not None:
            for rf in resampler.resample(None):
                audio_chunks.append(rf.to_ndarray().reshape(-1))
        duration_in = prev[0] - t0 + in_period
        # tolerance of 1/100 frame: container timestamps are often rounded to milliseconds
        total = int(np.floor(duration_in * cfg.fps + 1e-2))
        if total / cfg.fps < cfg.min_seconds or total == 0:
            raise PrepareError("too_short", f"{src}: {duration_in:.2f} s gives {total} frames at {cfg.fps} fps, "
                                            f"fewer than --min-seconds {cfg.min_seconds}")
        while n_out < total:
            emit(prev[1])
        try:
            for packet in out_stream.encode():
                out_container.mux(packet)
            out_container.close()
            out_container = None
        except Exception as e:
            raise PrepareError("encode_error", f"{src}: {e}") from e

        duration = total / cfg.fps
        n_samples = int(round(duration * AUDIO_RATE))
        audio = np.zeros(n_samples, np.int16)
        silent = astream is None or not audio_chunks
        if not silent:
            pcm = np.concatenate(audio_chunks)
            shift = int(round(((audio_t0 or 0.0) - t0) * AUDIO_RATE))  # > 0: audio starts after video
            if shift >= 0:
                n = max(0, min(len(pcm), n_samples - shift))
                audio[shift:shift + n] = pcm[:n]
            else:
                pcm = pcm[-shift:]
                n = min(len(pcm), n_samples)
                audio[:n] = pcm[:n]
        elif astream is not None and not cfg.silent_audio:
            raise PrepareError("no_audio_stream", f"{src}: the audio stream holds no decodable samples")
        sf.write(str(audio_out), audio, AUDIO_RATE, format="FLAC", subtype="PCM_16")
        return {"duration": duration, "num_frames": total, "width": width, "height": height,
                "silent_audio": bool(silent), "source_fps": round(1.0 / in_period, 3)}
    finally:
        container.close()
        if out_container is not None:
            try:
                out_container.close()
            except Exception:  # the error that brought us here is the one to report
                pass


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"source": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _process_one(job: dict) -> dict:
    """Worker entry point: transcode one video and write its done/failed marker."""
    cfg = PrepareConfig(**job["cfg"])
    out = Path(job["out"])
    vid = job["id"]
    marker = {"id": vid, "fingerprint": job["fingerprint"], "settings": cfg.key()}
    try:
        info = transcode_video(job["src"], str(out / job["video"]), str(out / job["audio"]), cfg, job["threads"])
    except PrepareError as e:
        marker.update(reason=e.reason, detail=e.detail)
        atomic_write(out / STATE_DIR / "failed" / f"{vid}.json", json.dumps(marker))
        return marker
    except Exception as e:  # an unforeseen FFmpeg failure on one input must not stop the run
        marker.update(reason="unreadable", detail=f"{job['src']}: {type(e).__name__}: {e}")
        atomic_write(out / STATE_DIR / "failed" / f"{vid}.json", json.dumps(marker))
        return marker
    marker.update(video=job["video"], audio=job["audio"], **info)
    stale = out / STATE_DIR / "failed" / f"{vid}.json"
    if stale.exists():
        stale.unlink()
    atomic_write(out / STATE_DIR / "done" / f"{vid}.json", json.dumps(marker))
    return marker


def _cleanup_temporaries(out: Path) -> int:
    """Remove the temporary files a killed run left in ``out``: hidden files holding
    :data:`~vatt_fast.io.TMP_MARK` (``.tmp-<name>-<pid>-...`` from :func:`~vatt_fast.io.atomic_path`,
    ``.<name>.tmp-<pid>`` from earlier versions of this tool)."""
    n = 0
    for sub in ("videos", "audio", f"{STATE_DIR}/done", f"{STATE_DIR}/failed", "."):
        folder = out / sub
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name.startswith(".") and TMP_MARK in p.name and p.is_file():
                    p.unlink()
                    n += 1
    return n


def _read_marker(path: Path) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------------------------
# The whole dataset
# ----------------------------------------------------------------------------------------------
def prepare_dataset(
    videos: str | os.PathLike,
    captions: Optional[str | os.PathLike],
    out: str | os.PathLike,
    *,
    cfg: PrepareConfig = PrepareConfig(),
    workers: int = 1,
    vocab_size: int = 2 ** 16,
    split_file: Optional[str | os.PathLike] = None,
    keep_uncaptioned: bool = False,
    retry_failed: bool = False,
    progress: bool = True,
) -> PrepareSummary:
    """Prepare a dataset folder (see the module docstring for the layout and guarantees).

    Args:
        videos: folder of input videos (searched recursively) or a text file listing them.
        captions: caption file (HowTo100M JSON, or CSV ``video_id,start,end,text``); ``None``
            only with ``keep_uncaptioned``.
        out: dataset folder (created).
        cfg: media settings.
        workers: transcoding processes (1 = in this process).
        vocab_size: vocabulary size including ``<pad>`` and ``<unk>``.
        split_file: optional ``video_id -> split`` file; videos not in it are ``train``.
        keep_uncaptioned: keep videos that have no caption (otherwise ``no_captions``).
        retry_failed: transcode again inputs that failed in an earlier run.
        progress: show a tqdm progress bar.

    Returns:
        A :class:`PrepareSummary` (also printed by the command line).
    """
    from tqdm import tqdm

    from vatt_fast.data.manifest import Caption, VideoRecord, write_jsonl, write_manifest
    from vatt_fast.data.vocab import Vocabulary

    t_start = time.time()
    out = Path(out)
    for sub in ("videos", "audio", f"{STATE_DIR}/done", f"{STATE_DIR}/failed"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    lock = _acquire_lock(out)
    try:
        removed = _cleanup_temporaries(out)
        if removed:
            logger.info("removed %d temporary file(s) left by an interrupted run", removed)
        caps = read_captions(captions) if captions is not None else {}
        if captions is None and not keep_uncaptioned:
            raise ValueError("no --captions file given; pass one, or --keep-uncaptioned to prepare videos without text")
        splits = read_splits(split_file) if split_file is not None else {}
        inputs = list_videos(videos)
        _, ext = CODECS[cfg.codec]
        key = cfg.key()

        failures: List[dict] = []
        seen: Dict[str, Path] = {}
        jobs: List[dict] = []
        finished: Dict[str, dict] = {}
        skipped = 0
        for src in inputs:
            vid = video_id_for(src)
            if vid in seen:
                failures.append({"id": vid, "source": str(src), "reason": "duplicate_id",
                                 "detail": f"same id as {seen[vid]}"})
                continue
            seen[vid] = src
            if not caps.get(vid) and not keep_uncaptioned:
                failures.append({"id": vid, "source": str(src), "reason": "no_captions",
                                 "detail": f"no caption with text for id {vid!r} in the caption file"})
                continue
            try:
                fp = _fingerprint(src)
            except OSError as e:
                failures.append({"id": vid, "source": str(src), "reason": "unreadable", "detail": str(e)})
                continue
            done = _read_marker(out / STATE_DIR / "done" / f"{vid}.json")
            if (done is not None and done.get("fingerprint") == fp and done.get("settings") == key
                    and (out / done["video"]).is_file() and (out / done["audio"]).is_file()):
                finished[vid] = done
                skipped += 1
                continue
            failed = _read_marker(out / STATE_DIR / "failed" / f"{vid}.json")
            if (not retry_failed and failed is not None and failed.get("fingerprint") == fp
                    and failed.get("settings") == key):
                failures.append({"id": vid, "source": str(src), "reason": failed["reason"], "detail": failed["detail"]})
                skipped += 1
                continue
            jobs.append({"id": vid, "src": str(src), "out": str(out), "fingerprint": fp, "cfg": asdict(cfg),
                         "video": f"videos/{vid}{ext}", "audio": f"audio/{vid}.flac",
                         "threads": 1 if workers > 1 else 2})

        new_done = 0

        def record(result: dict) -> None:
            nonlocal new_done
            if "reason" in result:
                failures.append({"id": result["id"], "source": result["fingerprint"]["source"],
                                 "reason": result["reason"], "detail": result["detail"]})
            else:
                finished[result["id"]] = result
                new_done += 1

        bar = tqdm(total=len(jobs), desc="prepare", unit="video", disable=not progress or not jobs)
        if workers > 1 and len(jobs) > 1:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                for fut in as_completed([pool.submit(_process_one, j) for j in jobs]):
                    record(fut.result())
                    bar.update(1)
        else:
            for job in jobs:
                record(_process_one(job))
                bar.update(1)
        bar.close()

        records = []
        for src in inputs:
            vid = video_id_for(src)
            m = finished.get(vid)
            if m is None or seen.get(vid) != src:
                continue
            records.append(VideoRecord(
                id=vid, video=str(out / m["video"]), audio=str(out / m["audio"]), duration=m["duration"],
                captions=[Caption(c["start"], c["end"], c["text"]) for c in caps.get(vid, [])],
                split=splits.get(vid, "train"), width=m["width"], height=m["height"],
            ))
        records.sort(key=lambda r: r.id)
        silent = sum(1 for r in records if finished[r.id].get("silent_audio"))
        vocab = Vocabulary.build((c.text for r in records if r.split == "train" for c in r.captions),
                                 max_size=vocab_size)
        vocab.save(out / "vocab.txt")
        write_manifest(out / "manifest.jsonl", records)
        failures.sort(key=lambda f: f["id"])
        write_jsonl(out / "failed.jsonl", failures)
        return PrepareSummary(
            total=len(inputs), done=new_done,
            skipped=skipped, failed=len(failures), failure_reasons=dict(Counter(f["reason"] for f in failures)), silent=silent,
            vocab_size=len(vocab), seconds=time.time() - t_start,
        )
    finally:
        _release_lock(lock)


def _acquire_lock(out: Path):
    """An exclusive lock on ``out/.prepare/lock``: two prepare runs on one folder would race."""
    import fcntl

    f = open(out / STATE_DIR / "lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise RuntimeError(f"another prepare run holds {out / STATE_DIR / 'lock'}; wait for it to finish "
                           f"or use another --out folder") from None
    return f


def _release_lock(f) -> None:
    import fcntl

    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vatt_fast.data.prepare",
        description="Transcode raw videos + captions into the vatt_fast dataset layout "
                    "(manifest.jsonl, vocab.txt, videos/, audio/, failed.jsonl).",
    )
    p.add_argument("--videos", required=True, help="folder of input videos (recursive) or a text file listing them")
    p.add_argument("--captions", default=None,
                   help="caption file: HowTo100M-style JSON {id: {start, end, text}} or CSV video_id,start,end,text")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)),
                   help="transcoding processes (default: all CPU cores)")
    p.add_argument("--fps", type=float, default=10.0, help="output frame rate (default 10)")
    p.add_argument("--short-side", type=int, default=256, help="output short side in pixels (default 256)")
    p.add_argument("--codec", choices=sorted(CODECS), default="vp9",
                   help="vp9 (default; DALI CPU and GPU) or h264 (DALI GPU only)")
    p.add_argument("--gop", type=int, default=5, help="keyframe interval in frames (default 5)")
    p.add_argument("--crf", type=int, default=None, help="encoder quality (default 32 for vp9, 23 for h264)")
    p.add_argument("--min-seconds", type=float, default=3.2,
                   help="reject inputs shorter than this (default 3.2 s, one VATT window)")
    p.add_argument("--vocab-size", type=int, default=2 ** 16,
                   help="vocabulary size incl. <pad> and <unk> (default 65536)")
    p.add_argument("--split-file", default=None, help="video_id,split CSV or {id: split} JSON (default: all train)")
    p.add_argument("--silent-audio", action="store_true",
                   help="keep videos without an audio stream, with a silent track (default: list as failed)")
    p.add_argument("--keep-uncaptioned", action="store_true",
                   help="keep videos without captions (default: list as failed)")
    p.add_argument("--retry-failed", action="store_true", help="try again inputs that failed in an earlier run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> PrepareSummary:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = PrepareConfig(
        fps=args.fps, short_side=args.short_side, codec=args.codec, gop=args.gop,
        crf=args.crf if args.crf is not None else (32 if args.codec == "vp9" else 23),
        min_seconds=args.min_seconds, silent_audio=args.silent_audio,
    )
    summary = prepare_dataset(
        args.videos, args.captions, args.out, cfg=cfg, workers=args.workers, vocab_size=args.vocab_size,
        split_file=args.split_file, keep_uncaptioned=args.keep_uncaptioned, retry_failed=args.retry_failed,
        progress=not args.no_progress,
    )
    print(summary)
    if summary.failed:
        print(f"failed inputs and reasons: {Path(args.out) / 'failed.jsonl'}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
