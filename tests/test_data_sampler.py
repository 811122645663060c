"""Clip sampling: geometry, determinism, caption choice, sharding, and time alignment of
frames, audio and captions in decoded clips."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data_helpers import NUMBER_WORDS, timed_audio, timed_level
from vatt_fast.data.base import DUPLICATE, fill_batch
from vatt_fast.data.manifest import Caption, VideoRecord, read_manifest
from vatt_fast.data.options import LoaderOptions
from vatt_fast.data.pyav_loader import decode_with_pyav, resample_audio
from vatt_fast.data.sampler import ClipSampler, ClipSpec, ShardedSchedule, resized_size, select_captions
from vatt_fast.data.vocab import Vocabulary
from vatt_fast.models.config import get_config


def _record(duration=6.3, captions=(), width=70, height=44, label=None):
    return VideoRecord("r", "/nowhere/r.webm", "/nowhere/r.flac", duration, list(captions), label,
                       width=width, height=height)


VOCAB = Vocabulary.build(["alpha beta gamma delta", "epsilon zeta eta theta iota"], max_size=32)


def test_clip_spec_follows_the_preset():
    for name in ("tiny", "medium"):
        cfg = get_config(name)
        spec = ClipSpec.from_preset(name)
        assert (spec.num_frames, spec.fps, spec.frame_size) == (cfg.num_frames, cfg.fps, cfg.frame_size)
        assert spec.audio_sample_rate == cfg.audio_sample_rate and spec.audio_samples == cfg.audio_samples
        assert (spec.num_captions, spec.caption_len) == (cfg.num_captions, cfg.caption_len)
        assert spec.resize_to >= spec.frame_size
    assert ClipSpec.from_preset("medium").resize_to == 256
    spec = ClipSpec.from_preset("tiny", num_frames=12, audio_sample_rate=16_000)
    assert spec.audio_samples == 12 * 1600
    with pytest.raises(TypeError, match="unknown ClipSpec field"):
        ClipSpec.from_preset("tiny", frames=3)
    with pytest.raises(ValueError, match="resize_to"):
        ClipSpec.from_preset("tiny", resize_to=20)


@pytest.mark.parametrize("h,w,short,expected", [(48, 64, 37, (37, 49)), (64, 48, 37, (49, 37)),
                                                (256, 455, 256, (256, 455)), (7, 7, 9, (9, 9))])
def test_resized_size(h, w, short, expected):
    assert resized_size(h, w, short) == expected


def test_plans_are_deterministic_and_random_where_they_should_be():
    spec = ClipSpec.from_preset("tiny")
    rec = _record()
    s1, s2 = ClipSampler(spec, VOCAB, train=True, seed=5), ClipSampler(spec, VOCAB, train=True, seed=5)
    a, b = s1.plan(rec, 3, epoch=2), s2.plan(rec, 3, epoch=2)
    assert (a.frame_indices, a.crop, a.flip) == (b.frame_indices, b.crop, b.flip)
    draws = {(p.frame_indices[0], p.crop, p.flip) for p in (s1.plan(rec, 3, epoch=e) for e in range(40))}
    assert len(draws) > 20
    n = math.floor(6.3 * 10)
    rh, rw = resized_size(44, 70, spec.resize_to)
    for e in range(40):
        p = s1.plan(rec, 7, epoch=e)
        assert p.frame_indices == list(range(p.frame_indices[0], p.frame_indices[0] + 8))
        assert 0 <= p.frame_indices[0] <= n - 8
        y, x, size = p.crop
        assert size == 32 and 0 <= y <= rh - 32 and 0 <= x <= rw - 32 and p.resized == (rh, rw)
        assert p.audio_start == pytest.approx(p.frame_indices[0] / 10) and p.audio_length == pytest.approx(0.8)
    ev = ClipSampler(spec, VOCAB, train=False, seed=5)
    p, q = ev.plan(rec, 3, epoch=0), ev.plan(rec, 9, epoch=4)
    assert p.frame_indices == q.frame_indices == list(range((n - 8) // 2, (n - 8) // 2 + 8))
    assert p.crop == ((rh - 32) // 2, (rw - 32) // 2, 32) and not p.flip


def test_short_video_plan_repeats_the_last_frame():
    spec = ClipSpec.from_preset("tiny")
    p = ClipSampler(spec, VOCAB, train=True, seed=0).plan(_record(duration=0.5), 0)
    assert p.short and p.frame_indices == [0, 1, 2, 3, 4, 4, 4, 4] and p.start_time == 0.0


def _brute_force_nearest(captions, t0, t1, k):
    out = []
    for c in captions:
        if not Vocabulary.words(c.text):
            continue
        gap = 0.0 if (c.start < t1 and c.end > t0) or (c.start == c.end and t0 <= c.start < t1) else min(
            abs(c.start - t1), abs(t0 - c.end))
        overlap = max(0.0, min(c.end, t1) - max(c.start, t0))
        out.append((gap, -overlap, c.start, c.end, c.text))
    return [x[-1] for x in sorted(out)[:k]]


def test_caption_choice_against_brute_force():
    rng = np.random.default_rng()
    for _ in range(50):
        caps = []
        for i in range(int(rng.integers(0, 9))):
            s = float(np.round(rng.uniform(0, 20), 2))
            text = f"cap {i}" if rng.random() > 0.1 else "!"  # "!" has no words: never chosen
            caps.append(Caption(s, s + float(np.round(rng.uniform(0, 4), 2)), text))
        t0 = float(np.round(rng.uniform(0, 18), 1))
        k = int(rng.integers(1, 6))
        got = [c.text for c in select_captions(caps, t0, t0 + 3.2, k)]
        assert got == _brute_force_nearest(caps, t0, t0 + 3.2, k)


def test_plan_text_and_mask():
    spec = ClipSpec.from_preset("tiny", num_captions=3, caption_len=4)
    caps = [Caption(0.0, 1.0, "alpha beta"), Caption(5.0, 6.0, "gamma delta epsilon zeta eta"),
            Caption(2.0, 2.5, "?!")]
    p = ClipSampler(spec, VOCAB, train=False, seed=0).plan(_record(duration=2.0, captions=caps), 0)
    # window [0.6, 1.4): overlaps "alpha beta"; next nearest is the 5 s caption; "?!" has no words
    assert p.text.dtype == np.int64 and p.text.shape == (3, 4)
    assert p.text[0].tolist() == VOCAB.encode("alpha beta", 4)
    assert p.text[1].tolist() == VOCAB.encode("gamma delta epsilon zeta", 4)
    assert p.text[2].tolist() == [0, 0, 0, 0]
    assert p.text_mask.tolist() == [True, True, False]
    p = ClipSampler(spec, VOCAB, train=True, seed=0).plan(_record(captions=[]), 0)
    assert not p.text_mask.any() and not p.text.any()


@pytest.mark.parametrize("n,world,batch", [(37, 3, 4), (10, 4, 2), (8, 1, 3), (5, 2, 1)])
def test_schedule_shards_are_disjoint_and_cover(n, world, batch):
    for epoch in (0, 3):
        train = [ShardedSchedule(n, LoaderOptions(batch, train=True, seed=11, rank=r, world_size=world, drop_last=True))
                 for r in range(world)]
        shards = [s.epoch_indices(epoch) for s in train]
        flat = np.concatenate(shards)
        assert len(set(flat.tolist())) == len(flat) == (n // world) * world
        assert len({s.batches_per_epoch for s in train}) == 1
        assert train[0].batches_per_epoch == (n // world) // batch
        ev = [ShardedSchedule(n, LoaderOptions(batch, train=False, rank=r, world_size=world)) for r in range(world)]
        flat = np.concatenate([s.epoch_indices(epoch) for s in ev])
        assert sorted(flat.tolist()) == list(range(n))
        for s in ev:
            got = [i for _, _, idx in s.iterate() for i in idx.tolist()]
            assert got == s.epoch_indices(0).tolist()
    a = ShardedSchedule(n, LoaderOptions(batch, train=True, seed=11, world_size=1, drop_last=False)).epoch_indices(0)
    b = ShardedSchedule(n, LoaderOptions(batch, train=True, seed=11, world_size=1, drop_last=False)).epoch_indices(1)
    assert sorted(a.tolist()) == sorted(b.tolist()) == list(range(n)) and a.tolist() != b.tolist()


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_global_batch_is_every_ranks_batch_of_the_step(train, world):
    n, batch = 23, 3
    ranks = [ShardedSchedule(n, LoaderOptions(batch, train=train, seed=4, rank=r, world_size=world, drop_last=False))
             for r in range(world)]
    for epoch in range(2):
        for b in range(ranks[0].batches_per_epoch):
            expected = [i for s in ranks if b < s.batches_per_epoch for i in s.batch(epoch, b).tolist()]
            for s in ranks:
                assert sorted(s.global_batch(epoch, b).tolist()) == sorted(expected)


def _fill(indices, bad, n, **kw):
    """fill_batch with records in ``bad`` failing; returns (chosen records, problem kinds)."""
    results, problems = fill_batch(
        indices, lambda i: (None, ("unreadable", f"r{i}")) if i in bad else (i, None), num_records=n,
        step_records=kw.pop("step", lambda: indices), **kw)
    return results, [k for k, _ in problems]


def test_a_bad_record_is_replaced_by_the_next_one_outside_the_step():
    # 1 -> 2, 3 are in the batch, 4; 2 -> 3 in the batch, 4 taken by 1's replacement, 5
    assert _fill([0, 1, 2, 3], {1, 2}, 10) == ([0, 4, 5, 3], ["unreadable", "unreadable"])
    # a replacement that fails counts too, and the next one is tried
    assert _fill([0, 1, 2, 3], {1, 4}, 10) == ([0, 5, 2, 3], ["unreadable", "unreadable"])
    # cyclic: after the last record comes the first
    assert _fill([8, 9], {9}, 10)[0] == [8, 0]
    # other ranks' records of the step are excluded too, and rank r only takes records j % world == r
    got, _ = _fill([3], {3}, 12, step=lambda: [3, 4, 5, 7], rank=1, world_size=2)
    assert got == [9]
    got, _ = _fill([3], {3}, 12, step=lambda: [3, 4, 5, 7], rank=0, world_size=2)
    assert got == [6]


def test_random_bad_sets_give_distinct_clips_that_follow_the_rule():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n, world = int(rng.integers(12, 40)), int(rng.integers(1, 4))
        rank = int(rng.integers(0, world))
        step = rng.choice(n, size=min(n // 2, 3 * world), replace=False).tolist()
        mine = step[rank::world]
        bad = set(rng.choice(n, size=n // 4, replace=False).tolist())
        got, kinds = _fill(mine, bad, n, step=lambda step=step: step, rank=rank, world_size=world)
        assert len(set(got)) == len(got) and not set(got) & bad
        if DUPLICATE in kinds:
            continue
        assert not set(got) & (set(step) - set(mine))  # no other rank's record
        taken = set(step)
        for i, j in zip(mine, got):
            if i == j:
                continue
            # j is the first record after i (cyclically) of this rank's class that is good and not taken
            ring = [(i + d) % n for d in range(1, n)]
            first = next(c for c in ring if c % world == rank and c not in taken and c not in bad)
            assert j == first and j % world == rank
            taken.add(j)


def test_no_distinct_record_left_gives_a_counted_duplicate_and_all_bad_is_an_error():
    got, kinds = _fill([0, 1, 2, 3], {1}, 4)
    assert got == [0, 2, 2, 3] and kinds == ["unreadable", DUPLICATE]
    with pytest.raises(RuntimeError, match=r"record 1 and the 3 records tried in its place could not be decoded"):
        _fill([1], set(range(4)), 4)
    with pytest.raises(RuntimeError, match=r"record 0 and the 4 records tried"):
        _fill([0], set(range(10)), 10, limit=5)


def test_schedule_errors_name_the_values():
    with pytest.raises(ValueError, match="fewer than one batch of 8"):
        ShardedSchedule(10, LoaderOptions(8, train=True, world_size=2, drop_last=True))
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        ShardedSchedule(10, LoaderOptions(2, train=True, rank=2, world_size=2))
    s = ShardedSchedule(10, LoaderOptions(2, train=True, drop_last=False))
    with pytest.raises(ValueError, match="batch_size: saved 3, here 2"):
        s.check_identity({**s.identity(), "batch_size": 3})


# 7350 and 44099 Hz: rates a file may have that the reduced polyphase table handles badly
# (44099 is coprime with 8000: an 8000 x 44167 table, 1.4 GB, before the per-sample path)
@pytest.mark.parametrize("orig,new", [(48_000, 8_000), (48_000, 16_000), (44_100, 8_000), (8_000, 11_025),
                                      (7_350, 8_000), (44_099, 8_000), (8_000, 44_099)])
def test_resample_matches_band_limited_signal(orig, new):
    rng = np.random.default_rng()
    # Inside the pass band: the windowed-sinc filter (rolloff 0.99) attenuates from ~0.4 of the rate on.
    freqs = rng.uniform(50, 0.35 * min(orig, new), size=3)
    n = int(rng.integers(9000, 12000))

    def signal(t):
        return sum(np.sin(2 * np.pi * f * t + i) for i, f in enumerate(freqs)) / 3

    y = resample_audio(signal(np.arange(n) / orig).astype(np.float32), orig, new)
    assert y.dtype == np.float32 and y.shape == (math.ceil(n * new / orig),)
    t = np.arange(y.shape[0]) / new
    inner = (t > 0.01) & (t < n / orig - 0.01)
    assert np.abs(y[inner] - signal(t[inner])).max() < 0.02


def test_per_sample_taps_equal_the_polyphase_table(monkeypatch):
    """Rate pairs with a large polyphase table compute the same taps per output sample."""
    import vatt_fast.data.pyav_loader as pl

    x = np.random.default_rng(0).standard_normal(5001).astype(np.float32)
    for orig, new in ((48_000, 8_000), (11_025, 8_000), (8_000, 22_050)):
        table = resample_audio(x, orig, new)
        monkeypatch.setattr(pl, "_MAX_POLYPHASE", 0)
        direct = resample_audio(x, orig, new)
        monkeypatch.undo()
        assert direct.shape == table.shape and direct.dtype == np.float32
        np.testing.assert_allclose(direct, table, atol=2e-6)


def test_resampling_a_coprime_rate_stays_small():
    import tracemalloc

    x = np.zeros(44_099, np.float32)  # one second
    tracemalloc.start()
    try:
        y = resample_audio(x, 44_099, 8_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert y.shape == (8_000,) and peak < 64 * 2**20, peak


def test_bad_sample_rates_are_errors():
    with pytest.raises(ValueError, match="sample rates must be positive"):
        resample_audio(np.zeros(10, np.float32), 0, 8_000)


# --- time alignment on decoded clips --------------------------------------------------
def test_frames_audio_and_captions_line_up(timed_dir):  # noqa: F811
    (rec,) = [r for r in read_manifest(timed_dir) if r.id == "long"]
    vocab = Vocabulary.load(timed_dir)
    spec = ClipSpec.from_preset("tiny", num_captions=2)
    sampler = ClipSampler(spec, vocab, train=True, seed=1)
    starts = set()
    for epoch in range(6):
        plan = sampler.plan(rec, 0, epoch)
        starts.add(plan.frame_indices[0])
        video, audio = decode_with_pyav(plan, spec)
        assert video.shape == (8, 32, 32, 3) and video.dtype == np.uint8
        levels = video.reshape(8, -1).mean(axis=1)
        np.testing.assert_allclose(levels, timed_level(plan.frame_indices), atol=3.0)
        t = plan.audio_start + np.arange(spec.audio_samples) / spec.audio_sample_rate
        assert audio.shape == (6400,) and audio.dtype == np.float32
        inner = t < rec.duration - 0.02
        np.testing.assert_allclose(audio[inner], timed_audio(t[inner]), atol=2e-3)
        # the caption of the second holding the window's middle comes first
        mid = int((plan.start_time + 0.4) // 1)
        words = vocab.decode(plan.text[0]).split()
        assert words == ["second", NUMBER_WORDS[mid]] or (plan.start_time + 0.4) % 1 == 0
        assert plan.text_mask.all()
    assert len(starts) >= 4


def test_short_video_pads_frames_and_audio(timed_dir):  # noqa: F811
    (rec,) = [r for r in read_manifest(timed_dir) if r.id == "short"]
    spec = ClipSpec.from_preset("tiny")
    plan = ClipSampler(spec, Vocabulary.load(timed_dir), train=False).plan(rec, 0)
    video, audio = decode_with_pyav(plan, spec)
    levels = video.reshape(8, -1).mean(axis=1)
    np.testing.assert_allclose(levels, timed_level([0, 1, 2, 3, 4, 4, 4, 4]), atol=3.0)
    t = np.arange(spec.audio_samples) / spec.audio_sample_rate
    np.testing.assert_allclose(audio[(t > 0.02) & (t < 0.48)], timed_audio(t[(t > 0.02) & (t < 0.48)]), atol=2e-3)
    assert np.abs(audio[t > 0.52]).max() < 4e-3


# --- one options object, one geometry ----------------------------------------------------------
def test_loader_options_defaults_follow_the_split():
    from vatt_fast.data import LoaderOptions

    val = LoaderOptions(3, split="val")
    assert (val.train, val.drop_last, val.rank, val.world_size) == (False, False, 0, 1)
    train = LoaderOptions(3)
    assert (train.train, train.drop_last) == (True, True)
    assert LoaderOptions(3, split="val", train=True).drop_last is True
    assert LoaderOptions(3, drop_last=False).drop_last is False


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size must be positive, got 0"),
        ({"batch_size": 2, "rank": 2, "world_size": 2}, r"rank must be in \[0, world_size\), got rank=2, world_size=2"),
        ({"batch_size": 2, "num_workers": -1}, "num_workers must be >= 0, got -1"),
        ({"batch_size": 2, "prefetch_factor": 0}, "prefetch_factor must be >= 1, got 0"),
    ],
)
def test_loader_options_reject_bad_values(kwargs, match):
    from vatt_fast.data import LoaderOptions

    with pytest.raises(ValueError, match=match):
        LoaderOptions(**kwargs)


def test_clip_spec_comes_from_the_model_config():
    from vatt_fast.models.config import get_config

    cfg = get_config("tiny")
    spec = ClipSpec.from_preset("tiny")
    assert spec == ClipSpec(num_frames=cfg.num_frames, fps=cfg.fps, frame_size=cfg.frame_size,
                            audio_sample_rate=cfg.audio_sample_rate, num_captions=cfg.num_captions,
                            caption_len=cfg.caption_len)  # fmt: skip
    assert spec.audio_samples == round(cfg.num_frames / cfg.fps * cfg.audio_sample_rate)
