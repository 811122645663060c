"""bf16 compute copies of the Linear weights, refreshed once per optimizer step.

Under ``torch.autocast(dtype=bfloat16)`` every ``nn.Linear`` casts its fp32 weight and bias to
bf16 in the forward (autocast caches the cast for the rest of that forward), and autograd casts
the bf16 gradient of each cast back to fp32 in the backward: four small copy kernels per Linear
per step, a few hundred per step in VATT's three towers, each a launch and a pass over memory.

:class:`ComputeWeights` keeps one persistent bf16 copy of each Linear parameter instead. The
forward runs on the copies (``torch.func.functional_call``: parameter names, state dicts,
checkpoints and evaluation keep the fp32 parameters), so autocast finds bf16 weights and casts
nothing; the gradients land on the copies in bf16. Then two multi-tensor copies do what the
per-Linear casts did:

- :meth:`grads_to_params` after the backward: every copy's gradient into its fp32 parameter's
  ``.grad`` (persistent fp32 buffers; gradient clipping and the optimizer see fp32 as before);
- :meth:`refresh` after the optimizer step: every fp32 parameter into its copy.

The arithmetic is the same as autocast's: the copy holds exactly the bf16 rounding autocast
would make of the same fp32 weight, and the fp32 gradient is exactly the cast of the same bf16
gradient, so a step gives the same numbers, bit for bit (tested); the optimizer keeps fp32
weights and fp32 moments. A parameter that its module reads outside ``nn.Linear.forward`` would
not be cast by autocast, so it gets no copy: a Linear lists such parameters in a ``keep_fp32``
attribute (``Mlp.fc1.bias``, which the fused path feeds to ``bias_gelu_dropout`` in fp32).
Memory: 2 bytes per Linear parameter kept between steps (autocast allocates the same within
each step); the fp32 gradients are allocated each step, as without the copies.

Not with:

- DDP or FSDP: they reduce the gradients of the parameters they wrap, which are not the tensors
  the forward used here (FSDP2 has its own bf16 parameter policy, ``MixedPrecisionPolicy``);
- activation checkpointing: the recomputation runs in the backward, after the copies were
  swapped out again, so it would see the fp32 parameters.

:func:`resolve_compute_weights` turns the copies off for these (``auto``) or refuses (``on``), and
:meth:`ComputeWeights.forward` refuses a model whose checkpointing was switched on later.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

__all__ = ["COMPUTE_WEIGHTS", "ComputeWeights", "linear_parameter_names", "resolve_compute_weights"]

log = logging.getLogger(__name__)

# --bf16-weights values: auto = on for a single-process bf16 run, on = demand it, off = autocast casts.
COMPUTE_WEIGHTS = ("auto", "on", "off")


def linear_parameter_names(model: nn.Module) -> Dict[str, nn.Parameter]:
    """``{name: parameter}`` of every ``nn.Linear`` weight and bias of ``model`` that requires grad,
    except those the Linear lists in ``keep_fp32`` (a parameter shared by two modules is listed
    under each of its names)."""
    names: Dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        if type(module) is nn.Linear:  # subclasses may use their weight in other ways
            keep_fp32 = getattr(module, "keep_fp32", ())
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad and pname not in keep_fp32:
                    names[f"{module_name}.{pname}" if module_name else pname] = p
    return names


class ComputeWeights:
    """bf16 compute copies of ``model``'s Linear parameters (module docstring).

    Args:
        model: the module forward is called on (its parameter names are used as they are, so
            pass the module itself or one compiled in place, not a DDP/FSDP wrapper).
        dtype: the copies' dtype (bf16; fp16 works the same way).

    Use::

        cw = ComputeWeights(model)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = cw.forward(batch)           # model(batch) on the copies
        loss_fn(out).backward()
        cw.grads_to_params()                  # fp32 .grad on the model's parameters
        optimizer.step(); optimizer.zero_grad(set_to_none=True)
        cw.refresh()                          # copies <- updated fp32 parameters

    ``refresh`` must also follow any other change of the parameters (loading a checkpoint):
    :meth:`forward` refreshes by itself when it finds a parameter changed in place since the
    last refresh (its version counter moved), so a forgotten refresh costs a copy, not a stale step.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"compute weights must be bfloat16 or float16, got {dtype}")
        self.model = model
        self.dtype = dtype
        named = linear_parameter_names(model)
        self.params: List[nn.Parameter] = []
        self.copies: List[Tensor] = []
        by_id: Dict[int, Tensor] = {}
        self.names: Dict[str, Tensor] = {}  # parameter name -> its copy (shared parameters share a copy)
        for name, p in named.items():
            if not p.is_floating_point():
                continue
            if id(p) not in by_id:
                copy = torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format).requires_grad_(True)
                by_id[id(p)] = copy
                self.params.append(p)
                self.copies.append(copy)
            self.names[name] = by_id[id(p)]
        if not self.params:
            raise ValueError(f"{type(model).__name__} has no nn.Linear parameter that requires grad: nothing to copy")
        self._checkpointing = [m for m in model.modules() if hasattr(m, "grad_checkpointing")]
        self._check_no_checkpointing()
        self._versions: Optional[List[int]] = None
        self.refresh()

    def _check_no_checkpointing(self) -> None:
        if any(m.grad_checkpointing for m in self._checkpointing):
            raise ValueError(
                "bf16 compute weights do not work with activation checkpointing (the recomputation in the "
                "backward would run on the fp32 parameters); turn one of them off (--bf16-weights off, or "
                "no --activation-checkpointing)"
            )

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy every fp32 parameter into its bf16 copy (one multi-tensor copy)."""
        _foreach_copy(self.copies, [p.detach() for p in self.params])
        self._versions = [p._version for p in self.params]

    def stale(self) -> bool:
        """Whether a parameter changed in place since the last :meth:`refresh`."""
        return self._versions != [p._version for p in self.params]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` with the Linear parameters replaced by their copies."""
        self._check_no_checkpointing()
        if self.stale():
            log.debug("compute weights: a parameter changed since the last refresh; refreshing")
            self.refresh()
        return torch.func.functional_call(self.model, self.names, args, kwargs, tie_weights=True, strict=False)

    __call__ = forward

    @torch.no_grad()
    def grads_to_params(self) -> None:
        """Move the copies' gradients into the fp32 parameters' ``.grad`` and clear the copies'.

        A parameter whose copy got no gradient keeps ``.grad = None`` (the optimizer then skips it,
        as it would skip the parameter itself); a parameter that already holds a gradient (used
        outside the Linear too) gets the copy's added to it.
        """
        dst, src, add_dst, add_src = [], [], [], []
        for p, c in zip(self.params, self.copies):
            if c.grad is None:
                continue
            if p.grad is not None:
                add_dst.append(p.grad)
                add_src.append(c.grad.to(p.grad.dtype))
                continue
            # A fresh buffer each step (an allocation, no kernel): after zero_grad(set_to_none=True)
            # it goes back to the allocator, so no fp32 gradient is held between steps.
            p.grad = torch.empty_like(p, memory_format=torch.preserve_format)
            dst.append(p.grad)
            src.append(c.grad)
        if dst:
            _foreach_copy(dst, src)
        if add_dst:
            torch._foreach_add_(add_dst, add_src)
        for c in self.copies:
            c.grad = None

    def extra_bytes(self) -> int:
        """Bytes held between steps: the copies."""
        return sum(c.numel() * c.element_size() for c in self.copies)

    def __repr__(self) -> str:
        return f"ComputeWeights({len(self.copies)} tensors, {self.extra_bytes() / 2**20:.1f} MiB {self.dtype})"


