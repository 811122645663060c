"""Train VATT: ``python -m vatt_fast.train`` (one CPU to many GPUs under ``torchrun``).

With no arguments it trains the ``tiny`` preset on the built-in synthetic dataset
(generated into a cache folder on first use) and ends with zero-shot retrieval on
the validation split, printed beside chance. Multi-GPU / multi-node::

    torchrun --nproc_per_node 8 -m vatt_fast.train --preset medium --data /data/howto100m

runs DDP (``--fsdp`` for FSDP2), with negatives gathered from every rank, the
heads' BatchNorm synchronised, the loader sharded by rank and rank 0 logging and
saving. :func:`main` reads as the table of contents of a run; each step it names is a
public function of :mod:`vatt_fast.training` (flags, schedule, precision, set-up,
resume, step loop, run folder), so evaluation and fine-tuning reuse them.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from vatt_fast.checkpoint import set_rng_state
from vatt_fast.distributed import get_world_size, init_distributed, is_dist
from vatt_fast.metrics import format_retrieval_table
from vatt_fast.models.config import VATTConfig
from vatt_fast.training.compute_weights import resolve_compute_weights
from vatt_fast.training.loop import (
    CompileError,
    DeviceBatches,
    NonFiniteLossError,
    RunState,
    StopSignals,
    closing_loaders,
    evaluate,
    evaluate_and_log,
    save,
    train_one_epoch,
    train_steps,
)
from vatt_fast.training.params import build_parser, fill_defaults, parse_args, run_cli
from vatt_fast.training.precision import pick_device, resolve_precision
from vatt_fast.training.resume import ResumePoint, check_resume, find_resume, restore
from vatt_fast.training.run_folder import (
    MetricsLog,
    make_run_dir,
    plot_curves,
    setup_logging,
    write_resolved_config,
    write_summary,
)
from vatt_fast.training.schedule import lr_at
from vatt_fast.training.setup import (
    build_config,
    build_loaders,
    build_loss,
    build_model,
    build_optimizer,
    check_data,
    compile_model,
    dataset_dir,
    resolve_peak_flops,
    wrap_model,
)

__all__ = [
    "CompileError",
    "NonFiniteLossError",
    "build_parser",
    "build_run",
    "cli",
    "evaluate",
    "lr_at",
    "main",
    "parse_args",
    "prepare",
    "run_training",
    "train_one_epoch",
    "train_steps",
]

log = logging.getLogger("vatt_fast.train")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train as the command line says and return the run summary (also in ``summary.json``).

    Every check on the arguments, the data and the checkpoint happens before the
    model is built, so a bad input fails in seconds with a message naming the value
    and the fix.
    """
    t_start = time.perf_counter()
    args = parse_args(argv)
    resume = find_resume(args)  # fills the arguments a resumed run takes from its checkpoint
    config, device, data_dir = prepare(args, resume)
    run = build_run(args, config, device, data_dir, resume)
    rng = restore(run, resume) if resume is not None else None
    if run.is_main:
        write_resolved_config(run.run_dir, args, config, data_dir)
    run.metrics = MetricsLog(run.run_dir, enabled=run.is_main)
    status = run_training(run, resume, rng)
    run.metrics.close()
    summary = _report(run, status, time.perf_counter() - t_start) if run.is_main else {}
    if is_dist():
        dist.barrier()
    return summary


def prepare(args: argparse.Namespace, resume: Optional[ResumePoint]) -> Tuple[VATTConfig, torch.device, Path]:
    """Settle the arguments, the data, the device and the process group, and check them all,
    before any expensive work: ``(model config, device, dataset folder)``."""
    args.preset = args.preset or "tiny"
    if args.data is not None:
        check_data(Path(args.data).expanduser(), "train")
    device = pick_device(args.device)
    init_distributed(device)
    world = get_world_size()
    data_dir = dataset_dir(args.data)  # the synthetic set (made by rank 0) when --data is not given
    args.data = str(data_dir)
    config = build_config(args, data_dir)
    fill_defaults(args, config)
    if args.batch_size % world:
        raise ValueError(
            f"--batch-size {args.batch_size} (global) is not divisible by the world size {world}; pass a multiple of "
            f"{world}, e.g. --batch-size {max(world, args.batch_size // world * world)}"
        )
    if resume is not None:
        check_resume(resume, config, world)
    return config, device, data_dir


