"""Session-scoped datasets shared by the data tests (import the fixtures you use).

``synthetic_dir``: a small synthetic dataset (16 videos: 14 train, 2 val).
``timed_dir``: videos whose content encodes time: frame ``k`` has grey level
``timed_level(k)``, the audio at time ``t`` is ``timed_audio(t)``, and captions are
one-second spans named after their second, so sampled clips can be checked against an
independent computation. Also holds one video shorter than the tiny window.
``bad_dir``: one good video plus one record per bad-data kind (see ``BAD_IDS``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vatt_fast.data.manifest import Caption, VideoRecord, write_manifest
from vatt_fast.data.synthetic import AUDIO_RATE, encode_audio, encode_video, generate_synthetic
from vatt_fast.data.vocab import Vocabulary

# Fixtures imported into several test modules become one definition per module; this
# process-wide cache makes each dataset get built once per session all the same.
_BUILT: dict = {}


def _once(name: str, build):
    if name not in _BUILT:
        _BUILT[name] = build()
    return _BUILT[name]


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


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    return _once("synthetic", lambda: generate_synthetic(
        tmp_path_factory.mktemp("data") / "synthetic", videos=16, seed=3, workers=1))


@pytest.fixture(scope="session")
def timed_dir(tmp_path_factory) -> Path:
    return _once("timed", lambda: _build_timed(tmp_path_factory.mktemp("data") / "timed"))


def _build_timed(out: Path) -> Path:
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


@pytest.fixture(scope="session")
def bad_dir(synthetic_dir, tmp_path_factory) -> Path:
    """One good record, one per bad kind, and one manifest row missing ``duration``."""
    return _once("bad", lambda: _build_bad(synthetic_dir, tmp_path_factory.mktemp("data") / "bad"))


def _build_bad(synthetic_dir: Path, out: Path) -> Path:
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
