"""Checkpoints: atomic, self-describing, and safe to load.

A checkpoint is a folder ``<run>/checkpoints/step-00001234/`` holding

- ``model.safetensors``: the model weights (full, unsharded), with the model
  config and preset in the safetensors metadata, so the file alone rebuilds the
  model; tensors shared between modules (the modality-agnostic backbone) are
  stored once and their other names listed as aliases;
- ``state.pt``: the training state (optimizer, schedule, step, RNG states of
  every rank, loader position, counters), plain tensors and containers only,
  read back with ``torch.load(weights_only=True)``: loading never unpickles
  arbitrary objects;
- ``meta.json``: step, preset, world size, the resolved run arguments.

The folder is written under a temporary name and renamed into place
(``os.replace``, atomic on POSIX), so a crash mid-write never leaves a partial
checkpoint under a ``step-*`` name; only the last ``keep`` are kept. In a process
group every rank calls :func:`save_checkpoint` (gathering FSDP shards is
collective) and rank 0 writes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from vatt_fast.distributed import get_rank, get_world_size, is_dist
from vatt_fast.io import TMP_MARK, atomic_path
from vatt_fast.models.config import VATTConfig

__all__ = [
    "WEIGHTS_NAME",
    "STATE_NAME",
    "META_NAME",
    "save_weights",
    "load_weights",
    "read_weights_config",
    "rng_state",
    "set_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "find_latest",
    "resolve_checkpoint",
    "read_meta",
]

WEIGHTS_NAME = "model.safetensors"
STATE_NAME = "state.pt"
META_NAME = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
PathLike = Union[str, os.PathLike]


# --- weights (safetensors) ------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def save_weights(path: PathLike, state_dict: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``state_dict`` to a safetensors file; tensors that share memory are stored once.

    Args:
        path: destination file (written directly; :func:`save_checkpoint` makes it atomic).
        state_dict: name -> tensor (any device; copied to CPU).
        metadata: extra string metadata (e.g. the model config as JSON).
    """
    tensors: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    seen: Dict[tuple, str] = {}
    for name, tensor in state_dict.items():
        key = _storage_key(tensor)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    meta = {"format": "pt", "aliases": json.dumps(aliases)}
    meta.update(metadata or {})
    save_file(tensors, str(path), metadata=meta)


