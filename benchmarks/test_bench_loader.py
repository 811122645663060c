"""PyAV loader throughput (clips/s, frames/s) on the synthetic dataset.

Two clip sizes: the ``tiny`` preset (8 x 32 x 32, 8 kHz audio; videos with a 48-pixel
short side) and the VATT clip of the ``medium`` preset (32 x 224 x 224, 48 kHz audio;
videos with a 256-pixel short side, as the prepare tool writes them). Each timed round
pulls as many batches as the workers keep prefetched, from a running loader, after a
warm-up round that drains the prefetch queue, so the figure is the steady decode rate.

    pytest benchmarks/test_bench_loader.py --benchmark-only
"""

from __future__ import annotations

import pytest
from bench_utils import record_loader_throughput

from vatt_fast.data import build_loader
from vatt_fast.data.sampler import ClipSpec
from vatt_fast.data.synthetic import generate_synthetic


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("bench") / "tiny", videos=32, seed=0)


@pytest.fixture(scope="session")
def big_set(tmp_path_factory):
    # 256-pixel short side, 4 s per video (two 2 s segments): room for a 3.2 s window.
    return generate_synthetic(tmp_path_factory.mktemp("bench") / "big", videos=4, seed=0, short_side=256,
                              segments=2, segment_seconds=2.0)


def _bench(benchmark, loader, rounds: int) -> None:
    spec: ClipSpec = loader.spec
    it = iter(loader)
    first = next(it)  # start the workers, fill the prefetch queue
    B = first["video"].shape[0]
    assert first["video"].shape == (B, spec.num_frames, spec.frame_size, spec.frame_size, 3)
    assert first["audio"].shape == (B, spec.audio_samples)
    per_round = max(1, loader.num_workers * loader.prefetch_factor)

    def pull() -> None:
        for _ in range(per_round):
            next(it)

    benchmark.pedantic(pull, rounds=rounds, iterations=1, warmup_rounds=1)
    record_loader_throughput(benchmark, spec, B, per_round, num_workers=loader.num_workers)
    loader.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bench_pyav_loader_tiny(benchmark, tiny_set, num_workers):
    # tiny preset: 8 frames of 32x32, 0.8 s of 8 kHz audio, 2 captions of 8 words
    loader = build_loader(tiny_set, "train", 16, preset="tiny", backend="pyav", num_workers=num_workers)
    _bench(benchmark, loader, rounds=3)


def test_bench_pyav_loader_224(benchmark, big_set):
    # VATT clip (medium preset): 32 frames of 224x224 from 256-short-side video, 3.2 s of 48 kHz audio
    loader = build_loader(big_set, "train", 4, preset="medium", backend="pyav", num_workers=2)
    _bench(benchmark, loader, rounds=2)
