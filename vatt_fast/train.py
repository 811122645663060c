"""Train VATT: ``python -m vatt_fast.train`` (one CPU to many GPUs under ``torchrun``).

With no arguments it trains the ``tiny`` preset on the built-in synthetic dataset
(generated into a cache folder on first use) and ends with zero-shot retrieval on
the validation split, printed beside chance. Multi-GPU / multi-node::

    torchrun --nproc_per_node 8 -m vatt_fast.train --preset medium --data /data/howto100m

runs DDP (``--fsdp`` for FSDP2), with negatives gathered from every rank, the
heads' BatchNorm synchronised, the loader sharded by rank and rank 0 logging and
saving. Plain functions: :func:`main` (callable from tests), :func:`train_steps`,
:func:`evaluate`.

Run folder (``--out``): ``config.yaml`` (resolved arguments and model config),
``metrics.jsonl`` (one row per log step and per evaluation, each with ``step`` and
``loss``), ``tensorboard/`` events, ``checkpoints/step-*`` (see
:mod:`vatt_fast.checkpoint`), ``curves.png`` (loss and retrieval curves),
``summary.json``, ``train.log`` and a copy of the dataset's ``vocab.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import math
import os
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from vatt_fast.checkpoint import find_latest, load_checkpoint, read_meta, resolve_checkpoint, save_checkpoint, set_rng_state
from vatt_fast.distributed import get_rank, get_world_size, is_dist
from vatt_fast.flops import measure_cpu_peak, peak_flops, tokens_per_clip, train_step_flops
from vatt_fast.metrics import clip_retrieval, format_retrieval_table
from vatt_fast.models.config import VATTConfig, get_config, list_presets

__all__ = [
    "build_parser",
    "parse_args",
    "lr_at",
    "train_steps",
    "train_one_epoch",
    "evaluate",
    "main",
    "cli",
    "NonFiniteLossError",
    "CompileError",
]

log = logging.getLogger("vatt_fast.train")

PRECISIONS = ("auto", "bf16", "fp32")
KERNELS = ("auto", "triton", "reference")
ATTENTION = ("auto", "flash_attn", "xformers", "sdpa", "math")
LOADERS = ("auto", "dali", "pyav")
DEVICES = ("auto", "cpu", "cuda")
# Arguments that a resumed run takes from its checkpoint unless given again.
_RESUMED_ARGS = (
    "preset", "data", "batch_size", "lr", "end_lr", "warmup_steps", "total_steps",
    "weight_decay", "seed", "grad_clip", "fsdp",
)  # fmt: skip


class NonFiniteLossError(RuntimeError):
    """Raised when the loss stays NaN/inf for ``--max-nonfinite`` consecutive steps."""


class CompileError(RuntimeError):
    """Raised when ``--compile`` fails on the first step, before any update is made."""


def _compile_failure(err: BaseException, backend: str) -> Optional[CompileError]:
    """A :class:`CompileError` naming torch's version and the workarounds, if ``err`` came from torch.compile."""
    from torch._dynamo.exc import TorchDynamoException

    try:
        from torch._inductor.exc import InductorError
    except ImportError:  # torch < 2.7
        InductorError = TorchDynamoException  # noqa: N806
    if not isinstance(err, (TorchDynamoException, InductorError)):
        return None
    cause = getattr(err, "inner_exception", None) or err  # BackendCompilerFailed wraps the compiler's error
    first = next((line for line in str(cause).splitlines() if line.strip()), "")
    return CompileError(
        f"torch.compile (--compile-backend {backend}) failed while compiling the first training step with torch "
        f"{torch.__version__}: {type(err).__name__} ({type(cause).__name__}: {first[:500]}). Nothing was trained or saved. Workarounds: run "
        f"without --compile (eager is the reference path), or --compile --compile-backend aot_eager (traces forward "
        f"and backward without Inductor's code generation), or another torch release. To report it, rerun with "
        f"TORCHDYNAMO_REPRO_AFTER=aot to write a minimal repro."
    )


