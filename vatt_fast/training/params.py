"""The trainer's flags: one table, the parser built from it, ``--config`` files and preset defaults.

Every flag is declared once in :data:`FLAGS`. The parser, the validation of
``--config`` file keys (type and choices) and the detection of which flags a user set
(a resumed run takes the others from its checkpoint) are all read off that table.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from vatt_fast.data.loader import LOADERS
from vatt_fast.kernels import IMPLS as KERNELS
from vatt_fast.kernels._dispatch import default_impl
from vatt_fast.models.config import VATTConfig, list_presets
from vatt_fast.nn.attention import BACKENDS as ATTENTION
from vatt_fast.training.compute_weights import COMPUTE_WEIGHTS
from vatt_fast.training.setup import COMPILE_MODES

__all__ = [
    "ATTENTION",
    "DEVICES",
    "FLAGS",
    "Flag",
    "KERNELS",
    "LOADERS",
    "PRECISIONS",
    "build_parser",
    "fill_defaults",
    "load_config_file",
    "parse_args",
]

PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Flag:
    """One command-line flag: its ``--name`` and the keyword arguments of ``add_argument``."""

    name: str
    kwargs: Dict[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.name[2:].replace("-", "_")


def _flag(name: str, **kwargs: Any) -> Flag:
    return Flag(name, kwargs)


FLAGS: Tuple[Flag, ...] = (
    _flag("--preset", default=None, choices=list_presets(), help="model preset (default: tiny, or the checkpoint's when resuming)"),
    _flag("--data", default=None, help="dataset folder (manifest.jsonl + vocab.txt); default: the built-in synthetic dataset"),
    _flag("--out", default=None, help="run folder (default: runs/<preset>-<date>-<time>)"),
    _flag("--batch-size", type=int, default=None, help="GLOBAL batch size (split evenly over ranks); default: the preset's"),
    _flag("--steps", type=int, default=None, help="total optimizer steps of the run (a resumed run continues up to it); "
          "default: --total-steps"),
    _flag("--total-steps", type=int, default=None, help="length of the learning-rate schedule; default: --steps if given, "
          "else the preset's"),
    _flag("--lr", type=float, default=None, help="peak learning rate (after warmup); default: the preset's"),
    _flag("--end-lr", type=float, default=None, help="learning rate at the end of the half-cosine; default: the preset's"),
    _flag("--warmup-steps", type=int, default=None, help="linear warmup steps from 0 to --lr; default: the preset's"),
    _flag("--weight-decay", type=float, default=None, help="decoupled (AdamW) weight decay on matrices; default: the "
          "preset's (0)"),
    _flag("--grad-clip", type=float, default=0.0, help="clip the global gradient norm to this value (0: off, as VATT)"),
    _flag("--precision", default="auto", choices=PRECISIONS, help="auto: bf16 autocast on CUDA, fp32 on CPU"),
    _flag("--bf16-weights", default="auto", choices=COMPUTE_WEIGHTS, help="bf16 copies of the Linear weights, "
          "refreshed once per optimizer step, instead of autocast's casts in every forward and backward (same "
          "arithmetic, fewer kernels). auto: on for a single-process bf16 run without activation checkpointing; off: "
          "plain autocast"),
    _flag("--device", default="auto", choices=DEVICES, help="auto: CUDA when available (cuda:LOCAL_RANK under torchrun)"),
    _flag("--compile", action="store_true", help="torch.compile the model"),
    _flag("--compile-scope", default="model", choices=("model", "blocks"), help="with --compile: the whole model "
          "(one graph per forward) or each Transformer block on its own (regional: one short compile reused by every "
          "block of a shape; the glue between blocks runs eagerly)"),
    _flag("--compile-mode", default="default", choices=COMPILE_MODES, help="with --compile and Inductor: its mode "
          "(reduce-overhead: CUDA graphs; max-autotune: tuned kernels, a longer compile)"),
    _flag("--compile-backend", default="inductor", help="torch.compile backend with --compile (inductor; aot_eager or "
          "eager to debug a compile problem)"),
    _flag("--activation-checkpointing", action="store_true", help="recompute each Transformer block in backward"),
    _flag("--kernels", default=None, choices=KERNELS, help="fused-kernel implementation (auto: Triton on CUDA); "
          "default: $VATT_FAST_KERNELS, else auto"),
    _flag("--attention", default="auto", choices=ATTENTION, help="attention backend"),
    _flag("--loader", default="auto", choices=LOADERS, help="data loader (auto: DALI on CUDA when installed, else PyAV)"),
    _flag("--workers", type=int, default=2, help="loader worker processes per rank"),
    _flag("--seed", type=int, default=0, help="random seed (model init, DropToken, data order)"),
    _flag("--resume", default=None, help="checkpoint folder to continue from, or 'auto' for the latest in --out "
          "(starts fresh when there is none)"),
    _flag("--eval-every", type=int, default=None, help="evaluate retrieval every N steps (0: only at the end); "
          "default: a quarter of the run"),
    _flag("--eval-split", default="val", help="manifest split used for evaluation"),
    _flag("--eval-batch-size", type=int, default=None, help="per-rank evaluation batch size (default: the per-rank "
          "training batch)"),
    _flag("--log-every", type=int, default=10, help="log metrics every N steps"),
    _flag("--save-every", type=int, default=1000, help="checkpoint every N steps (and always at the end and on "
          "SIGTERM/SIGINT)"),
    _flag("--keep-checkpoints", type=int, default=3, help="checkpoints to keep (0: all)"),
    _flag("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state with FSDP2 "
          "(fully_shard) instead of DDP; for the large presets"),
    _flag("--max-nonfinite", type=int, default=10, help="stop after this many consecutive steps with a NaN/inf loss"),
    _flag("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device for MFU (default: data-sheet figure "
          "for known GPUs; on CPU the measured rate of a large fp32 matmul)"),
    _flag("--no-progress", action="store_true", help="no progress bar"),
)  # fmt: skip
_BY_DEST = {f.dest: f for f in FLAGS}


_PROG = "python -m vatt_fast.train"
_DESCRIPTION = (
    "Train VATT (video-audio-text Transformers) with contrastive losses. "
    "No arguments: the tiny preset on the built-in synthetic dataset, ending with a retrieval score."
)


def build_parser(
    suppress_defaults: bool = False,
    flags: Sequence[Flag] = FLAGS,
    prog: str = _PROG,
    description: str = _DESCRIPTION,
) -> argparse.ArgumentParser:
    """The trainer's argument parser (defaults of ``None`` are filled from the preset).

    Args:
        suppress_defaults: leave flags that were not given out of the namespace (used to
            find which flags a user set).
        flags: the flag table (another entry point, e.g. ``vatt_fast.finetune``, passes its own).
        prog, description: what ``--help`` shows.
    """
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="YAML or JSON file of argument values (keys as the flags, '-' or "
                   "'_'; an optional 'model' mapping overrides model config fields); flags given on the command "
                   "line win")  # fmt: skip
    for flag in flags:
        kwargs = dict(flag.kwargs)
        if suppress_defaults:
            kwargs["default"] = argparse.SUPPRESS
        p.add_argument(flag.name, **kwargs)
    return p


def load_config_file(path: str, flags: Sequence[Flag] = FLAGS) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Read a ``--config`` file: ``(flag values by dest, model config overrides)``.

    Keys may use ``-`` or ``_``; each value is converted and checked as its flag (of ``flags``) would be.
    """
    by_dest = _BY_DEST if flags is FLAGS else {f.dest: f for f in flags}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path!r} does not exist; pass a YAML or JSON file of flag values")
    text = p.read_text()
    data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of flag names to values, got {type(data).__name__}")
    model = dict(data.pop("model", None) or {})
    values: Dict[str, Any] = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in by_dest:
            raise ValueError(f"--config {path!r}: unknown key {key!r}; valid keys: {sorted(by_dest)} and 'model'")
        kwargs = by_dest[dest].kwargs
        kind = kwargs.get("type")
        if value is not None and kind is not None and not isinstance(value, bool):
            value = kind(value)
        if kwargs.get("choices") is not None and value not in kwargs["choices"]:
            raise ValueError(f"--config {path!r}: {key}={value!r} is not one of {list(kwargs['choices'])}")
        values[dest] = value
    return values, model


