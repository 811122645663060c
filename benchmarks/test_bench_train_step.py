"""Training-step throughput (clips/s), MFU and peak memory of VATT: the reference model
against the fast one.

One step = forward, VATT loss, backward, AdamW update, on a synthetic batch already on
the device (no loader: this measures the model, ``vatt_fast.train`` reports the data wait).
Shapes: the ``tiny`` preset (batch 32, its training batch) on CPU in fp32; on CUDA in bf16
autocast the ``base`` (Base video/audio, Small text) and ``medium`` (the paper's MBS)
presets at batch 32 and 64 per GPU, with the presets' dropout and DropToken.
"reference" = plain PyTorch kernels and explicit-softmax attention (timed at batch 32);
"fast" = the trainer's default (``impl="auto"``: Triton kernels where registered on CUDA;
``attention="auto"``: the fastest backend that serves the call; under bf16 the compute copies of
the Linear weights, ``--bf16-weights auto``), fused AdamW on CUDA. On CUDA, ``fast+compile-blocks``
is the same with every Transformer block compiled by Inductor (``--compile --compile-scope blocks``),
at medium batch 64: the measured alternative to the eager fused kernels. ``test_largest_batch``
(CUDA only) finds the largest medium batch that fits, with and without activation checkpointing.

Correctness before timing, on a batch of 8 clips of the same preset with dropout off (so
every path sees the same DropToken draw) and the heads' BatchNorms in eval mode, for the
loss and the gradients of a few parameters spread over the model (tokenizer, attention,
MLP, relative position bias, head):
- reference: a float64 run of the reference path (on the same device; float64 has no TF32);
- "fast" must satisfy STYLE.md's parity rule against it, its error at most twice that of
  the reference path run in the same precision (bf16 autocast on CUDA, fp32 on the CPU),
  plus a floor relative to the reference value's size;
- "reference" in that precision must itself be within a sanity bound of float64.
"""

from __future__ import annotations

import copy
import functools
import gc

import pytest
import torch
from bench_utils import assert_parity, largest_fitting, max_error, record, seconds, time_it

from vatt_fast.flops import measure_cpu_peak, peak_flops, train_step_flops
from vatt_fast.models import create_model
from vatt_fast.nn.losses import VATTLoss
from vatt_fast.training.compute_weights import ComputeWeights

IMPLS = {"reference": ("reference", "math"), "fast": ("auto", "auto")}
# "fast+compile-blocks": the fast path with each Transformer block compiled by Inductor (the trainer's
# --compile --compile-scope blocks), the measured alternative to the eager fused kernels.
COMPILE_SUFFIX = "+compile-blocks"
# Parameters whose gradients are checked: one per kind of op the fast path may replace.
CHECKED = (
    "encoders.video.patch_embed.proj.weight",
    "encoders.video.backbone.blocks.0.attn.qkv.weight",
    "encoders.audio.backbone.blocks.0.attn.proj.weight",
    "encoders.text.backbone.blocks.0.mlp.fc1.weight",
    "encoders.text.backbone.rel_pos.relative_attention_bias.weight",
    "heads.text_to_vt.weight",
)
# Parity floor, relative to max|float64 value|, by precision.
ATOL_REL = {"fp32": 1e-5, "bf16": 1e-2}
# Sanity bound of the reference path in that precision against float64, relative to max|float64
# value|, for the loss and for the gradients. In bf16 the first layers' weight gradients are
# ~20% off float64 at initialisation (measured on tiny and base), hence the wide gradient bound.
PLAIN_RTOL = {"fp32": (1e-4, 1e-3), "bf16": (2e-2, 0.5)}


def _cases():
    cases = [("tiny", "cpu", 32, impl) for impl in IMPLS]
    if torch.cuda.is_available():
        for preset in ("base", "medium"):
            cases += [(preset, "cuda", 32, "reference"), (preset, "cuda", 32, "fast"), (preset, "cuda", 64, "fast")]
        cases.append(("medium", "cuda", 64, "fast" + COMPILE_SUFFIX))
    return cases


def _paths(impl: str):
    """``(kernels, attention, compiled)`` of a case's ``impl``."""
    compiled = impl.endswith(COMPILE_SUFFIX)
    kernels, attention = IMPLS[impl.removesuffix(COMPILE_SUFFIX)]
    return kernels, attention, compiled


def _prepare(model, impl):
    """Set the case's kernels and attention on ``model``; compile its blocks for a compiled case."""
    kernels, attention, compiled = _paths(impl)
    model.set_kernel_impl(kernels).set_attention_backend(attention)
    if compiled:
        from vatt_fast.training.setup import compile_model

        compile_model(model, model, "blocks", "inductor")
    return kernels