def build_run(
    args: argparse.Namespace, config: VATTConfig, device: torch.device, data_dir: Path, resume: Optional[ResumePoint]
) -> RunState:
    """The run folder and logging, then model (wrapped for DDP/FSDP, compiled), optimizer, loss and loaders."""
    world = get_world_size()
    precision = resolve_precision(args.precision, device)
    run_dir = make_run_dir(args)
    setup_logging(run_dir)
    if args.resume == "auto" and resume is None:
        log.info("--resume auto: no checkpoint in %s, starting a fresh run", run_dir)
    log.info("preset %s on %s (%s, world size %d), data %s, run folder %s", config.name, device, precision, world,
             data_dir, run_dir)  # fmt: skip
    raw_model = build_model(args, config, device)
    model = wrap_model(raw_model, args, device, world)
    if args.fsdp and world > 1:
        raw_model = model  # state dicts and evaluation go through the sharded module
    optimizer = build_optimizer(model, args, config, device)
    if args.compile:
        compile_model(model, raw_model, args.compile_scope, args.compile_backend, args.compile_mode)
    compute_weights = resolve_compute_weights(args, model, precision, world)
    train_loader, eval_loader = build_loaders(args, config, data_dir, device, world)
    return RunState(args=args, config=config, model=model, raw_model=raw_model, loss_fn=build_loss(args, config),
                    optimizer=optimizer, device=device, precision=precision, world_size=world, run_dir=run_dir,
                    train_loader=train_loader, eval_loader=eval_loader, compute_weights=compute_weights,
                    peak_flops=resolve_peak_flops(args, device, precision))  # fmt: skip


def run_training(run: RunState, resume: Optional[ResumePoint], rng: Optional[Dict[str, Any]]) -> str:
    """Train up to ``--steps`` (saving and stopping on SIGTERM/SIGINT), then save and evaluate;
    returns ``"done"`` or ``"interrupted"``. The loaders are closed however it ends."""
    args = run.args
    status = "done"
    with StopSignals(run), closing_loaders(run.train_loader, run.eval_loader):
        batches = DeviceBatches(run.train_loader, run.device)
        if rng is not None:
            set_rng_state(rng)  # after the loaders started their workers, as in the run that saved it
        if run.step < args.steps:
            log.info("training steps %d..%d of %d (global batch %d, %d per rank), lr %.3g -> %.3g, warmup %d, "
                     "schedule %d steps", run.step + 1, args.steps, args.steps, args.batch_size,
                     args.batch_size // run.world_size, args.lr, args.end_lr, args.warmup_steps,
                     args.total_steps)  # fmt: skip
            status = train_steps(run, args.steps, batches)
        else:
            log.info("already at step %d >= --steps %d: nothing to train", run.step, args.steps)
        if status == "done":
            if resume is None or run.step > resume.step:
                save(run)
            if run.eval_loader is not None:
                run.last_eval = evaluate_and_log(run)
    return status


def _report(run: RunState, status: str, wall_s: float) -> Dict[str, Any]:
    """Write ``summary.json`` and ``curves.png``, print the retrieval table and the run folder (rank 0)."""
    summary = write_summary(run, status, wall_s)
    plot_curves(run.run_dir)
    if run.last_eval is not None:
        print(f"\nZero-shot retrieval on the {run.args.eval_split!r} split after {run.step} steps "
              f"({summary.get('eval_clips', '?')} clips; R@K in %):")  # fmt: skip
        print(format_retrieval_table(run.last_eval))
    speed = f", {summary['clips_per_s']:.1f} clips/s" if summary.get("clips_per_s") else ""
    print(f"run folder: {run.run_dir}  ({summary['wall_s']:.0f} s{speed})")
    return summary


def cli() -> None:
    """Console entry point ``vatt-train``: errors become one line and exit status 1."""
    run_cli(main)

if __name__ == "__main__":
    cli()
