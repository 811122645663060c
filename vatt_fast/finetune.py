"""Fine-tune a pretrained VATT encoder for classification: ``python -m vatt_fast.finetune``.

::

    python -m vatt_fast.finetune --checkpoint runs/X                      # video, the run's dataset, paper recipe
    python -m vatt_fast.finetune --checkpoint runs/X --data /data/k400 --modality video --out runs/k400
    python -m vatt_fast.finetune --checkpoint runs/X --data /data/audioset --modality audio
    torchrun --nproc_per_node 8 -m vatt_fast.finetune --checkpoint runs/X --data /data/k400

A linear head on the pooled feature of the pretrained video (or audio) encoder, trained with
the paper's recipe (:mod:`vatt_fast.finetuning.recipe`: SGD momentum 0.9, lr 5e-3, warmup then
cosine, gradient clip 0.75, label smoothing 0.1, the release's augmentation), every setting
a flag whose default is the paper's value; the ``tiny`` preset gets a short schedule (800
steps of 32 at lr 0.05, no scale or colour jitter: see :data:`RECIPES`) so that the default
run takes minutes on a CPU. It ends with the multi-view test
(4 temporal windows x 3 spatial crops, averaged) and the single view: top-1, top-5, and mAP
for multi-label data. The classes are the train split's manifest labels.

The run is the trainer's (:mod:`vatt_fast.training`): the flags table and ``--config``
files, the step loop with logging, periodic evaluation and checkpoints, exact resume
(``--resume auto --out RUN``), saving on SIGTERM, torchrun/DDP (FSDP2 with ``--fsdp``),
bf16, the fused kernels, the loaders and the run folder (``summary.json``, ``curves.png``,
``metrics.jsonl``, TensorBoard). :func:`main` reads as the table of contents of a run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from vatt_fast.checkpoint import (
    WEIGHTS_NAME,
    load_weights,
    read_meta,
    read_weights_config,
    resolve_checkpoint,
    set_rng_state,
)
from vatt_fast.data.manifest import read_manifest
from vatt_fast.data.vocab import Vocabulary
from vatt_fast.distributed import all_reduce_value, broadcast_object, get_world_size, init_distributed, is_dist
from vatt_fast.finetuning.evaluate import evaluate_classifier
from vatt_fast.finetuning.labels import LabelSpace, build_label_space
from vatt_fast.finetuning.model import MODALITIES, Classifier, classifier_flops, load_pretrained
from vatt_fast.finetuning.recipe import (
    AudioAugment,
    VideoAugment,
    classification_loss,
    clip_generator,
    clip_grad_groups,
    smooth_targets,
)
from vatt_fast.io import atomic_write
from vatt_fast.models.config import VATTConfig
from vatt_fast.training.loop import DeviceBatches, RunState, StopSignals, closing_loaders, save, train_steps
from vatt_fast.training.params import FLAGS, Flag, fill_defaults, parse_args, run_cli
from vatt_fast.training.precision import autocast, pick_device, resolve_precision
from vatt_fast.training.resume import RESUMED_ARGS, ResumePoint, check_resume, find_resume, restore
from vatt_fast.training.run_folder import (
    MetricsLog,
    make_run_dir,
    plot_curves,
    setup_logging,
    write_resolved_config,
    write_summary,
)
from vatt_fast.training.setup import build_loaders, check_data, dataset_dir, resolve_peak_flops, wrap_model

__all__ = ["FINETUNE_FLAGS", "RECIPES", "FineTune", "build_parser", "cli", "main", "parse_finetune_args", "prepare"]

log = logging.getLogger("vatt_fast.finetune")
PROG = "python -m vatt_fast.finetune"

# The recipe's per-preset values: the paper's (VATT_SPEC.md, the release's Finetune config) for
# every preset but the CPU-sized one, whose short run needs a larger lr, and whose synthetic
# labels are colours and shapes (colour jitter and scale jitter would change the class). The
# batch size is ours: the release sets it per job.
PAPER: Dict[str, float] = dict(batch_size=64, steps=100_000, warmup_steps=2_500, lr=5e-3, scale_jitter_prob=0.8,
                               color_jitter_prob=0.8)  # fmt: skip
RECIPES: Dict[str, Dict[str, float]] = {
    "tiny": dict(batch_size=32, steps=800, warmup_steps=50, lr=0.05, scale_jitter_prob=0.0, color_jitter_prob=0.0),
}


def _trainer_flag(name: str, **overrides: Any) -> Flag:
    flag = next(f for f in FLAGS if f.name == name)
    return Flag(name, {**flag.kwargs, **overrides})


def _flag(name: str, **kwargs: Any) -> Flag:
    return Flag(name, kwargs)


_SHARED = (
    "--data", "--out", "--precision", "--device", "--compile", "--compile-backend", "--activation-checkpointing",
    "--kernels", "--attention", "--loader", "--workers", "--seed", "--resume", "--eval-split", "--eval-batch-size",
    "--log-every", "--save-every", "--keep-checkpoints", "--fsdp", "--max-nonfinite", "--peak-tflops", "--no-progress",
)  # fmt: skip
FINETUNE_FLAGS: Sequence[Flag] = (
    _flag("--checkpoint", default=None, help="pretraining checkpoint: a run folder (its latest checkpoint), a "
          "checkpoint folder or a model.safetensors (required unless resuming)"),
    _flag("--modality", default="video", choices=MODALITIES, help="which encoder to fine-tune"),
    _trainer_flag("--preset", help="model preset; default: the checkpoint's (another one is an error)"),
    _flag("--num-classes", type=int, default=None, help="fix the classes to 0..N-1 (default: the train split's labels)"),
    _flag("--num-frames", type=int, default=None, help="frames per clip (default: the checkpoint's; another value "
          "interpolates the position tables; audio follows: num_frames / fps seconds)"),
    _flag("--frame-size", type=int, default=None, help="crop side in pixels (default: the checkpoint's; another value "
          "interpolates the position tables)"),
    _trainer_flag("--batch-size", help="GLOBAL batch size; default: 64 (32 for tiny)"),
    _trainer_flag("--steps", help="total optimizer steps; default: 100000 (800 for tiny)"),
    _trainer_flag("--total-steps", help="length of the cosine schedule; default: --steps"),
    _trainer_flag("--lr", help="peak learning rate; default: 5e-3, the paper's (0.05 for tiny)"),
    _trainer_flag("--end-lr", default=0.0, help="learning rate at the end of the cosine"),
    _trainer_flag("--warmup-steps", help="linear warmup steps; default: 2500 (50 for tiny)"),
    _trainer_flag("--weight-decay", default=0.0, help="SGD weight decay (VATT fine-tuning: 0)"),
    _flag("--momentum", type=float, default=0.9, help="SGD momentum"),
    _trainer_flag("--grad-clip", default=0.75, help="clip the encoder's global gradient norm to this (0: off)"),
    _flag("--head-grad-clip", type=float, default=0.0, help="clip the head's gradient norm to this (0: off, as the "
          "release)"),
    _flag("--label-smoothing", type=float, default=0.1, help="label smoothing"),
    _flag("--head-dropout", type=float, default=0.0, help="dropout on the pooled feature before the head"),
    _flag("--scale-jitter-prob", type=float, default=None, help="video: probability of scale jitter; default: 0.8 "
          "(0 for tiny)"),
    _flag("--scale-jitter-min", type=float, default=0.8, help="video: smallest scale-jitter factor"),
    _flag("--scale-jitter-max", type=float, default=1.2, help="video: largest scale-jitter factor"),
    _flag("--color-jitter-prob", type=float, default=None, help="video: probability of colour jitter; default: 0.8 "
          "(0 for tiny)"),
    _flag("--brightness", type=float, default=32 / 255, help="video: brightness jitter, fraction of the pixel range"),
    _flag("--saturation", type=float, default=0.4, help="video: saturation factor in [1 - s, 1 + s]"),
    _flag("--contrast", type=float, default=0.4, help="video: contrast factor in [1 - c, 1 + c]"),
    _flag("--hue", type=float, default=0.2, help="video: hue shift in turns, in [-h, h]"),
    _flag("--mixup", default="auto", choices=("auto", "on", "off"), help="mixup of clips and targets (auto: on for "
          "audio, off for video)"),
    _flag("--mixup-alpha", type=float, default=5.0, help="mixup weight ~ Beta(alpha, beta)"),
    _flag("--mixup-beta", type=float, default=2.0, help="mixup weight ~ Beta(alpha, beta)"),
    _flag("--audio-noise", type=float, default=0.0, help="audio: Gaussian noise, std as a fraction of the clip's peak"),
    _flag("--test-temporal-views", type=int, default=4, help="test windows per clip, evenly spaced over --test-span"),
    _flag("--test-spatial-crops", type=int, default=3, choices=(1, 3), help="test crops per window (video)"),
    _flag("--test-span", type=float, default=None, help="seconds of each test clip the windows spread over "
          "(default: the shortest video of the evaluation split)"),
    _trainer_flag("--eval-every", help="test every N steps (0: only at the end); default: a quarter of the run"),
    *(_trainer_flag(name) for name in _SHARED),
)  # fmt: skip

# Arguments a resumed run takes from its checkpoint unless given again.
RESUMED = RESUMED_ARGS + (
    "checkpoint", "modality", "num_classes", "num_frames", "frame_size", "momentum", "head_grad_clip",
    "label_smoothing", "head_dropout", "scale_jitter_prob", "scale_jitter_min", "scale_jitter_max",
    "color_jitter_prob", "brightness", "saturation", "contrast", "hue", "mixup", "mixup_alpha", "mixup_beta",
    "audio_noise", "test_temporal_views", "test_spatial_crops", "test_span", "eval_split",
)  # fmt: skip
_DESCRIPTION = (
    "Fine-tune a pretrained VATT video or audio encoder with a classification head (the paper's recipe), and test it "
    "with the multi-view protocol. Only --checkpoint of the default `python -m vatt_fast.train` run: the synthetic "
    "dataset's 16 classes in minutes on a CPU."
)


def build_parser() -> argparse.ArgumentParser:
    from vatt_fast.training.params import build_parser as _build

    return _build(flags=FINETUNE_FLAGS, prog=PROG, description=_DESCRIPTION)


def parse_finetune_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return parse_args(argv, FINETUNE_FLAGS, prog=PROG, description=_DESCRIPTION)


@dataclass
class Plan:
    """What :func:`prepare` settled before anything expensive: config, device, data, classes, test views."""

    config: VATTConfig
    device: torch.device
    data_dir: Path
    weights_file: Path
    labels: LabelSpace
    train_targets: torch.Tensor
    eval_targets: Optional[torch.Tensor]
    resize: int  # side of the square the loaders cut (training resize of the short side)
    span: int  # frames of each test clip
    samples_per_frame: int


def _pretrained(args: argparse.Namespace) -> tuple:
    """``(weights file, its config, the pretraining run's dataset or None)`` for ``--checkpoint``."""
    if not args.checkpoint:
        raise ValueError(f"--checkpoint is required: the pretraining run to fine-tune, e.g. {PROG} --checkpoint "
                         f"runs/tiny-<date> (a run folder, checkpoint folder or model.safetensors)")  # fmt: skip
    ckpt = resolve_checkpoint(args.checkpoint)
    weights_file = ckpt if ckpt.is_file() else ckpt / WEIGHTS_NAME
    config = read_weights_config(weights_file)
    if config is None:
        raise ValueError(f"{str(weights_file)!r} carries no model config in its metadata; pass a checkpoint written by "
                         f"`python -m vatt_fast.train`")  # fmt: skip
    data = read_meta(ckpt).get("args", {}).get("data") if ckpt.is_dir() else None
    return weights_file, config, data


def prepare(args: argparse.Namespace, resume: Optional[ResumePoint]) -> Plan:
    """Settle and check the arguments, the checkpoint, the data and its labels and the process group,
    before the model is built: every bad input fails here, naming the value and the fix."""
    weights_file, pretrained, pre_data = _pretrained(args)
    if args.preset is not None and args.preset != pretrained.name:
        raise ValueError(
            f"--checkpoint {args.checkpoint!r} was pretrained with preset {pretrained.name!r}, but --preset "
            f"{args.preset!r} was given; leave --preset out (it defaults to the checkpoint's) or pass --preset "
            f"{pretrained.name}"
        )
    args.preset = pretrained.name
    if args.data is None and pre_data is not None:
        args.data = pre_data
    if args.data is not None:
        check_data(Path(args.data).expanduser(), "train")
    device = pick_device(args.device)
    init_distributed(device)
    world = get_world_size()
    data_dir = dataset_dir(args.data)
    args.data = str(data_dir)
    geometry = {k: getattr(args, k) for k in ("num_frames", "frame_size") if getattr(args, k) is not None}
    config = pretrained.replace(**{**args.model, "drop_token": 0.0, **geometry})  # validate() checks the geometry
    for key, value in {**PAPER, **RECIPES.get(config.name, {})}.items():
        if key == "steps":
            if args.steps is None and args.total_steps is None:
                args.steps = value
        elif getattr(args, key) is None:
            setattr(args, key, value)
    fill_defaults(args, config)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} (global) is not divisible by the world size {world}; pass a "
                         f"multiple of {world}")  # fmt: skip
    for key in ("label_smoothing", "scale_jitter_prob", "color_jitter_prob", "head_dropout"):
        if not 0.0 <= getattr(args, key) <= 1.0:
            raise ValueError(f"--{key.replace('_', '-')} must be in [0, 1], got {getattr(args, key)}")
    if not 0 < args.scale_jitter_min <= args.scale_jitter_max:
        raise ValueError(f"--scale-jitter-min {args.scale_jitter_min} must be > 0 and <= --scale-jitter-max "
                         f"{args.scale_jitter_max}")  # fmt: skip
    if args.test_temporal_views < 1:
        raise ValueError(f"--test-temporal-views must be at least 1, got {args.test_temporal_views}")
    train_records = read_manifest(data_dir, split="train")
    eval_records = read_manifest(data_dir, split=args.eval_split)
    labels = build_label_space(train_records, eval_records, args.num_classes, args.eval_split)
    spf = config.audio_sample_rate / config.fps
    if args.modality == "audio" and spf != int(spf):
        raise ValueError(f"audio test windows need a whole number of samples per frame; audio_sample_rate "
                         f"{config.audio_sample_rate} / fps {config.fps} = {spf}")  # fmt: skip
    if args.test_span is not None:
        span = int(round(args.test_span * config.fps))
    else:
        span = min((max(1, int(math.floor(r.duration * config.fps + 1e-3))) for r in eval_records), default=0)
    span = max(span, config.num_frames)
    if args.mixup == "auto":
        args.mixup = "on" if args.modality == "audio" else "off"
    if args.out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = broadcast_object(str(Path("runs") / f"finetune-{args.modality}-{config.name}-{stamp}"))
    if resume is not None:
        check_resume(resume, config, world)
    return Plan(
        config=config, device=device, data_dir=data_dir, weights_file=weights_file, labels=labels,
        train_targets=labels.targets(train_records),
        eval_targets=labels.targets(eval_records) if eval_records else None,
        resize=round(config.frame_size * 8 / 7), span=span, samples_per_frame=int(spf),
    )  # fmt: skip