# ---------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The trainer's argument parser (defaults of ``None`` are filled from the preset)."""
    p = argparse.ArgumentParser(
        prog="python -m vatt_fast.train",
        description="Train VATT (video-audio-text Transformers) with contrastive losses. "
        "No arguments: the tiny preset on the built-in synthetic dataset, ending with a retrieval score.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--config", default=None, help="YAML or JSON file of argument values (keys as the flags, '-' or '_'; "
      "an optional 'model' mapping overrides model config fields); flags given on the command line win")
    a("--preset", default=None, choices=list_presets(), help="model preset (default: tiny, or the checkpoint's when resuming)")
    a("--data", default=None, help="dataset folder (manifest.jsonl + vocab.txt); default: the built-in synthetic dataset")
    a("--out", default=None, help="run folder (default: runs/<preset>-<date>-<time>)")
    a("--batch-size", type=int, default=None, help="GLOBAL batch size (split evenly over ranks); default: the preset's")
    a("--steps", type=int, default=None, help="total optimizer steps of the run (a resumed run continues up to it); "
      "default: --total-steps")
    a("--total-steps", type=int, default=None, help="length of the learning-rate schedule; default: --steps if given, "
      "else the preset's")
    a("--lr", type=float, default=None, help="peak learning rate (after warmup); default: the preset's")
    a("--end-lr", type=float, default=None, help="learning rate at the end of the half-cosine; default: the preset's")
    a("--warmup-steps", type=int, default=None, help="linear warmup steps from 0 to --lr; default: the preset's")
    a("--weight-decay", type=float, default=None, help="decoupled (AdamW) weight decay on matrices; default: the preset's (0)")
    a("--grad-clip", type=float, default=0.0, help="clip the global gradient norm to this value (0: off, as VATT)")
    a("--precision", default="auto", choices=PRECISIONS, help="auto: bf16 autocast on CUDA, fp32 on CPU")
    a("--device", default="auto", choices=DEVICES, help="auto: CUDA when available (cuda:LOCAL_RANK under torchrun)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--compile-backend", default="inductor", help="torch.compile backend with --compile (inductor; aot_eager or "
      "eager to debug a compile problem)")
    a("--activation-checkpointing", action="store_true", help="recompute each Transformer block in backward")
    a("--kernels", default="auto", choices=KERNELS, help="fused-kernel implementation (auto: Triton on CUDA)")
    a("--attention", default="auto", choices=ATTENTION, help="attention backend")
    a("--loader", default="auto", choices=LOADERS, help="data loader backend (auto: DALI on CUDA when installed, else PyAV)")
    a("--workers", type=int, default=2, help="loader worker processes per rank")
    a("--seed", type=int, default=0, help="random seed (model init, DropToken, data order)")
    a("--resume", default=None, help="checkpoint folder to continue from, or 'auto' for the latest in --out "
      "(starts fresh when there is none)")
    a("--eval-every", type=int, default=None, help="evaluate retrieval every N steps (0: only at the end); "
      "default: a quarter of the run")
    a("--eval-split", default="val", help="manifest split used for evaluation")
    a("--eval-batch-size", type=int, default=None, help="per-rank evaluation batch size (default: the per-rank training batch)")
    a("--log-every", type=int, default=10, help="log metrics every N steps")
    a("--save-every", type=int, default=1000, help="checkpoint every N steps (and always at the end and on SIGTERM/SIGINT)")
    a("--keep-checkpoints", type=int, default=3, help="checkpoints to keep (0: all)")
    a("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state with FSDP2 (fully_shard) "
      "instead of DDP; for the large presets")
    a("--max-nonfinite", type=int, default=10, help="stop after this many consecutive steps with a NaN/inf loss")
    a("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device for MFU (default: data-sheet figure "
      "for known GPUs; on CPU the measured rate of a large fp32 matmul)")
    a("--no-progress", action="store_true", help="no progress bar")
    return p


def _load_config_file(path: str) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path!r} does not exist; pass a YAML or JSON file of flag values")
    text = p.read_text()
    if p.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of flag names to values, got {type(data).__name__}")
    return data


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``), with ``--config`` values as defaults under the flags.

    The returned namespace has an extra ``model`` dict: model config overrides from
    the config file's ``model`` mapping.
    """
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    model_overrides: Dict[str, Any] = {}
    config_keys: List[str] = []
    if known.config:
        data = _load_config_file(known.config)
        model_overrides = dict(data.pop("model", None) or {})
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
        defaults = {}
        for key, value in data.items():
            dest = str(key).replace("-", "_")
            if dest not in actions:
                raise ValueError(
                    f"--config {known.config!r}: unknown key {key!r}; valid keys: {sorted(actions)} and 'model'"
                )
            action = actions[dest]
            if value is not None and action.type is not None and not isinstance(value, bool):
                value = action.type(value)
            if action.choices is not None and value not in action.choices:
                raise ValueError(
                    f"--config {known.config!r}: {key}={value!r} is not one of {list(action.choices)}"
                )
            defaults[dest] = value
        parser.set_defaults(**defaults)
        config_keys = list(defaults)
    args = parser.parse_args(argv)
    args.model = model_overrides
    # Which arguments the user set (command line or config file): a resumed run takes
    # the others from its checkpoint.
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(probe.parse_args(argv))) | {str(k).replace("-", "_") for k in config_keys}
    args.explicit = sorted(given - {"config"})
    return args


# ---------------------------------------------------------------------------------------
# schedule, precision, devices
# ---------------------------------------------------------------------------------------
def lr_at(step: int, *, lr: float, end_lr: float, warmup_steps: int, total_steps: int) -> float:
    """VATT's schedule: linear warmup to ``lr`` then a half-cosine down to ``end_lr``.

    Step ``s`` (0-based, the update about to be made) gets ``lr * (s + 1) / warmup_steps``
    during warmup, then ``end_lr + (lr - end_lr) * (1 + cos(pi * p)) / 2`` with
    ``p = (s - warmup) / (total - warmup)`` clamped to [0, 1].
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return end_lr + (lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


# ---------------------------------------------------------------------------------------
# synchronised BatchNorm on CPU (torch's SyncBatchNorm refuses CPU tensors)
# ---------------------------------------------------------------------------------------
class _GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch, for gloo (CPU) process groups.

    Sums and sums of squares are all-reduced with ``torch.distributed.nn.functional.all_reduce``
    (differentiable: its backward all-reduces the gradients), so outputs and gradients
    equal those of one process holding the whole batch. Same parameters and buffers as
    ``nn.BatchNorm1d``, so state dicts load either way. CUDA uses ``nn.SyncBatchNorm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C)
        if not self.training or not is_dist():
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()
        local = torch.cat([xf.sum(0), (xf * xf).sum(0), xf.new_tensor([float(x.shape[0])])])  # (2C + 1,)
        total = all_reduce(local)
        count = total[-1]
        mean = total[:c] / count
        var = (total[c : 2 * c] / count - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = var * (count / (count - 1).clamp_min(1.0))
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * unbiased.detach())
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def _sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Make the heads' BatchNorm global over ranks (SyncBatchNorm on CUDA, :class:`_GlobalBatchNorm1d` on CPU)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm1d:
                new = _GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new.to(child.weight.device))
    return model


