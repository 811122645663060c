"""DALI backend: batch contract, parity with the PyAV reference backend, bad data, resume.

Runs DALI's CPU pipeline here (VP9 decoding on the CPU); on a GPU machine the same tests
also run the mixed (NVDEC) pipeline through the ``device`` fixture.
"""

from __future__ import annotations

import gc
import itertools
import os
import signal
import time

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from data_fixtures import (  # noqa: F401,E402
    BAD_IDS,
    bad_dir,
    synthetic_dir,
    timed_audio,
    timed_dir,
    timed_level,
)

from vatt_fast.data import build_loader  # noqa: E402
from vatt_fast.data.dali_loader import DALILoader  # noqa: E402
from vatt_fast.data.manifest import read_manifest  # noqa: E402
from vatt_fast.data.sampler import ClipSpec  # noqa: E402
from vatt_fast.models.config import get_config  # noqa: E402

# Decoder/resampler differences between DALI and the PyAV reference (measured: ~0.6 grey
# levels mean abs. difference on the synthetic set, audio correlation > 0.9999).
VIDEO_MAD = 2.0
AUDIO_CORR = 0.999


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


@pytest.mark.parametrize("batch_size", [1, 3])
def test_corrupt_packets_found_by_the_reference_decoder(bad_dir, tmp_path, device, batch_size):  # noqa: F811
    """A file whose header and packet count are fine but whose data is garbage passes the probe;
    DALI's failure is traced to it, it is counted and replaced, and the batch still comes."""
    import json
    import shutil

    rows = [json.loads(line) for line in (bad_dir / "manifest.jsonl").read_text().splitlines()]
    good = next(r for r in rows if r["id"] == "good")
    (tmp_path / "media").mkdir()
    for name in ("a", "corrupt", "b"):
        shutil.copy(bad_dir / good["video"], tmp_path / "media" / f"{name}.webm")
        shutil.copy(bad_dir / good["audio"], tmp_path / "media" / f"{name}.flac")
    audio = bytearray((tmp_path / "media" / "corrupt.flac").read_bytes())
    rng = np.random.default_rng(0)
    audio[200:] = rng.integers(0, 256, len(audio) - 200, dtype=np.uint8).tobytes()
    (tmp_path / "media" / "corrupt.flac").write_bytes(bytes(audio))
    with open(tmp_path / "manifest.jsonl", "w") as f:
        for name in ("a", "corrupt", "b"):
            f.write(json.dumps(dict(good, id=name, video=f"media/{name}.webm", audio=f"media/{name}.flac")) + "\n")
    shutil.copy(bad_dir / "vocab.txt", tmp_path / "vocab.txt")
    loader = build_loader(tmp_path, "train", batch_size, backend="dali", num_workers=1, train=False, device=device)
    pyav = build_loader(tmp_path, "train", batch_size, backend="pyav", num_workers=0, train=False)
    got_d, got_p = list(loader), list(pyav)
    assert [b["index"].tolist() for b in got_d] == [b["index"].tolist() for b in got_p]
    assert torch.cat([b["index"].cpu() for b in got_d]).tolist() == [0, 2, 2]
    assert loader.bad_data == pyav.bad_data and sum(loader.bad_data.values()) == 1


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