class FineTune:
    """The fine-tuning parts of a run, as the hooks of :class:`~vatt_fast.training.loop.RunState`:
    the augmented, label-smoothed loss, the per-group gradient clipping and the test."""

    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args = args
        self.plan = plan
        self.video_aug = VideoAugment(
            plan.config.frame_size, args.scale_jitter_prob, args.scale_jitter_min, args.scale_jitter_max,
            args.color_jitter_prob, args.brightness, args.saturation, args.contrast, args.hue,
        )  # fmt: skip
        self.audio_aug = AudioAugment(args.audio_noise, args.mixup == "on", args.mixup_alpha, args.mixup_beta)

    def forward_loss(self, run: RunState, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Augment, forward, and the loss: its global mean as value, the gradient of the local rows."""
        a, labels = self.args, self.plan.labels
        index = batch["index"].cpu()
        gens = [clip_generator(a.seed, run.step, int(i)) for i in index]
        targets = smooth_targets(self.plan.train_targets[index], labels.num_classes, a.label_smoothing,
                                 labels.multi_label).to(run.device)  # fmt: skip
        if a.modality == "video":
            x = self.video_aug(batch["video"], gens)
        else:
            x = batch["audio"]
            if a.mixup == "on" or a.audio_noise > 0:
                x, targets = self.audio_aug(x, targets, gens)
        if a.mixup == "on" and a.modality == "video":
            x, targets = self._mix_video(x, targets, gens)
        with autocast(run.device, run.precision):
            logits = run.model(x)
        per_clip = classification_loss(logits, targets, labels.multi_label)  # (b,)
        local_sum = per_clip.sum()
        count = per_clip.shape[0] * run.world_size
        if run.world_size == 1:
            return {"loss": local_sum / count}
        total = all_reduce_value(local_sum.detach(), op="sum")
        part = local_sum / count
        return {"loss": part + (total / count - part).detach()}

    def _mix_video(self, x: torch.Tensor, targets: torch.Tensor, gens: List[torch.Generator]) -> tuple:
        flat, t = AudioAugment(0.0, True, self.args.mixup_alpha, self.args.mixup_beta)(x.flatten(1), targets, gens)
        return flat.reshape(x.shape), t

    def clip_grads(self, run: RunState) -> torch.Tensor:
        raw = run.raw_model
        return clip_grad_groups([(raw.encoder_parameters(), self.args.grad_clip),
                                 (raw.head_parameters(), self.args.head_grad_clip)])  # fmt: skip

    def evaluate(self, run: RunState) -> Dict[str, Any]:
        """The multi-view and single-view test on the evaluation loader, logged as an ``eval`` row."""
        a, plan = self.args, self.plan
        t0 = time.perf_counter()
        model = run.model if a.fsdp else run.raw_model
        res = evaluate_classifier(
            model, run.eval_loader, plan.eval_targets, modality=a.modality, num_frames=plan.config.num_frames,
            frame_size=plan.config.frame_size, temporal=a.test_temporal_views, spatial=a.test_spatial_crops,
            samples_per_frame=plan.samples_per_frame, multi_label=plan.labels.multi_label, device=run.device,
            precision=run.precision, shard_gather=not a.fsdp, chunk=max(1, a.eval_batch_size or 64),
        )  # fmt: skip
        row: Dict[str, Any] = {"kind": "eval", "step": run.step, "loss": run.last_loss}
        for key in ("top1", "top5", "map"):
            if key in res:
                row[key] = res[key]
                row[f"single_{key}"] = res["single_view"][key]
        row.update(chance_top1=res["chance_top1"], clips=res["clips"], eval_s=time.perf_counter() - t0)
        run.log_row(row)
        if run.is_main:
            log.info("step %d test (%d clips, %.1fs): top-1 %.1f%% (%d views), single view %.1f%%, chance %.1f%%",
                     run.step, res["clips"], row["eval_s"], 100 * res["top1"], res["views"],
                     100 * res["single_view"]["top1"], 100 * res["chance_top1"])  # fmt: skip
        return res


def build_run(args: argparse.Namespace, plan: Plan, resume: Optional[ResumePoint]) -> RunState:
    """The run folder and logging, then the classifier (pretrained weights loaded, wrapped for
    DDP/FSDP, compiled), SGD, the loaders and the hooks."""
    world = get_world_size()
    config, device = plan.config, plan.device
    precision = resolve_precision(args.precision, device)
    run_dir = make_run_dir(args)
    setup_logging(run_dir)
    log.info("fine-tuning the %s encoder of %s (preset %s) on %s: %d classes%s, %s on %s (world size %d), run folder %s",
             args.modality, plan.weights_file, config.name, plan.data_dir, plan.labels.num_classes,
             " (multi-label)" if plan.labels.multi_label else "", precision, device, world, run_dir)  # fmt: skip
    torch.manual_seed(args.seed)
    raw = Classifier(config, args.modality, plan.labels.num_classes, args.head_dropout)
    raw.set_attention_backend(args.attention).set_kernel_impl(args.kernels)
    raw.set_grad_checkpointing(args.activation_checkpointing)
    if resume is None:
        report = load_pretrained(raw, load_weights(plan.weights_file), source=f"checkpoint {str(plan.weights_file)!r}")
        _log_report(report, args.modality, run_dir)
    else:
        report = resume.meta.get("pretrained", {})
    raw = raw.to(device)
    model = wrap_model(raw, args, device, world)
    if args.fsdp and world > 1:
        raw = model
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if args.compile:
        model.compile(backend=args.compile_backend)
    vocab_size = len(Vocabulary.load(plan.data_dir / "vocab.txt"))
    loader_config = config.replace(vocab_size=max(config.vocab_size, vocab_size))  # text is loaded but not used
    video = args.modality == "video"
    train_spec = dict(frame_size=plan.resize, resize_to=plan.resize) if video else {}
    eval_spec = dict(num_frames=plan.span, audio_samples=plan.span * plan.samples_per_frame)
    if video:
        eval_spec.update(frame_size=plan.resize, resize_to=plan.resize)
    train_loader, eval_loader = build_loaders(args, loader_config, plan.data_dir, device, world, train_spec, eval_spec)
    if plan.eval_targets is None:
        eval_loader = None
    ft = FineTune(args, plan)
    flops, tokens = classifier_flops(config, args.modality, plan.labels.num_classes)
    extra = {"finetune": {"modality": args.modality, "classes": plan.labels.classes,
                          "multi_label": plan.labels.multi_label, "pretrained_from": str(plan.weights_file)},
             "pretrained": {k: v for k, v in report.items() if k != "unused"}}  # fmt: skip
    return RunState(args=args, config=config, model=model, raw_model=raw, loss_fn=None, optimizer=optimizer,
                    device=device, precision=precision, world_size=world, run_dir=run_dir, train_loader=train_loader,
                    eval_loader=eval_loader, peak_flops=resolve_peak_flops(args, device, precision),
                    forward_loss=ft.forward_loss, clip_grads=ft.clip_grads, eval_fn=ft.evaluate,
                    flops_per_clip=flops, tokens_per_clip=tokens, extra_meta=extra, command=PROG)  # fmt: skip


def _log_report(report: Dict[str, Any], modality: str, run_dir: Path) -> None:
    """Log what the pretrained checkpoint gave, and list every key in ``pretrained_keys.json``."""
    groups = ", ".join(f"{g}.* ({n})" for g, n in sorted(report["unused_groups"].items()))
    log.info("pretrained %s encoder: %d tensors loaded; new (not in the checkpoint): %s; not used by %s fine-tuning: "
             "%s (every name in %s)", modality, report["loaded"], report["missing"], modality, groups or "none",
             run_dir / "pretrained_keys.json")  # fmt: skip
    for key, (old, new) in report["interpolated"].items():
        log.info("position table %s interpolated from %d to %d entries (clip geometry changed)", key, old, new)
    if not is_dist() or dist.get_rank() == 0:
        atomic_write(run_dir / "pretrained_keys.json", json.dumps(report, indent=2))


def run_finetune(run: RunState, resume: Optional[ResumePoint], rng: Optional[Dict[str, Any]]) -> str:
    """Train up to ``--steps`` (saving and stopping on SIGTERM/SIGINT), save, test; ``"done"`` or ``"interrupted"``."""
    args = run.args
    status = "done"
    with StopSignals(run), closing_loaders(run.train_loader, run.eval_loader):
        batches = DeviceBatches(run.train_loader, run.device)
        if rng is not None:
            set_rng_state(rng)
        if run.step < args.steps:
            log.info("training steps %d..%d (global batch %d), SGD momentum %g, lr %.3g -> %.3g, warmup %d, schedule %d "
                     "steps, grad clip %g", run.step + 1, args.steps, args.batch_size, args.momentum, args.lr,
                     args.end_lr, args.warmup_steps, args.total_steps, args.grad_clip)  # fmt: skip
            status = train_steps(run, args.steps, batches)
        if status == "done":
            if resume is None or run.step > resume.step:
                save(run)
            if run.eval_loader is not None:
                run.last_eval = run.eval_fn(run)
    return status


def _report(run: RunState, status: str, wall_s: float) -> Dict[str, Any]:
    """``summary.json``, ``curves.png`` and the printed table (rank 0)."""
    extra: Dict[str, Any] = {"modality": run.args.modality, "num_classes": len(run.extra_meta["finetune"]["classes"]),
                             "pretrained": run.extra_meta["pretrained"]}  # fmt: skip
    res = run.last_eval
    if res is not None:
        extra.update({k: res[k] for k in ("top1", "top5", "map") if k in res})
        extra.update({f"single_view_{k}": v for k, v in res["single_view"].items()})
        extra.update(test_views=res["views"], eval_clips=res["clips"], chance_top1=res["chance_top1"],
                     chance_top5=res["chance_top5"])  # fmt: skip
    summary = write_summary(run, status, wall_s, extra)
    plot_curves(run.run_dir, (("top1", "top-1, multi-view"), ("single_top1", "top-1, single view"),
                              ("map", "mAP"), ("chance_top1", "chance top-1")), "classification test")  # fmt: skip
    if res is not None:
        a = run.args
        views = f"{a.test_temporal_views}x{a.test_spatial_crops}" if a.modality == "video" else f"{a.test_temporal_views}"
        print(f"\n{a.modality} classification on the {a.eval_split!r} split after {run.step} steps ({res['clips']} clips, "
              f"{extra['num_classes']} classes; %):")  # fmt: skip
        has_map = "map" in res
        print(f"{'protocol':<22}{'top-1':>8}{'top-5':>8}" + (f"{'mAP':>8}" if has_map else ""))
        for name, r in ((f"multi-view ({views})", res), ("single view", res["single_view"])):
            print(f"{name:<22}{100 * r['top1']:8.1f}{100 * r['top5']:8.1f}" + (f"{100 * r['map']:8.1f}" if has_map else ""))
        print(f"{'chance':<22}{100 * res['chance_top1']:8.1f}{100 * res['chance_top5']:8.1f}")
    print(f"run folder: {run.run_dir}  ({summary['wall_s']:.0f} s)")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Fine-tune as the command line says; returns the run summary (also in ``summary.json``)."""
    t_start = time.perf_counter()
    args = parse_finetune_args(argv)
    resume = find_resume(args, RESUMED)
    plan = prepare(args, resume)
    run = build_run(args, plan, resume)
    rng = restore(run, resume) if resume is not None else None
    if run.is_main:
        write_resolved_config(run.run_dir, args, plan.config, plan.data_dir)
    run.metrics = MetricsLog(run.run_dir, enabled=run.is_main)
    status = run_finetune(run, resume, rng)
    run.metrics.close()
    summary = _report(run, status, time.perf_counter() - t_start) if run.is_main else {}
    if is_dist():
        dist.barrier()
    return summary


def cli() -> None:
    """Console entry point ``vatt-finetune``: errors become one line and exit status 1."""
    run_cli(main)

if __name__ == "__main__":
    cli()