# ---------------------------------------------------------------------------------------
# run state
# ---------------------------------------------------------------------------------------
@dataclass
class RunState:
    """What the training functions share: model, optimizer, data, counters and outputs."""

    args: argparse.Namespace
    config: VATTConfig
    model: nn.Module  # what forward is called on (DDP / FSDP / compiled)
    raw_model: nn.Module  # the VATT module (state dicts, evaluation)
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: str
    world_size: int
    run_dir: Path
    train_loader: Any
    eval_loader: Any = None
    step: int = 0
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0
    loader_state: Optional[Dict[str, Any]] = None  # loader position after the last consumed batch
    writer: Any = None
    metrics_file: Any = None
    peak_flops: Optional[float] = None
    stop_signal: Optional[int] = None
    last_loss: float = float("nan")
    history: Dict[str, float] = field(default_factory=dict)  # running totals for the summary
    last_eval: Optional[Dict[str, Dict[str, float]]] = None

    @property
    def is_main(self) -> bool:
        return get_rank() == 0

    def schedule(self) -> Dict[str, float]:
        a = self.args
        return {"lr": a.lr, "end_lr": a.end_lr, "warmup_steps": a.warmup_steps, "total_steps": a.total_steps}

    def log_row(self, row: Dict[str, Any]) -> None:
        """Append a row to metrics.jsonl and TensorBoard (rank 0 only)."""
        if not self.is_main:
            return
        if self.metrics_file is not None:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            self.metrics_file.write(json.dumps(clean) + "\n")  # strict JSON: NaN/inf become null
            self.metrics_file.flush()
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key if "/" in key else f"{row.get('kind', 'train')}/{key}", value, row["step"])


class _Batches:
    """Iterate a loader, moving batches to the device (non-blocking, a side stream on CUDA,
    one batch ahead), timing the wait for data and tracking the loader position per batch."""

    def __init__(self, loader: Any, device: torch.device) -> None:
        self.loader = loader
        self.device = device
        self.it = iter(loader)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ahead: Optional[Tuple[Dict[str, torch.Tensor], float, Dict[str, Any]]] = None
        self.ahead = self._fetch() if self.stream is not None else None

    def _fetch(self) -> Tuple[Dict[str, torch.Tensor], float, Dict[str, Any]]:
        t0 = time.perf_counter()
        batch = next(self.it)
        state = self.loader.state_dict()
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        else:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return batch, time.perf_counter() - t0, state

    def next(self) -> Tuple[Dict[str, torch.Tensor], float, Dict[str, Any]]:
        """``(batch on device, seconds waited, loader state after this batch)``."""
        if self.stream is None:
            return self._fetch()
        batch, wait, state = self.ahead
        t0 = time.perf_counter()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for v in batch.values():
            v.record_stream(torch.cuda.current_stream(self.device))
        self.ahead = self._fetch()
        return batch, wait + (time.perf_counter() - t0), state


# ---------------------------------------------------------------------------------------
# training and evaluation
# ---------------------------------------------------------------------------------------
def _train_step(run: RunState, batch: Dict[str, torch.Tensor]) -> Optional[Dict[str, float]]:
    """One optimizer step; returns the loss terms, or None when the loss was not finite (step skipped)."""
    lr = lr_at(run.step, **run.schedule())
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    with _autocast(run.device, run.precision):
        out = run.model(batch)
    losses = run.loss_fn({**out, "text_mask": batch["text_mask"]})
    loss = losses["loss"]
    # DDP/FSDP average gradients over ranks; the loss gives each rank the single-process
    # gradient of its rows, so scale by the world size to get the global-batch gradient.
    (loss * run.world_size if run.world_size > 1 else loss).backward()
    # The global gradient norm (clipped to --grad-clip when set); logged, and a check on
    # distributed runs: it must equal one process's on the same global batch.
    max_norm = run.args.grad_clip if run.args.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.grad is not None], max_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    keys = ["loss"] + sorted(k for k in losses if k != "loss")
    tensors = [losses[k].detach().float() for k in keys] + [grad_norm.detach().float().to(loss.device)]
    values = torch.stack(tensors).tolist()  # one device sync
    keys.append("grad_norm")
    if not math.isfinite(values[0]):
        run.optimizer.zero_grad(set_to_none=True)
        run.nonfinite_steps += 1
        run.consecutive_nonfinite += 1
        log.warning("step %d: loss is %s, update skipped (%d in a row)", run.step + 1, values[0], run.consecutive_nonfinite)
        if run.consecutive_nonfinite >= run.args.max_nonfinite:
            raise NonFiniteLossError(
                f"the loss was NaN/inf for {run.consecutive_nonfinite} consecutive steps (last at step {run.step + 1}, "
                f"lr {lr:.3g}); lower --lr (now {run.args.lr}), use --precision fp32, or check the data; "
                f"resume from the last checkpoint with --resume auto --out {run.run_dir}"
            )
        return None
    run.consecutive_nonfinite = 0
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {**dict(zip(keys, values)), "lr": lr}


