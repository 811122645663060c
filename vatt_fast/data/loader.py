"""``build_loader``: the one entry point to the data, whatever the backend.

Example::

    from vatt_fast.data import build_loader
    from vatt_fast.data.synthetic import ensure_synthetic

    loader = build_loader(ensure_synthetic(), "train", batch_size=32, preset="tiny")
    for step, batch in zip(range(100), loader):   # infinite in train mode
        batch["video"]      # uint8   [B, T, H, W, 3]
        batch["audio"]      # float32 [B, S]
        batch["text"]       # int64   [B, K, L]  (0 = padding)
        batch["text_mask"]  # bool    [B, K]
        batch["label"]      # int64   [B]        (only when the manifest has labels; -1 = none)
        batch["index"]      # int64   [B]        record indices in the split
    state = loader.state_dict()                   # resume: loader.load_state_dict(state)
    print(loader.bad_data)                        # {"truncated": 2, "no_captions": 5, ...}
    loader.close()
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import torch

from vatt_fast.data.manifest import VOCAB_NAME, read_manifest
from vatt_fast.data.options import LoaderOptions
from vatt_fast.data.sampler import ClipSpec
from vatt_fast.data.vocab import Vocabulary
from vatt_fast.models.config import VATTConfig, get_config

__all__ = ["build_loader", "resolve_loader", "choose_loader", "LOADERS", "NVDEC_LIBRARIES"]

logger = logging.getLogger(__name__)

# The loader backends; "backend" here means the loader, not the attention kernel
# (vatt_fast.nn.attention) or the torch.compile backend.
LOADERS = ("auto", "dali", "pyav")
# The NVIDIA driver's video decoder (NVDEC) library that DALI's GPU video decoder dlopens; the
# driver installs it, but some installs (containers without the "video" driver capability,
# minimal driver packages) leave it out.
NVDEC_LIBRARIES = ("libnvcuvid.so.1", "libnvcuvid.so")


def _dali_problem() -> Optional[str]:
    """Why DALI cannot be used here, or None when it imports."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return "DALI not installed (pip install 'vatt_fast[dali]')"
    except Exception as e:  # a wheel for another CUDA or platform can fail to load its libraries
        return f"DALI does not import ({type(e).__name__}: {e})"
    return None


def _dali_available() -> bool:
    return _dali_problem() is None


