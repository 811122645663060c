"""Manifest, vocabulary and on-disk layout of vatt_fast.data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

from vatt_fast.data.manifest import (
    Caption,
    VideoRecord,
    append_manifest,
    manifest_ids,
    read_manifest,
    repair_manifest_tail,
    write_manifest,
)
from vatt_fast.data.vocab import PAD_ID, UNK_ID, Vocabulary


def _record(root: Path, i: int, **kw) -> VideoRecord:
    base = dict(
        id=f"v{i}", video=str(root / "media" / f"v{i}.webm"), audio=str(root / "media" / f"v{i}.flac"),
        duration=3.7 + i, captions=[Caption(0.25, 1.5, f"caption number {i}")], label=i % 3, split="train",
    )
    base.update(kw)
    return VideoRecord(**base)


# --- manifest -------------------------------------------------------------------------
def test_manifest_round_trip_relative_paths(tmp_path):
    recs = [_record(tmp_path, 0), _record(tmp_path, 1, label=None, split="val", width=66, height=40),
            _record(tmp_path, 2, captions=[])]
    write_manifest(tmp_path, recs)
    rows = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert rows[0]["video"] == "media/v0.webm" and rows[0]["audio"] == "media/v0.flac"
    assert "label" not in rows[1] and rows[1]["width"] == 66
    assert read_manifest(tmp_path) == recs
    assert read_manifest(tmp_path / "manifest.jsonl") == recs
    assert [r.id for r in read_manifest(tmp_path, split="val")] == ["v1"]
    assert [r.id for r in read_manifest(tmp_path, split="train")] == ["v0", "v2"]


def test_manifest_resolves_relative_to_dataset_folder(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.jsonl").write_text(
        json.dumps({"id": "a", "video": "x/a.webm", "audio": "/abs/a.flac", "duration": 2, "captions": []}) + "\n\n"
    )
    (rec,) = read_manifest(tmp_path / "ds")
    assert rec.video == str(tmp_path / "ds" / "x" / "a.webm")
    assert rec.audio == "/abs/a.flac"
    assert rec.split == "train" and rec.label is None and rec.captions == []


@pytest.mark.parametrize("broken", [
    {"video": "a.webm", "audio": "a.flac", "duration": 2.0, "captions": []},  # no id
    {"id": "b", "audio": "a.flac", "duration": 2.0, "captions": []},  # no video
    {"id": "b", "video": "a.webm", "duration": 2.0, "captions": []},  # no audio
    {"id": "b", "video": "a.webm", "audio": "a.flac", "captions": []},  # no duration
    {"id": "b", "video": "a.webm", "audio": "a.flac", "duration": 2.0},  # no captions
    {"id": "b", "video": "a.webm", "audio": "a.flac", "duration": -1.0, "captions": []},
    {"id": "b", "video": "a.webm", "audio": "a.flac", "duration": 2.0, "captions": [{"start": 1.0}]},
    [1, 2, 3],
])
def test_manifest_line_with_missing_field_is_skipped_and_counted(tmp_path, broken):
    good = {"id": "g", "video": "g.webm", "audio": "g.flac", "duration": 1.5, "captions": []}
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(x) for x in (good, broken, good)) + "\n")
    stats = Counter()
    recs = read_manifest(tmp_path, stats=stats)
    assert [r.id for r in recs] == ["g", "g"]
    assert stats == Counter({"bad_manifest_line": 1})


def test_unparsable_manifest_names_the_line(tmp_path):
    good = json.dumps({"id": "g", "video": "g.webm", "audio": "g.flac", "duration": 1.5, "captions": []})
    (tmp_path / "manifest.jsonl").write_text(f"{good}\n{good}\n{{\"id\": \"x\", oops\n{good}\n")
    with pytest.raises(ValueError, match=r"manifest\.jsonl:3: not valid JSON"):
        read_manifest(tmp_path)


def test_missing_manifest_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="vatt_fast.data.synthetic"):
        read_manifest(tmp_path)


def test_append_manifest_and_partial_tail(tmp_path):
    append_manifest(tmp_path, [_record(tmp_path, 0)])
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write('{"id": "half-writ')  # an interrupted append
    assert manifest_ids(tmp_path) == {"v0"}
    append_manifest(tmp_path, [_record(tmp_path, 1), _record(tmp_path, 2)])
    assert [r.id for r in read_manifest(tmp_path)] == ["v0", "v1", "v2"]
    assert not repair_manifest_tail(tmp_path)


# --- vocabulary -----------------------------------------------------------------------
def test_vocab_ids_by_frequency_then_alphabet():
    texts = ["the cat", "The dog, the cat!", "a Cat sat", "zebra"]
    v = Vocabulary.build(texts, max_size=100)
    # counts: the 3, cat 3, dog 1, a 1, sat 1, zebra 1 -> ties alphabetical
    assert v.tokens == ["<pad>", "<unk>", "cat", "the", "a", "dog", "sat", "zebra"]
    assert len(v) == 8
    assert v.id("cat") == 2 and v.id("lion") == UNK_ID


def test_vocab_max_size_and_min_count():
    texts = [" ".join(f"w{i}" for i in range(n)) for n in range(1, 12)]  # w0 x11, w1 x10, ...
    v = Vocabulary.build(texts, max_size=5)
    assert v.tokens == ["<pad>", "<unk>", "w0", "w1", "w2"]
    assert Vocabulary.build(texts, min_count=9).tokens[2:] == ["w0", "w1", "w2"]
    with pytest.raises(ValueError, match="at least 3"):
        Vocabulary.build(texts, max_size=2)


def test_vocab_encode_pads_truncates_lowercases_and_marks_unknown():
    v = Vocabulary.build(["red circle rising", "blue square"], max_size=50)
    ids = {w: v.id(w) for w in ("red", "circle", "rising", "blue", "square")}
    assert v.encode("RED circle,  rising!", 5) == [ids["red"], ids["circle"], ids["rising"], PAD_ID, PAD_ID]
    assert v.encode("blue giraffe square red", 3) == [ids["blue"], UNK_ID, ids["square"]]
    assert v.encode("", 4) == [PAD_ID] * 4
    batch = v.encode_batch(["red", "square blue", ""], 3)
    assert batch.dtype == np.int64 and batch.shape == (3, 3)
    assert batch.tolist() == [v.encode("red", 3), v.encode("square blue", 3), [0, 0, 0]]
    assert v.decode(v.encode("blue square", 6)) == "blue square"
    with pytest.raises(ValueError, match="length must be positive"):
        v.encode("red", 0)


def test_vocab_save_load_round_trip(tmp_path):
    rng = np.random.default_rng()
    words = [f"w{int(i)}" for i in rng.integers(0, 40, size=300)]
    v = Vocabulary.build([" ".join(words[i : i + 7]) for i in range(0, 300, 7)], max_size=23)
    v.save(tmp_path / "vocab.txt")
    lines = (tmp_path / "vocab.txt").read_text().splitlines()
    assert lines == v.tokens and lines[:2] == ["<pad>", "<unk>"]
    w = Vocabulary.load(tmp_path)
    assert w.tokens == v.tokens
    text = " ".join(words[:13])
    assert w.encode(text, 11) == v.encode(text, 11)


def test_vocab_rejects_bad_files(tmp_path):
    (tmp_path / "vocab.txt").write_text("cat\ndog\n")
    with pytest.raises(ValueError, match="must start with '<pad>'"):
        Vocabulary.load(tmp_path / "vocab.txt")
    with pytest.raises(FileNotFoundError):
        Vocabulary.load(tmp_path / "nope.txt")


# --- layout of a generated dataset ----------------------------------------------------
def test_synthetic_layout_round_trip(synthetic_dir):  # noqa: F811
    recs = read_manifest(synthetic_dir)
    assert len(recs) == 16
    assert {r.split for r in recs} == {"train", "val"}
    vocab = Vocabulary.load(synthetic_dir / "vocab.txt")
    for line in (synthetic_dir / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert not Path(row["video"]).is_absolute() and not Path(row["audio"]).is_absolute()
    for r in recs[:3]:
        assert all(UNK_ID not in vocab.encode(c.text, 8) for c in r.captions)
        with av.open(r.video) as c:
            s = c.streams.video[0]
            assert s.codec_context.name == "vp9"
            assert (s.codec_context.height, s.codec_context.width) == (r.height, r.width)
            assert min(r.height, r.width) == 48
            packets = [p for p in c.demux(s) if p.size]
            times = [float(p.pts * p.time_base) for p in packets]
            keys = [i for i, p in enumerate(packets) if p.is_keyframe]
        assert len(packets) == round(r.duration * 10)
        assert np.allclose(np.diff(times), 0.1)
        assert keys[0] == 0 and max(np.diff(keys)) <= 5
        with av.open(r.audio) as c:
            s = c.streams.audio[0]
            assert s.codec_context.name == "flac" and s.codec_context.sample_rate == 48_000
            assert len(s.codec_context.layout.channels) == 1
            n = sum(f.samples for f in c.decode(s))
        assert n == round(r.duration * 48_000)