def _stop_requested(run: RunState) -> bool:
    """Whether any rank got SIGTERM/SIGINT (all ranks agree, so they stop at the same step)."""
    flag = 1.0 if run.stop_signal is not None else 0.0
    if run.world_size > 1:
        t = torch.tensor([flag], device=run.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = float(t.item())
    return flag > 0


def train_steps(run: RunState, stop_step: int, batches: _Batches) -> str:
    """Train from ``run.step`` up to ``stop_step``, logging, evaluating and checkpointing.

    Args:
        run: the run state (updated in place: ``step``, counters, ``loader_state``).
        stop_step: the step count at which to stop.
        batches: device batch iterator over the training loader.

    Returns:
        ``"done"`` when ``stop_step`` was reached, ``"interrupted"`` after SIGTERM/SIGINT
        (a checkpoint has then been saved).
    """
    args = run.args
    global_batch = args.batch_size
    flops_per_step = train_step_flops(run.config, global_batch)
    tokens = tokens_per_clip(run.config, train=True)["total"]
    bar = None
    if run.is_main and not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=stop_step, initial=run.step, desc="train", unit="step", dynamic_ncols=True, disable=None)
    window = {"t0": time.perf_counter(), "steps": 0, "wait": 0.0, "sums": {}}
    # The first step of a compiled model compiles it; a compiler failure there stops the
    # run with CompileError before any update (the optimizer steps after forward and backward).
    first_compiled_step = bool(args.compile)
    run.model.train()
    from tqdm.contrib.logging import logging_redirect_tqdm

    redirect = logging_redirect_tqdm([logging.getLogger("vatt_fast")]) if bar is not None else contextlib.nullcontext()
    try:
        redirect.__enter__()
        while run.step < stop_step:
            if _stop_requested(run):
                return _interrupt(run)
            try:
                batch, wait, state = batches.next()
            except StopIteration:
                raise RuntimeError("the training loader ended; it must be infinite in train mode") from None
            except Exception:
                if run.stop_signal is not None:  # workers killed by the same Ctrl-C
                    return _interrupt(run)
                raise
            if first_compiled_step:
                try:
                    values = _train_step(run, batch)
                except Exception as err:
                    failure = _compile_failure(err, args.compile_backend)
                    if failure is None:
                        raise
                    raise failure from err
                first_compiled_step = False
            else:
                values = _train_step(run, batch)
            run.step += 1
            run.loader_state = state
            window["steps"] += 1
            window["wait"] += wait
            if values is not None:
                run.last_loss = values["loss"]
                for k, v in values.items():
                    window["sums"][k] = window["sums"].get(k, 0.0) + v
                window["sums"]["_n"] = window["sums"].get("_n", 0) + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{run.last_loss:.4f}")
            if run.step % args.log_every == 0 or run.step == stop_step:
                _log_window(run, window, global_batch, flops_per_step, tokens)
                if bar is not None:
                    bar.set_postfix(loss=f"{run.last_loss:.4f}", clips_s=f"{run.history.get('last_clips_per_s', 0):.1f}")
                window = {"t0": time.perf_counter(), "steps": 0, "wait": 0.0, "sums": {}}
            if args.eval_every and run.step % args.eval_every == 0 and run.step < stop_step and run.eval_loader is not None:
                run.last_eval = _eval_and_log(run)
                window["t0"] = time.perf_counter()
            if args.save_every and run.step % args.save_every == 0 and run.step < stop_step:
                _save(run)
                window["t0"] = time.perf_counter()
    finally:
        redirect.__exit__(None, None, None)
        if bar is not None:
            bar.close()
    return "done"


def train_one_epoch(run: RunState, batches: _Batches) -> str:
    """Train one pass over the training split (``len(loader)`` steps, capped at ``--steps``)."""
    return train_steps(run, min(run.args.steps, run.step + len(run.train_loader)), batches)


