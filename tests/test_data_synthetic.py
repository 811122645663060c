"""The synthetic dataset: determinism, shared concepts across modalities, splits, cache."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from vatt_fast.data.manifest import read_manifest
from vatt_fast.data.pyav_loader import decode_audio_pyav, decode_video_pyav
from vatt_fast.data.sampler import ClipPlan, ClipSpec
from vatt_fast.data.synthetic import COLOURS, SHAPES, ensure_synthetic, generate_synthetic, main

_RGB = {"red": (230, 45, 40), "green": (40, 205, 70), "blue": (60, 100, 245), "yellow": (240, 220, 40)}
_PITCH = {"red": 220.0, "green": 330.0, "blue": 495.0, "yellow": 742.5}
_WORD = {"up": "rising", "down": "falling", "grow": "growing", "still": "resting"}


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "synthetic.json":
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed_and_worker_count(tmp_path):
    a = generate_synthetic(tmp_path / "a", videos=3, seed=11, workers=1, segments=2, segment_seconds=1.0)
    b = generate_synthetic(tmp_path / "b", videos=3, seed=11, workers=2, segments=2, segment_seconds=1.0)
    c = generate_synthetic(tmp_path / "c", videos=3, seed=12, workers=1, segments=2, segment_seconds=1.0)
    assert _digest(a) == _digest(b) != _digest(c)
    with pytest.raises(FileExistsError, match="not empty"):
        generate_synthetic(a, videos=3)


def _rows(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def test_captions_labels_and_val_concepts(synthetic_dir):  # noqa: F811
    rows = _rows(synthetic_dir)
    assert [r["split"] for r in rows].count("val") == 2
    for r in rows:
        assert len(r["captions"]) == len(r["concepts"]) == 3 and r["duration"] == 6.0
        for i, (cap, concept) in enumerate(zip(r["captions"], r["concepts"])):
            colour, shape, motion = concept.split()
            words = cap["text"].split()
            assert colour in words and shape in words and _WORD[motion] in words and len(words) <= 8
            assert (cap["start"], cap["end"]) == (2.0 * i, 2.0 * i + 2.0)
        colour, shape, _ = r["concepts"][0].split()
        assert r["label"] == SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)
    big = _plan_only(tmp_videos=512)
    mids = [c for split, c in big if split == "val"]
    assert len(mids) == 64 and len(set(mids)) == 64


def _plan_only(tmp_videos):
    from vatt_fast.data.synthetic import _plan_jobs

    jobs = _plan_jobs("/unused", tmp_videos, 0, 48, 3, 2.0)
    return [(split, (cfg["shape"], cfg["colour"], motions[1])) for _, _, split, _, motions, cfg in jobs]


def _plan(rec, t0, spec, h, w):
    return ClipPlan(index=0, video=rec.video, audio=rec.audio, start_time=t0,
                    frame_indices=[int(round(t0 * 10)) + i for i in range(spec.num_frames)],
                    audio_start=t0, audio_length=spec.num_frames / 10, resized=(h, w), crop=(0, 0, h), flip=False,
                    text=np.zeros((1, 1), np.int64), text_mask=np.zeros(1, bool))


def test_frames_and_tone_carry_the_caption_concept(synthetic_dir):  # noqa: F811
    """Independent check on decoded media: object colour and position, tone pitch and rhythm."""
    rows = _rows(synthetic_dir)
    recs = read_manifest(synthetic_dir)
    for row, rec in list(zip(rows, recs))[:6]:
        for seg, concept in enumerate(row["concepts"]):
            colour, shape, motion = concept.split()
            t0 = 2.0 * seg + 0.1
            spec = ClipSpec(num_frames=18, fps=10, frame_size=48, resize_to=48, audio_sample_rate=8000,
                            audio_samples=14_400, num_captions=1, caption_len=1)
            plan = _plan(rec, t0, spec, rec.height, rec.width)
            plan.crop = (0, (rec.width - 48) // 2, 48)
            video = decode_video_pyav(plan, spec).astype(np.float64)
            audio = decode_audio_pyav(plan, spec)
            # object pixels: far from the background's mean colour
            bg = np.median(video.reshape(-1, 3), axis=0)
            obj = np.linalg.norm(video - bg, axis=-1) > 60
            assert obj[0].sum() > 30
            mean_rgb = video[obj].mean(axis=0)
            nearest = min(_RGB, key=lambda c: np.linalg.norm(mean_rgb - np.array(_RGB[c])))
            assert nearest == colour
            ys = [np.nonzero(o)[0].mean() for o in obj]
            areas = [o.sum() for o in obj]
            dy, growth = ys[-1] - ys[0], areas[-1] / areas[0]
            if motion == "up":
                assert dy < -10
            elif motion == "down":
                assert dy > 10
            elif motion == "grow":
                assert growth > 2
            else:
                assert abs(dy) < 2 and 0.8 < growth < 1.25
            # pitch: spectral peak within a quarter tone of the colour's glided pitch
            spec_mag = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
            peak = np.fft.rfftfreq(audio.size, 1 / 8000)[np.argmax(spec_mag)]
            nearest = min(_PITCH, key=lambda c: abs(np.log(peak / _PITCH[c])))
            assert nearest == colour, (peak, concept)
            # rhythm: the shape's amplitude modulation rate dominates the envelope spectrum
            env = np.abs(audio).reshape(-1, 80).max(axis=1)  # 100 Hz envelope
            if shape == "circle" and motion != "grow":
                assert env.std() / env.mean() < 0.1
            elif shape != "circle":
                rate = {"square": 3.0, "triangle": 7.0, "cross": 12.0}[shape]
                e = env - env.mean()
                mags = np.abs(np.fft.rfft(e * np.hanning(e.size)))
                freqs = np.fft.rfftfreq(e.size, 1 / 100)
                assert abs(freqs[np.argmax(mags[freqs > 1.5]) + np.sum(freqs <= 1.5)] - rate) < 1.0, concept


def test_vocabulary_holds_every_caption_word(synthetic_dir):  # noqa: F811
    from vatt_fast.data.synthetic import _TEMPLATES
    from vatt_fast.data.vocab import Vocabulary

    vocab = Vocabulary.load(synthetic_dir)
    allowed = set(COLOURS) | set(SHAPES) | set(_WORD.values()) | {
        w for t in _TEMPLATES for w in t.split() if not w.startswith("{")}
    used = {w for r in _rows(synthetic_dir) for c in r["captions"] for w in c["text"].split()}
    assert used <= set(vocab.tokens[2:]) <= allowed


def test_ensure_synthetic_caches_atomically(tmp_path, monkeypatch):
    kw = dict(videos=2, seed=1, segments=1, segment_seconds=1.0, workers=1)
    path = ensure_synthetic(tmp_path, **kw)
    assert path.parent == tmp_path and path.name.startswith("synthetic-v1-")
    assert (path / "manifest.jsonl").is_file() and (path / "vocab.txt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp folder left behind
    stamp = (path / "manifest.jsonl").stat().st_mtime_ns
    assert ensure_synthetic(tmp_path, **kw) == path
    assert (path / "manifest.jsonl").stat().st_mtime_ns == stamp
    monkeypatch.setenv("VATT_FAST_CACHE", str(tmp_path))
    assert ensure_synthetic(**kw) == path
    with pytest.raises(TypeError, match="unknown synthetic option"):
        ensure_synthetic(tmp_path, frames=3)


def test_command_line(tmp_path, capsys):
    out = main(["--out", str(tmp_path / "cli"), "--videos", "2", "--seed", "4", "--segments", "1",
                "--segment-seconds", "1.0", "--workers", "1", "--short-side", "40"])
    recs = read_manifest(out)
    assert len(recs) == 2 and (recs[0].height, recs[0].width) == (40, 54)
    assert "wrote 2 videos" in capsys.readouterr().out
