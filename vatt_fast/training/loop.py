"""The step loop: run state, one optimizer step, training with logging/evaluation/checkpoints, evaluation.

:func:`train_steps` trains from ``run.step`` to a stop step; every ``--log-every`` steps it
logs a :class:`MetricsWindow` (loss terms, clips/s, tokens/s, MFU, data wait, memory),
every ``--eval-every`` steps it evaluates retrieval, every ``--save-every`` steps it
checkpoints, and on SIGTERM/SIGINT (see :class:`StopSignals`) it saves and returns.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch._dynamo.exc import TorchDynamoException
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vatt_fast.checkpoint import save_checkpoint
from vatt_fast.distributed import get_rank, get_world_size, is_dist
from vatt_fast.flops import tokens_per_clip, train_step_flops
from vatt_fast.metrics import clip_retrieval, format_retrieval_table
from vatt_fast.models.config import VATTConfig
from vatt_fast.training.precision import autocast, memory_gb
from vatt_fast.training.run_folder import MetricsLog
from vatt_fast.training.schedule import LRSchedule

try:
    from torch._inductor.exc import InductorError
except ImportError:  # torch < 2.7 wraps Inductor's errors in BackendCompilerFailed (a TorchDynamoException)
    InductorError = TorchDynamoException

__all__ = [
    "CompileError",
    "DeviceBatches",
    "MetricsWindow",
    "NonFiniteLossError",
    "RunState",
    "StopSignals",
    "closing_loaders",
    "compile_failure",
    "evaluate",
    "evaluate_and_log",
    "save",
    "train_one_epoch",
    "train_step",
    "train_steps",
]

log = logging.getLogger("vatt_fast.train")


class NonFiniteLossError(RuntimeError):
    """Raised when the loss stays NaN/inf for ``--max-nonfinite`` consecutive steps."""


class CompileError(RuntimeError):
    """Raised when ``--compile`` fails on the first step, before any update is made."""


def compile_failure(err: BaseException, backend: str) -> Optional[CompileError]:
    """A :class:`CompileError` naming torch's version and the workarounds, if ``err`` came from torch.compile."""
    if not isinstance(err, (TorchDynamoException, InductorError)):
        return None
    cause = getattr(err, "inner_exception", None) or err  # BackendCompilerFailed wraps the compiler's error
    first = next((line for line in str(cause).splitlines() if line.strip()), "")
    return CompileError(
        f"torch.compile (--compile-backend {backend}) failed while compiling the first training step with torch "
        f"{torch.__version__}: {type(err).__name__} ({type(cause).__name__}: {first[:500]}). Nothing was trained or "
        f"saved. Workarounds: run without --compile (eager is the reference path), or --compile --compile-backend "
        f"aot_eager (traces forward and backward without Inductor's code generation), or another torch release. To "
        f"report it, rerun with TORCHDYNAMO_REPRO_AFTER=aot to write a minimal repro."
    )


