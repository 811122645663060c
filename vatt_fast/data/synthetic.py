"""A small synthetic dataset whose video, audio and captions share a hidden concept.

Every video lasts ``segments * segment_seconds`` (default 3 x 2 s) at 10 fps. Each
segment shows one concept, ``shape x colour x motion`` (4 x 4 x 4 = 64 concepts):

* video: a coloured shape (circle, square, triangle, cross: all mirror-symmetric) on a
  dark textured background, moving up, moving down, growing, or still (all unchanged by
  the horizontal flips of training);
* audio (48 kHz mono FLAC): a tone whose pitch comes from the colour (red 220 Hz,
  green 330 Hz, blue 495 Hz, yellow 742 Hz, with a second harmonic), whose amplitude
  rhythm comes from the shape (steady, 3 Hz gate, 7 Hz tremolo, 12 Hz tremolo) and whose
  glide comes from the motion (rising, falling, vibrato with a crescendo, flat);
* captions: one per segment, spanning it, naming colour, shape and motion word (rising,
  falling, growing, resting) in one of several templates with filler words, at most 8 words.

Shape and colour are fixed for a whole video and the motion changes per segment; the
per-video ``label`` is ``4 * shape + colour`` (16 classes) for linear probing. The
``val`` split (``min(64, videos // 8)`` videos) has a distinct concept in every video's
middle segment, the one the centred evaluation window sees, so zero-shot retrieval over
the val split is well posed (chance R@1 = 1 / number of val videos).

Usage::

    python -m vatt_fast.data.synthetic --out /tmp/synth --videos 512 --seed 0

The trainer calls :func:`ensure_synthetic`, which builds the default set once into
``$VATT_FAST_CACHE/synthetic-v1`` (default ``~/.cache/vatt_fast/synthetic-v1``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from vatt_fast.data.manifest import MANIFEST_NAME, VOCAB_NAME, write_jsonl
from vatt_fast.data.vocab import Vocabulary
from vatt_fast.io import TMP_MARK, atomic_write

__all__ = [
    "SHAPES",
    "COLOURS",
    "MOTIONS",
    "encode_video",
    "encode_audio",
    "generate_synthetic",
    "ensure_synthetic",
    "default_cache_dir",
    "main",
]

log = logging.getLogger(__name__)

VERSION = "v1"
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
MOTIONS = ("up", "down", "grow", "still")
_RGB = {"red": (230, 45, 40), "green": (40, 205, 70), "blue": (60, 100, 245), "yellow": (240, 220, 40)}
_PITCH = {"red": 220.0, "green": 330.0, "blue": 495.0, "yellow": 742.5}
_MOTION_WORD = {"up": "rising", "down": "falling", "grow": "growing", "still": "resting"}
_TEMPLATES = (
    "{c} {s} {m}",
    "a {c} {s} is {m}",
    "look at the {c} {s} {m} now",
    "here the {s} is {c} and {m}",
    "we see a {m} {c} {s}",
    "this {s} is {m} and it is {c}",
    "now the {m} {s} looks {c}",
)
FPS = 10
AUDIO_RATE = 48_000
DEFAULTS: Dict[str, Any] = dict(videos=512, seed=0, short_side=48, segments=3, segment_seconds=2.0)


# ------------------------------------------------------------------------------------
# media writers (also used by tests and benchmarks)
# ------------------------------------------------------------------------------------
def encode_video(
    path: Union[str, os.PathLike],
    frames: np.ndarray,
    fps: int = FPS,
    *,
    codec: str = "libvpx-vp9",
    gop: int = 5,
    crf: int = 30,
) -> None:
    """Encode RGB frames to a short-GOP video (VP9 in WebM by default), single-threaded.

    Args:
        path: output file (``.webm`` for VP9/VP8, ``.mp4``/``.mkv`` for H.264).
        frames: uint8 ``[N, H, W, 3]``, H and W even.
        fps: frame rate; frame ``k`` gets timestamp ``k / fps``.
        codec: FFmpeg encoder name (``libvpx-vp9``, ``libvpx``, ``libx264``...).
        gop: keyframe interval in frames.
        crf: constant quality (lower = better).
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"frame size {h}x{w} must be even for yuv420p; crop or pad by one pixel")
    # bitexact: no random track/segment UIDs, so a seed gives byte-identical files
    with av.open(str(path), "w", options={"fflags": "+bitexact"}) as c:
        s = c.add_stream(codec, rate=int(fps))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.gop_size = int(gop)
        s.codec_context.thread_count = 1
        if "vpx" in codec:
            s.options = {"deadline": "realtime", "cpu-used": "8", "crf": str(crf), "b": "0",
                         "lag-in-frames": "0", "auto-alt-ref": "0", "keyint_min": str(gop)}
        elif codec in ("libx264", "h264"):
            s.options = {"preset": "ultrafast", "crf": str(crf), "bf": "0", "keyint_min": str(gop)}
        tb = Fraction(1, int(fps))
        for i in range(n):
            vf = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            vf.pts, vf.time_base = i, tb
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def encode_audio(path: Union[str, os.PathLike], samples: np.ndarray, sample_rate: int = AUDIO_RATE) -> None:
    """Encode a mono waveform in [-1, 1] (float) as 16-bit FLAC.

    Args:
        path: output ``.flac`` file.
        samples: float ``[N]`` waveform (clipped to [-1, 1]).
        sample_rate: Hz.
    """
    import av

    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"samples must be a mono waveform [N], got shape {x.shape}")
    pcm = np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)
    with av.open(str(path), "w", format="flac", options={"fflags": "+bitexact"}) as c:
        s = c.add_stream("flac", rate=int(sample_rate), layout="mono")
        fr = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        fr.sample_rate, fr.pts = int(sample_rate), 0
        for p in s.encode(fr):
            c.mux(p)
        for p in s.encode():
            c.mux(p)


