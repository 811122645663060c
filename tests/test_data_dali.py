"""DALI backend: batch contract, parity with the PyAV reference backend, bad data, resume.

Runs DALI's CPU pipeline here (VP9 decoding on the CPU); on a GPU machine the same tests
also run the mixed (NVDEC) pipeline through the ``device`` fixture.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import signal
import time
from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from data_helpers import BAD_IDS, ZOO, timed_audio, timed_level  # noqa: E402
from vatt_fast.data import build_loader  # noqa: E402
from vatt_fast.data.base import TooMuchBadData  # noqa: E402
from vatt_fast.data.dali_loader import DALILoader  # noqa: E402
from vatt_fast.data.manifest import read_manifest  # noqa: E402
from vatt_fast.data.sampler import ClipSpec  # noqa: E402
from vatt_fast.models.config import get_config  # noqa: E402

# Decoder/resampler differences between DALI and the PyAV reference, as the README states them.
# Measured on the synthetic set (DALI 2.4 CPU pipeline): mean abs. frame difference 0.58 grey
# levels at the preset geometry, 0.71-0.77 with the odd 37-pixel resize of the parity test (0.9
# for the worst single clip); audio correlation >= 0.99995 for every clip.
VIDEO_MAD = 1.0
AUDIO_CORR = 0.9999


def _take(loader, n):
    return list(itertools.islice(loader, n))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-20))


def test_build_loader_picks_dali(synthetic_dir, device):  # noqa: F811
    loader = build_loader(synthetic_dir, "train", 3, backend="dali", num_workers=1, device=device)
    assert isinstance(loader, DALILoader) and loader.backend == "dali"
    assert loader.gpu == (device.type == "cuda")
    loader.close()


def test_auto_picks_dali_when_cuda_dali_and_nvdec_are_there(synthetic_dir, monkeypatch, caplog):  # noqa: F811
    import vatt_fast.data.loader as ld

    monkeypatch.setattr(ld, "_cuda_problem", lambda: None)  # pretend: the DALI import and NVDEC probes are real
    monkeypatch.setattr(ld, "_nvdec_problem", lambda: None)
    with caplog.at_level(logging.INFO, logger="vatt_fast.data.loader"):
        loader = build_loader(synthetic_dir, "train", 3, backend="auto", num_workers=1, device="cpu")
    assert isinstance(loader, DALILoader)
    assert [r.getMessage() for r in caplog.records if r.name == "vatt_fast.data.loader"] == [
        "loader auto: DALI (GPU decoding), because CUDA device, DALI and the NVDEC library libnvcuvid are present"]
    loader.close()


def test_forked_child_can_free_a_running_loader(synthetic_dir):  # noqa: F811
    """A DataLoader worker forked while a DALI pipeline is alive must not hang freeing it."""
    loader = build_loader(synthetic_dir, "train", 3, backend="dali", num_workers=1, device="cpu")
    _take(loader, 1)  # the pipeline and its threads are running now
    pid = os.fork()
    if pid == 0:  # child: free the inherited loader (its pipeline's threads are not here)
        try:
            loader.close()
            del loader
            gc.collect()
        finally:
            os._exit(0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung freeing the DALI loader it inherited")
    assert os.waitstatus_to_exitcode(status) == 0
    assert _take(loader, 1)[0]["video"].shape[0] == 3  # the parent's pipeline still works
    loader.close()


@pytest.mark.parametrize("train", [True, False])
def test_batch_contract_matches_the_tiny_preset(synthetic_dir, train, device):  # noqa: F811
    cfg = get_config("tiny")
    loader = build_loader(synthetic_dir, "train", 5, backend="dali", num_workers=2, train=train, device=device)
    batch = _take(loader, 1)[0]
    B, T, S, K, L = 5, cfg.num_frames, cfg.frame_size, cfg.num_captions, cfg.caption_len
    assert batch["video"].shape == (B, T, S, S, 3) and batch["video"].dtype == torch.uint8
    assert batch["audio"].shape == (B, cfg.audio_samples) and batch["audio"].dtype == torch.float32
    assert batch["text"].shape == (B, K, L) and batch["text"].dtype == torch.int64
    assert batch["text_mask"].shape == (B, K) and batch["text_mask"].dtype == torch.bool
    assert batch["label"].shape == (B,) and batch["label"].dtype == torch.int64
    assert batch["index"].shape == (B,) and batch["index"].dtype == torch.int64
    assert {v.device.type for v in batch.values()} == {device.type}
    assert batch["video"].float().std() > 5 and batch["audio"].abs().max() > 0.01
    loader.close()


@pytest.mark.parametrize("train", [True, False])
def test_parity_with_the_pyav_backend(synthetic_dir, train, device):  # noqa: F811
    """Same seed -> same records, windows, crops, flips and captions; pixels and audio within
    decoder tolerance; odd geometry (37-pixel resize, 30x30 crop) exercises the ROI mapping."""
    kw = dict(train=train, seed=11, frame_size=24, resize_to=37)
    dali = build_loader(synthetic_dir, "train", 3, backend="dali", num_workers=2, device=device, **kw)
    pyav = build_loader(synthetic_dir, "train", 3, backend="pyav", num_workers=0, **kw)
    for bd, bp in zip(_take(dali, 3), _take(pyav, 3)):
        for key in ("index", "text", "text_mask", "label"):
            assert torch.equal(bd[key].cpu(), bp[key]), key
        vd, vp = bd["video"].cpu().float(), bp["video"].float()
        assert vd.shape == vp.shape
        mad = (vd - vp).abs().mean().item()
        assert mad < VIDEO_MAD, mad
        # a wrong flip or crop offset gives a much larger difference than the decoders do
        assert mad < 0.5 * (vd.flip(3) - vp).abs().mean().item() or vp.flip(3).equal(vp)
        for a, b in zip(bd["audio"].cpu().numpy(), bp["audio"].numpy()):
            assert _corr(a, b) > AUDIO_CORR
    dali.close()
    pyav.close()


def test_long_audio_is_cut_to_the_window_with_the_same_result(synthetic_dir, monkeypatch, device):  # noqa: F811
    """Files over WHOLE_FILE_AUDIO_SECONDS are cut before decoding; the clip audio must not change."""
    import vatt_fast.data.dali_loader as dl

    kw = dict(train=True, seed=4, backend="dali", num_workers=1, device=device)
    whole = _take(build_loader(synthetic_dir, "train", 4, **kw), 2)
    monkeypatch.setattr(dl, "WHOLE_FILE_AUDIO_SECONDS", 0.0)
    cut = _take(build_loader(synthetic_dir, "train", 4, **kw), 2)
    for a, b in zip(whole, cut):
        assert torch.equal(a["index"], b["index"])
        np.testing.assert_allclose(b["audio"].cpu().numpy(), a["audio"].cpu().numpy(), atol=1e-5)


def test_frames_and_audio_are_the_planned_window(timed_dir, device):  # noqa: F811
    """Independent check: the timed videos encode frame index and time in pixels and audio."""
    spec = ClipSpec.from_preset("tiny")
    loader = build_loader(timed_dir, "train", 1, backend="dali", num_workers=1, train=True, seed=5, device=device)
    records = read_manifest(timed_dir, split="train")
    for k, batch in enumerate(_take(loader, 6)):
        rec = records[int(batch["index"][0])]
        plan = loader.sampler.plan(rec, int(batch["index"][0]), epoch=k // len(loader))
        video = batch["video"][0].cpu().float().mean(dim=(1, 2, 3)).numpy()
        np.testing.assert_allclose(video, timed_level(np.array(plan.frame_indices)), atol=2.0)
        sr = spec.audio_sample_rate
        t = plan.audio_start + np.arange(spec.audio_samples) / sr
        audio = batch["audio"][0].cpu().numpy()
        edge = 32 / sr  # resampler filter reach at the clip start and the file end
        inner = (t > plan.audio_start + edge) & (t < rec.duration - edge)
        np.testing.assert_allclose(audio[inner], timed_audio(t[inner]), atol=0.02)
        past = t > rec.duration + 2 * edge
        if past.any():
            assert np.abs(audio[past]).max() < 1e-3  # zero padding past the end of the file


def test_train_is_deterministic_infinite_and_resumes_exactly(synthetic_dir, device):  # noqa: F811
    a = build_loader(synthetic_dir, "train", 4, backend="dali", num_workers=2, seed=3, device=device)
    nb = len(a)
    first = _take(a, nb + 2)  # crosses an epoch boundary
    assert len(first) == nb + 2
    epoch0 = sorted(i for b in first[:nb] for i in b["index"].tolist())
    assert len(set(epoch0)) == len(epoch0)
    state = None
    b = build_loader(synthetic_dir, "train", 4, backend="dali", num_workers=1, seed=3, device=device)
    for k, batch in enumerate(b):
        assert torch.equal(batch["index"], first[k]["index"])
        if k == nb - 1:
            state = b.state_dict()
            break
    b.close()
    assert state["epoch"] == 1 and state["batch"] == 0
    c = build_loader(synthetic_dir, "train", 4, backend="dali", num_workers=1, seed=3, device=device)
    c.load_state_dict(state)
    resumed = _take(c, 2)
    for x, y in zip(resumed, first[nb:]):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["video"], y["video"])
    a.close()
    c.close()


def test_eval_is_one_ordered_pass_with_a_short_last_batch(synthetic_dir, device):  # noqa: F811
    n = len(read_manifest(synthetic_dir, split="train"))
    loader = build_loader(synthetic_dir, "train", 4, backend="dali", num_workers=1, train=False, device=device)
    for _ in range(2):
        batches = list(loader)
        assert [len(b["index"]) for b in batches] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
        assert torch.cat([b["index"].cpu() for b in batches]).tolist() == list(range(n))
    assert len(loader) == len(batches)
    loader.close()


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_match_the_pyav_backend(synthetic_dir, world_size):  # noqa: F811
    for rank in range(world_size):
        kw = dict(train=True, seed=2, rank=rank, world_size=world_size)
        d = build_loader(synthetic_dir, "train", 2, backend="dali", num_workers=1, device="cpu", **kw)
        p = build_loader(synthetic_dir, "train", 2, backend="pyav", num_workers=0, **kw)
        assert len(d) == len(p)
        assert [b["index"].tolist() for b in _take(d, len(d))] == [b["index"].tolist() for b in _take(p, len(p))]
        d.close()


def test_bad_data_is_replaced_and_counted_like_pyav(bad_dir, device):  # noqa: F811
    ids = [r.id for r in read_manifest(bad_dir)]
    assert ids == [k for k in BAD_IDS]
    dali = build_loader(bad_dir, "train", 1, backend="dali", num_workers=1, train=False, device=device)
    pyav = build_loader(bad_dir, "train", 1, backend="pyav", num_workers=0, train=False)
    got_d, got_p = list(dali), list(pyav)
    assert [int(b["index"]) for b in got_d] == [int(b["index"]) for b in got_p] == [0, 4, 4, 4, 4, 5]
    assert dali.bad_data == pyav.bad_data == {
        "bad_manifest_line": 1, "unreadable": 1, "truncated": 2, "missing_audio": 3, "short": 4, "no_captions": 1,
    }
    short = got_d[1]["video"][0].cpu()
    assert torch.equal(short[5], short[7])  # the short video repeats its last frame
    state = dali.state_dict()
    fresh = build_loader(bad_dir, "train", 1, backend="dali", num_workers=1, train=False, device=device)
    fresh.load_state_dict(state)
    assert fresh.bad_data == state["bad_data"]
    dali.close()


def _corrupt_copy(bad_dir, tmp_path, corrupt):  # noqa: F811
    """Six copies of bad_dir's good record; ``corrupt(media_dir)`` damages some in place."""
    import json
    import shutil

    rows = [json.loads(line) for line in (bad_dir / "manifest.jsonl").read_text().splitlines()]
    good = next(r for r in rows if r["id"] == "good")
    (tmp_path / "media").mkdir()
    with open(tmp_path / "manifest.jsonl", "w") as f:
        for k in range(6):
            shutil.copy(bad_dir / good["video"], tmp_path / "media" / f"r{k}.webm")
            shutil.copy(bad_dir / good["audio"], tmp_path / "media" / f"r{k}.flac")
            f.write(json.dumps(dict(good, id=f"r{k}", video=f"media/r{k}.webm", audio=f"media/r{k}.flac")) + "\n")
    shutil.copy(bad_dir / "vocab.txt", tmp_path / "vocab.txt")
    corrupt(tmp_path / "media")
    return tmp_path


