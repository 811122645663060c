"""Builders of the small datasets the data tests share (the session fixtures in ``conftest.py`` call them).

``synthetic_dir``: a small synthetic dataset (16 videos: 14 train, 2 val).
``timed_dir``: videos whose content encodes time: frame ``k`` has grey level
``timed_level(k)``, the audio at time ``t`` is ``timed_audio(t)``, and captions are
one-second spans named after their second, so sampled clips can be checked against an
independent computation. Also holds one video shorter than the tiny window.
``bad_dir``: one good video plus one record per bad-data kind (see ``BAD_IDS``).
``zoo_dir``: every kind of broken media file, each between two valid records, plus valid
files of unusual rates, channel counts and frame sizes (see ``ZOO``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from vatt_fast.data.manifest import Caption, VideoRecord, write_manifest
from vatt_fast.data.synthetic import AUDIO_RATE, encode_audio, encode_video
from vatt_fast.data.vocab import Vocabulary

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def timed_level(k: np.ndarray) -> np.ndarray:
    """Grey level of frame ``k`` in the timed videos."""
    return 20.0 + 5.0 * np.asarray(k, dtype=np.float64)


def timed_audio(t: np.ndarray) -> np.ndarray:
    """Audio value at time ``t`` (seconds) in the timed videos: a ramp plus a 50 Hz sine
    (one sample of misalignment at 8 kHz moves the value by up to 8e-3)."""
    t = np.asarray(t, dtype=np.float64)
    return 0.05 + 0.15 * t + 0.2 * np.sin(2 * np.pi * 50.0 * t)


def write_timed_video(folder: Path, vid: str, frames: int, width: int = 58, height: int = 42) -> VideoRecord:
    """A timed video of ``frames`` frames at 10 fps with its 48 kHz audio; captions per second."""
    k = np.arange(frames)
    video = np.broadcast_to(timed_level(k)[:, None, None, None], (frames, height, width, 3))
    video = np.ascontiguousarray(np.round(video).astype(np.uint8))
    seconds = frames / 10.0
    audio = timed_audio(np.arange(int(round(seconds * AUDIO_RATE))) / AUDIO_RATE)
    (folder / "media").mkdir(parents=True, exist_ok=True)
    encode_video(folder / "media" / f"{vid}.webm", video, 10, crf=4)
    encode_audio(folder / "media" / f"{vid}.flac", audio)
    caps = [Caption(float(s), float(s + 1), f"second {NUMBER_WORDS[s]}") for s in range(int(np.ceil(seconds)))]
    return VideoRecord(
        id=vid, video=str(folder / "media" / f"{vid}.webm"), audio=str(folder / "media" / f"{vid}.flac"),
        duration=seconds, captions=caps, label=None, split="train", width=width, height=height,
    )


def build_timed(out: Path) -> Path:
    records = [write_timed_video(out, "long", 45), write_timed_video(out, "short", 5)]
    write_manifest(out, records)
    vocab = Vocabulary.build([c.text for r in records for c in r.captions], max_size=64)
    vocab.save(out / "vocab.txt")
    return out


# record id -> the bad_data kind it must produce ("good" records produce none)
BAD_IDS = {
    "good": None,
    "unreadable": "unreadable",
    "truncated": "truncated",
    "missing_audio": "missing_audio",
    "short": "short",
    "no_captions": "no_captions",
}


def build_bad(synthetic_dir: Path, out: Path) -> Path:
    (out / "media").mkdir(parents=True)
    rows = [json.loads(line) for line in (synthetic_dir / "manifest.jsonl").read_text().splitlines()]
    src = rows[0]
    for name in ("good", "truncated", "no_captions"):
        shutil.copy(synthetic_dir / src["video"], out / "media" / f"{name}.webm")
        shutil.copy(synthetic_dir / src["audio"], out / "media" / f"{name}.flac")
    data = (out / "media" / "truncated.webm").read_bytes()
    (out / "media" / "truncated.webm").write_bytes(data[: len(data) // 3])
    rng = np.random.default_rng(0)
    (out / "media" / "unreadable.webm").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    shutil.copy(synthetic_dir / src["audio"], out / "media" / "unreadable.flac")
    shutil.copy(synthetic_dir / src["video"], out / "media" / "missing_audio.webm")
    short = write_timed_video(out, "short", 5, width=64, height=48)

    def row(name, **kw):
        r = dict(src, id=name, video=f"media/{name}.webm", audio=f"media/{name}.flac", split="train", label=1)
        r.pop("concepts", None)
        r.update(kw)
        return r

    lines = [
        row("good"),
        row("unreadable"),
        row("truncated"),
        row("missing_audio"),
        row("short", duration=short.duration, captions=[{"start": 0.0, "end": 0.5, "text": "second zero"}]),
        row("no_captions", captions=[]),
    ]
    missing_field = row("missing_field")
    missing_field.pop("duration")
    with open(out / "manifest.jsonl", "w") as f:
        for r in lines[:3]:
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps(missing_field) + "\n")
        for r in lines[3:]:
            f.write(json.dumps(r) + "\n")
    shutil.copy(synthetic_dir / "vocab.txt", out / "vocab.txt")
    return out


# --- the zoo: one record per kind of broken file, and valid but unusual files -----------
# record id -> the bad_data kind it must produce (None: valid, must be decoded and kept).
ZOO = {
    "audio_garbage": "unreadable",  # random bytes named .flac (FFmpeg opens it with sample rate 0)
    "audio_truncated": "truncated",  # the first third of a FLAC
    "audio_empty": "unreadable",  # 0 bytes
    "audio_missing": "missing_audio",
    "audio_rate0_flac": "unreadable",  # STREAMINFO sample rate 0 (FFmpeg reads the rate from the frames)
    "audio_rate0_wav": "unreadable",  # fmt chunk sample rate 0
    "video_garbage": "unreadable",
    "video_truncated": "truncated",  # the first third of a WebM: 18 of its 60 frames
    "video_header_only": "unreadable",  # a WebM cut before its first cluster
    "video_zero_frames": "truncated",  # an MJPEG AVI with a video stream and no frame
    "video_vfr": "frame_rate",  # frame times 0, 0.17, 0.27, 0.37, 0.54, ... s
    "video_25fps": "frame_rate",  # a constant 25 fps, not the dataset's 10 fps
    "video_size_mismatch": "frame_size",  # 33x17 frames, the manifest says 64x48
    "audio_7350hz": None,
    "audio_11025hz_3ch": None,
    "audio_48khz_6ch": None,
    "audio_44099hz_wav": None,  # coprime with 8 kHz: an 8000 x 44167 polyphase table
    "video_33x17": None,
}
ZOO_GOOD_COPIES = 13  # copies of valid synthetic records, one after each broken one


def _encode_with_times(path: Path, frames: np.ndarray, times_ms, codec: str = "libvpx-vp9") -> None:
    """Encode RGB frames with explicit presentation times (ms); any frame size."""
    from fractions import Fraction

    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        s.options = {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b": "0", "lag-in-frames": "0",
                     "auto-alt-ref": "0"}
        for f, t in zip(frames, times_ms):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf.pts, vf.time_base = int(t), Fraction(1, 1000)
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _pattern(n: int, h: int, w: int) -> np.ndarray:
    """Smooth moving colour gradients (frame k differs from frame k + 1)."""
    k, y, x = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
    rgb = [128 + 100 * np.sin(0.3 * x + 0.2 * y + 0.4 * k + c) for c in range(3)]
    return np.stack(rgb, axis=-1).round().astype(np.uint8)


def zoo_tone(t: np.ndarray, channels: int = 1) -> np.ndarray:
    """The mono mix of the unusual-rate zoo audio at times ``t`` (channel ``c`` is scaled by 1 - c / 10)."""
    x = 0.3 * np.sin(2 * np.pi * 330 * t) + 0.1 * np.sin(2 * np.pi * 1100 * t)
    return x * np.mean([1 - 0.1 * c for c in range(channels)])


# zoo record id -> (sample rate, channels) of its unusual but valid audio
ZOO_AUDIO = {"audio_7350hz": (7350, 1), "audio_11025hz_3ch": (11025, 3), "audio_48khz_6ch": (48000, 6),
             "audio_44099hz_wav": (44099, 1)}


def _tone(rate: int, channels: int, seconds: float = 6.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([zoo_tone(t) * (1 - 0.1 * c) for c in range(channels)], axis=1)


def write_broken_audio(path: Path, kind: str, good_flac: Path) -> None:
    """Write ``path`` as a broken audio file of ``kind`` (an ``audio_*`` key of ``ZOO``)."""
    import io
    import struct

    import soundfile as sf

    data = good_flac.read_bytes()
    if kind == "audio_garbage":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif kind == "audio_truncated":
        path.write_bytes(data[: len(data) // 3])
    elif kind == "audio_empty":
        path.write_bytes(b"")
    elif kind == "audio_rate0_flac":
        b = bytearray(data)
        assert b[:4] == b"fLaC" and b[4] & 0x7F == 0  # STREAMINFO first: rate = 20 bits at byte 18
        b[18], b[19], b[20] = 0, 0, b[20] & 0x0F
        path.write_bytes(bytes(b))
    elif kind == "audio_rate0_wav":
        x, sr = sf.read(str(good_flac))
        buf = io.BytesIO()
        sf.write(buf, x, sr, format="WAV", subtype="PCM_16")
        w = bytearray(buf.getvalue())
        fmt = w.find(b"fmt ")
        struct.pack_into("<II", w, fmt + 12, 0, 0)  # sample rate, byte rate
        path.write_bytes(bytes(w))
    else:
        raise ValueError(kind)


def write_broken_video(path: Path, kind: str, good_webm: Path) -> Path:
    """Write a broken video of ``kind`` (a ``video_*`` key of ``ZOO``) at ``path`` (or beside it
    with the extension its container needs); returns the path written."""
    import av

    data = good_webm.read_bytes()
    if kind == "video_garbage":
        path.write_bytes(np.random.default_rng(2).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif kind == "video_truncated":
        path.write_bytes(data[: len(data) // 3])
    elif kind == "video_header_only":
        path.write_bytes(data[: data.find(bytes.fromhex("1F43B675"))])  # first Matroska Cluster
    elif kind == "video_zero_frames":
        path = path.with_suffix(".avi")
        c = av.open(str(path), "w")
        s = c.add_stream("mjpeg", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuvj420p"
        c.start_encoding()
        c.close()
    elif kind == "video_vfr":
        _encode_with_times(path, _pattern(60, 48, 64), np.cumsum([0] + [170 if k % 3 == 0 else 100 for k in range(59)]))
    elif kind == "video_25fps":
        _encode_with_times(path, _pattern(60, 48, 64), np.arange(60) * 40)
    elif kind == "video_size_mismatch":
        _encode_with_times(path, _pattern(60, 17, 33), np.arange(60) * 100)
    else:
        raise ValueError(kind)
    return path


def build_zoo(synthetic_dir: Path, out: Path) -> Path:
    import soundfile as sf

    media = out / "media"
    media.mkdir(parents=True)
    rows = [json.loads(line) for line in (synthetic_dir / "manifest.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    lines = []

    def row(name, src, video, audio, **kw):
        r = dict(src, id=name, video=f"media/{video}", audio=f"media/{audio}", split="train")
        r.pop("concepts", None)
        r.update(kw)
        return r

    for k, name in enumerate(ZOO):
        src = train[k % len(train)]
        good_webm, good_flac = synthetic_dir / src["video"], synthetic_dir / src["audio"]
        if k < ZOO_GOOD_COPIES:
            gid = f"good_{k}"
            shutil.copy(good_webm, media / f"{gid}.webm")
            shutil.copy(good_flac, media / f"{gid}.flac")
            lines.append(row(gid, src, f"{gid}.webm", f"{gid}.flac"))
        video, audio, extra = f"{name}.webm", f"{name}.flac", {}
        if name.startswith("audio_"):
            shutil.copy(good_webm, media / video)
            if name in ZOO_AUDIO:
                rate, channels = ZOO_AUDIO[name]
                audio = f"{name}.wav" if name.endswith("_wav") else audio
                sf.write(str(media / audio), _tone(rate, channels), rate)
            elif name == "audio_rate0_wav":
                audio = f"{name}.wav"
                write_broken_audio(media / audio, name, good_flac)
            elif name != "audio_missing":
                write_broken_audio(media / audio, name, good_flac)
        else:
            shutil.copy(good_flac, media / audio)
            if name == "video_33x17":
                _encode_with_times(media / video, _pattern(60, 17, 33), np.arange(60) * 100)
                extra = dict(width=33, height=17)
            else:
                video = write_broken_video(media / video, name, good_webm).name
        lines.append(row(name, src, video, audio, **extra))
    with open(out / "manifest.jsonl", "w") as f:
        for r in lines:
            f.write(json.dumps(r) + "\n")
    shutil.copy(synthetic_dir / "vocab.txt", out / "vocab.txt")
    return out