# ------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------
def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    ady, adx = np.abs(dy), np.abs(dx)
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        return np.maximum(ady, adx) <= 0.85 * r
    if shape == "triangle":  # apex up, base at the bottom
        return (dy >= -r) & (dy <= r) & (adx <= (dy + r) * 0.55)
    if shape == "cross":
        arm = 0.35 * r
        return ((adx <= arm) & (ady <= r)) | ((ady <= arm) & (adx <= r))
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def _render_video(
    rng: np.random.Generator, shape: str, colour: str, motions: Sequence[str], h: int, w: int, seg_frames: int
) -> np.ndarray:
    """uint8 ``[segments * seg_frames, h, w, 3]``."""
    scale = h / 48.0
    base = rng.uniform(15, 55)
    tint = rng.uniform(0.8, 1.2, size=3)
    texture = rng.normal(0.0, 7.0, size=(h // 4 + 1, w // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:h, :w]
    background = np.clip(base * tint + texture, 0, 255).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.array(_RGB[colour], dtype=np.float32) * rng.uniform(0.9, 1.0)
    out = np.empty((len(motions) * seg_frames, h, w, 3), dtype=np.uint8)
    for si, motion in enumerate(motions):
        cx = w * rng.uniform(0.45, 0.55)
        cy0 = h * rng.uniform(0.45, 0.55)
        for k in range(seg_frames):
            u = k / max(1, seg_frames - 1)
            r = 7.0 * scale
            cy = cy0
            if motion == "up":
                cy = h * (0.72 - 0.44 * u)
            elif motion == "down":
                cy = h * (0.28 + 0.44 * u)
            elif motion == "grow":
                r = (3.5 + 7.0 * u) * scale
            mask = _shape_mask(shape, yy - cy, xx - cx, r)
            img = background.copy()
            img[mask] = rgb
            out[si * seg_frames + k] = img.astype(np.uint8)
    return out


def _render_audio(
    rng: np.random.Generator, shape: str, colour: str, motions: Sequence[str], seg_seconds: float
) -> np.ndarray:
    """float32 waveform at 48 kHz, ``segments * seg_seconds`` long."""
    n = int(round(seg_seconds * AUDIO_RATE))
    t = np.arange(n, dtype=np.float64) / AUDIO_RATE
    u = t / seg_seconds
    f0 = _PITCH[colour] * rng.uniform(0.97, 1.03)
    if shape == "circle":
        env = np.ones_like(t)
    elif shape == "square":
        env = (np.sin(2 * np.pi * 3.0 * t) > 0).astype(np.float64) * 0.9 + 0.1
    elif shape == "triangle":
        env = 0.55 + 0.45 * np.sin(2 * np.pi * 7.0 * t)
    else:
        env = 0.55 + 0.45 * np.sin(2 * np.pi * 12.0 * t)
    fade = np.minimum(1.0, np.minimum(t, seg_seconds - t) / 0.02)
    gain = rng.uniform(0.3, 0.5)
    pieces = []
    phase0 = rng.uniform(0, 2 * np.pi)
    for motion in motions:
        if motion == "up":
            f = f0 * 2.0 ** ((u - 0.5) * 0.4)
            amp = np.ones_like(t)
        elif motion == "down":
            f = f0 * 2.0 ** ((0.5 - u) * 0.4)
            amp = np.ones_like(t)
        elif motion == "grow":
            f = f0 * (1.0 + 0.04 * np.sin(2 * np.pi * 6.0 * t))
            amp = 0.35 + 0.65 * u
        else:
            f = np.full_like(t, f0)
            amp = np.ones_like(t)
        phase = phase0 + 2 * np.pi * np.cumsum(f) / AUDIO_RATE
        tone = np.sin(phase) + 0.3 * np.sin(2 * phase)
        pieces.append(gain * tone * env * amp * fade / 1.3)
    wave = np.concatenate(pieces)
    return wave.astype(np.float32)


def _caption(rng: np.random.Generator, shape: str, colour: str, motion: str) -> str:
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    return template.format(c=colour, s=shape, m=_MOTION_WORD[motion])


def _make_video(job: Tuple[str, int, str, str, Tuple[str, ...], Dict[str, Any]]) -> Dict[str, Any]:
    """Render and encode one video; returns its manifest row (relative paths)."""
    out_dir, seed, split, vid, motions, cfg = job
    shape, colour = cfg["shape"], cfg["colour"]
    rng = np.random.default_rng([seed, int(hashlib.sha1(vid.encode()).hexdigest()[:8], 16)])
    h = int(cfg["short_side"])
    w = int(round(h * 4 / 3 / 2)) * 2
    seg_s = float(cfg["segment_seconds"])
    seg_frames = int(round(seg_s * FPS))
    frames = _render_video(rng, shape, colour, motions, h, w, seg_frames)
    audio = _render_audio(rng, shape, colour, motions, seg_s)
    encode_video(Path(out_dir) / "media" / f"{vid}.webm", frames, FPS)
    encode_audio(Path(out_dir) / "media" / f"{vid}.flac", audio, AUDIO_RATE)
    captions = [
        {"start": round(i * seg_s, 3), "end": round((i + 1) * seg_s, 3), "text": _caption(rng, shape, colour, m)}
        for i, m in enumerate(motions)
    ]
    return {
        "id": vid,
        "video": f"media/{vid}.webm",
        "audio": f"media/{vid}.flac",
        "duration": frames.shape[0] / FPS,
        "captions": captions,
        "label": SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour),
        "split": split,
        "width": w,
        "height": h,
        "concepts": [f"{colour} {shape} {m}" for m in motions],
    }


def _plan_jobs(out_dir: str, videos: int, seed: int, short_side: int, segments: int, segment_seconds: float):
    n_val = min(64, videos // 8)
    n_train = videos - n_val
    rng = np.random.default_rng([seed, 7])
    concepts = [(s, c, m) for s in SHAPES for c in COLOURS for m in MOTIONS]
    val_concepts = [concepts[i] for i in rng.permutation(len(concepts))[:n_val]]
    mid = segments // 2
    jobs = []
    for split, count in (("train", n_train), ("val", n_val)):
        for i in range(count):
            vid = f"{split}-{i:05d}"
            if split == "val":
                shape, colour, mid_motion = val_concepts[i]
            else:
                shape, colour, mid_motion = SHAPES[rng.integers(4)], COLOURS[rng.integers(4)], MOTIONS[rng.integers(4)]
            motions = [MOTIONS[int(m)] for m in rng.integers(0, 4, size=segments)]
            motions[mid] = mid_motion
            cfg = dict(shape=shape, colour=colour, short_side=short_side, segment_seconds=segment_seconds)
            jobs.append((out_dir, seed, split, vid, tuple(motions), cfg))
    return jobs


def generate_synthetic(
    out: Union[str, os.PathLike],
    videos: int = DEFAULTS["videos"],
    seed: int = DEFAULTS["seed"],
    *,
    short_side: int = DEFAULTS["short_side"],
    segments: int = DEFAULTS["segments"],
    segment_seconds: float = DEFAULTS["segment_seconds"],
    workers: Optional[int] = None,
    vocab_size: int = 1024,
    progress: bool = False,
) -> Path:
    """Write the synthetic dataset into ``out`` (created; must not exist or be empty).

    Args:
        out: dataset folder.
        videos: total number of videos (``min(64, videos // 8)`` of them form the val split).
        seed: everything is a function of it (bit-identical media for a seed).
        short_side: frame height in pixels (even; width = 4/3 of it, rounded to even).
        segments: captioned segments per video.
        segment_seconds: length of a segment.
        workers: processes used to encode (default: CPU count, at most 8).
        vocab_size: vocabulary size cap (the vocabulary has ~30 words).
        progress: show a tqdm bar.

    Returns:
        The dataset folder.
    """
    if videos < 1:
        raise ValueError(f"videos must be positive, got {videos}")
    if short_side < 16 or short_side % 2:
        raise ValueError(f"short_side must be an even number >= 16, got {short_side}")
    if segments < 1 or segment_seconds * FPS < 2:
        raise ValueError(f"need segments >= 1 and segment_seconds >= 0.2, got {segments}, {segment_seconds}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; pass a new --out folder or delete it")
    (out / "media").mkdir(parents=True, exist_ok=True)
    jobs = _plan_jobs(str(out), videos, seed, short_side, segments, segment_seconds)
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            it = ex.map(_make_video, jobs, chunksize=max(1, len(jobs) // (workers * 8)))
            rows = list(_maybe_progress(it, len(jobs), progress))
    else:
        rows = [_make_video(j) for j in _maybe_progress(iter(jobs), len(jobs), progress)]
    vocab = Vocabulary.build([c["text"] for r in rows for c in r["captions"]], max_size=vocab_size)
    vocab.save(out / VOCAB_NAME)
    write_jsonl(out / MANIFEST_NAME, rows)
    atomic_write(out / "synthetic.json", json.dumps({"version": VERSION, "videos": videos, "seed": seed,
                                                     "short_side": short_side, "segments": segments,
                                                     "segment_seconds": segment_seconds}))
    return out


def _maybe_progress(it, total: int, progress: bool):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="synthetic videos", unit="video")


def default_cache_dir() -> Path:
    """``$VATT_FAST_CACHE`` or ``~/.cache/vatt_fast``."""
    return Path(os.environ.get("VATT_FAST_CACHE") or Path.home() / ".cache" / "vatt_fast")


def ensure_synthetic(cache_dir: Optional[Union[str, os.PathLike]] = None, **kw: Any) -> Path:
    """The synthetic dataset in a cache folder, generated on first use.

    Built in a temporary sibling folder and renamed into place, so a half-written dataset
    is never seen; concurrent callers (e.g. several ranks) each build and the first rename
    wins.

    Args:
        cache_dir: parent folder (default :func:`default_cache_dir`).
        **kw: arguments of :func:`generate_synthetic` (``videos``, ``seed``, ``short_side``,
            ``segments``, ``segment_seconds``, ``workers``, ``progress``). The default set
            lives in ``synthetic-v1``; other sizes in ``synthetic-v1-<hash>``.

    Returns:
        The dataset folder.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    run_kw = {k: kw.pop(k) for k in ("workers", "progress") if k in kw}
    unknown = sorted(set(kw) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown synthetic option(s) {unknown}; valid: {sorted(DEFAULTS)}")
    params = {**DEFAULTS, **kw}
    name = f"synthetic-{VERSION}"
    if params != DEFAULTS:
        digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
        name += f"-{digest}"
    final = root / name
    if (final / MANIFEST_NAME).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    # Not atomic_path(directory=True): that replaces an existing folder, and here the first
    # caller's folder must win (another rank may already be reading it).
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{TMP_MARK}{name}-"))
    try:
        log.info("generating the synthetic dataset into %s", final)
        generate_synthetic(tmp, **params, **run_kw)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST_NAME).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Command line: ``python -m vatt_fast.data.synthetic --out DIR [--videos N] [--seed S]``."""
    p = argparse.ArgumentParser(prog="python -m vatt_fast.data.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="dataset folder to create (must not exist or be empty)")
    p.add_argument("--videos", type=int, default=DEFAULTS["videos"], help="total videos (1/8, at most 64, are val)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="random seed (output is a function of it)")
    p.add_argument("--short-side", type=int, default=DEFAULTS["short_side"], help="frame height in pixels (even)")
    p.add_argument("--segments", type=int, default=DEFAULTS["segments"], help="captioned segments per video")
    p.add_argument("--segment-seconds", type=float, default=DEFAULTS["segment_seconds"], help="segment length")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: CPU count)")
    args = p.parse_args(argv)
    t0 = time.time()
    out = generate_synthetic(
        args.out, args.videos, args.seed, short_side=args.short_side, segments=args.segments,
        segment_seconds=args.segment_seconds, workers=args.workers, progress=sys.stderr.isatty(),
    )
    print(f"wrote {args.videos} videos to {out} in {time.time() - t0:.1f}s")
    return out


if __name__ == "__main__":
    main()
