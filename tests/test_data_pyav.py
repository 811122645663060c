"""The PyAV loader: batch contract, determinism, resume, rank sharding and bad data."""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch

from data_helpers import ZOO, ZOO_AUDIO, ZOO_GOOD_COPIES, zoo_tone
from vatt_fast.data import build_loader, read_manifest
from vatt_fast.data.loader import resolve_loader
from vatt_fast.data.pyav_loader import decode_audio_pyav, decode_with_pyav, probe_media
from vatt_fast.data.sampler import ClipSampler, ClipSpec
from vatt_fast.data.vocab import Vocabulary
from vatt_fast.models.config import get_config


def _take(loader, n):
    return list(itertools.islice(loader, n))


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_auto_backend_is_pyav_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("auto picks DALI when CUDA is there")
    assert resolve_loader("auto") == "pyav"
    with pytest.raises(ValueError, match="unknown loader backend 'ffmpeg'"):
        resolve_loader("ffmpeg")


def _no_probe():
    raise AssertionError("probed after an earlier check already failed")


def _cdll_fails(name):
    raise OSError(f"{name}: cannot open shared object file: No such file or directory")


@pytest.mark.parametrize("missing", ["cuda", "dali", "nvdec", "nothing"])
def test_auto_falls_back_to_pyav_and_logs_why(monkeypatch, caplog, missing):
    """auto: DALI needs a CUDA device, the DALI wheel and the driver's NVDEC library; without
    one of them it picks PyAV and logs one line naming the one that is missing."""
    import ctypes
    import sys

    import vatt_fast.data.loader as ld

    if missing == "cuda":
        monkeypatch.setattr(ld, "_cuda_problem", lambda: "no CUDA device (torch.cuda.is_available() is False)")
        monkeypatch.setattr(ld, "_dali_problem", _no_probe)
        monkeypatch.setattr(ld, "_nvdec_problem", _no_probe)
    else:
        monkeypatch.setattr(ld, "_cuda_problem", lambda: None)
        if missing == "dali":  # what an import of a package that is not installed does
            monkeypatch.setitem(sys.modules, "nvidia.dali", None)
            monkeypatch.setattr(ld, "_nvdec_problem", _no_probe)
        else:
            monkeypatch.setattr(ld, "_dali_problem", lambda: None)
            monkeypatch.setattr(ctypes, "CDLL", _cdll_fails if missing == "nvdec" else (lambda name: object()))
    with caplog.at_level(logging.INFO, logger="vatt_fast.data.loader"):
        chosen = resolve_loader("auto")
    lines = [r for r in caplog.records if r.name == "vatt_fast.data.loader"]
    assert len(lines) == 1
    message, level = lines[0].getMessage(), lines[0].levelno
    if missing == "nothing":
        assert chosen == "dali" and message.startswith("loader auto: DALI") and level == logging.INFO
        return
    assert chosen == "pyav" and message.startswith("loader auto: PyAV (CPU decoding), because ")
    expected = {
        "cuda": "no CUDA device",
        "dali": "DALI not installed",
        "nvdec": "NVDEC library libnvcuvid.so.1 not found (libnvcuvid.so.1: cannot open shared object file",
    }[missing]
    assert expected in message
    # a GPU decoding on the CPU anyway is worth a warning; a CPU-only machine is not
    assert level == (logging.INFO if missing == "cuda" else logging.WARNING)


def test_explicit_backends_are_not_probed(monkeypatch, caplog):
    import vatt_fast.data.loader as ld

    for probe in ("_cuda_problem", "_nvdec_problem"):
        monkeypatch.setattr(ld, probe, _no_probe)
    with caplog.at_level(logging.INFO, logger="vatt_fast.data.loader"):
        assert resolve_loader("pyav") == "pyav"
    assert not caplog.records


