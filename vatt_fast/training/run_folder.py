"""The run folder: logging, resolved config, metrics (JSONL + TensorBoard), summary, curves.

A run folder holds ``config.yaml`` (resolved arguments and model config), ``metrics.jsonl``
(one row per log step and per evaluation, each with ``kind``, ``step`` and ``loss``),
``tensorboard/``, ``checkpoints/step-*`` (:mod:`vatt_fast.checkpoint`), ``curves.png``,
``summary.json``, ``train.log`` and a copy of the dataset's ``vocab.txt``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import yaml

from vatt_fast.distributed import broadcast_object, get_rank, is_dist
from vatt_fast.io import atomic_write
from vatt_fast.models.config import VATTConfig

if TYPE_CHECKING:
    from vatt_fast.training.loop import RunState

__all__ = [
    "MetricsLog",
    "finite_or_none",
    "make_run_dir",
    "plot_curves",
    "setup_logging",
    "write_json",
    "write_resolved_config",
    "write_summary",
]

log = logging.getLogger("vatt_fast.train")


def finite_or_none(obj: Any) -> Any:
    """``obj`` made strict JSON: NaN/inf floats become None (nested dicts and lists too), other
    values that JSON cannot hold become their ``str``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def write_json(path: Path, data: Dict[str, Any]) -> Dict[str, Any]:
    """Write ``data`` as strict, indented JSON, atomically; returns what was written."""
    clean = finite_or_none(data)
    atomic_write(path, json.dumps(clean, indent=2))
    return clean


def make_run_dir(args: argparse.Namespace) -> Path:
    """The run folder ``--out`` (default ``runs/<preset>-<date>-<time>``, the same on every rank), created by rank 0."""
    if args.out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = broadcast_object(str(Path("runs") / f"{args.preset}-{stamp}"))
    run_dir = Path(args.out)
    if get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    if is_dist():
        dist.barrier()
    return run_dir


def setup_logging(run_dir: Optional[Path]) -> None:
    """Log ``vatt_fast.*`` to stderr (INFO on rank 0, WARNING elsewhere) and to ``train.log`` on rank 0."""
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


def write_resolved_config(run_dir: Path, args: argparse.Namespace, config: VATTConfig, data_dir: Path) -> None:
    """``config.yaml`` (every argument plus the model config: itself a valid ``--config``) and ``vocab.txt``."""
    data = {k: v for k, v in vars(args).items() if k not in ("explicit", "model", "config")}
    data["model"] = {k: v for k, v in config.to_dict().items() if k != "extra"}
    atomic_write(run_dir / "config.yaml", yaml.safe_dump(finite_or_none(data), sort_keys=False))
    if (data_dir / "vocab.txt").is_file():
        shutil.copyfile(data_dir / "vocab.txt", run_dir / "vocab.txt")


class MetricsLog:
    """Rows to ``metrics.jsonl`` (strict JSON: NaN/inf become null) and TensorBoard scalars.

    Only rank 0 writes; on other ranks every method is a no-op. Scalars go to TensorBoard
    as ``<kind>/<key>`` (``train/loss``, ``eval/t2v_r1``).
    """

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.file = None
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            self.file = open(run_dir / "metrics.jsonl", "a")

    def write(self, row: Dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(finite_or_none(row)) + "\n")
        self.file.flush()
        for key, value in row.items():
            if key not in ("step", "kind") and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key if "/" in key else f"{row.get('kind', 'train')}/{key}", value, row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.writer.close()
            self.file = self.writer = None


RETRIEVAL_CURVES = (("t2v_r1", "text->video R@1"), ("v2a_r1", "video->audio R@1"), ("chance_r1", "chance R@1"))


def plot_curves(
    run_dir: Path,
    eval_curves: Sequence[Tuple[str, str]] = RETRIEVAL_CURVES,
    eval_title: str = "zero-shot retrieval",
) -> Optional[Path]:
    """Draw ``curves.png`` from ``metrics.jsonl``: the training loss, and the ``eval`` rows' ``eval_curves``
    (``(key, label)`` pairs, fractions drawn in %; a ``chance_*`` key dashed) under ``eval_title``."""
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
    for key, label in eval_curves:
        pts = [(r["step"], 100 * r[key]) for r in evals if r.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts), marker="o", linestyle="--" if key.startswith("chance") else "-", label=label)
    ax2.set_xlabel("step")
    ax2.set_ylabel("%")
    ax2.set_title(eval_title if evals else f"{eval_title} (no evaluation yet)")
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    return out


def write_summary(run: "RunState", status: str, wall_s: float, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``summary.json``: throughput, MFU and data wait over the timed windows (the first, with
    compilation and worker start-up, left out when there are others), the last evaluation,
    bad-data counts, then ``extra``; returns what was written (NaN as None)."""
    h = run.history
    prefix = "timed" if h.get("timed_s") else "first"
    timed_s = h.get(f"{prefix}_s", 0.0)
    batch = run.args.batch_size
    clips_per_s = batch * h.get(f"{prefix}_steps", 0) / timed_s if timed_s else float("nan")
    summary: Dict[str, Any] = {
        "status": status,
        "preset": run.config.name,
        "steps": run.step,
        "global_batch": batch,
        "world_size": run.world_size,
        "device": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu",
        "precision": run.precision,
        "clips_per_s": clips_per_s,
        "tokens_per_s": clips_per_s * run.clip_tokens(),
        "mfu": (run.step_flops() * clips_per_s / batch / (run.peak_flops * run.world_size))
        if run.peak_flops else None,  # fmt: skip
        "peak_tflops": run.peak_flops / 1e12 if run.peak_flops else None,
        "data_wait": h[f"{prefix}_wait_s"] / timed_s if timed_s else None,
        "final_loss": run.last_loss,
        "nonfinite_steps": run.nonfinite_steps,
        "bad_data": dict(getattr(run.train_loader, "bad_data", {}) or {}),
        "wall_s": wall_s,
    }
    if run.last_eval is not None and "chance" in run.last_eval:  # retrieval (other runs pass theirs in extra)
        r = run.last_eval
        for task in ("t2v", "v2t", "v2a"):
            if task in r:
                for metric in ("r1", "r5", "r10", "medr"):
                    summary[f"{task}_{metric}"] = r[task][metric]
        summary["chance_r1"] = r["chance"]["r1"]
        summary["chance_medr"] = r["chance"]["medr"]
        summary["eval_clips"] = int(r["chance"]["candidates"])
    summary.update(extra or {})
    return write_json(run.run_dir / "summary.json", summary)
