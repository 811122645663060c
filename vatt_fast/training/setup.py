"""What a run is made of: the dataset check, model config, model, optimizer, loss, loaders, peak FLOP/s.

Each function is one decision, so the trainer's ``main``, ``vatt_fast.eval`` and a
fine-tuning entry point assemble the pieces they need.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from vatt_fast.data.loader import build_loader, resolve_loader
from vatt_fast.data.manifest import read_manifest
from vatt_fast.data.synthetic import ensure_synthetic
from vatt_fast.data.vocab import Vocabulary
from vatt_fast.distributed import broadcast_object, get_rank, sync_batchnorm
from vatt_fast.flops import measure_cpu_peak, peak_flops
from vatt_fast.models.config import VATTConfig, get_config
from vatt_fast.models.vatt import VATT
from vatt_fast.nn.losses import VATTLoss
from vatt_fast.nn.transformer import Block

__all__ = [
    "build_config",
    "build_loaders",
    "build_loss",
    "build_model",
    "build_optimizer",
    "check_data",
    "compile_model",
    "dataset_dir",
    "resolve_peak_flops",
    "wrap_model",
]

log = logging.getLogger("vatt_fast.train")

_DATA_HINT = (
    "pass --data DIR holding manifest.jsonl and vocab.txt (make one with `python -m vatt_fast.data.prepare` or "
    "`python -m vatt_fast.data.synthetic --out DIR`), or leave --data out for the built-in synthetic dataset"
)


def check_data(data: Path, split: str) -> None:
    """Fail early, naming the folder and the fix, when a dataset folder is unusable for ``split``."""
    if not data.exists():
        raise FileNotFoundError(f"--data {str(data)!r} does not exist; {_DATA_HINT}")
    if not data.is_dir():
        raise NotADirectoryError(f"--data {str(data)!r} is not a folder; {_DATA_HINT}")
    if not (data / "manifest.jsonl").is_file():
        raise FileNotFoundError(f"--data {str(data)!r} has no manifest.jsonl; {_DATA_HINT}")
    if not (data / "vocab.txt").is_file():
        raise FileNotFoundError(f"--data {str(data)!r} has no vocab.txt; {_DATA_HINT}")
    if not read_manifest(data, split=split):
        raise ValueError(f"--data {str(data)!r}: manifest.jsonl has no records of split {split!r}; {_DATA_HINT}")


def dataset_dir(data: Optional[str]) -> Path:
    """``--data`` as a path, or the built-in synthetic dataset (generated on first use by rank 0)."""
    if data is not None:
        return Path(data).expanduser()
    path = str(ensure_synthetic()) if get_rank() == 0 else None
    return Path(broadcast_object(path))


def build_config(args: argparse.Namespace, data_dir: Path) -> VATTConfig:
    """The preset's config with the ``--config`` file's model overrides and the dataset's vocabulary size."""
    vocab_size = len(Vocabulary.load(data_dir / "vocab.txt"))
    return get_config(args.preset, **{**args.model, "vocab_size": vocab_size})


def build_model(args: argparse.Namespace, config: VATTConfig, device: torch.device) -> VATT:
    """A freshly initialised VATT (seeded by ``--seed``) with the run's attention, kernels and checkpointing, on ``device``."""
    torch.manual_seed(args.seed)
    model = VATT(config)
    model.set_attention_backend(args.attention)
    model.set_kernel_impl(args.kernels)
    model.set_grad_checkpointing(args.activation_checkpointing)
    return model.to(device)


