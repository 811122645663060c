"""PyAV loader throughput (clips/s, frames/s, frames/s per core) on the synthetic dataset.

Two clip sizes: the ``tiny`` preset (8 x 32 x 32, 8 kHz audio; videos with a 48-pixel
short side) and the VATT clip of the ``medium`` preset (32 x 224 x 224, 48 kHz audio;
videos with a 256-pixel short side, VP9 with a keyframe every 5 frames, as the prepare tool
writes them). Each timed round pulls as many batches as the workers keep prefetched, from a
running loader, after a warm-up round that drains the prefetch queue, so the figure is the
steady decode rate.

Per core: the CPU time of this process and of its children (the DataLoader workers, with
their FFmpeg threads) over the warm-up and timed rounds, read from ``/proc``; frames/s per
core is the frames delivered in those rounds over those CPU seconds, and ``cpu_cores_used``
the CPU seconds over the wall seconds. The 224 case runs over worker x decoder-thread
settings (``decoder_threads``: 1 = no FFmpeg threading, the default; 0 = FFmpeg's automatic
count, PyAV's default before it was an option; 2 = frame + slice threading)::

    OMP_NUM_THREADS=1 pytest benchmarks/test_bench_loader.py --benchmark-only -k 224 \\
        --benchmark-columns=median,rounds --benchmark-json=loader.json
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from fractions import Fraction
from pathlib import Path
from typing import Optional

import pytest
from bench_utils import record_loader_throughput

from vatt_fast.data import build_loader
from vatt_fast.data.sampler import ClipSpec
from vatt_fast.data.synthetic import generate_synthetic


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> Optional[float]:
    """CPU seconds used so far by this process and its live children (Linux ``/proc``; None elsewhere).

    Children = processes whose parent is this one: the PyAV loader's DataLoader workers. DALI's
    threads are this process's own.
    """
    if not os.path.isdir("/proc/self/task"):
        return None
    me = os.getpid()
    total = time.process_time()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me:
            total += _proc_cpu_seconds(int(name))
    return total


class CpuMeter:
    """CPU seconds and wall seconds between :meth:`start` and :meth:`stop` (this process + children)."""

    def start(self) -> None:
        self.cpu0, self.wall0 = cpu_seconds(), time.perf_counter()

    def stop(self) -> None:
        cpu1 = cpu_seconds()
        self.wall = time.perf_counter() - self.wall0
        self.cpu = None if cpu1 is None or self.cpu0 is None else cpu1 - self.cpu0

    def info(self, frames: int) -> dict:
        """``frames_per_s_per_core`` and ``cpu_cores_used`` for ``frames`` delivered while measured."""
        if not self.cpu or not self.wall:
            return {}
        return dict(frames_per_s_per_core=round(frames / self.cpu, 1), cpu_cores_used=round(self.cpu / self.wall, 2))


def reencode_h264(src: Path, dst: Path) -> Path:
    """A copy of dataset ``src`` whose videos are H.264 as ``prepare --codec h264`` writes them
    (its encoder settings: libx264 veryfast, crf 23, a keyframe every 5 frames, no B-frames), the
    same frames, audio and captions; the records point to ``src``'s audio files."""
    import av

    from vatt_fast.data.manifest import VOCAB_NAME, read_manifest, write_manifest
    from vatt_fast.data.prepare import PrepareConfig, _open_encoder

    cfg = PrepareConfig(codec="h264", crf=23)
    (dst / "videos").mkdir(parents=True)
    shutil.copyfile(src / VOCAB_NAME, dst / VOCAB_NAME)
    records = []
    for rec in read_manifest(src):
        out = dst / "videos" / (Path(rec.video).stem + ".mp4")
        with av.open(rec.video) as c:
            frames = [f.reformat(format="yuv420p") for f in c.decode(video=0)]
        container, stream = _open_encoder(str(out), cfg, frames[0].width, frames[0].height, threads=1)
        with container:
            for i, frame in enumerate(frames):
                frame.pts, frame.time_base = i, Fraction(1, int(cfg.fps))
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        records.append(dataclasses.replace(rec, video=str(out)))
    write_manifest(dst, records)
    return dst


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("bench") / "tiny", videos=32, seed=0)


@pytest.fixture(scope="session")
def big_set(tmp_path_factory):
    # 256-pixel short side, 4 s per video (two 2 s segments): room for a 3.2 s window. VP9, GOP 5.
    return generate_synthetic(tmp_path_factory.mktemp("bench") / "big", videos=4, seed=0, short_side=256,
                              segments=2, segment_seconds=2.0)


def _bench(benchmark, loader, rounds: int, **extra) -> None:
    spec: ClipSpec = loader.spec
    it = iter(loader)
    first = next(it)  # start the workers, fill the prefetch queue
    B = first["video"].shape[0]
    assert first["video"].shape == (B, spec.num_frames, spec.frame_size, spec.frame_size, 3)
    assert first["audio"].shape == (B, spec.audio_samples)
    assert first["video"].float().std() > 1  # decoded pixels, not padding
    per_round = max(1, loader.num_workers * loader.prefetch_factor)

    def pull() -> None:
        for _ in range(per_round):
            next(it)

    meter = CpuMeter()
    meter.start()
    benchmark.pedantic(pull, rounds=rounds, iterations=1, warmup_rounds=1)
    meter.stop()
    frames = (rounds + 1) * per_round * B * spec.num_frames
    record_loader_throughput(benchmark, spec, B, per_round, num_workers=loader.num_workers,
                             decoder_threads=loader.options.decoder_threads, **meter.info(frames), **extra)
    loader.close()


@pytest.fixture(scope="session")
def big_set_h264(big_set, tmp_path_factory):
    # big_set's videos as H.264, GOP 5 (prepare --codec h264)
    return reencode_h264(Path(big_set), tmp_path_factory.mktemp("bench") / "big_h264")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bench_pyav_loader_tiny(benchmark, tiny_set, num_workers):
    # tiny preset: 8 frames of 32x32, 0.8 s of 8 kHz audio, 2 captions of 8 words
    loader = build_loader(tiny_set, "train", 16, preset="tiny", backend="pyav", num_workers=num_workers)
    _bench(benchmark, loader, rounds=3)


@pytest.mark.parametrize("num_workers,decoder_threads", [(2, 1), (2, 0), (1, 2), (0, 1)])
def test_bench_pyav_loader_224(benchmark, big_set, num_workers, decoder_threads):
    # VATT clip (medium preset): 32 frames of 224x224 from 256-short-side VP9 video, 3.2 s of 48 kHz audio
    loader = build_loader(big_set, "train", 4, preset="medium", backend="pyav", num_workers=num_workers,
                          decoder_threads=decoder_threads)
    _bench(benchmark, loader, rounds=6 if num_workers else 12, video="256p vp9 gop5")


def test_bench_pyav_loader_224_h264(benchmark, big_set_h264):
    # the same VATT clip from the same frames encoded as H.264 (GOP 5, no B-frames)
    loader = build_loader(big_set_h264, "train", 4, preset="medium", backend="pyav", num_workers=2)
    _bench(benchmark, loader, rounds=6, video="256p h264 gop5")