def _log_window(run: RunState, window: Dict[str, Any], global_batch: int, flops_per_step: float, tokens: int) -> None:
    elapsed = max(time.perf_counter() - window["t0"], 1e-9)
    steps = window["steps"]
    clips_per_s = steps * global_batch / elapsed
    sums = window["sums"]
    n = sums.get("_n", 0)
    row: Dict[str, Any] = {"kind": "train", "step": run.step}
    for key in ("loss", "loss_vt", "loss_va", "grad_norm", "lr"):
        if key in sums and n:
            row[key] = sums[key] / n
    if "loss" not in row:
        row["loss"] = float("nan")
    row.update(
        clips_per_s=clips_per_s,
        tokens_per_s=clips_per_s * tokens,
        data_wait=window["wait"] / elapsed,
        mem_gb=_memory_gb(run.device),
        nonfinite_steps=run.nonfinite_steps,
    )
    if run.peak_flops:
        row["mfu"] = flops_per_step * steps / elapsed / (run.peak_flops * run.world_size)
    h = run.history
    # Run averages skip the first window (compilation, worker start-up) when there are others.
    prefix = "timed" if h.get("windows", 0) > 0 else "first"
    h[f"{prefix}_steps"] = h.get(f"{prefix}_steps", 0) + steps
    h[f"{prefix}_s"] = h.get(f"{prefix}_s", 0.0) + elapsed
    h[f"{prefix}_wait_s"] = h.get(f"{prefix}_wait_s", 0.0) + window["wait"]
    h["windows"] = h.get("windows", 0) + 1
    h["last_clips_per_s"] = clips_per_s
    run.log_row(row)
    if run.is_main:
        log.info(
            "step %d  loss %.4f  lr %.3g  %.1f clips/s  %.3g tokens/s  mfu %s  data-wait %.0f%%  mem %.2f GB",
            run.step, row["loss"], row.get("lr", float("nan")), clips_per_s, row["tokens_per_s"],
            f"{100 * row['mfu']:.1f}%" if "mfu" in row else "n/a", 100 * row["data_wait"], row["mem_gb"],
        )  # fmt: skip


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    precision: str = "fp32",
    shard_gather: bool = True,
) -> Dict[str, Dict[str, float]]:
    """Zero-shot retrieval (t2v, v2t, v2a) over one pass of an evaluation loader.

    The model runs in eval mode (no DropToken) inside ``torch.random.fork_rng``, so an
    evaluation never changes the training run's random stream. In a process group each
    rank embeds its shard and the embeddings are gathered (duplicates by record index
    dropped); with ``shard_gather=False`` every rank embeds the whole split itself.

    Args:
        model: a VATT model (or FSDP-sharded one; then every rank must call this).
        loader: evaluation loader (``train=False``) yielding the batch dict with ``index``.
        device: where to run.
        precision: ``"bf16"`` or ``"fp32"``.
        shard_gather: gather embeddings from all ranks.

    Returns:
        :func:`vatt_fast.metrics.clip_retrieval`'s dict (``t2v``, ``v2t``, ``v2a``, ``chance``).
    """
    was_training = model.training
    model.eval()
    keys = ("video_vt", "text_vt", "video_va", "audio_va")
    parts: Dict[str, List[torch.Tensor]] = {k: [] for k in keys + ("text_mask", "index")}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with _autocast(device, precision):
                out = model(batch)
            for k in keys:
                parts[k].append(out[k].float().cpu())
            parts["text_mask"].append(batch["text_mask"].cpu())
            parts["index"].append(batch["index"].cpu())
    model.train(was_training)
    local = {k: torch.cat(v) for k, v in parts.items()}
    if shard_gather and is_dist():
        gathered: List[Any] = [None] * get_world_size()
        dist.all_gather_object(gathered, local)
        local = {k: torch.cat([g[k] for g in gathered]) for k in local}
    order = torch.argsort(local["index"])
    idx = local["index"][order]
    keep = torch.ones_like(idx, dtype=torch.bool)
    keep[1:] = idx[1:] != idx[:-1]  # one row per record
    sel = order[keep]
    return clip_retrieval(
        local["video_vt"][sel], local["text_vt"][sel], local["text_mask"][sel], local["video_va"][sel], local["audio_va"][sel]
    )


def _eval_and_log(run: RunState) -> Dict[str, Dict[str, float]]:
    t0 = time.perf_counter()
    model = run.model if run.args.fsdp else run.raw_model
    results = evaluate(model, run.eval_loader, run.device, run.precision, shard_gather=not run.args.fsdp)
    row: Dict[str, Any] = {"kind": "eval", "step": run.step, "loss": run.last_loss}
    for task in ("t2v", "v2t", "v2a"):
        for metric in ("r1", "r5", "r10", "medr"):
            if task in results:
                row[f"{task}_{metric}"] = results[task][metric]
    row["chance_r1"] = results["chance"]["r1"]
    row["eval_s"] = time.perf_counter() - t0
    run.log_row(row)
    if run.is_main:
        log.info("step %d retrieval (%d clips, %.1fs):\n%s", run.step, round(1 / row["chance_r1"]), row["eval_s"],
                 format_retrieval_table(results))  # fmt: skip
    return results


def _save(run: RunState) -> Optional[Path]:
    meta = {
        "preset": run.config.name,
        "args": {k: v for k, v in vars(run.args).items() if k not in ("explicit",)},
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    state = {"schedule": run.schedule(), "nonfinite_steps": run.nonfinite_steps}
    path = save_checkpoint(run.run_dir / "checkpoints", run.step, run.raw_model if not run.args.fsdp else run.model,
                           run.optimizer, state, meta, keep=run.args.keep_checkpoints,
                           per_rank={"loader": run.loader_state})  # fmt: skip
    if run.is_main:
        log.info("saved checkpoint %s", path)
    return path


def _interrupt(run: RunState) -> str:
    name = signal.Signals(run.stop_signal).name if run.stop_signal else "a signal on another rank"
    if run.is_main:
        log.warning("got %s at step %d: saving a checkpoint and stopping", name, run.step)
    _save(run)
    if run.is_main:
        log.warning("stopped at step %d; continue with: python -m vatt_fast.train --resume auto --out %s", run.step, run.run_dir)
    return "interrupted"


# ---------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------
def _setup_logging(run_dir: Optional[Path]) -> None:
    root = logging.getLogger("vatt_fast")
    root.setLevel(logging.INFO if get_rank() == 0 else logging.WARNING)
    for h in list(root.handlers):
        if getattr(h, "_vatt_train", False):
            root.removeHandler(h)
            h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None and get_rank() == 0:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
        h._vatt_train = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.propagate = False


def _check_data(data: Path, split: str) -> None:
    """Fail early, naming the folder and the fix, when a dataset folder is unusable."""
    hint = (
        "pass --data DIR holding manifest.jsonl and vocab.txt (make one with `python -m vatt_fast.data.prepare` or "
        "`python -m vatt_fast.data.synthetic --out DIR`), or leave --data out for the built-in synthetic dataset"
    )
    if not data.exists():
        raise FileNotFoundError(f"--data {str(data)!r} does not exist; {hint}")
    if not data.is_dir():
        raise NotADirectoryError(f"--data {str(data)!r} is not a folder; {hint}")
    if not (data / "manifest.jsonl").is_file():
        raise FileNotFoundError(f"--data {str(data)!r} has no manifest.jsonl; {hint}")
    if not (data / "vocab.txt").is_file():
        raise FileNotFoundError(f"--data {str(data)!r} has no vocab.txt; {hint}")
    from vatt_fast.data.manifest import read_manifest

    if not read_manifest(data, split=split):
        raise ValueError(f"--data {str(data)!r}: manifest.jsonl has no records of split {split!r}; {hint}")


def _check_resume_config(ckpt: Path, meta: Dict[str, Any], config: VATTConfig) -> None:
    saved_preset = meta.get("preset")
    if saved_preset is not None and saved_preset != config.name:
        raise ValueError(
            f"checkpoint {str(ckpt)!r} was trained with --preset {saved_preset!r}, but this run uses --preset "
            f"{config.name!r}; pass --preset {saved_preset} (or leave --preset out when resuming), or start a new "
            f"run with a different --out"
        )
    from vatt_fast.checkpoint import WEIGHTS_NAME, read_weights_config

    saved = read_weights_config(ckpt / WEIGHTS_NAME)
    if saved is not None:
        mine, theirs = config.to_dict(), saved.to_dict()
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if k != "extra" and theirs.get(k) != v}
        if diff:
            raise ValueError(
                f"checkpoint {str(ckpt)!r} has a different model config: "
                + ", ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in sorted(diff.items()))
                + "; resume with the same preset, model overrides and dataset vocabulary"
            )