def parse_args(argv: Optional[Sequence[str]] = None, flags: Sequence[Flag] = FLAGS, **parser_kw: str) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``), with ``--config`` values as defaults under the flags.

    The namespace has two extra fields: ``model`` (model config overrides from the config
    file's ``model`` mapping) and ``explicit`` (the flags the user set on the command line
    or in the config file; a resumed run takes the others from its checkpoint).
    ``flags`` and ``parser_kw`` (``prog``, ``description``) go to :func:`build_parser`.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    file_values: Dict[str, Any] = {}
    model: Dict[str, Any] = {}
    if known.config:
        file_values, model = load_config_file(known.config, flags)
    parser = build_parser(flags=flags, **parser_kw)
    parser.set_defaults(**file_values)
    args = parser.parse_args(argv)
    args.model = model
    given = set(vars(build_parser(suppress_defaults=True, flags=flags, **parser_kw).parse_args(argv))) | set(file_values)
    args.explicit = sorted(given - {"config"})
    return args


def fill_defaults(args: argparse.Namespace, config: VATTConfig) -> None:
    """Fill the flags left at ``None`` from the preset, and check every count is in range."""
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
    if getattr(args, "kernels", "auto") is None:  # the layers' process default, so one setting serves both
        args.kernels = default_impl()
    at_least: List[Tuple[str, int]] = [(k, 1) for k in ("batch_size", "steps", "total_steps", "log_every", "max_nonfinite")]
    at_least += [(k, 0) for k in ("warmup_steps", "eval_every", "save_every", "workers", "keep_checkpoints")]
    for key, low in at_least:
        if getattr(args, key) < low:
            raise ValueError(f"--{key.replace('_', '-')} must be {'at least 1' if low else '>= 0'}, got {getattr(args, key)}")


def run_cli(main: Callable[[], Any]) -> None:
    """A console entry point around ``main`` (``vatt-train``, ``vatt-finetune``): an error a user can
    fix becomes one line on stderr and exit status 1; the process group is always torn down."""
    import logging
    import sys

    import torch.distributed as dist

    from vatt_fast.distributed import is_dist

    try:
        main()
    except (ValueError, FileNotFoundError, NotADirectoryError, ImportError, RuntimeError) as e:
        logging.getLogger("vatt_fast").error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if is_dist():
            dist.destroy_process_group()