def _cuda_problem() -> Optional[str]:
    """Why there is no CUDA device for DALI's GPU pipeline, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def _nvdec_problem() -> Optional[str]:
    """Why DALI's GPU video decoder (NVDEC) cannot run, or None when the driver's NVDEC library loads.

    A cheap probe (a ``dlopen`` of :data:`NVDEC_LIBRARIES`, as DALI does); only asked when CUDA is there.
    """
    import ctypes

    errors = []
    for name in NVDEC_LIBRARIES:
        try:
            ctypes.CDLL(name)
        except OSError as e:
            errors.append(str(e))
        else:
            return None
    return (f"NVDEC library {NVDEC_LIBRARIES[0]} not found ({errors[0]}): DALI's GPU decoder cannot run; the "
            f"NVIDIA driver install lacks its video decode library")


def choose_loader(name: str = "auto") -> Tuple[str, str]:
    """``(backend, why)``: the loader :func:`resolve_loader` picks and the reason, in words.

    ``auto`` picks DALI when CUDA is available, DALI imports and the driver's NVDEC library
    (``libnvcuvid``) loads; else PyAV, naming the first of those that failed.
    """
    if name not in LOADERS:
        raise ValueError(f"unknown loader backend {name!r}; choose one of {LOADERS}")
    if name == "dali" and not _dali_available():
        raise ImportError("backend='dali' needs NVIDIA DALI: pip install 'vatt_fast[dali]' (or use backend='pyav')")
    if name != "auto":
        return name, f"asked for {name!r}"
    for probe in (_cuda_problem, _dali_problem, _nvdec_problem):  # cheapest first; NVDEC only with CUDA
        problem = probe()
        if problem is not None:
            return "pyav", problem
    return "dali", "CUDA device, DALI and the NVDEC library libnvcuvid are present"


def resolve_loader(name: str = "auto") -> str:
    """``"dali"`` or ``"pyav"`` (see :func:`choose_loader`).

    ``auto`` logs one line that names the loader and why: at INFO, or at WARNING when a CUDA
    device is there but PyAV still decodes on the CPU (no DALI wheel, no NVDEC library).

    Raises:
        ValueError: an unknown name.
        ImportError: ``"dali"`` without DALI installed.
    """
    chosen, why = choose_loader(name)
    if name == "auto":
        if chosen == "dali":
            logger.info("loader auto: DALI (GPU decoding), because %s", why)
        else:
            level = logging.INFO if _cuda_problem() is not None else logging.WARNING
            logger.log(level, "loader auto: PyAV (CPU decoding), because %s", why)
    return chosen


def build_loader(
    dataset_dir: Union[str, os.PathLike],
    split: str,
    batch_size: int,
    *,
    preset: Union[str, VATTConfig] = "tiny",
    backend: str = "auto",
    num_workers: int = 2,
    decoder_threads: int = 1,
    seed: int = 0,
    train: Optional[bool] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    drop_last: Optional[bool] = None,
    device: Optional[Union[str, torch.device]] = None,
    pin_memory: Optional[bool] = None,
    **spec_overrides: Any,
):
    """A loader of clip batches for one split of a dataset folder.

    Args:
        dataset_dir: folder with ``manifest.jsonl`` and ``vocab.txt``.
        split: manifest split to read (``"train"``, ``"val"``...).
        batch_size: clips per batch on this rank.
        preset: model preset (or config) giving the clip geometry: ``num_frames``, ``fps``,
            ``frame_size``, ``audio_sample_rate``, ``num_captions``, ``caption_len``.
        backend: the loader backend, one of :data:`LOADERS`: ``"auto"`` (DALI when it imports,
            CUDA is available and the driver has the NVDEC library; else PyAV, with a log line
            that says why), ``"dali"`` or ``"pyav"``.
        num_workers: decoding worker processes (PyAV) or threads (DALI).
        decoder_threads: FFmpeg threads per video decode in each PyAV worker (1: none, the
            fastest per core when the workers fill the cores; 0: FFmpeg's count); see
            :class:`~vatt_fast.data.options.LoaderOptions`.
        seed: seed of the epoch permutations and of every random window, crop and flip.
        train: random clips, infinite iteration, reshuffled every epoch (default: ``split == "train"``);
            otherwise one ordered pass of centred clips per ``iter()``.
        rank, world_size: shard (default: from ``torch.distributed`` when initialised, else 0 / 1).
        drop_last: drop the last incomplete batch of an epoch (default: ``train``).
        device: move batches there (DALI on CUDA outputs there directly).
        pin_memory: pin host batches (default: when CUDA is available).
        **spec_overrides: any :class:`~vatt_fast.data.sampler.ClipSpec` field, e.g. ``resize_to=40``.

    The loader options are gathered, defaulted and checked once in a
    :class:`~vatt_fast.data.options.LoaderOptions`, which the backend and its schedule share.

    Returns:
        A loader: iterable of batch dicts (see the module docstring), with ``len()`` =
        batches per epoch, ``state_dict()`` / ``load_state_dict()``, ``bad_data`` and ``close()``.

    Raises:
        FileNotFoundError: no manifest or vocabulary.
        ValueError: an unparsable manifest line, an empty split, a vocabulary larger than the
            preset's ``vocab_size``, an option out of range.
    """
    root = Path(dataset_dir)
    cfg = preset if isinstance(preset, VATTConfig) else get_config(preset)
    spec = ClipSpec.from_preset(cfg, **spec_overrides)
    stats: Counter = Counter()
    records = read_manifest(root, split=split, stats=stats)
    if not records:
        splits = sorted({r.split for r in read_manifest(root)})
        raise ValueError(f"split {split!r} of {root} has no usable records; splits present: {splits}")
    vocab = Vocabulary.load(root / VOCAB_NAME)
    if len(vocab) > cfg.vocab_size:
        raise ValueError(
            f"{root / VOCAB_NAME} has {len(vocab)} tokens but preset {cfg.name!r} embeds only "
            f"vocab_size={cfg.vocab_size}; rebuild the vocabulary smaller or raise the model's vocab_size"
        )
    chosen = resolve_loader(backend)
    options = LoaderOptions(
        batch_size=batch_size, split=split, train=train, seed=seed, rank=rank, world_size=world_size,
        drop_last=drop_last, num_workers=num_workers, decoder_threads=decoder_threads, device=device, pin_memory=pin_memory,
    )
    if chosen == "dali":
        from vatt_fast.data.dali_loader import DALILoader as Loader
    else:
        from vatt_fast.data.pyav_loader import PyAVLoader as Loader
    return Loader(records, spec, vocab, options, bad_data=dict(stats))
