"""Training-step throughput (clips/s) of VATT: the reference model against the fast one.

One step = forward, VATT loss, backward, AdamW update, on a synthetic batch already on
the device (no loader: this measures the model, ``vatt_fast.train`` reports the data wait).
Shapes: the ``tiny`` preset (batch 32, its training batch) on CPU in fp32; the ``base``
preset (Base video/audio, Small text; batch 32 per GPU) on CUDA in bf16 autocast.
"reference" = plain PyTorch kernels and explicit-softmax attention; "fast" = the default
dispatch (Triton kernels on CUDA, fused attention), fused AdamW on CUDA. Before timing,
the fast step's loss is checked against the reference step's on the same weights and batch.
"""

import copy

import pytest
import torch

from vatt_fast.flops import peak_flops, train_step_flops
from vatt_fast.models import create_model
from vatt_fast.nn.losses import VATTLoss

IMPLS = {"reference": ("reference", "math"), "fast": ("auto", "auto")}
CASES = [("tiny", "cpu", 32)] + ([("base", "cuda", 32)] if torch.cuda.is_available() else [])


def _batch(cfg, B, device):
    g = torch.Generator().manual_seed(1)
    return {
        "video": torch.randint(0, 256, (B, cfg.num_frames, cfg.frame_size, cfg.frame_size, 3), dtype=torch.uint8, generator=g),
        "audio": torch.randn(B, cfg.audio_samples, generator=g),
        "text": torch.randint(1, cfg.vocab_size, (B, cfg.num_captions, cfg.caption_len), generator=g),
        "text_mask": torch.ones(B, cfg.num_captions, dtype=torch.bool),
    }, device


def _step_fn(model, batch, device, impl):
    kernels, attention = IMPLS[impl]
    model.set_kernel_impl(kernels).set_attention_backend(attention)
    loss_fn = VATTLoss(impl=kernels)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(batch)
        loss = loss_fn({**out, "text_mask": batch["text_mask"]})["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss.detach()

    return step


def _loss_once(model, batch, device, impl):
    kernels, attention = IMPLS[impl]
    model.set_kernel_impl(kernels).set_attention_backend(attention)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)  # the same DropToken draw
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        out = model(batch)
        return VATTLoss(impl=kernels)({**out, "text_mask": batch["text_mask"]})["loss"].float()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("preset, device_type, batch_size", CASES, ids=[c[0] + "-" + c[1] for c in CASES])
def test_train_step(benchmark, preset, device_type, batch_size, impl):
    device = torch.device(device_type)
    torch.manual_seed(0)
    model = create_model(preset, vocab_size=1000).to(device)
    cfg = model.config
    batch, _ = _batch(cfg, batch_size, device)
    batch = {k: v.to(device) for k, v in batch.items()}
    # Correctness first: the fast step's loss equals the reference one on the same weights and batch.
    ref_loss = _loss_once(copy.deepcopy(model), batch, device, "reference")
    got_loss = _loss_once(copy.deepcopy(model), batch, device, impl)
    tol = 2e-2 if device.type == "cuda" else 1e-4
    torch.testing.assert_close(got_loss, ref_loss, rtol=tol, atol=tol)

    step = _step_fn(model, batch, device, impl)
    for _ in range(2):  # warm-up (allocator, autotuning)
        step()
    rounds = 5 if device.type == "cpu" else 20
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    seconds = benchmark.stats.stats.median
    flops = train_step_flops(cfg, batch_size)
    peak = peak_flops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    benchmark.extra_info.update(
        preset=preset,
        impl=impl,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        precision="bf16" if device.type == "cuda" else "fp32",
        batch_size=batch_size,
        clips_per_s=batch_size / seconds,
        tflops=flops / seconds / 1e12,
        mfu=(flops / seconds / peak) if peak else None,
    )