def _garble_packets(path, first: int, last: int) -> None:
    """Overwrite the data of video packets first..last-1 (container structure intact)."""
    import av

    with av.open(str(path)) as c:
        packets = [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size]
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for pos, size in packets[first:last]:
        data[pos + 4 : pos + size] = rng.integers(0, 256, size - 4, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _garble_flac_middle(path) -> None:
    """Overwrite 75%..80% of a FLAC's bytes: its header, its end and the centred 0.8 s window stay intact."""
    data = bytearray(path.read_bytes())
    a, b = int(0.75 * len(data)), int(0.80 * len(data))
    data[a:b] = np.random.default_rng(1).integers(0, 256, b - a, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_corrupt_packets_found_by_the_reference_decoder(bad_dir, tmp_path, device, batch_size):  # noqa: F811
    """A video whose header and packet index are fine but whose packets around the window are
    garbage passes the probe; DALI's failure is traced to it with the PyAV reference decoder,
    it is counted and replaced, and the batches still come, as from the PyAV backend."""
    data = _corrupt_copy(bad_dir, tmp_path, lambda media: _garble_packets(media / "r1.webm", 20, 40))
    loader = build_loader(data, "train", batch_size, backend="dali", num_workers=1, train=False, device=device)
    pyav = build_loader(data, "train", batch_size, backend="pyav", num_workers=0, train=False)
    got_d, got_p = [b["index"].tolist() for b in loader], [b["index"].tolist() for b in pyav]
    assert got_d == got_p and all(len(set(b)) == len(b) for b in got_d)
    assert 1 not in sum(got_d, []) and len(sum(got_d, [])) == 6
    assert loader.bad_data == pyav.bad_data == {"truncated": 1}
    loader.close()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_file_only_dali_cannot_decode_is_found_clip_by_clip(bad_dir, tmp_path, device, caplog,  # noqa: F811
                                                               batch_size):
    """DALI decodes a short audio file whole; damage outside the window breaks DALI's batch but
    not the PyAV reference (which decodes the window). Running the batch's clips through DALI
    one by one finds the file; it is counted as unreadable and replaced, and the run goes on."""
    data = _corrupt_copy(bad_dir, tmp_path, lambda media: _garble_flac_middle(media / "r4.flac"))
    pyav = build_loader(data, "train", batch_size, backend="pyav", num_workers=0, train=False)
    assert sum([b["index"].tolist() for b in pyav], []) == list(range(6)) and pyav.bad_data == {}
    loader = build_loader(data, "train", batch_size, backend="dali", num_workers=1, train=False, device=device)
    with caplog.at_level(logging.WARNING, logger="vatt_fast.data"):
        got = [b["index"].tolist() for b in loader]
    assert all(len(set(b)) == len(b) for b in got) and 4 not in sum(got, []) and len(sum(got, [])) == 6
    assert loader.bad_data == {"unreadable": 1}
    (message,) = [r.getMessage() for r in caplog.records]
    assert "r4.flac" in message and "decoders.audio" in message
    loader.close()


def test_clips_away_from_corrupt_packets_are_kept_like_pyav(bad_dir, tmp_path, device):  # noqa: F811
    """Garbage packets at the end of a video break DALI only on windows that reach them; after
    the first failure the record's clips are checked with the PyAV reference before they are
    fed, so DALI keeps the clips PyAV keeps (the whole record is not thrown away)."""
    data = _corrupt_copy(bad_dir, tmp_path, lambda media: _garble_packets(media / "r1.webm", 45, 60))
    pyav = build_loader(data, "train", 2, backend="pyav", num_workers=0, seed=1)
    dali = build_loader(data, "train", 2, backend="dali", num_workers=1, seed=1, device=device)
    rejected_at, kept_after = None, False
    for k, (bp, bd) in enumerate(zip(_take(pyav, 12), _take(dali, 12))):
        assert torch.equal(bd["index"].cpu(), bp["index"]), k
        if rejected_at is None and pyav.bad_data:
            rejected_at = k
        kept_after |= rejected_at is not None and k > rejected_at and 1 in bp["index"].tolist()
    assert kept_after  # the case this test is about: a clip of r1 kept after one was rejected
    assert dali.bad_data == pyav.bad_data
    dali.close()


def test_resume_is_exact_after_dali_finds_a_broken_record(bad_dir, tmp_path, device):  # noqa: F811
    """Records DALI failed on are part of the loader state: a run resumed after DALI found one
    rejects the same clips as the run that found it (DALI decodes some clips of that video)."""
    import json

    data = _corrupt_copy(bad_dir, tmp_path, lambda media: _garble_packets(media / "r1.webm", 20, 40))
    kw = dict(backend="dali", num_workers=1, seed=1, device=device)
    full = build_loader(data, "train", 2, **kw)
    ref = _take(full, 12)
    part = build_loader(data, "train", 2, **kw)
    first = _take(part, 6)
    assert part.bad_data  # the broken video was met before the checkpoint: the case this test is about
    state = json.loads(json.dumps(part.state_dict()))
    part.close()
    resumed = build_loader(data, "train", 2, **kw)
    resumed.load_state_dict(state)
    for a, b in zip(first + _take(resumed, 6), ref):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["video"], b["video"])
    assert resumed.bad_data == full.bad_data
    full.close()
    resumed.close()


# --- every kind of broken file: the same verdicts, replacements and counts as PyAV ------------
def test_broken_files_are_replaced_and_counted_like_pyav(zoo_dir, device):  # noqa: F811
    recs = read_manifest(zoo_dir)
    dali = build_loader(zoo_dir, "train", 1, backend="dali", num_workers=2, train=False, device=device)
    pyav = build_loader(zoo_dir, "train", 1, backend="pyav", num_workers=0, train=False)
    got_d, got_p = list(dali), list(pyav)
    assert [int(b["index"]) for b in got_d] == [int(b["index"]) for b in got_p]
    assert dali.bad_data == pyav.bad_data == dict(Counter(k for k in ZOO.values() if k))
    # valid but unusual files (audio at 7350 / 11025 / 44099 Hz, 3 and 6 channels; 33x17 frames)
    # decode in both backends within the stated parity
    unusual = {r.id for r in recs if r.id in ZOO and ZOO[r.id] is None}
    checked = set()
    for bd, bp in zip(got_d, got_p):
        rec = recs[int(bp["index"])]
        if rec.id not in unusual:
            continue
        checked.add(rec.id)
        mad = (bd["video"].cpu().float() - bp["video"].float()).abs().mean().item()
        assert mad < VIDEO_MAD, (rec.id, mad)
        assert _corr(bd["audio"][0].cpu().numpy(), bp["audio"][0].numpy()) > AUDIO_CORR, rec.id
    assert checked == unusual
    dali.close()


def test_train_batches_over_broken_files_match_pyav(zoo_dir, device):  # noqa: F811
    dali = build_loader(zoo_dir, "train", 4, backend="dali", num_workers=2, seed=3, device=device)
    pyav = build_loader(zoo_dir, "train", 4, backend="pyav", num_workers=0, seed=3)
    n = 2 * len(pyav)
    got_d, got_p = [b["index"].tolist() for b in _take(dali, n)], [b["index"].tolist() for b in _take(pyav, n)]
    assert got_d == got_p and all(len(set(b)) == len(b) for b in got_d)
    assert dali.bad_data == pyav.bad_data and sum(dali.bad_data.values()) > 0
    dali.close()


def test_a_dataset_without_good_records_left_is_an_error(synthetic_dir, monkeypatch):  # noqa: F811
    """When no record can fill a slot, the loader says so, even with batches in flight (it is
    not a decoding failure for the recovery to chase)."""
    loader = build_loader(synthetic_dir, "train", 2, backend="dali", num_workers=1, train=False, device="cpu")
    real, calls = loader._attempt, []

    def attempt(epoch, i):  # the first two batches are fine, then every record fails
        calls.append(i)
        return real(epoch, i) if len(calls) <= 4 else (None, ("unreadable", f"record {i} is gone"))

    monkeypatch.setattr(loader, "_attempt", attempt)
    with pytest.raises(TooMuchBadData, match="records tried in its place could not be decoded.*record 4 is gone"):
        list(loader)
    loader.close()


def test_h264_on_the_cpu_pipeline_is_an_error_that_says_what_to_do(synthetic_dir, tmp_path):  # noqa: F811
    import json
    import shutil

    from vatt_fast.data.prepare import PrepareConfig, transcode_video

    rows = [json.loads(line) for line in (synthetic_dir / "manifest.jsonl").read_text().splitlines()][:1]
    (tmp_path / "m").mkdir()
    cfg = PrepareConfig(codec="h264", short_side=48, min_seconds=0, silent_audio=True)
    transcode_video(str(synthetic_dir / rows[0]["video"]), str(tmp_path / "m" / "v.mp4"),
                    str(tmp_path / "m" / "silent.flac"), cfg)
    shutil.copy(synthetic_dir / rows[0]["audio"], tmp_path / "m" / "a.flac")
    (tmp_path / "manifest.jsonl").write_text(json.dumps(dict(rows[0], video="m/v.mp4", audio="m/a.flac")) + "\n")
    shutil.copy(synthetic_dir / "vocab.txt", tmp_path / "vocab.txt")
    loader = build_loader(tmp_path, "train", 1, backend="dali", device="cpu", train=False)
    with pytest.raises(ValueError, match="h264.*--codec vp9"):
        next(iter(loader))
