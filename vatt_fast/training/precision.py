"""Device, precision and memory: which device a rank trains on and in which arithmetic.

Precision policy: ``bf16`` is autocast (fp32 weights and optimizer, bf16 matmuls and
attention); ``fp32`` on CUDA allows TF32 tensor-core matmuls and convolutions (10-bit
mantissa inputs, fp32 accumulation), as every CUDA PyTorch training recipe does; ``auto`` is
bf16 on CUDA and fp32 on CPU.
"""

from __future__ import annotations

import contextlib
import os
import resource

import torch

__all__ = ["autocast", "memory_gb", "pick_device", "resolve_precision"]


def pick_device(arg: str) -> torch.device:
    """The device of this rank for ``--device`` (``auto``: ``cuda:LOCAL_RANK`` when CUDA is there)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if arg == "cuda" or (arg == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch sees no CUDA device; use --device cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_precision(arg: str, device: torch.device) -> str:
    """``"bf16"`` or ``"fp32"`` for ``--precision``, applying the TF32 policy for fp32 on CUDA."""
    precision = arg if arg != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda" and precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``precision == "bf16"``, else a no-op context."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated on the GPU, or this process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