def wrap_model(model: nn.Module, args: argparse.Namespace, device: torch.device, world: int) -> nn.Module:
    """What forward is called on: the model itself, DDP, or FSDP2 (``--fsdp``, each Block sharded);
    BatchNorm synchronised over ranks in a process group."""
    if world > 1:
        model = sync_batchnorm(model, device)
    if args.fsdp:
        if world < 2:
            log.warning("--fsdp with a single process: nothing to shard, running unsharded")
            return model
        try:
            from torch.distributed.fsdp import fully_shard  # torch >= 2.6
        except ImportError:  # torch 2.4 / 2.5 ship FSDP2 under its composable name
            from torch.distributed._composable.fsdp import fully_shard

        for module in model.modules():
            if isinstance(module, Block):
                fully_shard(module)
        fully_shard(model)
        return model
    if world > 1:
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_model(model: nn.Module, raw_model: nn.Module, scope: str, backend: str, mode: str = "default") -> None:
    """``torch.compile`` in place (``nn.Module.compile``): the module forward is called on
    (``scope="model"``), or each Transformer :class:`Block` of ``raw_model`` on its own
    (``scope="blocks"``, regional compilation: blocks of one shape share a compiled graph, so the
    compile is short; DropToken, the heads and the loss stay eager). ``mode`` is Inductor's
    (``reduce-overhead``: CUDA graphs, worth trying where shapes are static, as with DropToken's
    fixed count); another backend takes only ``default``."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {list(COMPILE_MODES)}")
    if mode != "default" and backend != "inductor":
        raise ValueError(f"--compile-mode {mode} is an Inductor mode, but --compile-backend is {backend!r}; "
                         "use --compile-backend inductor or --compile-mode default")
    kwargs = {"backend": backend} if mode == "default" else {"backend": backend, "mode": mode}
    if scope == "model":
        model.compile(**kwargs)
        return
    if scope != "blocks":
        raise ValueError(f"compile scope {scope!r} is not one of ['model', 'blocks']")
    blocks = [m for m in raw_model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError("--compile-scope blocks: the model has no Transformer Block to compile; use --compile-scope model")
    for block in blocks:
        block.compile(**kwargs)
        # The fused path (CUDA, impl auto/triton) calls forward_fused from the encoder, not the module.
        block.forward_fused = torch.compile(block.forward_fused, **kwargs)


def build_optimizer(model: nn.Module, args: argparse.Namespace, config: VATTConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the preset's betas and eps; weight decay on matrices only; fused on CUDA."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs: Dict[str, Any] = {"lr": args.lr, "betas": tuple(config.adam_betas), "eps": config.adam_eps}
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def build_loss(args: argparse.Namespace, config: VATTConfig) -> nn.Module:
    """VATT's loss, ``(L_vt + L_va) / 2``, on the run's kernel implementation."""
    return VATTLoss(tau=config.tau, impl=args.kernels)


def resolve_peak_flops(args: argparse.Namespace, device: torch.device, precision: str) -> Optional[float]:
    """Peak FLOP/s per device for MFU: ``--peak-tflops``, the card's data-sheet figure, or the CPU's measured rate."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    peak = peak_flops(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    if peak is None and device.type == "cpu":
        peak = measure_cpu_peak()
    return peak


def build_loaders(
    args: argparse.Namespace,
    config: VATTConfig,
    data_dir: Path,
    device: torch.device,
    world: int,
    train_spec: Optional[Dict[str, Any]] = None,
    eval_spec: Optional[Dict[str, Any]] = None,
) -> Tuple[Any, Optional[Any]]:
    """``(train loader, eval loader or None)`` for this rank.

    The training loader is infinite and sharded by rank. The evaluation loader reads
    ``--eval-split`` (every rank reads all of it under FSDP, where every rank must run the
    model); None, with a warning, when the dataset has no such split. ``train_spec`` and
    ``eval_spec`` override the clip geometry of each (ClipSpec fields, e.g. ``frame_size``).
    """
    per_rank = args.batch_size // world
    loader = resolve_loader(args.loader)
    # DALI decodes where the run trains (NVDEC into device memory on CUDA, its CPU pipeline on
    # --device cpu, even on a GPU machine); PyAV batches come pinned and are copied to the
    # device one batch ahead (vatt_fast.training.loop.DeviceBatches).
    loader_device = device if loader == "dali" else None
    common = dict(preset=config, backend=loader, num_workers=args.workers, seed=args.seed, device=loader_device)
    train_loader = build_loader(data_dir, "train", per_rank, train=True, drop_last=True, **common, **(train_spec or {}))
    ranks = {"rank": 0, "world_size": 1} if args.fsdp else {}
    try:
        if not read_manifest(data_dir, split=args.eval_split):
            log.warning("no %r split in %s: skipping evaluation (set --eval-split)", args.eval_split, data_dir)
            return train_loader, None
        eval_loader = build_loader(data_dir, args.eval_split, args.eval_batch_size or per_rank, train=False,
                                   drop_last=False, **ranks, **common, **(eval_spec or {}))  # fmt: skip
    except ValueError as e:
        log.warning("no evaluation loader: %s", e)
        eval_loader = None
    return train_loader, eval_loader
