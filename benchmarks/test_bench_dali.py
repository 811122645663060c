"""DALI loader throughput (clips/s, frames/s, CPU cores used) on the synthetic dataset.

CPU pipeline (runs here): the ``tiny`` preset (8 x 32 x 32, 8 kHz audio, videos with a
48-pixel short side) and the VATT clip of the ``medium`` preset (32 x 224 x 224, 48 kHz audio,
videos with a 256-pixel short side as the prepare tool writes them), like
``test_bench_loader.py`` (the PyAV backend).

GPU pipeline (``test_bench_dali_gpu_224``, one GPU): NVDEC decode, resize/crop/flip on the GPU,
audio from FLAC, for the medium clip from 256p VP9 and from 256p H.264 (both GOP 5, no
B-frames, the prepare tool's encoder settings), at batch 32 (the per-GPU batch of a 2048-clip
run on 64 GPUs) and 2 or 4 DALI CPU threads. It records frames/s and clips/s of the GPU
(``frames_per_s``, ``clips_per_s``: one GPU, so per GPU) and the CPU cores the loader used
(``cpu_cores_used``: CPU seconds of the process, DALI's threads and the feeding thread, over
wall seconds). Issue 12's target: >= 15,000 frames/s per GPU on <= 2 CPU cores. The cases skip,
with the reason, where there is no CUDA device or the driver has no NVDEC library
(``libnvcuvid``, checked first with a cheap ``dlopen``). On a GPU machine with DALI installed::

    VATT_BENCH_LOG=dali.jsonl pytest benchmarks/test_bench_dali.py --benchmark-only -k gpu \\
        --benchmark-columns=median,rounds

Each timed round pulls batches from a running loader after a warm-up round, and on CUDA
synchronises before the clock stops, so the figure is the steady rate of decoded, resized,
cropped clips in torch tensors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("nvidia.dali")

from bench_utils import record_loader_throughput  # noqa: E402
from test_bench_loader import CpuMeter, big_set, reencode_h264, tiny_set  # noqa: F401,E402  (session fixtures)

from vatt_fast.data import build_loader  # noqa: E402
from vatt_fast.data.loader import _cuda_problem, _nvdec_problem  # noqa: E402
from vatt_fast.data.sampler import ClipSpec  # noqa: E402
from vatt_fast.data.synthetic import generate_synthetic  # noqa: E402


def _bench(benchmark, loader, rounds: int, per_round: int, **extra) -> None:
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

    meter = CpuMeter()
    meter.start()
    benchmark.pedantic(pull, rounds=rounds, iterations=1, warmup_rounds=1)
    meter.stop()
    frames = (rounds + 1) * per_round * B * spec.num_frames
    record_loader_throughput(benchmark, spec, B, per_round, num_threads=loader.num_threads,
                             pipeline="gpu (NVDEC)" if loader.gpu else "cpu", **meter.info(frames), **extra)
    loader.close()


def test_bench_dali_loader_tiny(benchmark, tiny_set, device):  # noqa: F811
    # tiny preset: 8 frames of 32x32, 0.8 s of 8 kHz audio, 2 captions of 8 words
    loader = build_loader(tiny_set, "train", 16, preset="tiny", backend="dali", num_workers=2, device=device)
    _bench(benchmark, loader, rounds=3, per_round=4)


def test_bench_dali_loader_224_cpu(benchmark, big_set):  # noqa: F811
    # VATT clip (medium preset) on DALI's CPU pipeline: 32 frames of 224x224 from 256p VP9, 3.2 s of 48 kHz audio
    loader = build_loader(big_set, "train", 4, preset="medium", backend="dali", num_workers=2, device="cpu")
    _bench(benchmark, loader, rounds=2, per_round=2, video="256p vp9 gop5")


# --- GPU (NVDEC) ------------------------------------------------------------------------
GPU_BATCH = 32  # clips per GPU per step (2048 clips on 64 GPUs)


@pytest.fixture(scope="session")
def nvdec_gpu():
    """Skips (with the reason) unless a CUDA device and the driver's NVDEC library are here."""
    problem = _cuda_problem() or _nvdec_problem()
    if problem:
        pytest.skip(f"DALI's GPU pipeline cannot run here: {problem}")


@pytest.fixture(scope="session")
def gpu_sets(nvdec_gpu, tmp_path_factory):
    # 128 videos of 4 s (two 2 s segments) at a 256-pixel short side: 112 train records, three
    # batches of 32 per epoch; VP9 as generated, and the same frames as H.264.
    root = tmp_path_factory.mktemp("bench_gpu")
    vp9 = generate_synthetic(root / "vp9", videos=128, seed=0, short_side=256, segments=2, segment_seconds=2.0)
    return {"vp9": Path(vp9), "h264": reencode_h264(Path(vp9), root / "h264")}


@pytest.mark.parametrize("num_threads", [2, 4])
@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_bench_dali_gpu_224(benchmark, gpu_sets, codec, num_threads):
    # VATT clip (medium preset), 32 clips of 32 x 224 x 224 per batch, NVDEC on the current GPU
    loader = build_loader(gpu_sets[codec], "train", GPU_BATCH, preset="medium", backend="dali",
                          num_workers=num_threads, device=torch.device("cuda", torch.cuda.current_device()))
    assert loader.gpu
    _bench(benchmark, loader, rounds=5, per_round=8, video=f"256p {codec} gop5", gpu=torch.cuda.get_device_name())