def test_build_loader_auto_on_this_machine_says_why_it_picks_pyav(synthetic_dir, caplog):  # noqa: F811
    from vatt_fast.data.loader import choose_loader
    from vatt_fast.data.pyav_loader import PyAVLoader

    chosen, why = choose_loader("auto")
    if chosen == "dali":
        pytest.skip("this machine has CUDA, DALI and NVDEC: auto picks DALI")
    with caplog.at_level(logging.INFO, logger="vatt_fast.data.loader"):
        loader = build_loader(synthetic_dir, "val", 2, backend="auto", num_workers=0)
    assert isinstance(loader, PyAVLoader)
    lines = [r.getMessage() for r in caplog.records if r.name == "vatt_fast.data.loader"]
    assert lines == [f"loader auto: PyAV (CPU decoding), because {why}"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batch_contract_matches_the_tiny_preset(synthetic_dir, num_workers):  # noqa: F811
    cfg = get_config("tiny")
    loader = build_loader(synthetic_dir, "train", 3, backend="pyav", num_workers=num_workers)
    try:
        (batch,) = _take(loader, 1)
    finally:
        loader.close()
    B, T, S = 3, cfg.num_frames, cfg.audio_samples
    assert batch["video"].dtype == torch.uint8 and batch["video"].shape == (B, T, cfg.frame_size, cfg.frame_size, 3)
    assert batch["audio"].dtype == torch.float32 and batch["audio"].shape == (B, S)
    assert batch["text"].dtype == torch.int64 and batch["text"].shape == (B, cfg.num_captions, cfg.caption_len)
    assert batch["text_mask"].dtype == torch.bool and batch["text_mask"].shape == (B, cfg.num_captions)
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (B,)
    assert batch["index"].dtype == torch.int64 and batch["index"].shape == (B,)
    assert batch["text_mask"].all() and batch["audio"].abs().max() > 0.05
    assert int(batch["text"].max()) < len(Vocabulary.load(synthetic_dir)) <= cfg.vocab_size
    recs = read_manifest(synthetic_dir, split="train")
    assert batch["label"].tolist() == [recs[i].label for i in batch["index"].tolist()]
    assert len(loader) == len(recs) // 3
    assert loader.bad_data == {}


def test_batch_matches_the_reference_decode(synthetic_dir):  # noqa: F811
    loader = build_loader(synthetic_dir, "val", 2, backend="pyav", num_workers=0)
    (batch,) = _take(loader, 1)
    recs = read_manifest(synthetic_dir, split="val")
    spec = ClipSpec.from_preset("tiny")
    sampler = ClipSampler(spec, Vocabulary.load(synthetic_dir), train=False, seed=0)
    for j, i in enumerate(batch["index"].tolist()):
        plan = sampler.plan(recs[i], i, 0)
        video, audio = decode_with_pyav(plan, spec)
        assert np.array_equal(batch["video"][j].numpy(), video)
        assert np.array_equal(batch["audio"][j].numpy(), audio)
        assert np.array_equal(batch["text"][j].numpy(), plan.text)


def test_loader_feeds_the_tiny_model(synthetic_dir):  # noqa: F811
    from vatt_fast.models import create_model

    loader = build_loader(synthetic_dir, "train", 2, backend="pyav", num_workers=0)
    (batch,) = _take(loader, 1)
    model = create_model("tiny").eval()
    with torch.no_grad():
        out = model(batch)
    for key in ("video_va", "audio_va", "video_vt", "text_vt"):
        assert key in out and out[key].shape[0] == 2 and torch.isfinite(out[key]).all()


def test_train_is_deterministic_for_a_seed_and_worker_count_independent(synthetic_dir):  # noqa: F811
    a = build_loader(synthetic_dir, "train", 4, backend="pyav", num_workers=0, seed=7)
    b = build_loader(synthetic_dir, "train", 4, backend="pyav", num_workers=2, seed=7)
    c = build_loader(synthetic_dir, "train", 4, backend="pyav", num_workers=0, seed=8)
    try:
        xa, xb, xc = _take(a, 2), _take(b, 2), _take(c, 1)
    finally:
        b.close()
    for p, q in zip(xa, xb):
        _same(p, q)
    assert not torch.equal(xa[0]["index"], xc[0]["index"]) or not torch.equal(xa[0]["video"], xc[0]["video"])


def test_train_is_infinite_reshuffled_and_resumes_exactly(synthetic_dir):  # noqa: F811
    # 14 train records, batch 4, drop_last -> 3 batches per epoch; take 7 = two epochs and a bit
    full = build_loader(synthetic_dir, "train", 4, backend="pyav", num_workers=0, seed=2)
    assert len(full) == 3
    ref = _take(full, 7)
    assert full.state_dict()["epoch"] == 2 and full.state_dict()["batch"] == 1
    epoch0 = torch.cat([b["index"] for b in ref[:3]]).tolist()
    epoch1 = torch.cat([b["index"] for b in ref[3:6]]).tolist()
    assert len(set(epoch0)) == 12 and len(set(epoch1)) == 12 and epoch0 != epoch1

    part = build_loader(synthetic_dir, "train", 4, backend="pyav", num_workers=2, seed=2)
    first = _take(part, 2)
    state = json.loads(json.dumps(part.state_dict()))  # it must survive a checkpoint file
    part.close()
    resumed = build_loader(synthetic_dir, "train", 4, backend="pyav", num_workers=2, seed=2)
    resumed.load_state_dict(state)
    rest = _take(resumed, 5)
    resumed.close()
    for p, q in zip(first + rest, ref):
        _same(p, q)
    wrong = build_loader(synthetic_dir, "train", 2, backend="pyav", num_workers=0, seed=2)
    with pytest.raises(ValueError, match="batch_size: saved 4, here 2"):
        wrong.load_state_dict(state)


def test_eval_is_one_ordered_pass_every_time(synthetic_dir):  # noqa: F811
    recs = read_manifest(synthetic_dir, split="train")
    loader = build_loader(synthetic_dir, "train", 4, backend="pyav", num_workers=2, train=False)
    assert len(loader) == 4  # 14 records, no drop
    first = list(loader)
    second = list(loader)
    loader.close()
    assert torch.cat([b["index"] for b in first]).tolist() == list(range(len(recs)))
    assert [b["video"].shape[0] for b in first] == [4, 4, 4, 2]
    for p, q in zip(first, second):
        _same(p, q)


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_are_disjoint_and_cover(synthetic_dir, world_size):  # noqa: F811
    n = len(read_manifest(synthetic_dir, split="train"))
    seen_eval, seen_train = [], []
    for rank in range(world_size):
        ev = build_loader(synthetic_dir, "train", 3, backend="pyav", num_workers=0, train=False,
                          rank=rank, world_size=world_size)
        seen_eval += [i for b in ev for i in b["index"].tolist()]
        tr = build_loader(synthetic_dir, "train", 2, backend="pyav", num_workers=0, rank=rank,
                          world_size=world_size, seed=4)
        assert len(tr) == (n // world_size) // 2
        seen_train += [i for b in _take(tr, len(tr)) for i in b["index"].tolist()]
    assert sorted(seen_eval) == list(range(n))
    assert len(seen_train) == len(set(seen_train)) == world_size * ((n // world_size) // 2) * 2


def test_bad_data_is_replaced_and_counted(bad_dir):  # noqa: F811
    ids = [r.id for r in read_manifest(bad_dir)]
    assert ids == ["good", "unreadable", "truncated", "missing_audio", "short", "no_captions"]
    loader = build_loader(bad_dir, "train", 1, backend="pyav", num_workers=0, train=False)
    assert loader.bad_data == {"bad_manifest_line": 1}
    got = [(int(b["index"]), b) for b in loader]
    # replaced by the next readable record: unreadable -> truncated -> missing_audio -> short
    assert [i for i, _ in got] == [0, 4, 4, 4, 4, 5]
    assert loader.bad_data == {
        "bad_manifest_line": 1,
        "unreadable": 1,
        "truncated": 2,
        "missing_audio": 3,
        "short": 4,
        "no_captions": 1,
    }
    short = got[1][1]
    assert torch.equal(short["video"][0, 5], short["video"][0, 7])  # last frame repeated
    assert short["text_mask"][0].tolist() == [True, False]
    no_caps = got[5][1]
    assert not no_caps["text_mask"].any() and not no_caps["text"].any()
    assert no_caps["video"].float().std() > 5


@pytest.mark.parametrize("num_workers", [0, 2])
def test_replacements_are_distinct_within_a_batch(bad_dir, num_workers):  # noqa: F811
    """Records: good, unreadable, truncated, missing_audio, short, no_captions. A bad record is
    replaced by the next one that is not in its batch (a duplicate would be a false negative
    for the contrastive loss), whichever worker builds the batch."""
    loader = build_loader(bad_dir, "train", 2, backend="pyav", num_workers=num_workers, train=False)
    got = [b["index"].tolist() for b in loader]
    counts = loader.bad_data
    loader.close()
    # [0, 1]: 1 -> 2 (bad), 3 (bad), 4.  [2, 3]: 2 -> 3 (in the batch, skipped), 4; 3 -> 4 (taken), 5.
    assert got == [[0, 4], [4, 5], [4, 5]]
    assert counts == {"bad_manifest_line": 1, "unreadable": 1, "truncated": 2, "missing_audio": 2, "short": 3,
                      "no_captions": 2}
    fresh = build_loader(bad_dir, "train", 2, backend="pyav", num_workers=0, train=False)
    fresh.load_state_dict({"epoch": 0, "batch": 0, "bad_data": {"truncated": 5}})
    assert fresh.bad_data == {"truncated": 5}


def test_everything_bad_is_an_error(bad_dir, tmp_path):  # noqa: F811
    rows = [json.loads(line) for line in (bad_dir / "manifest.jsonl").read_text().splitlines()]
    rows = [dict(r, video=str(bad_dir / r["video"]), audio=str(bad_dir / r["audio"])) for r in rows
            if r["id"] in ("unreadable", "missing_audio")]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "vocab.txt").write_text((bad_dir / "vocab.txt").read_text())
    loader = build_loader(tmp_path, "train", 1, backend="pyav", num_workers=0, train=False)
    with pytest.raises(RuntimeError, match=r"record 0 and the 1 records tried in its place could not be decoded"):
        next(iter(loader))


# --- every kind of broken file (the zoo: each broken record sits between two valid ones) ----
def test_probe_names_each_broken_file(zoo_dir):  # noqa: F811
    recs = read_manifest(zoo_dir)
    assert {r.id for r in recs} == set(ZOO) | {f"good_{k}" for k in range(ZOO_GOOD_COPIES)}
    for r in recs:
        info = probe_media(r, 10.0)
        assert info.kind == ZOO.get(r.id), (r.id, info.message)
        assert info.kind is None or (r.video in info.message or r.audio in info.message), info.message


@pytest.mark.parametrize("num_workers", [0, 2])
def test_broken_files_are_replaced_by_the_next_record_and_counted(zoo_dir, num_workers, caplog):  # noqa: F811
    recs = read_manifest(zoo_dir)
    kinds = [ZOO.get(r.id) for r in recs]
    loader = build_loader(zoo_dir, "train", 1, backend="pyav", num_workers=num_workers, train=False)
    with caplog.at_level(logging.WARNING, logger="vatt_fast.data"):
        got = [int(b["index"]) for b in loader]
    loader.close()
    assert got == [i + 1 if kinds[i] else i for i in range(len(recs))]
    expected = Counter(k for k in kinds if k)
    assert loader.bad_data == dict(expected)
    # one log line per kind, naming a file, however many records of the kind
    logged = [r.getMessage() for r in caplog.records if r.name == "vatt_fast.data"]
    assert sorted(m.split(":")[0] for m in logged) == sorted(f"bad data, {k}" for k in expected)
    assert all(str(zoo_dir) in m for m in logged)


def test_unusual_rates_and_channels_are_resampled_and_mixed_down(zoo_dir):  # noqa: F811
    """Valid audio at 7350 / 11025 / 44099 Hz, 3 and 6 channels: mixed down and resampled to the
    model rate (checked against the analytic tone) for windows all over the file, including
    windows where FFmpeg's FLAC demuxer cannot seek (7350 Hz, from 4.5 s on: decoded from the start)."""
    import dataclasses

    spec = ClipSpec.from_preset("tiny")
    sampler = ClipSampler(spec, Vocabulary.load(zoo_dir), train=False)
    recs = [r for r in read_manifest(zoo_dir) if r.id in ZOO_AUDIO]
    assert len(recs) == len(ZOO_AUDIO)
    for rec in recs:
        centred = sampler.plan(rec, 0)
        for f0 in range(0, sampler.num_frames_of(rec) - spec.num_frames + 1, 4):
            plan = dataclasses.replace(centred, frame_indices=list(range(f0, f0 + spec.num_frames)),
                                       start_time=f0 / spec.fps, audio_start=f0 / spec.fps)
            audio = decode_audio_pyav(plan, spec)
            t = plan.audio_start + np.arange(spec.audio_samples) / spec.audio_sample_rate
            inner = (t > 0.005) & (t < rec.duration - 0.005)  # the resampling filter's reach at the file ends
            np.testing.assert_allclose(audio[inner], zoo_tone(t[inner], ZOO_AUDIO[rec.id][1]), atol=5e-3,
                                       err_msg=f"{rec.id} at {plan.audio_start:.1f} s")


def test_odd_frame_sizes_keep_their_colours(zoo_dir):  # noqa: F811
    """A 33x17 video (odd sides) against an independent resize: the frames converted to RGB at
    their own size, then resized with torch's antialiased bilinear filter (swscale's one-pass
    YUV -> RGB + resize is off by ~3 grey levels on odd sizes)."""
    import av

    (rec,) = [r for r in read_manifest(zoo_dir) if r.id == "video_33x17"]
    spec = ClipSpec.from_preset("tiny")
    plan = ClipSampler(spec, Vocabulary.load(zoo_dir), train=False).plan(rec, 0)
    video, _ = decode_with_pyav(plan, spec)
    with av.open(rec.video) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    full = torch.from_numpy(np.stack([frames[k] for k in plan.frame_indices])).permute(0, 3, 1, 2).float()
    y, x, size = plan.crop
    ref = torch.nn.functional.interpolate(full, size=plan.resized, mode="bilinear", antialias=True)
    ref = ref[:, :, y : y + size, x : x + size].permute(0, 2, 3, 1)
    assert (torch.from_numpy(video).float() - ref).abs().mean() < 1.0


class _CountDecoded:
    """A PyAV container that records the frame number of every video frame its decoder returns."""

    def __init__(self, container, fps, seen):
        self._c, self._fps, self._seen = container, fps, seen

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._c.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._c, name)

    def decode(self, *args, **kw):
        for frame in self._c.decode(*args, **kw):
            self._seen.append(int(round(float(frame.time) * self._fps)))
            yield frame


@pytest.mark.parametrize("record", ["long", "short"])
def test_only_the_window_is_decoded_and_converted(timed_dir, monkeypatch, record):  # noqa: F811
    """Decoding starts at the keyframe before the window (GOP 5), stops at its last frame, and
    each frame of the window is converted to RGB once (a short video repeats its last frame)."""
    import av

    import vatt_fast.data.pyav_loader as pl

    rec = next(r for r in read_manifest(timed_dir) if r.id == record)
    spec = ClipSpec.from_preset("tiny")
    sampler = ClipSampler(spec, Vocabulary.load(timed_dir), train=True, seed=1)
    plans = [sampler.plan(rec, 0, epoch) for epoch in range(4)]
    references = [decode_with_pyav(plan, spec)[0] for plan in plans]
    converted, decoded = [], []
    real_rgb, real_open = pl._to_rgb, av.open

    def counting_rgb(reformatter, frame, width, height):
        converted.append(int(round(float(frame.time) * spec.fps)))
        return real_rgb(reformatter, frame, width, height)

    monkeypatch.setattr(pl, "_to_rgb", counting_rgb)
    monkeypatch.setattr(av, "open", lambda *a, **kw: _CountDecoded(real_open(*a, **kw), spec.fps, decoded))
    for plan, reference in zip(plans, references):
        converted.clear()
        decoded.clear()
        video = pl.decode_video_pyav(plan, spec)
        assert np.array_equal(video, reference)
        wanted = sorted(set(plan.frame_indices))
        assert sorted(converted) == wanted
        first, last = wanted[0], wanted[-1]
        assert decoded == list(range(first - first % 5, last + 1)), (plan.frame_indices, decoded)
    if record == "short":
        assert plans[0].short and len(set(plans[0].frame_indices)) < len(plans[0].frame_indices)
    else:
        assert any(plan.frame_indices[0] % 5 for plan in plans) and any(plan.flip for plan in plans)


def test_decoder_threads_do_not_change_the_pixels(synthetic_dir):  # noqa: F811
    from vatt_fast.data.pyav_loader import decode_video_pyav

    recs = read_manifest(synthetic_dir, split="train")
    spec = ClipSpec.from_preset("tiny")
    sampler = ClipSampler(spec, Vocabulary.load(synthetic_dir), train=True, seed=11)
    for i in (0, 5, 9):
        plan = sampler.plan(recs[i], i, 0)
        single = decode_video_pyav(plan, spec, threads=1)
        for threads in (0, 2, 3):
            assert np.array_equal(decode_video_pyav(plan, spec, threads=threads), single), threads
    with pytest.raises(ValueError, match="decoder threads must be >= 0"):
        decode_video_pyav(plan, spec, threads=-1)


def test_flip_mirrors_the_crop_left_to_right(synthetic_dir):  # noqa: F811
    import dataclasses

    from vatt_fast.data.pyav_loader import decode_video_pyav

    rec = read_manifest(synthetic_dir, split="val")[0]
    spec = ClipSpec.from_preset("tiny")
    plan = ClipSampler(spec, Vocabulary.load(synthetic_dir), train=False).plan(rec, 0)
    assert not plan.flip
    video = decode_video_pyav(plan, spec)
    flipped = decode_video_pyav(dataclasses.replace(plan, flip=True), spec)
    assert flipped.flags.c_contiguous and not np.array_equal(video, video[:, ::-1])
    assert np.array_equal(flipped, video[:, :, ::-1])


def test_the_loader_passes_decoder_threads_to_ffmpeg(synthetic_dir, monkeypatch):  # noqa: F811
    import vatt_fast.data.pyav_loader as pl

    seen = []
    real = pl.set_decoder_threads

    def recording(codec_context, threads):
        real(codec_context, threads)
        seen.append((threads, codec_context.thread_count, str(codec_context.thread_type)))

    monkeypatch.setattr(pl, "set_decoder_threads", recording)
    default = build_loader(synthetic_dir, "val", 2, backend="pyav", num_workers=0)
    threaded = build_loader(synthetic_dir, "val", 2, backend="pyav", num_workers=0, decoder_threads=3)
    _same(_take(default, 1)[0], _take(threaded, 1)[0])
    assert seen[:2] == [(1, 1, "ThreadType.SLICE")] * 2 and seen[2:] == [(3, 3, "ThreadType.AUTO")] * 2
    assert default.options.decoder_threads == 1
    with pytest.raises(ValueError, match="decoder_threads must be >= 0"):
        build_loader(synthetic_dir, "val", 2, backend="pyav", decoder_threads=-1)


class _NoSeek:
    """A PyAV container whose demuxer cannot seek anywhere but to the start."""

    def __init__(self, container):
        self._c = container

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._c.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._c, name)

    def seek(self, offset, **kw):
        if offset:
            raise PermissionError(1, "Operation not permitted")
        return self._c.seek(offset, **kw)


def test_a_failed_seek_decodes_from_the_start(synthetic_dir, monkeypatch):  # noqa: F811
    import av

    rec = read_manifest(synthetic_dir, split="val")[0]
    spec = ClipSpec.from_preset("tiny")
    plan = ClipSampler(spec, Vocabulary.load(synthetic_dir), train=False).plan(rec, 0)
    assert plan.frame_indices[0] > 0 and plan.audio_start > 0
    video, audio = decode_with_pyav(plan, spec)
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **kw: _NoSeek(real_open(*a, **kw)))
    video2, audio2 = decode_with_pyav(plan, spec)
    assert np.array_equal(video, video2) and np.array_equal(audio, audio2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_batches_over_broken_files_are_distinct_and_deterministic(zoo_dir, num_workers):  # noqa: F811
    recs = read_manifest(zoo_dir)
    bad = {i for i, r in enumerate(recs) if ZOO.get(r.id)}
    loader = build_loader(zoo_dir, "train", 4, backend="pyav", num_workers=num_workers, seed=3)
    nb = len(loader)
    batches = _take(loader, 2 * nb)
    loader.close()
    reference = build_loader(zoo_dir, "train", 4, backend="pyav", num_workers=0, seed=3)
    for p, q in zip(batches, _take(reference, 2 * nb)):
        _same(p, q)
    scheduled_bad = 0
    for k, b in enumerate(batches):
        idx = b["index"].tolist()
        assert len(set(idx)) == len(idx) and not set(idx) & bad, idx
        scheduled_bad += len(set(loader.schedule.batch(k // nb, k % nb).tolist()) & bad)
    assert sum(loader.bad_data.values()) >= scheduled_bad > 0


def test_replacements_are_distinct_across_ranks(zoo_dir):  # noqa: F811
    """The contrastive loss gathers every rank's clips: a replacement must not be in another
    rank's batch of the same step, nor another rank's replacement."""
    recs = read_manifest(zoo_dir)
    bad = {i for i, r in enumerate(recs) if ZOO.get(r.id)}
    world = 3
    loaders = [build_loader(zoo_dir, "train", 3, backend="pyav", num_workers=0, seed=5, rank=r, world_size=world)
               for r in range(world)]
    steps = 2 * len(loaders[0])
    per_rank = [_take(loader, steps) for loader in loaders]
    replaced = 0
    for k in range(steps):
        idx = [i for r in range(world) for i in per_rank[r][k]["index"].tolist()]
        assert len(set(idx)) == len(idx) and not set(idx) & bad, (k, idx)
        replaced += len(set(loaders[0].schedule.global_batch(k // len(loaders[0]), k % len(loaders[0])).tolist()) & bad)
    assert replaced > 0


def test_unexpected_errors_count_under_their_type_and_are_logged_once(bad_dir, monkeypatch, caplog):  # noqa: F811
    """A bug while decoding one record is not bad data in disguise: it is counted under its
    exception type and logged with the file and the traceback; the run goes on."""
    import vatt_fast.data.pyav_loader as pl

    real = pl.decode_with_pyav

    def buggy(plan, spec, *args):
        if plan.video.endswith("no_captions.webm"):
            return 1 / 0
        return real(plan, spec, *args)

    monkeypatch.setattr(pl, "decode_with_pyav", buggy)
    loader = build_loader(bad_dir, "train", 1, backend="pyav", num_workers=0, train=False)
    with caplog.at_level(logging.WARNING, logger="vatt_fast.data"):
        got = [int(b["index"]) for b in loader]
        list(loader)  # a second pass: counted again, not logged again
    assert got[-1] == 0 and loader.bad_data["error:ZeroDivisionError"] == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "no_captions.webm" in errors[0] and "ZeroDivisionError" in errors[0]
    assert "Traceback" in errors[0]


def test_build_loader_errors_name_the_problem(synthetic_dir, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match=r"split 'test' .* splits present: \['train', 'val'\]"):
        build_loader(synthetic_dir, "test", 2, backend="pyav")
    (tmp_path / "manifest.jsonl").write_text((synthetic_dir / "manifest.jsonl").read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"manifest\.jsonl:17: not valid JSON"):
        build_loader(tmp_path, "train", 2, backend="pyav")
    small = get_config("tiny", vocab_size=8)
    with pytest.raises(ValueError, match="vocab_size=8"):
        build_loader(synthetic_dir, "train", 2, preset=small, backend="pyav")


def test_spec_overrides_reach_the_batch(synthetic_dir):  # noqa: F811
    loader = build_loader(synthetic_dir, "val", 2, backend="pyav", num_workers=0, num_frames=6, frame_size=24,
                          audio_sample_rate=16_000, num_captions=3, caption_len=5)
    (batch,) = _take(loader, 1)
    assert batch["video"].shape == (2, 6, 24, 24, 3) and batch["audio"].shape == (2, 9600)
    assert batch["text"].shape == (2, 3, 5) and batch["text_mask"].shape == (2, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and device copies need CUDA")
def test_pinned_batches_and_device(synthetic_dir):  # noqa: F811
    loader = build_loader(synthetic_dir, "val", 2, backend="pyav", num_workers=0)
    (batch,) = _take(loader, 1)
    assert batch["video"].is_pinned()
    loader = build_loader(synthetic_dir, "val", 2, backend="pyav", num_workers=0, device="cuda")
    (batch,) = _take(loader, 1)
    assert batch["video"].device.type == "cuda"