CASES = _cases()


def _precision(device: torch.device):
    return ("bf16", torch.bfloat16) if device.type == "cuda" else ("fp32", None)


def _batch(cfg, B, device):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(B, cfg.num_captions, dtype=torch.bool)
    mask[1::3, 1:] = False  # some clips with a single caption, as with short transcripts
    batch = {
        "video": torch.randint(0, 256, (B, cfg.num_frames, cfg.frame_size, cfg.frame_size, 3), dtype=torch.uint8, generator=g),
        "audio": torch.randn(B, cfg.audio_samples, generator=g),
        "text": torch.randint(1, cfg.vocab_size, (B, cfg.num_captions, cfg.caption_len), generator=g),
        "text_mask": mask,
    }
    return {k: v.to(device) for k, v in batch.items()}


def _loss_and_grads(model, batch, impl, autocast_dtype):
    kernels = _prepare(model, impl)
    device = batch["video"].device
    cw = _compute_weights(model, impl, autocast_dtype)
    torch.manual_seed(0)  # the same DropToken draw in every run
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = model(batch) if cw is None else cw(batch)
    loss = VATTLoss(impl=kernels)({**out, "text_mask": batch["text_mask"]})["loss"]
    model.zero_grad(set_to_none=True)
    loss.backward()
    if cw is not None:
        cw.grads_to_params()
    params = dict(model.named_parameters())
    # A parameter the path does not reach gets a zero gradient, which the comparison then reports.
    grads = [params[name].grad if params[name].grad is not None else torch.zeros_like(params[name]) for name in CHECKED]
    return [loss.detach()] + [g.clone() for g in grads]


def _compute_weights(model, impl, autocast_dtype):
    """The trainer's bf16 compute copies of the Linear weights (``--bf16-weights auto``) on the fast
    path under bf16 autocast; None otherwise."""
    return ComputeWeights(model) if impl.startswith("fast") and autocast_dtype == torch.bfloat16 else None


@functools.lru_cache(maxsize=None)
def _check(preset: str, device_type: str, impl: str) -> None:
    """Loss and gradients of ``impl`` against float64 (see the module docstring); raises on failure."""
    device = torch.device(device_type)
    precision, autocast_dtype = _precision(device)
    torch.manual_seed(0)
    model = create_model(preset, dropout=0.0, attn_dropout=0.0).to(device)
    # The heads' BatchNorms in eval mode: in train mode a BN over a few near-identical random
    # clips amplifies rounding noise without bound (bf16 gradients came out 100% off float64 on
    # base), and BN is the same module on every path. DropToken stays in training mode.
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    batch = _batch(model.config, 8, device)
    ref = _loss_and_grads(copy.deepcopy(model).double(), batch, "reference", None)
    plain = _loss_and_grads(copy.deepcopy(model), batch, "reference", autocast_dtype)
    got = _loss_and_grads(copy.deepcopy(model), batch, impl, autocast_dtype) if impl != "reference" else None
    for i, name in enumerate(("loss",) + CHECKED):
        label = f"{preset} {impl} {precision} {name}"
        scale = ref[i].abs().max().item()
        assert scale > 0, f"{label}: the float64 reference is all zero; the check would prove nothing"
        plain_rtol = PLAIN_RTOL[precision][0 if i == 0 else 1]
        if got is None:
            base = max_error(plain[i], ref[i])
            assert base <= plain_rtol * scale, (
                f"{label}: the reference path is off float64 by {base:.3g} (max|ref| {scale:.3g}), more than "
                f"{plain_rtol} x max|ref|"
            )
        else:
            assert_parity(got[i], ref[i], plain[i], ATOL_REL[precision] * scale, label, plain_rtol=plain_rtol)


@pytest.mark.parametrize("preset, device_type, batch_size, impl", CASES,
                         ids=[f"{p}-{d}-b{b}-{i}" for p, d, b, i in CASES])
