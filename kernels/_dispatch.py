"""Choosing between the Triton kernel and the PyTorch reference of a fused op.

Every fused op of ``vatt_fast.kernels`` takes ``impl``:

- ``"reference"``: the plain PyTorch version; runs anywhere and defines what is correct.
- ``"triton"``: the Triton kernel. On CPU tensors it runs only under ``TRITON_INTERPRET=1``.
  Asking for it where it cannot run raises; it never falls back silently.
- ``"auto"``: the Triton kernel when every tensor is on a CUDA device, Triton imports and
  a Triton implementation of the op is registered; the reference otherwise.
- ``None``: the process default, read from the environment variable ``VATT_FAST_KERNELS``
  (``auto`` | ``triton`` | ``reference``, default ``auto``) at every call, so a model, test
  or benchmark can be switched without touching code.

Triton implementations plug in through :func:`register_triton`, normally at the bottom
of the op's own file, so that importing ``vatt_fast.kernels`` is all it takes.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, Dict, Optional

import torch

__all__ = [
    "INTERPRETING",
    "IMPLS",
    "ENV_VAR",
    "default_impl",
    "get_triton",
    "launch",
    "library_op",
    "sm_count",
    "has_triton",
    "register_triton",
    "resolve_impl",
    "triton_available",
]

IMPLS = ("auto", "triton", "reference")
ENV_VAR = "VATT_FAST_KERNELS"

_TRITON_OPS: Dict[str, Callable] = {}


def register_triton(op: str, fn: Callable) -> Callable:
    """Register ``fn`` as the Triton implementation of ``op`` (replacing any earlier one).

    ``fn`` takes the same arguments as the op's public function, minus ``impl``. Returns
    ``fn`` so it can be used as a decorator: ``register_triton("patch_embed", launcher)``.
    """
    if not isinstance(op, str) or not op:
        raise ValueError(f"op must be a non-empty string naming the fused op, got {op!r}")
    if not callable(fn):
        raise TypeError(f"register_triton({op!r}, fn): fn must be callable, got {type(fn).__name__}")
    _TRITON_OPS[op] = fn
    return fn


def has_triton(op: str) -> bool:
    """Whether a Triton implementation of ``op`` has been registered."""
    return op in _TRITON_OPS


def get_triton(op: str) -> Callable:
    """The registered Triton implementation of ``op``; raises as :func:`resolve_impl` does."""
    if op not in _TRITON_OPS:
        raise NotImplementedError(_missing_triton_message(op))
    return _TRITON_OPS[op]


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (checked once, at import; a plain constant
    so that ``torch.compile`` traces :func:`resolve_impl` without a warning)."""
    return _TRITON_INSTALLED


# Whether Triton kernels run in the interpreter, fixed at import like the kernels' own mode (the
# root conftest.py sets TRITON_INTERPRET before vatt_fast.kernels is imported).
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def library_op(name: str):
    """The ``torch.library`` decorator for a Triton core op ``name`` (``"vatt_fast::<op>"``).

    Compiled Triton (a GPU): ``triton_op``, so ``torch.compile`` traces into the kernels it
    launches with :func:`launch`. Under ``TRITON_INTERPRET=1``: an opaque ``custom_op`` (give it a
    ``register_fake``), because a ``triton_op`` would run the interpreter on fake tensors.
    """
    if INTERPRETING:
        return torch.library.custom_op(name, mutates_args=())
    return torch.library.triton_op(name, mutates_args=())


def launch(kernel):
    """``launch(kernel)[grid](...)``: through ``wrap_triton`` inside a ``triton_op``, directly in the
    interpreter."""
    if INTERPRETING:
        return kernel
    return torch.library.wrap_triton(kernel)


_SM_COUNT: Dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (cached), to size persistent grids; 4 elsewhere
    (the interpreter, meta tensors while tracing), so that small grids still cross block edges."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _missing_triton_message(op: str) -> str:
    return (
        f"impl='triton' was requested for {op}, but no Triton kernel is registered for it "
        f"(ops with a Triton kernel: {sorted(_TRITON_OPS)}); use impl='reference' or 'auto' "
        f"(or unset {ENV_VAR}, or set it to 'auto' or 'reference')"
    )


def default_impl() -> str:
    """The process default implementation, from ``$VATT_FAST_KERNELS`` (``"auto"`` when unset)."""
    value = os.environ.get(ENV_VAR)
    if value is None or value.strip() == "":
        return "auto"
    normalised = value.strip().lower()
    if normalised not in IMPLS:
        raise ValueError(
            f"environment variable {ENV_VAR}={value!r} is not a kernel implementation; "
            f"expected one of {list(IMPLS)}; fix or unset it"
        )
    return normalised


def resolve_impl(impl: Optional[str], *tensors: Optional[torch.Tensor], op: str) -> str:
    """Decide which implementation of ``op`` runs for these tensors.

    Args:
        impl: ``"auto"``, ``"triton"``, ``"reference"`` or ``None`` (the process default,
            see :func:`default_impl`).
        *tensors: the op's tensor arguments (``None`` entries are ignored); their devices
            decide what ``"auto"`` means.
        op: the op's name, as registered with :func:`register_triton` (e.g. ``"patch_embed"``).

    Returns:
        ``"triton"`` or ``"reference"``.

    Raises:
        ValueError: ``impl`` (or ``$VATT_FAST_KERNELS``) is not one of the three names.
        NotImplementedError: ``"triton"`` was asked for an op without a Triton kernel.
        RuntimeError: ``"triton"`` was asked but Triton is not installed, or the tensors
            are on the CPU without ``TRITON_INTERPRET=1``.
    """
    if impl is None:
        impl = default_impl()
    elif not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl={impl!r} for {op} is not one of {list(IMPLS)} (or None for ${ENV_VAR})")

    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)

    if impl == "reference":
        return "reference"
    if impl == "auto":
        if on_cuda and has_triton(op) and triton_available():
            return "triton"
        return "reference"

    # impl == "triton": run it or say exactly why not.
    if not has_triton(op):
        raise NotImplementedError(_missing_triton_message(op))
    if not triton_available():
        raise RuntimeError(
            f"impl='triton' was requested for {op} but the triton package is not installed; "
            f"`pip install triton` or use impl='reference'"
        )
    if not on_cuda and not _interpreting():
        devices = sorted({str(t.device) for t in present})
        raise RuntimeError(
            f"impl='triton' for {op} needs CUDA tensors, got tensors on {devices}; move them to a "
            f"GPU, set TRITON_INTERPRET=1 before importing vatt_fast.kernels to run the kernel on "
            f"the CPU through the interpreter, or use impl='reference'"
        )
    return "triton"