def _resolve_run(args: argparse.Namespace) -> Tuple[Optional[Path], Dict[str, Any]]:
    """Find the checkpoint to resume from (None for a fresh run) and fill resumed defaults."""
    ckpt: Optional[Path] = None
    meta: Dict[str, Any] = {}
    if args.resume == "auto":
        if args.out is None:
            raise ValueError("--resume auto needs --out RUN_DIR (the run folder to continue); or pass --resume PATH")
        ckpt = find_latest(args.out)
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
    if ckpt is not None:
        meta = read_meta(ckpt)
        saved_args = meta.get("args", {})
        for key in _RESUMED_ARGS:
            if key not in args.explicit and saved_args.get(key) is not None:
                setattr(args, key, saved_args[key])
        if not args.model and saved_args.get("model"):
            args.model = dict(saved_args["model"])
        if args.steps is None and saved_args.get("steps") is not None:
            args.steps = saved_args["steps"]
        if args.eval_every is None and saved_args.get("eval_every") is not None:
            args.eval_every = saved_args["eval_every"]
    return ckpt, meta


def _fill_defaults(args: argparse.Namespace, config: VATTConfig) -> None:
    if args.batch_size is None:
        args.batch_size = config.batch_size
    for key in ("lr", "end_lr", "warmup_steps", "weight_decay"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(config, key))
    if args.total_steps is None:
        args.total_steps = args.steps if args.steps is not None else config.total_steps
    if args.steps is None:
        args.steps = args.total_steps
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 4)
    for key in ("batch_size", "steps", "total_steps", "log_every"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    for key in ("warmup_steps", "eval_every", "save_every", "workers", "keep_checkpoints"):
        if getattr(args, key) < 0:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {getattr(args, key)}")
    if args.max_nonfinite < 1:
        raise ValueError(f"--max-nonfinite must be at least 1, got {args.max_nonfinite}")


def _pick_device(arg: str) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if arg == "cuda" or (arg == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch sees no CUDA device; use --device cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _init_distributed(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_dist():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")


def _broadcast(obj: Any) -> Any:
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _wrap_model(model: nn.Module, args: argparse.Namespace, device: torch.device, world: int) -> nn.Module:
    if world > 1:
        model = _sync_batchnorm(model, device)
    if args.fsdp:
        if world < 2:
            log.warning("--fsdp with a single process: nothing to shard, running unsharded")
            return model
        try:
            from torch.distributed.fsdp import fully_shard  # torch >= 2.6
        except ImportError:  # torch 2.4 / 2.5 ship FSDP2 under its composable name
            from torch.distributed._composable.fsdp import fully_shard

        from vatt_fast.nn.transformer import Block

        for module in model.modules():
            if isinstance(module, Block):
                fully_shard(module)
        fully_shard(model)
        return model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def _build_optimizer(model: nn.Module, args: argparse.Namespace, config: VATTConfig, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs: Dict[str, Any] = {"lr": args.lr, "betas": tuple(config.adam_betas), "eps": config.adam_eps}
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def _write_resolved_config(run_dir: Path, args: argparse.Namespace, config: VATTConfig) -> None:
    import yaml

    data = {k: v for k, v in vars(args).items() if k not in ("explicit", "model", "config")}
    data["model"] = {k: v for k, v in config.to_dict().items() if k != "extra"}
    text = yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False)
    (run_dir / "config.yaml").write_text(text)


def plot_curves(run_dir: Path) -> Optional[Path]:
    """Draw ``curves.png`` (training loss; retrieval R@1 and chance) from ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train" and r.get("loss") is not None]
    evals = [r for r in rows if r.get("kind") == "eval"]
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for key, label in (("loss", "total"), ("loss_vt", "video-text (MIL-NCE)"), ("loss_va", "video-audio (NCE)")):
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts), label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.set_title("training loss")
    for key, label in (("t2v_r1", "text->video R@1"), ("v2a_r1", "video->audio R@1"), ("chance_r1", "chance R@1")):
        pts = [(r["step"], 100 * r[key]) for r in evals if r.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts), marker="o", linestyle="--" if key == "chance_r1" else "-", label=label)
    ax2.set_xlabel("step")
    ax2.set_ylabel("%")
    ax2.set_title("zero-shot retrieval" if evals else "zero-shot retrieval (no evaluation yet)")
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    return out


def _write_summary(run: RunState, status: str, wall_s: float) -> Dict[str, Any]:
    h = run.history
    prefix = "timed" if h.get("timed_s") else "first"
    timed_s = h.get(f"{prefix}_s", 0.0)
    clips_per_s = run.args.batch_size * h.get(f"{prefix}_steps", 0) / timed_s if timed_s else float("nan")
    summary: Dict[str, Any] = {
        "status": status,
        "preset": run.config.name,
        "steps": run.step,
        "global_batch": run.args.batch_size,
        "world_size": run.world_size,
        "device": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu",
        "precision": run.precision,
        "clips_per_s": clips_per_s,
        "tokens_per_s": clips_per_s * tokens_per_clip(run.config, train=True)["total"],
        "mfu": (train_step_flops(run.config, run.args.batch_size) * clips_per_s / run.args.batch_size
                / (run.peak_flops * run.world_size)) if run.peak_flops else None,  # fmt: skip
        "peak_tflops": run.peak_flops / 1e12 if run.peak_flops else None,
        "data_wait": h[f"{prefix}_wait_s"] / timed_s if timed_s else None,
        "final_loss": run.last_loss,
        "nonfinite_steps": run.nonfinite_steps,
        "bad_data": dict(getattr(run.train_loader, "bad_data", {}) or {}),
        "wall_s": wall_s,
    }
    if run.last_eval is not None:
        r = run.last_eval
        for task in ("t2v", "v2t", "v2a"):
            if task in r:
                for metric in ("r1", "r5", "r10", "medr"):
                    summary[f"{task}_{metric}"] = r[task][metric]
        summary["chance_r1"] = r["chance"]["r1"]
        summary["chance_medr"] = r["chance"]["medr"]
        summary["eval_clips"] = int(r["chance"]["candidates"])
    summary = json.loads(json.dumps(summary, default=str).replace("NaN", "null"))
    (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train as the command line says and return the run summary (also in ``summary.json``).

    Every check on the arguments, the data and the checkpoint happens before the
    model is built, so a bad input fails in seconds with a message naming the value
    and the fix.
    """
    t_start = time.perf_counter()
    args = parse_args(argv)
    ckpt, _ = _resolve_run(args)
    if args.preset is None:
        args.preset = "tiny"
    # --- data folder (fail before any expensive work) ----------------------------------
    data_given = args.data is not None
    if data_given:
        data_dir = Path(args.data).expanduser()
        _check_data(data_dir, "train")
    # --- model config and run arguments ------------------------------------------------
    from vatt_fast.data.vocab import Vocabulary

    device = _pick_device(args.device)
    _init_distributed(device)
    world = get_world_size()
    if not data_given:
        from vatt_fast.data.synthetic import ensure_synthetic

        data_dir = Path(ensure_synthetic()) if get_rank() == 0 else None
        data_dir = Path(_broadcast(str(data_dir) if data_dir else None))
        args.data = str(data_dir)
    vocab_size = len(Vocabulary.load(data_dir / "vocab.txt"))
    config = get_config(args.preset, **{**args.model, "vocab_size": vocab_size})
    _fill_defaults(args, config)
    if args.batch_size % world:
        raise ValueError(
            f"--batch-size {args.batch_size} (global) is not divisible by the world size {world}; pass a multiple of "
            f"{world}, e.g. --batch-size {max(world, args.batch_size // world * world)}"
        )
    if ckpt is not None:
        _check_resume_config(ckpt, read_meta(ckpt), config)
        saved_world = int(read_meta(ckpt).get("world_size", 1))
        if saved_world != world:
            raise ValueError(
                f"checkpoint {str(ckpt)!r} was written by {saved_world} rank(s) but this run has {world}; each rank's "
                f"data position and RNG state belong to its shard, so resume with {saved_world} process(es) (torchrun "
                f"--nproc_per_node/--nnodes), or start a new run from its weights"
            )
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda" and precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # --- run folder --------------------------------------------------------------------
    if args.out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = _broadcast(str(Path("runs") / f"{args.preset}-{stamp}"))
    run_dir = Path(args.out)
    if get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    if is_dist():
        dist.barrier()
    _setup_logging(run_dir)
    if ckpt is None and args.resume == "auto":
        log.info("--resume auto: no checkpoint in %s, starting a fresh run", run_dir)
    log.info("preset %s on %s (%s, world size %d), data %s, run folder %s", config.name, device, precision, world,
             data_dir, run_dir)  # fmt: skip
    # --- model, loss, optimizer --------------------------------------------------------
    from vatt_fast.data.loader import build_loader, resolve_backend
    from vatt_fast.models.vatt import VATT
    from vatt_fast.nn.losses import VATTLoss

    torch.manual_seed(args.seed)
    raw_model = VATT(config)
    raw_model.set_attention_backend(args.attention)
    raw_model.set_kernel_impl(args.kernels)
    raw_model.set_grad_checkpointing(args.activation_checkpointing)
    raw_model.to(device)
    model = _wrap_model(raw_model, args, device, world)
    if args.fsdp and world > 1:
        raw_model = model
    optimizer = _build_optimizer(model, args, config, device)
    if args.compile:
        model.compile(backend=args.compile_backend)
    loss_fn = VATTLoss(tau=config.tau, impl=args.kernels)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    if peak is None and device.type == "cpu":
        peak = measure_cpu_peak()
    # --- data --------------------------------------------------------------------------
    per_rank = args.batch_size // world
    backend = resolve_backend(args.loader)
    # DALI decodes on the GPU straight into device memory; PyAV batches come pinned and are
    # copied by _Batches on a side stream, one batch ahead.
    loader_device = device if backend == "dali" and device.type == "cuda" else None
    loader_kw = dict(preset=config, backend=backend, num_workers=args.workers, seed=args.seed, device=loader_device)
    train_loader = build_loader(data_dir, "train", per_rank, train=True, drop_last=True, **loader_kw)
    eval_loader = None
    try:
        from vatt_fast.data.manifest import read_manifest

        if read_manifest(data_dir, split=args.eval_split):
            rank_kw = {"rank": 0, "world_size": 1} if args.fsdp else {}
            eval_loader = build_loader(data_dir, args.eval_split, args.eval_batch_size or per_rank, train=False,
                                       drop_last=False, **rank_kw, **loader_kw)  # fmt: skip
        else:
            log.warning("no %r split in %s: skipping retrieval evaluation (set --eval-split)", args.eval_split, data_dir)
    except ValueError as e:
        log.warning("no evaluation loader: %s", e)
    run = RunState(args=args, config=config, model=model, raw_model=raw_model, loss_fn=loss_fn, optimizer=optimizer,
                   device=device, precision=precision, world_size=world, run_dir=run_dir, train_loader=train_loader,
                   eval_loader=eval_loader, peak_flops=peak)  # fmt: skip
    # --- resume ------------------------------------------------------------------------
    rng = None
    if ckpt is not None:
        state = load_checkpoint(ckpt, raw_model if not args.fsdp else model, optimizer)
        run.step = int(state["step"])
        run.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        sched = state.get("schedule") or {}
        for key in ("lr", "end_lr", "warmup_steps", "total_steps"):
            if key not in args.explicit and key in sched:
                setattr(args, key, sched[key])
        loader_state = state["per_rank"][get_rank()].get("loader")
        if loader_state is not None:
            train_loader.load_state_dict(loader_state)
        run.loader_state = loader_state
        rng = state["rng"][get_rank()]
        log.info("resumed from %s at step %d", ckpt, run.step)
        if args.steps > args.total_steps:
            log.warning("--steps %d goes past the checkpoint's %d-step schedule: the learning rate stays at "
                        "--end-lr %g after step %d; pass --total-steps to stretch the schedule",
                        args.steps, args.total_steps, args.end_lr, args.total_steps)
    if get_rank() == 0:
        _write_resolved_config(run_dir, args, config)
        if (data_dir / "vocab.txt").is_file():
            shutil.copyfile(data_dir / "vocab.txt", run_dir / "vocab.txt")
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(run_dir / "tensorboard"))
        run.metrics_file = open(run_dir / "metrics.jsonl", "a")
    # --- signals -----------------------------------------------------------------------
    previous = {}

    def _on_signal(signum: int, frame: Any) -> None:
        run.stop_signal = signum
        signal.signal(signum, previous.get(signum, signal.SIG_DFL))  # a second signal acts at once

    if threading_is_main():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, _on_signal)
    status = "done"
    try:
        batches = _Batches(train_loader, device)
        if rng is not None:
            set_rng_state(rng)
        if run.step < args.steps:
            log.info("training steps %d..%d of %d (global batch %d, %d per rank), lr %.3g -> %.3g, warmup %d, "
                     "schedule %d steps", run.step + 1, args.steps, args.steps, args.batch_size, per_rank, args.lr,
                     args.end_lr, args.warmup_steps, args.total_steps)  # fmt: skip
            status = train_steps(run, args.steps, batches)
        else:
            log.info("already at step %d >= --steps %d: nothing to train", run.step, args.steps)
        if status == "done":
            if ckpt is None or run.step > int(read_meta(ckpt).get("step", -1)):
                _save(run)
            if eval_loader is not None:
                run.last_eval = _eval_and_log(run)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        train_loader.close() if hasattr(train_loader, "close") else None
        if eval_loader is not None and hasattr(eval_loader, "close"):
            eval_loader.close()
    summary: Dict[str, Any] = {}
    if get_rank() == 0:
        run.metrics_file.close()
        run.writer.close()
        summary = _write_summary(run, status, time.perf_counter() - t_start)
        plot_curves(run_dir)
        if run.last_eval is not None:
            print(f"\nZero-shot retrieval on the {args.eval_split!r} split after {run.step} steps "
                  f"({summary.get('eval_clips', '?')} clips; R@K in %):")  # fmt: skip
            print(format_retrieval_table(run.last_eval))
        speed = f", {summary['clips_per_s']:.1f} clips/s" if summary.get("clips_per_s") else ""
        print(f"run folder: {run_dir}  ({summary['wall_s']:.0f} s{speed})")
    if is_dist():
        dist.barrier()
    return summary


def threading_is_main() -> bool:
    """Whether we run on the main thread (signal handlers can only be installed there)."""
    import threading

    return threading.current_thread() is threading.main_thread()


def cli() -> None:
    """Console entry point ``vatt-train``: errors become one line and exit status 1."""
    try:
        main()
    except (ValueError, FileNotFoundError, NotADirectoryError, ImportError, RuntimeError) as e:
        logging.getLogger("vatt_fast").error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if is_dist():
            dist.destroy_process_group()


if __name__ == "__main__":
    cli()
