"""Continuing a run, in one place: which checkpoint, which arguments it brings, whether it fits, its state.

A resumed run takes from its checkpoint every argument of :data:`RESUMED_ARGS` that the
user did not give again (preset, data, batch size, schedule, seed, ...), the learning-rate
schedule saved with it, the model and optimizer state, each rank's loader position and
RNG state, and its counters, so that it continues exactly.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from vatt_fast.checkpoint import (
    WEIGHTS_NAME,
    find_latest,
    load_checkpoint,
    read_meta,
    read_weights_config,
    resolve_checkpoint,
)
from vatt_fast.distributed import get_rank
from vatt_fast.models.config import VATTConfig

__all__ = ["RESUMED_ARGS", "ResumePoint", "check_resume", "find_resume", "restore"]

log = logging.getLogger("vatt_fast.train")

# Arguments that a resumed run takes from its checkpoint unless given again.
RESUMED_ARGS = (
    "preset", "data", "batch_size", "lr", "end_lr", "warmup_steps", "total_steps",
    "weight_decay", "seed", "grad_clip", "fsdp", "steps", "eval_every",
)  # fmt: skip
_SCHEDULE = ("lr", "end_lr", "warmup_steps", "total_steps")


@dataclass
class ResumePoint:
    """A checkpoint folder to continue from, with its ``meta.json`` (read once)."""

    path: Path
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.meta.get("step", -1))


def find_resume(args: argparse.Namespace, resumed_args: Sequence[str] = RESUMED_ARGS) -> Optional[ResumePoint]:
    """The checkpoint ``--resume`` names (None for a fresh run), with the resumed arguments filled into ``args``.

    ``--resume auto`` takes the latest checkpoint of ``--out`` (none: a fresh run);
    ``--resume PATH`` a checkpoint or run folder, and ``--out`` defaults to its run folder.
    ``resumed_args``: the arguments taken from the checkpoint unless given again.
    """
    if args.resume == "auto":
        if args.out is None:
            raise ValueError("--resume auto needs --out RUN_DIR (the run folder to continue); or pass --resume PATH")
        ckpt = find_latest(args.out)
        if ckpt is None:
            return None
    elif args.resume:
        path = Path(args.resume)
        if not path.exists():
            raise FileNotFoundError(
                f"--resume {args.resume!r} does not exist; pass a checkpoint folder (<run>/checkpoints/step-*), a run "
                f"folder, or 'auto' with --out"
            )
        ckpt = resolve_checkpoint(path)
        if ckpt.is_file():
            raise ValueError(
                f"--resume {args.resume!r} is a weights file; resuming needs a checkpoint folder with state.pt "
                f"(<run>/checkpoints/step-*)"
            )
        if args.out is None:
            args.out = str(ckpt.parent.parent)
    else:
        return None
    point = ResumePoint(ckpt, read_meta(ckpt))
    saved = point.meta.get("args", {})
    for key in resumed_args:
        if key not in args.explicit and saved.get(key) is not None:
            setattr(args, key, saved[key])
    if not args.model and saved.get("model"):
        args.model = dict(saved["model"])
    return point


def check_resume(point: ResumePoint, config: VATTConfig, world: int) -> None:
    """Raise, naming both values and the fix, when the checkpoint cannot continue in this run."""
    saved_preset = point.meta.get("preset")
    if saved_preset is not None and saved_preset != config.name:
        raise ValueError(
            f"checkpoint {str(point.path)!r} was trained with --preset {saved_preset!r}, but this run uses --preset "
            f"{config.name!r}; pass --preset {saved_preset} (or leave --preset out when resuming), or start a new "
            f"run with a different --out"
        )
    saved = read_weights_config(point.path / WEIGHTS_NAME)
    if saved is not None:
        mine, theirs = config.to_dict(), saved.to_dict()
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if k != "extra" and theirs.get(k) != v}
        if diff:
            raise ValueError(
                f"checkpoint {str(point.path)!r} has a different model config: "
                + ", ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in sorted(diff.items()))
                + "; resume with the same preset, model overrides and dataset vocabulary"
            )
    saved_world = int(point.meta.get("world_size", 1))
    if saved_world != world:
        raise ValueError(
            f"checkpoint {str(point.path)!r} was written by {saved_world} rank(s) but this run has {world}; each rank's "
            f"data position and RNG state belong to its shard, so resume with {saved_world} process(es) (torchrun "
            f"--nproc_per_node/--nnodes), or start a new run from its weights"
        )


def restore(run: Any, point: ResumePoint) -> Dict[str, Any]:
    """Load ``point`` into ``run`` (a :class:`vatt_fast.training.loop.RunState`); returns this rank's RNG state.

    The RNG state is applied by the caller right before the first step, after the loaders
    (whose workers draw from it) are running.
    """
    args = run.args
    state = load_checkpoint(point.path, run.raw_model if not args.fsdp else run.model, run.optimizer)
    run.step = int(state["step"])
    run.nonfinite_steps = int(state.get("nonfinite_steps", 0))
    schedule = state.get("schedule") or {}
    for key in _SCHEDULE:
        if key not in args.explicit and key in schedule:
            setattr(args, key, schedule[key])
    loader_state = state["per_rank"][get_rank()].get("loader")
    if loader_state is not None:
        run.train_loader.load_state_dict(loader_state)
    run.loader_state = loader_state
    log.info("resumed from %s at step %d", point.path, run.step)
    if args.steps > args.total_steps:
        log.warning("--steps %d goes past the checkpoint's %d-step schedule: the learning rate stays at --end-lr %g "
                    "after step %d; pass --total-steps to stretch the schedule",
                    args.steps, args.total_steps, args.end_lr, args.total_steps)  # fmt: skip
    return state["rng"][get_rank()]