def load_weights(path: PathLike, device: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    """Read a safetensors file written by :func:`save_weights` (aliases restored as shared tensors)."""
    out: Dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for name in f.keys():
            out[name] = f.get_tensor(name)
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for alias, name in aliases.items():
        out[alias] = out[name]
    return out


def read_weights_config(path: PathLike) -> Optional[VATTConfig]:
    """The :class:`VATTConfig` stored in a weights file's metadata, or None if it has none."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        return None
    return VATTConfig.from_dict(json.loads(meta["config"]))


# --- RNG ------------------------------------------------------------------------------
def rng_state() -> Dict[str, Any]:
    """This process's RNG states (torch CPU, every CUDA device, numpy, python) as plain tensors and lists."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only if the device count matches)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# --- checkpoints ----------------------------------------------------------------------
def list_checkpoints(root: PathLike) -> List[Path]:
    """Complete checkpoints under ``root`` (a ``checkpoints`` folder), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / WEIGHTS_NAME).is_file() and (p / STATE_NAME).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_latest(run_dir: PathLike) -> Optional[Path]:
    """The newest checkpoint of a run folder (``<run>/checkpoints/step-*``), or None."""
    ckpts = list_checkpoints(Path(run_dir) / "checkpoints")
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: PathLike) -> Path:
    """Turn a checkpoint folder, a run folder (its latest checkpoint) or a ``model.safetensors`` file into a checkpoint folder or weights file.

    Raises:
        FileNotFoundError: naming the path and what was expected there.
    """
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        return p
    if p.is_dir() and (p / WEIGHTS_NAME).is_file():
        return p
    if p.is_dir():
        latest = find_latest(p)
        if latest is not None:
            return latest
    raise FileNotFoundError(
        f"no checkpoint at {str(p)!r}: expected a checkpoint folder holding {WEIGHTS_NAME}, a run folder with "
        f"checkpoints/step-*, or a .safetensors file; list a run's checkpoints with `ls <run>/checkpoints`"
    )


def read_meta(ckpt: PathLike) -> Dict[str, Any]:
    """``meta.json`` of a checkpoint folder ({} when absent)."""
    p = Path(ckpt) / META_NAME
    return json.loads(p.read_text()) if p.is_file() else {}


def save_checkpoint(
    root: PathLike,
    step: int,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    state: Dict[str, Any],
    meta: Dict[str, Any],
    keep: int = 3,
    per_rank: Optional[Dict[str, Any]] = None,
) -> Optional[Path]:
    """Save a checkpoint atomically; every rank calls it, rank 0 writes.

    Args:
        root: the run's ``checkpoints`` folder.
        step: training step (number of optimizer steps taken); names the folder.
        model: the model (plain, DDP-unwrapped, compiled or FSDP2-sharded: the
            full state dict is gathered).
        optimizer: its optimizer (state saved by parameter name), or None.
        state: extra training state (schedule, loader position, counters): tensors,
            numbers, strings, lists and dicts only. RNG states of every rank are added.
        meta: JSON-serialisable description (preset, args) for ``meta.json``.
        keep: how many checkpoints to keep (older ones are deleted); 0 keeps all.
        per_rank: state that differs between ranks (e.g. each rank's loader position),
            gathered and stored as ``state["per_rank"][rank]`` (also without a process group).

    Returns:
        The checkpoint folder on rank 0, None on other ranks.
    """
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=opts)
    optim_state = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    rngs: List[Dict[str, Any]] = [rng_state()]
    ranks: List[Any] = [per_rank or {}]
    if is_dist():
        gathered: List[Any] = [None] * get_world_size()
        dist.all_gather_object(gathered, (rngs[0], ranks[0]))
        rngs, ranks = [g[0] for g in gathered], [g[1] for g in gathered]
    state = {**state, "per_rank": ranks}
    path: Optional[Path] = None
    if get_rank() == 0:
        path = _write(Path(root), step, model, weights, optim_state, state, rngs, meta, keep)
    if is_dist():
        dist.barrier()
    return path


def _write(
    root: Path,
    step: int,
    model: nn.Module,
    weights: Dict[str, torch.Tensor],
    optim_state: Optional[Dict[str, Any]],
    state: Dict[str, Any],
    rngs: List[Dict[str, Any]],
    meta: Dict[str, Any],
    keep: int,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{TMP_MARK}*"):  # left by a writer that crashed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:08d}"
    config = getattr(model, "config", None)
    wmeta = {"step": str(step)}
    if isinstance(config, VATTConfig):
        wmeta.update(preset=config.name, config=json.dumps(config.to_dict()))
    # Re-saving the same step (a signal right after a periodic save) replaces the folder.
    with atomic_path(final, directory=True) as tmp:
        save_weights(tmp / WEIGHTS_NAME, weights, wmeta)
        torch.save(
            {**state, "step": step, "optimizer": optim_state, "rng": rngs, "world_size": len(rngs)},
            tmp / STATE_NAME,
        )
        (tmp / META_NAME).write_text(json.dumps({**meta, "step": step, "world_size": len(rngs)}, indent=2, default=str))
    if keep > 0:
        for old_ckpt in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old_ckpt, ignore_errors=True)
    return final


def load_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> Dict[str, Any]:
    """Load a checkpoint folder into ``model`` (and ``optimizer``); every rank calls it.

    The weights come from safetensors, the training state from
    ``torch.load(weights_only=True)``; nothing else is unpickled. RNG states are not
    applied here (call :func:`set_rng_state` with ``state["rng"][rank]`` when the
    loop is about to start, after loaders are built).

    Args:
        path: a checkpoint folder (``.../step-*``).
        model: model to fill (plain, compiled or FSDP2-sharded).
        optimizer: optimizer to fill, or None to skip its state.

    Returns:
        The training state dict (``step``, ``rng``, ``loader``, schedule, counters, ...).
    """
    path = Path(path)
    weights = load_weights(path / WEIGHTS_NAME)
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=True))
    state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    if optimizer is not None and state.get("optimizer") is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    return state
