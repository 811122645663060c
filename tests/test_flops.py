"""FLOP counts of vatt_fast.flops: a hand count for tiny, torch's FlopCounterMode on real models, the paper's figure;
the peak table by device name, the measured CPU peak, and the MFU the trainer logs recomputed from its own figures."""

import json
import logging
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vatt_fast.flops as flops_module
import vatt_fast.train as train_module
import vatt_fast.training.setup as training_setup
from train_helpers import read_rows, train_argv
from vatt_fast.checkpoint import WEIGHTS_NAME, read_weights_config, resolve_checkpoint
from vatt_fast.flops import (
    clip_flops,
    encoder_layer_flops,
    kept_tokens,
    measure_cpu_peak,
    peak_flops,
    tokens_per_clip,
    train_step_flops,
)
from vatt_fast.models import create_model, get_config


def test_tiny_hand_count():
    # tiny: d=128, MLP 512, depth 2 everywhere; video 8x32x32 in 2x8x8 tubelets = 64 tokens,
    # audio 0.8 s at 8 kHz in 128-sample patches = 50 tokens, DropToken 0.5 -> 32 and 25 kept;
    # text: 2 captions of 8 words; heads va=128, vt=64.
    layer = lambda n: 8 * n * 128 * 128 + 4 * n * n * 128 + 4 * n * 128 * 512  # noqa: E731
    video = 2 * layer(32 + 1) + 2 * 32 * (2 * 8 * 8 * 3) * 128
    audio = 2 * layer(25 + 1) + 2 * 25 * 128 * 128
    text = 2 * (2 * layer(8 + 1))
    heads = 2 * (128 * 128 + 128 * 128 + 128 * 64) + 2 * 128 * 128 + 2 * 2 * 128 * 64
    assert (video, audio, text, heads) == (30_213_120, 21_958_656, 14_321_664, 147_456)
    got = clip_flops("tiny", train=True)
    assert (got.video, got.audio, got.text, got.heads, got.loss) == (video, audio, text, heads, 0)
    assert got.total == 66_640_896
    assert tokens_per_clip("tiny") == {"video": 32, "audio": 25, "text": 16, "total": 73}


def test_layer_formula_by_terms():
    n, d, m = 7, 12, 40
    terms = 2 * n * d * 3 * d + 2 * n * n * d + 2 * n * n * d + 2 * n * d * d + 2 * n * d * m * 2
    assert encoder_layer_flops(n, d, m) == terms


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"word_dim": 24, "num_captions": 3, "caption_len": 5, "drop_token": 0.3},
        {"shared_backbone": True, "num_frames": 16, "frame_size": 24},
    ],
)
@pytest.mark.parametrize("train", [True, False])
def test_matches_torch_flop_counter(overrides, train):
    """Our formula against torch's own count of every matmul/conv the model runs (math attention)."""
    model = create_model("tiny", vocab_size=50, **overrides).set_attention_backend("math").set_kernel_impl("reference")
    model.train(train)
    cfg = model.config
    B = 3
    batch = {
        "video": torch.randint(0, 256, (B, cfg.num_frames, cfg.frame_size, cfg.frame_size, 3), dtype=torch.uint8),
        "audio": torch.randn(B, cfg.audio_samples),
        "text": torch.randint(1, 50, (B, cfg.num_captions, cfg.caption_len)),
    }
    with FlopCounterMode(display=False) as counter:
        model(batch)
    assert counter.get_total_flops() == B * clip_flops(cfg, train=train).total


def test_paper_figures():
    # VATT_SPEC.md: MBS with DropToken 0.5 about 396 GFLOPs per clip forward, 855 without.
    assert clip_flops("medium", train=True).total / 1e9 == pytest.approx(396, rel=0.02)
    assert clip_flops("medium", train=False).total / 1e9 == pytest.approx(855, rel=0.02)


def test_train_step_is_three_forwards_plus_loss():
    cfg = get_config("base")
    G = 37
    fwd = clip_flops(cfg, train=True).total
    loss = 2 * G * (cfg.va_dim + cfg.num_captions * cfg.vt_dim)
    assert train_step_flops(cfg, G) == 3 * G * (fwd + loss)


def test_kept_tokens_matches_droptoken():
    from vatt_fast.nn.embed import DropToken

    for n, rate in [(1568, 0.5), (50, 0.9), (7, 0.3), (1, 0.5), (1200, 0.0)]:
        assert kept_tokens(n, rate) == (DropToken(rate).num_kept(n) if rate else n)


