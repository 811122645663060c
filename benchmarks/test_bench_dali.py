"""DALI loader throughput (clips/s, frames/s) on the synthetic dataset, CPU and GPU pipelines.

Same datasets and clip sizes as ``test_bench_loader.py`` (the PyAV backend): the ``tiny``
preset (8 x 32 x 32, 8 kHz audio, videos with a 48-pixel short side) and the VATT clip of the
``medium`` preset (32 x 224 x 224, 48 kHz audio, videos with a 256-pixel short side as the
prepare tool writes them). Each timed round pulls batches from a running loader after a
warm-up round, and on CUDA synchronises before the clock stops, so the figure is the steady
rate of decoded, resized, cropped clips in torch tensors.

The issue's target is >= 10,700 frames/s of 224 x 224 per GPU (``medium`` model at 40% of an
H100); on a GPU machine with DALI installed run::

    pytest benchmarks/test_bench_dali.py --benchmark-only -k "224 and cuda"
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("nvidia.dali")

from bench_utils import record_loader_throughput  # noqa: E402
from test_bench_loader import big_set, tiny_set  # noqa: F401,E402  (session fixtures)

from vatt_fast.data import build_loader  # noqa: E402
from vatt_fast.data.sampler import ClipSpec  # noqa: E402


def _bench(benchmark, loader, rounds: int, per_round: int) -> None:
    spec: ClipSpec = loader.spec
    it = iter(loader)
    first = next(it)  # builds the pipeline and fills DALI's prefetch queue
    B = first["video"].shape[0]
    assert first["video"].shape == (B, spec.num_frames, spec.frame_size, spec.frame_size, 3)
    assert first["audio"].shape == (B, spec.audio_samples)
    assert first["video"].float().std() > 1  # decoded pixels, not padding
    cuda = first["video"].is_cuda

    def pull() -> None:
        for _ in range(per_round):
            batch = next(it)
        if cuda:
            torch.cuda.synchronize()
        assert batch["video"].shape[0] == B

    benchmark.pedantic(pull, rounds=rounds, iterations=1, warmup_rounds=1)
    record_loader_throughput(benchmark, spec, B, per_round, num_threads=loader.num_threads,
                             pipeline="gpu (NVDEC)" if loader.gpu else "cpu")
    loader.close()


def test_bench_dali_loader_tiny(benchmark, tiny_set, device):  # noqa: F811
    # tiny preset: 8 frames of 32x32, 0.8 s of 8 kHz audio, 2 captions of 8 words
    loader = build_loader(tiny_set, "train", 16, preset="tiny", backend="dali", num_workers=2, device=device)
    _bench(benchmark, loader, rounds=3, per_round=4)


def test_bench_dali_loader_224(benchmark, big_set, device):  # noqa: F811
    # VATT clip (medium preset): 32 frames of 224x224 from 256-short-side video, 3.2 s of 48 kHz audio.
    # GPU: 32 clips (1,024 frames) per batch, the per-GPU batch of a 2048-clip run on 64 GPUs.
    cuda = device.type == "cuda"
    loader = build_loader(big_set, "train", 32 if cuda else 4, preset="medium", backend="dali",
                          num_workers=8 if cuda else 2, device=device)
    _bench(benchmark, loader, rounds=5 if cuda else 2, per_round=8 if cuda else 2)