def _foreach_copy(dst: List[Tensor], src: List[Tensor]) -> None:
    """``d.copy_(s)`` for each pair (dtype conversion included), in multi-tensor launches where
    torch has them."""
    foreach_copy = getattr(torch, "_foreach_copy_", None)
    if foreach_copy is not None:
        foreach_copy(dst, src)
    else:  # pragma: no cover - torch releases before _foreach_copy_
        for d, s in zip(dst, src):
            d.copy_(s)


def resolve_compute_weights(args: argparse.Namespace, model: nn.Module, precision: str, world: int) -> Optional[ComputeWeights]:
    """The run's :class:`ComputeWeights` for ``--bf16-weights``, or None.

    ``auto``: on for a bf16 run in one process without activation checkpointing (where it changes no
    arithmetic and removes the per-Linear casts), off otherwise. ``on`` where it cannot run (fp32, DDP,
    FSDP, activation checkpointing) raises and says why.
    """
    mode = getattr(args, "bf16_weights", "off")
    if mode not in COMPUTE_WEIGHTS:
        raise ValueError(f"--bf16-weights {mode!r} is not one of {list(COMPUTE_WEIGHTS)}")
    reason = None
    if precision != "bf16":
        reason = f"--precision resolves to {precision}, and compute copies only serve bf16 autocast"
    elif world > 1:
        reason = (f"the run has {world} processes, and DDP/FSDP reduce the gradients of the parameters they wrap, "
                  "not of the copies the forward uses")
    elif getattr(args, "activation_checkpointing", False):
        reason = ("--activation-checkpointing recomputes blocks in the backward, after the copies were swapped "
                  "out, on the fp32 parameters")
    if mode == "off":
        return None
    if reason is not None:
        if mode == "on":
            raise ValueError(f"--bf16-weights on: {reason}; use --bf16-weights auto or off")
        log.info("bf16 compute weights off: %s", reason)
        return None
    cw = ComputeWeights(model)
    log.info("bf16 compute weights: %r", cw)
    return cw