# --- peak FLOP/s by device name ---------------------------------------------------------
def _fake_cuda(monkeypatch, name):
    """Make this process look like it has one CUDA device called ``name`` (runs on a CPU-only machine)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.fixture(name="tf32_switch")
def tf32_switch_fixture():
    """Set ``torch.backends.cuda.matmul.allow_tf32`` in a test (monkeypatch does not restore this flag)."""
    old = torch.backends.cuda.matmul.allow_tf32

    def set_flag(value):
        torch.backends.cuda.matmul.allow_tf32 = value

    yield set_flag
    torch.backends.cuda.matmul.allow_tf32 = old


# Dense (no sparsity) data-sheet figures in TFLOP/s: bf16 tensor, fp32 matmuls with TF32, fp32 without.
@pytest.mark.parametrize(
    "name, bf16, tf32, fp32",
    [
        ("NVIDIA H100 80GB HBM3", 989, 494, 67),  # the SXM5 board's name
        ("NVIDIA H100 PCIe", 756, 378, 51),
        ("NVIDIA H100 NVL", 835, 417.5, 60),
        ("NVIDIA H200", 989, 494, 67),  # SXM
        ("NVIDIA H200 NVL", 835, 417.5, 60),
        ("NVIDIA GH200 480GB", 989, 494, 67),
        ("NVIDIA B200", 2250, 1100, 80),
        ("NVIDIA A100-SXM4-40GB", 312, 156, 19.5),
        ("NVIDIA A100-SXM4-80GB", 312, 156, 19.5),
        ("NVIDIA A100-PCIE-40GB", 312, 156, 19.5),
        ("NVIDIA A100 80GB PCIe", 312, 156, 19.5),
        ("NVIDIA A10", 125, 62.5, 31.2),
        ("NVIDIA L4", 121, 60, 30.3),
        ("NVIDIA L40", 181.05, 90.5, 90.5),
        ("NVIDIA L40S", 362.05, 183, 91.6),
        ("NVIDIA GeForce RTX 4090", 165.2, 82.6, 82.6),
        ("NVIDIA GeForce RTX 3090", 71, 35.6, 35.6),
    ],
)
def test_peak_flops_by_device_name(monkeypatch, tf32_switch, name, bf16, tf32, fp32):
    _fake_cuda(monkeypatch, name)
    cuda = torch.device("cuda")
    assert peak_flops(cuda, torch.bfloat16) == pytest.approx(bf16 * 1e12, rel=1e-12)
    assert peak_flops(cuda, torch.float16) == pytest.approx(bf16 * 1e12, rel=1e-12)
    tf32_switch(True)
    assert peak_flops(cuda, torch.float32) == pytest.approx(tf32 * 1e12, rel=1e-12)
    tf32_switch(False)
    assert peak_flops(cuda, torch.float32) == pytest.approx(fp32 * 1e12, rel=1e-12)


def test_v100_has_fp16_but_no_bf16_tensor_peak(monkeypatch, tf32_switch):
    _fake_cuda(monkeypatch, "Tesla V100-SXM2-16GB")
    assert peak_flops(torch.device("cuda"), torch.float16) == pytest.approx(125e12, rel=1e-12)
    tf32_switch(True)  # no TF32 on Volta: fp32 matmuls run at the fp32 rate
    assert peak_flops(torch.device("cuda"), torch.float32) == pytest.approx(15.7e12, rel=1e-12)
    assert peak_flops(torch.device("cuda"), torch.bfloat16) is None


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA A10G",  # not the A10's figures; no data sheet
        "NVIDIA GeForce RTX 4090 D",
        "NVIDIA GeForce RTX 3090 Ti",
        "NVIDIA GeForce RTX 4090 Laptop GPU",
        "NVIDIA A100-SXM4-40GB MIG 1g.5gb",  # a slice of the card
        "NVIDIA H100",  # which board?
        "NVIDIA H800",
        "NVIDIA A100X",
        "AMD Instinct MI300X",
    ],
)
def test_unknown_device_has_no_peak_and_says_how_to_get_mfu(monkeypatch, caplog, name):
    _fake_cuda(monkeypatch, name)
    with caplog.at_level(logging.WARNING, logger="vatt_fast.flops"):
        assert peak_flops(torch.device("cuda"), torch.bfloat16) is None
    assert name in caplog.text and "--peak-tflops" in caplog.text


def test_no_table_peak_for_a_cpu_or_without_cuda(monkeypatch):
    assert peak_flops(torch.device("cpu"), torch.float32) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda"), torch.bfloat16) is None


# --- measured CPU peak ------------------------------------------------------------------
def test_measure_cpu_peak_is_matmul_flops_over_timed_span(monkeypatch):
    """With a fake clock that snapshots a FLOP counter at every read, the result must be the FLOPs
    done between the first and the last clock read over the time between them."""
    with FlopCounterMode(display=False) as counter:

        class Clock:
            def __init__(self):
                self.now, self.reads = 0.0, []

            def perf_counter(self):
                self.reads.append((self.now, counter.get_total_flops()))
                self.now += 0.1
                return self.reads[-1][0]

        clock = Clock()
        monkeypatch.setattr(flops_module, "time", clock)
        rate = measure_cpu_peak(seconds=0.25)
    (t0, f0), (t1, f1) = clock.reads[0], clock.reads[-1]
    assert f1 > f0 and rate == pytest.approx((f1 - f0) / (t1 - t0), rel=1e-12)


def test_measure_cpu_peak_is_a_positive_rate_and_leaves_the_random_stream():
    state = torch.get_rng_state()
    rate = measure_cpu_peak(seconds=0.01)
    assert math.isfinite(rate) and rate > 0
    assert torch.equal(torch.get_rng_state(), state)  # a run's seed means the same with or without --peak-tflops
    with pytest.raises(ValueError, match="size must be at least 1, got 0"):
        measure_cpu_peak(size=0)


# --- MFU as the trainer logs it -----------------------------------------------------------
def _run_config(run_dir):
    return read_weights_config(resolve_checkpoint(run_dir) / WEIGHTS_NAME)


def _check_mfu(run_dir, peak):
    """Every train row's and the summary's MFU = train_step_flops * clips_per_s / batch / peak."""
    summary = json.loads((run_dir / "summary.json").read_text())
    batch = summary["global_batch"]
    step_flops = train_step_flops(_run_config(run_dir), batch)
    assert summary["peak_tflops"] * 1e12 == pytest.approx(peak, rel=1e-12)
    rows = read_rows(run_dir)
    assert len(rows) >= 2 and rows[-1]["step"] == summary["steps"]
    for row in rows:
        assert row["mfu"] == pytest.approx(step_flops * row["clips_per_s"] / batch / peak, rel=1e-9)
    assert summary["mfu"] == pytest.approx(step_flops * summary["clips_per_s"] / batch / peak, rel=1e-9)
    # The summary's rate is over the windows after the first (a row per window): their clips over their seconds.
    steps = [r["step"] - prev["step"] for prev, r in zip(rows, rows[1:])]
    seconds = [n * batch / r["clips_per_s"] for n, r in zip(steps, rows[1:])]
    assert summary["clips_per_s"] == pytest.approx(sum(steps) * batch / sum(seconds), rel=1e-9)
    return rows, summary


def test_mfu_with_given_peak(tiny_run):
    _check_mfu(tiny_run, 0.1e12)  # train_argv passes --peak-tflops 0.1


def test_mfu_with_measured_cpu_peak(tiny_data, tmp_path, monkeypatch):
    """No --peak-tflops on the CPU: the trainer measures the peak once and divides by it."""
    measured = []
    real = flops_module.measure_cpu_peak

    def spy(*args, **kwargs):
        measured.append(real(*args, **kwargs))
        return measured[-1]

    monkeypatch.setattr(flops_module, "measure_cpu_peak", spy)
    monkeypatch.setattr(training_setup, "measure_cpu_peak", spy)
    argv = train_argv(tiny_data, tmp_path / "run", 4)
    i = argv.index("--peak-tflops")
    del argv[i : i + 2]
    train_module.main(argv + ["--log-every", "2"])  # two steps per row
    assert len(measured) == 1 and math.isfinite(measured[0]) and measured[0] > 0
    rows, summary = _check_mfu(tmp_path / "run", measured[0])
    # No upper bound: MFU <= 1 would compare two timings on a shared machine (a stall while
    # the peak is measured pushes it past 1), so only the sign is checked.
    assert all(math.isfinite(r["mfu"]) and r["mfu"] > 0 for r in rows) and summary["mfu"] > 0