@dataclass
class RunState:
    """What the training functions share: model, optimizer, data, counters and outputs."""

    args: argparse.Namespace
    config: VATTConfig
    model: nn.Module  # what forward is called on (DDP / FSDP / compiled)
    raw_model: nn.Module  # the VATT module (state dicts, evaluation); the sharded one under FSDP
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
    metrics: Optional[MetricsLog] = None
    peak_flops: Optional[float] = None
    stop_signal: Optional[int] = None
    last_loss: float = float("nan")
    history: Dict[str, float] = field(default_factory=dict)  # run totals for the summary (see MetricsWindow.close)
    last_eval: Optional[Dict[str, Dict[str, float]]] = None
    # Hooks for runs that train something else on the same loop (vatt_fast.finetune); None: VATT pretraining.
    forward_loss: Optional[Callable[["RunState", Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None
    clip_grads: Optional[Callable[["RunState"], torch.Tensor]] = None  # clips, returns the global gradient norm
    eval_fn: Optional[Callable[["RunState"], Any]] = None  # periodic evaluation (default: retrieval)
    flops_per_clip: Optional[float] = None  # training FLOPs per clip (default: VATT's, from the config)
    tokens_per_clip: Optional[int] = None  # tokens per training clip (default: VATT's, from the config)
    extra_meta: Dict[str, Any] = field(default_factory=dict)  # added to every checkpoint's meta.json
    command: str = "python -m vatt_fast.train"  # named in the messages on how to continue a run
    # bf16 copies of the Linear weights the forward runs on (--bf16-weights; training.compute_weights)
    compute_weights: Optional[Any] = None

    @property
    def is_main(self) -> bool:
        return get_rank() == 0

    def step_flops(self) -> float:
        """Model FLOPs of one training step over the global batch."""
        if self.flops_per_clip is not None:
            return self.flops_per_clip * self.args.batch_size
        return float(train_step_flops(self.config, self.args.batch_size))

    def clip_tokens(self) -> int:
        """Tokens the model sees per training clip."""
        if self.tokens_per_clip is not None:
            return self.tokens_per_clip
        return tokens_per_clip(self.config, train=True)["total"]

    @property
    def schedule(self) -> LRSchedule:
        a = self.args
        return LRSchedule(a.lr, a.end_lr, a.warmup_steps, a.total_steps)

    def log_row(self, row: Dict[str, Any]) -> None:
        """Append a row to metrics.jsonl and TensorBoard (rank 0 only)."""
        if self.is_main and self.metrics is not None:
            self.metrics.write(row)


class DeviceBatches:
    """Iterate a loader, moving batches to the device (non-blocking, a side stream on CUDA,
    one batch ahead), timing the wait for data and tracking the loader position per batch."""

    def __init__(self, loader: Any, device: torch.device) -> None:
        self.loader = loader
        self.device = device
        self.it = iter(loader)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ahead = self._fetch() if self.stream is not None else None

    def _fetch(self) -> Tuple[Dict[str, torch.Tensor], float, Dict[str, Any]]:
        t0 = time.perf_counter()
        batch = next(self.it)
        state = self.loader.state_dict()
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
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


def train_step(run: RunState, batch: Dict[str, torch.Tensor]) -> Optional[Dict[str, float]]:
    """One optimizer step; returns the loss terms, or None when the loss was not finite (step skipped)."""
    lr = run.schedule(run.step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if run.forward_loss is not None:
        losses = run.forward_loss(run, batch)
    else:
        with autocast(run.device, run.precision):
            out = run.model(batch) if run.compute_weights is None else run.compute_weights(batch)
        losses = run.loss_fn({**out, "text_mask": batch["text_mask"]})
    loss = losses["loss"]
    # DDP/FSDP average gradients over ranks; the loss gives each rank the single-process
    # gradient of its rows, so scale by the world size to get the global-batch gradient.
    (loss * run.world_size if run.world_size > 1 else loss).backward()
    if run.compute_weights is not None:
        run.compute_weights.grads_to_params()  # bf16 copies' gradients -> fp32 .grad, one multi-tensor copy
    # The global gradient norm (clipped to --grad-clip when set); logged, and a check on
    # distributed runs: it must equal one process's on the same global batch.
    if run.clip_grads is not None:
        grad_norm = run.clip_grads(run)
    else:
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
    if run.compute_weights is not None:
        run.compute_weights.refresh()  # updated fp32 weights -> bf16 copies, one multi-tensor copy
    return {**dict(zip(keys, values)), "lr": lr}


class MetricsWindow:
    """Averages of the step values and timings since the last log row."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.steps = 0
        self.wait = 0.0
        self.updates = 0  # steps with a finite loss (their values are averaged)
        self.sums: Dict[str, float] = {}

    def add(self, values: Optional[Dict[str, float]], wait: float) -> None:
        self.steps += 1
        self.wait += wait
        if values is not None:
            self.updates += 1
            for k, v in values.items():
                self.sums[k] = self.sums.get(k, 0.0) + v

    def pause_clock(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation, a checkpoint) out of the throughput."""
        self.t0 += seconds

    def close(self, run: RunState, global_batch: int, flops_per_step: float, tokens: int) -> Dict[str, Any]:
        """Log this window as a ``train`` row, add it to the run totals, and return the row."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        clips_per_s = self.steps * global_batch / elapsed
        row: Dict[str, Any] = {"kind": "train", "step": run.step}
        for key in ("loss", "loss_vt", "loss_va", "grad_norm", "lr"):
            if key in self.sums and self.updates:
                row[key] = self.sums[key] / self.updates
        row.setdefault("loss", float("nan"))
        row.update(
            clips_per_s=clips_per_s,
            tokens_per_s=clips_per_s * tokens,
            data_wait=self.wait / elapsed,
            mem_gb=memory_gb(run.device),
            nonfinite_steps=run.nonfinite_steps,
        )
        if run.peak_flops:
            row["mfu"] = flops_per_step * self.steps / elapsed / (run.peak_flops * run.world_size)
        h = run.history
        # Run averages skip the first window (compilation, worker start-up) when there are others.
        prefix = "timed" if h.get("windows", 0) > 0 else "first"
        h[f"{prefix}_steps"] = h.get(f"{prefix}_steps", 0) + self.steps
        h[f"{prefix}_s"] = h.get(f"{prefix}_s", 0.0) + elapsed
        h[f"{prefix}_wait_s"] = h.get(f"{prefix}_wait_s", 0.0) + self.wait
        h["windows"] = h.get("windows", 0) + 1
        h["last_clips_per_s"] = clips_per_s
        run.log_row(row)
        if run.is_main:
            log.info(
                "step %d  loss %.4f  lr %.3g  %.1f clips/s  %.3g tokens/s  mfu %s  data-wait %.0f%%  mem %.2f GB",
                run.step, row["loss"], row.get("lr", float("nan")), clips_per_s, row["tokens_per_s"],
                f"{100 * row['mfu']:.1f}%" if "mfu" in row else "n/a", 100 * row["data_wait"], row["mem_gb"],
            )  # fmt: skip
        return row


def _stop_requested(run: RunState) -> bool:
    """Whether any rank got SIGTERM/SIGINT (all ranks agree, so they stop at the same step)."""
    flag = 1.0 if run.stop_signal is not None else 0.0
    if run.world_size > 1:
        t = torch.tensor([flag], device=run.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = float(t.item())
    return flag > 0


def _first_step(run: RunState, batch: Dict[str, torch.Tensor]) -> Optional[Dict[str, float]]:
    """The first step of a compiled model compiles it: a compiler failure there becomes a
    :class:`CompileError` before any update (the optimizer steps after forward and backward)."""
    try:
        return train_step(run, batch)
    except Exception as err:
        failure = compile_failure(err, run.args.compile_backend)
        if failure is None:
            raise
        raise failure from err


def train_steps(run: RunState, stop_step: int, batches: DeviceBatches) -> str:
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
    flops_per_step = run.step_flops()
    tokens = run.clip_tokens()
    show_bar = run.is_main and not args.no_progress
    bar = tqdm(total=stop_step, initial=run.step, desc="train", unit="step", dynamic_ncols=True, disable=None) if show_bar else None
    step_fn = _first_step if args.compile else train_step
    window = MetricsWindow()
    run.model.train()
    redirect = logging_redirect_tqdm([logging.getLogger("vatt_fast")]) if bar is not None else contextlib.nullcontext()
    with redirect, (bar if bar is not None else contextlib.nullcontext()):
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
            values = step_fn(run, batch)
            step_fn = train_step
            run.step += 1
            run.loader_state = state
            window.add(values, wait)
            if values is not None:
                run.last_loss = values["loss"]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{run.last_loss:.4f}")
            if run.step % args.log_every == 0 or run.step == stop_step:
                window.close(run, args.batch_size, flops_per_step, tokens)
                if bar is not None:
                    bar.set_postfix(loss=f"{run.last_loss:.4f}", clips_s=f"{run.history.get('last_clips_per_s', 0):.1f}")
                window = MetricsWindow()
            t_pause = time.perf_counter()
            if args.eval_every and run.step % args.eval_every == 0 and run.step < stop_step and run.eval_loader is not None:
                run.last_eval = (run.eval_fn or evaluate_and_log)(run)
            if args.save_every and run.step % args.save_every == 0 and run.step < stop_step:
                save(run)
            window.pause_clock(time.perf_counter() - t_pause)
    return "done"


def train_one_epoch(run: RunState, batches: DeviceBatches) -> str:
    """Train one pass over the training split (``len(loader)`` steps, capped at ``--steps``)."""
    return train_steps(run, min(run.args.steps, run.step + len(run.train_loader)), batches)


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
            with autocast(device, precision):
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


def evaluate_and_log(run: RunState) -> Dict[str, Dict[str, float]]:
    """:func:`evaluate` on the run's evaluation loader, logged as an ``eval`` row and a table."""
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


def save(run: RunState) -> Optional[Path]:
    """Checkpoint the run at ``run.step`` (every rank calls it; rank 0 writes)."""
    meta = {
        "preset": run.config.name,
        "args": {k: v for k, v in vars(run.args).items() if k != "explicit"},
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        **run.extra_meta,
    }
    state = {"schedule": run.schedule.as_dict(), "nonfinite_steps": run.nonfinite_steps}
    path = save_checkpoint(run.run_dir / "checkpoints", run.step, run.raw_model, run.optimizer, state, meta,
                           keep=run.args.keep_checkpoints, per_rank={"loader": run.loader_state})  # fmt: skip
    if run.is_main:
        log.info("saved checkpoint %s", path)
    return path


def _interrupt(run: RunState) -> str:
    name = signal.Signals(run.stop_signal).name if run.stop_signal else "a signal on another rank"
    if run.is_main:
        log.warning("got %s at step %d: saving a checkpoint and stopping", name, run.step)
    save(run)
    if run.is_main:
        log.warning("stopped at step %d; continue with: %s --resume auto --out %s", run.step, run.command, run.run_dir)
    return "interrupted"


class StopSignals:
    """While active, SIGTERM and SIGINT set ``run.stop_signal`` (the loop then saves and stops);
    a second signal acts at once. Handlers are installed only on the main thread."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, run: RunState) -> None:
        self.run = run
        self.previous: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.run.stop_signal = signum
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()


@contextlib.contextmanager
def closing_loaders(*loaders: Any) -> Iterator[None]:
    """Close every loader (its workers or DALI pipelines) when the block ends, however it ends."""
    try:
        yield
    finally:
        for loader in loaders:
            if loader is not None and hasattr(loader, "close"):
                loader.close()