def test_train_step(benchmark, preset, device_type, batch_size, impl):
    device = torch.device(device_type)
    precision, autocast_dtype = _precision(device)
    _check(preset, device_type, impl)
    if device.type == "cuda":  # start from an empty cache, so that peak memory is this case's
        gc.collect()
        torch.cuda.empty_cache()

    torch.manual_seed(0)
    model = create_model(preset).to(device)
    cfg = model.config
    batch = _batch(cfg, batch_size, device)
    kernels = _prepare(model, impl)
    loss_fn = VATTLoss(impl=kernels)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=cfg.adam_eps, fused=device.type == "cuda")

    cw = _compute_weights(model, impl, autocast_dtype)

    def step():
        return _train_step(model, cw, loss_fn, opt, batch, autocast_dtype)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peak = weights, optimizer state, activations of a step
    loss = time_it(benchmark, step, device, rounds=10, warmup_rounds=2)
    assert torch.isfinite(loss), f"{preset} {impl}: training loss became {loss.item()}"
    flops = train_step_flops(cfg, batch_size)
    if device.type == "cuda":
        peak = peak_flops(device, autocast_dtype)
        device_label, memory = torch.cuda.get_device_name(device), torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        peak, device_label, memory = measure_cpu_peak(), "cpu", None
    t = seconds(benchmark)  # None under --benchmark-disable
    record(
        benchmark, flops=flops, preset=preset, impl=impl, device=device_label, precision=precision,
        batch_size=batch_size, bf16_weights=cw is not None, peak_mem_gb=None if memory is None else round(memory, 2),
        peak_tflops=None if peak is None else round(peak / 1e12, 2),
        clips_per_s=None if t is None else round(batch_size / t, 2),
        mfu=None if t is None or peak is None else round(flops / t / peak, 4),
    )


def _train_step(model, cw, loss_fn, opt, batch, autocast_dtype):
    """One optimizer step as the trainer takes it: forward (on the compute copies ``cw`` when given)
    under autocast when ``autocast_dtype`` is set, loss, backward, the copies' gradients to the fp32
    parameters, AdamW, the copies refreshed. Returns the detached loss."""
    device_type = batch["video"].device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = model(batch) if cw is None else cw(batch)
    loss = loss_fn({**out, "text_mask": batch["text_mask"]})["loss"]
    loss.backward()
    if cw is not None:
        cw.grads_to_params()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cw is not None:
        cw.refresh()
    return loss.detach()


def _fits(model, loss_fn, opt, cw, cfg, batch_size, device) -> bool:
    """Whether two fast-path training steps at ``batch_size`` run without running out of memory."""
    fits = True
    try:
        batch = _batch(cfg, batch_size, device)
        for _ in range(2):
            _train_step(model, cw, loss_fn, opt, batch, torch.bfloat16)
        torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError:
        fits = False  # the exception (and the activations its traceback holds) is released here
    batch = None  # drop the reference before emptying the cache
    opt.zero_grad(set_to_none=True)
    for c in [] if cw is None else cw.copies:
        c.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    return fits


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation_checkpointing"])
def test_largest_batch(benchmark, checkpointing):
    """The largest per-GPU batch of the medium preset's fast bf16 step (the trainer's defaults: bf16 compute
    weights, which activation checkpointing turns off) that fits on this card (doubling
    from 64, then bisecting to a multiple of 16), timed there: clips/s, MFU and peak memory, with and
    without activation checkpointing, to say whether checkpointing pays (a larger batch at a higher
    clips/s). GPU only: on a CPU the question has no answer worth the minutes."""
    if not torch.cuda.is_available():
        pytest.skip("the largest batch that fits is measured on a GPU")
    device = torch.device("cuda")
    _check("medium", "cuda", "fast")
    gc.collect()
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = create_model("medium").to(device)
    cfg = model.config
    model.set_kernel_impl("auto").set_attention_backend("auto").set_grad_checkpointing(checkpointing)
    loss_fn = VATTLoss(impl="auto")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=cfg.adam_eps, fused=True)
    # As the trainer's --bf16-weights auto: the copies, except with activation checkpointing.
    cw = None if checkpointing else ComputeWeights(model)
    batch_size = largest_fitting(lambda b: _fits(model, loss_fn, opt, cw, cfg, b, device), start=64, cap=4096, step=16)
    if batch_size == 0:
        pytest.fail(f"medium does not train at batch 64 on {torch.cuda.get_device_name(device)}")
    batch = _batch(cfg, batch_size, device)

    def step():
        return _train_step(model, cw, loss_fn, opt, batch, torch.bfloat16)

    torch.cuda.reset_peak_memory_stats(device)
    loss = time_it(benchmark, step, device, rounds=3, warmup_rounds=1)
    assert torch.isfinite(loss)
    flops = train_step_flops(cfg, batch_size)
    peak = peak_flops(device, torch.bfloat16)
    t = seconds(benchmark)
    record(
        benchmark, flops=flops, preset="medium", impl="fast", device=torch.cuda.get_device_name(device),
        precision="bf16", batch_size=batch_size, activation_checkpointing=checkpointing, bf16_weights=cw is not None,
        memory_gb=round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1),
        peak_mem_gb=round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2),
        peak_tflops=None if peak is None else round(peak / 1e12, 2),
        clips_per_s=None if t is None else round(batch_size / t, 2),
        mfu=None if t is None or peak is None else round(flops / t / peak, 4),
    )
