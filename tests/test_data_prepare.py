"""The prepare tool: layout round trip, frame-rate conversion, audio alignment, captions,
vocabulary, failure list, resumability and atomicity.

Raw inputs are generated with PyAV: H.264 + AAC mp4 at 29.97 and 25 fps, a VP9 + Opus mkv at
15 fps with a non-square size, a webm without audio, a corrupt file, a too-short clip and a
video without captions. Frame ``i`` of an input (shown at ``t_i``) has grey level
``_level(t_i)`` and the audio is a 440 Hz tone whose amplitude is ``_envelope(t)``, so the
stored media can be checked against the source times independently of the tool.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from vatt_fast.data.manifest import read_manifest
from vatt_fast.data.prepare import (
    PrepareConfig,
    list_videos,
    main,
    prepare_dataset,
    read_captions,
    transcode_video,
)
from vatt_fast.data.vocab import Vocabulary

SHORT = 36  # --short-side used in the tests (keeps encoding fast)


def _level(t: np.ndarray) -> np.ndarray:
    return 30.0 + 40.0 * np.asarray(t, dtype=np.float64)


def _envelope(t: np.ndarray) -> np.ndarray:
    return 0.1 + 0.1 * np.asarray(t, dtype=np.float64)


def _write_input(path: Path, *, fps: Fraction, seconds: float, size=(52, 40), vcodec="libx264",
                 acodec="aac", audio_delay: float = 0.0) -> None:
    """A raw input: grey level encodes time, audio amplitude encodes time."""
    w, h = size
    with av.open(str(path), "w") as c:
        vs = c.add_stream(vcodec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.codec_context.time_base = 1 / fps
        if vcodec == "libx264":
            vs.codec_context.options = {"crf": "10", "preset": "ultrafast"}
        else:
            vs.codec_context.options = {"crf": "10", "deadline": "realtime", "cpu-used": "8"}
        if acodec:
            rate = 48000 if acodec == "libopus" else 44100
            aus = c.add_stream(acodec, rate=rate)
            aus.layout = "stereo"
        n = int(round(seconds * float(fps)))
        for i in range(n):
            img = np.full((h, w, 3), int(round(_level(i / float(fps)))), np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = i, 1 / fps
            for p in vs.encode(frame):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if acodec:
            t = np.arange(int(seconds * rate)) / rate
            wave = (_envelope(t + audio_delay) * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            step = aus.codec_context.frame_size or 1024
            offset = int(round(audio_delay * rate))
            for j in range(0, len(wave), step):
                chunk = np.ascontiguousarray(np.stack([wave[j:j + step]] * 2))
                fr = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
                fr.sample_rate, fr.pts, fr.time_base = rate, j + offset, Fraction(1, rate)
                for p in aus.encode(fr):
                    c.mux(p)
            for p in aus.encode():
                c.mux(p)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Raw videos + a HowTo100M-style caption JSON and a CSV with the same captions."""
    root = tmp_path_factory.mktemp("raw")
    vids = root / "videos"
    (vids / "sub").mkdir(parents=True)
    _write_input(vids / "ntsc.mp4", fps=Fraction(30000, 1001), seconds=4.3)
    _write_input(vids / "pal.mp4", fps=Fraction(25), seconds=3.6, size=(40, 52), audio_delay=0.2)
    _write_input(vids / "sub" / "wide.mkv", fps=Fraction(15), seconds=3.4, size=(66, 30), vcodec="libvpx-vp9",
                 acodec="libopus")
    _write_input(vids / "mute.webm", fps=Fraction(10), seconds=3.5, vcodec="libvpx-vp9", acodec=None)
    _write_input(vids / "tiny.mp4", fps=Fraction(25), seconds=1.0)
    _write_input(vids / "nocap.mp4", fps=Fraction(25), seconds=3.5)
    (vids / "broken.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (vids / "notes.txt").write_text("not a video")
    captions = {
        "ntsc": {"start": [2.0, 0.0], "end": [4.0, 1.5], "text": ["then the Grey square fades", "a grey square"]},
        "pal": {"start": [0.5], "end": [3.0], "text": ["grey grey square, brighter!"]},
        "wide": {"start": [0.0, 1.0], "end": [1.0, 3.0], "text": ["wide frame", "   "]},
        "mute": {"start": [0.0], "end": [3.0], "text": ["silent square"]},
        "tiny": {"start": [0.0], "end": [1.0], "text": ["too short"]},
        "broken": {"start": [0.0], "end": [1.0], "text": ["broken"]},
    }
    (root / "captions.json").write_text(json.dumps(captions))
    with open(root / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id", "start", "end", "text"])
        for vid, c in captions.items():
            for s, e, t in zip(c["start"], c["end"], c["text"]):
                w.writerow([vid, s, e, t])
    (root / "splits.csv").write_text("video_id,split\npal,val\n")
    return root


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "ds"
    summary = main(["--videos", str(raw / "videos"), "--captions", str(raw / "captions.json"), "--out", str(out),
                    "--short-side", str(SHORT), "--workers", "2", "--vocab-size", "6",
                    "--split-file", str(raw / "splits.csv"), "--no-progress"])
    assert summary.total == 7 and summary.done == 3 and summary.skipped == 0
    return out


def _decoded(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _source_times(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.array([float(f.time) for f in c.decode(video=0)])


def test_captions_json_and_csv_agree(raw):
    a, b = read_captions(raw / "captions.json"), read_captions(raw / "captions.csv")
    assert a == b
    assert [c["text"] for c in a["ntsc"]] == ["a grey square", "then the Grey square fades"]  # sorted by start
    assert a["wide"] == [{"start": 0.0, "end": 1.0, "text": "wide frame"}]  # blank text dropped


def test_caption_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"v": {"start": [0, 1], "end": [1], "text": ["a", "b"]}}))
    with pytest.raises(ValueError, match="2 starts, 1 ends"):
        read_captions(bad)
    bad_csv = tmp_path / "c.csv"
    bad_csv.write_text("v,0,1,hello\nv,zero,1,hello\n")
    with pytest.raises(ValueError, match=r"c.csv:2: start/end must be numbers"):
        read_captions(bad_csv)
    with pytest.raises(ValueError, match="unknown extension"):
        read_captions(tmp_path / "c.srt")


def test_list_file_of_videos(raw, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text(f"# inputs\n{raw / 'videos' / 'pal.mp4'}\n\n{raw / 'videos' / 'sub' / 'wide.mkv'}\n")
    assert [p.name for p in list_videos(lst)] == ["pal.mp4", "wide.mkv"]
    assert "notes.txt" not in [p.name for p in list_videos(raw / "videos")]
    with pytest.raises(FileNotFoundError, match="neither a folder nor a list file"):
        list_videos(tmp_path / "nope")


@pytest.mark.slow  # first user of `prepared`: ~10 s, mostly two spawned workers importing torch
def test_manifest_and_failure_list(prepared, raw):
    records = {r.id: r for r in read_manifest(prepared)}
    assert sorted(records) == ["ntsc", "pal", "wide"]
    assert records["pal"].split == "val" and records["ntsc"].split == "train"
    assert [c.text for c in records["ntsc"].captions] == ["a grey square", "then the Grey square fades"]
    failed = {r["id"]: r for r in map(json.loads, (prepared / "failed.jsonl").read_text().splitlines())}
    assert {k: v["reason"] for k, v in failed.items()} == {
        "broken": "unreadable", "mute": "no_audio_stream", "tiny": "too_short", "nocap": "no_captions",
    }
    assert all(v["detail"] and v["source"].endswith(k + ".mp4") or k == "mute" for k, v in failed.items())
    # nothing else in the media folders: no temporaries, no files of failed inputs
    assert sorted(p.name for p in (prepared / "videos").iterdir()) == ["ntsc.webm", "pal.webm", "wide.webm"]
    assert sorted(p.name for p in (prepared / "audio").iterdir()) == ["ntsc.flac", "pal.flac", "wide.flac"]


@pytest.mark.parametrize("vid,source", [("ntsc", "ntsc.mp4"), ("pal", "pal.mp4"), ("wide", "sub/wide.mkv")])
def test_stored_video_is_10fps_short_side_and_short_gop(prepared, raw, vid, source):
    rec = {r.id: r for r in read_manifest(prepared)}[vid]
    src_times = _source_times(raw / "videos" / source)
    with av.open(rec.video) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "vp9" and s.average_rate == 10
        keys = [p.is_keyframe for p in c.demux(s) if p.size]
    with av.open(rec.video) as c:
        frames = [f for f in c.decode(video=0)]
    n = len(frames)
    with av.open(str(raw / "videos" / source)) as src:
        period = 1 / float(src.streams.video[0].average_rate)
        src_w, src_h = src.streams.video[0].width, src.streams.video[0].height
    assert n == int(np.floor((src_times[-1] - src_times[0] + period) * 10 + 1e-2)) == round(rec.duration * 10)
    assert [i for i, k in enumerate(keys) if k] == list(range(0, n, 5))
    assert min(rec.height, rec.width) == SHORT and (rec.width, rec.height) == (frames[0].width, frames[0].height)
    assert abs(rec.width / rec.height - src_w / src_h) < 0.08
    # output frame k shows the source frame nearest to k / 10 s
    got = np.array([f.to_ndarray(format="rgb24").mean() for f in frames])
    dist = np.abs((src_times - src_times[0])[None, :] - np.arange(n)[:, None] / 10)  # [n, source frames]
    nearest = dist <= dist.min(1, keepdims=True) + 1e-6  # both neighbours on a tie (25 -> 10 fps)
    err = np.where(nearest, np.abs(got[:, None] - _level(src_times - src_times[0])[None, :]), np.inf).min(1)
    assert err.max() < 2.5, (err, got)
    assert [float(f.time) for f in frames] == pytest.approx(np.arange(n) / 10)


@pytest.mark.parametrize("vid", ["ntsc", "pal", "wide"])
def test_stored_audio_is_48k_mono_flac_aligned_to_frame_0(prepared, vid):
    rec = {r.id: r for r in read_manifest(prepared)}[vid]
    info = sf.info(rec.audio)
    assert (info.format, info.samplerate, info.channels) == ("FLAC", 48000, 1)
    assert info.frames == round(rec.duration * 48000)
    audio, _ = sf.read(rec.audio, dtype="float32")
    # RMS over 0.25 s blocks, away from the edges (codec priming), follows the envelope
    block = 12000
    centres, rms = [], []
    for j in range(1, len(audio) // block - 1):
        seg = audio[j * block:(j + 1) * block]
        centres.append((j + 0.5) * block / 48000)
        rms.append(np.sqrt(np.mean(seg.astype(np.float64) ** 2)) * np.sqrt(2))
    np.testing.assert_allclose(rms, _envelope(np.array(centres)), atol=0.012)


def test_vocabulary_holds_the_most_frequent_train_words(prepared, raw):
    vocab = Vocabulary.load(prepared)
    assert len(vocab) == 6
    # independent count over the train captions (pal is val): square 2 + 0, grey 2 + ...
    counts = Counter()
    for vid in ("ntsc", "wide"):
        for text in json.loads((raw / "captions.json").read_text())[vid]["text"]:
            counts.update(text.lower().split())
    ranked = sorted(counts, key=lambda w: (-counts[w], w))[:4]
    assert vocab.tokens == ["<pad>", "<unk>"] + ranked
    assert "brighter" not in vocab  # only in the val split


def test_rerun_does_no_work_and_gives_the_same_dataset(prepared, raw):
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(prepared.rglob("*"))
              if p.is_file() and ".prepare" not in p.parts}
    summary = main(["--videos", str(raw / "videos"), "--captions", str(raw / "captions.csv"), "--out", str(prepared),
                    "--short-side", str(SHORT), "--workers", "1", "--vocab-size", "6",
                    "--split-file", str(raw / "splits.csv"), "--no-progress"])
    assert summary.done == 0 and summary.skipped == 7 - 1  # nocap is not even tried
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(prepared.rglob("*"))
             if p.is_file() and ".prepare" not in p.parts}
    assert sorted(before) == sorted(after)
    for p in before:
        assert before[p][0] == after[p][0], p
        if p.parent.name in ("videos", "audio"):
            assert before[p][1] == after[p][1], f"{p} was rewritten"


def test_interrupted_run_is_resumed_and_cleaned(raw, tmp_path):
    out = tmp_path / "ds"
    kw = dict(cfg=PrepareConfig(short_side=SHORT), vocab_size=64, split_file=raw / "splits.csv", progress=False)
    prepare_dataset(raw / "videos", raw / "captions.json", out, **kw)
    manifest = (out / "manifest.jsonl").read_bytes()
    pal = (out / "videos" / "pal.webm").read_bytes()
    pal_frames = _decoded(out / "videos" / "pal.webm")
    # simulate a kill while pal was being written: its marker never came, half a file in a temp name
    (out / ".prepare" / "done" / "pal.json").unlink()
    (out / "videos" / "pal.webm").unlink()
    (out / "videos" / ".pal.webm.tmp-4242").write_bytes(pal[: len(pal) // 2])
    (out / "audio" / ".pal.flac.tmp-4242").write_bytes(b"fLaC")
    # ...and what vatt_fast.io.atomic_path leaves when a write is killed
    (out / "videos" / ".tmp-pal-4242-x.webm").write_bytes(pal[: len(pal) // 3])
    (out / ".prepare" / "done" / ".tmp-pal-4242-y.json").write_text("{")
    summary = prepare_dataset(raw / "videos", raw / "captions.json", out, **kw)
    assert summary.done == 1 and summary.skipped == 5
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert (out / "manifest.jsonl").read_bytes() == manifest
    np.testing.assert_array_equal(_decoded(out / "videos" / "pal.webm"), pal_frames)
    # a changed setting redoes every video; a changed input file redoes that one
    os.utime(raw / "videos" / "pal.mp4")
    summary = prepare_dataset(raw / "videos", raw / "captions.json", out, **kw)
    assert summary.done == 1
    summary = prepare_dataset(raw / "videos", raw / "captions.json", out, **dict(kw, cfg=PrepareConfig(short_side=32)))
    assert summary.done == 3
    assert min(read_manifest(out)[0].width, read_manifest(out)[0].height) == 32


def test_silent_audio_option_and_h264_output(raw, tmp_path):
    cfg = PrepareConfig(short_side=SHORT, codec="h264", silent_audio=True, gop=4)
    info = transcode_video(str(raw / "videos" / "mute.webm"), str(tmp_path / "m.mp4"), str(tmp_path / "m.flac"), cfg)
    assert info["silent_audio"] and info["num_frames"] == 35
    audio, sr = sf.read(tmp_path / "m.flac")
    assert sr == 48000 and len(audio) == 35 * 4800 and not audio.any()
    with av.open(str(tmp_path / "m.mp4")) as c:
        s = c.streams.video[0]
        keys = [p.is_keyframe for p in c.demux(s) if p.size]
        assert s.codec_context.name == "h264" and s.average_rate == 10
    assert [i for i, k in enumerate(keys) if k] == list(range(0, 35, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.flac", "m.mp4"]


def test_settings_are_validated():
    with pytest.raises(ValueError, match="codec 'av1'"):
        PrepareConfig(codec="av1")
    with pytest.raises(ValueError, match="short_side must be an even number"):
        PrepareConfig(short_side=255)
