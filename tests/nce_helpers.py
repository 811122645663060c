"""Helpers shared by the NCE tests (the ``mil_nce`` / ``nce`` ops and the loss modules).

``explicit_mil_nce`` is the released formula written out clip by clip, independently of
``vatt_fast.kernels.nce``; the tests compare against it in float64.
"""

import torch
import torch.nn.functional as F

TAU = 0.07


def explicit_mil_nce(video, text, mask=None, tau=TAU, per_clip=False, dtype=torch.float64):
    """The released formula, clip by clip, on an explicit [B, B, K] logits tensor.

    For clip i: numerator = logsumexp of x[i, i, valid k]; denominator = logsumexp of the
    concatenation of row i (x[i, j, k] over every valid caption (j, k)) and column i
    (x[j, i, k] over every video j and clip i's valid captions k).
    Computed in ``dtype`` (fp64: the reference; fp32: the plain PyTorch comparator of the
    parity rule) on the inputs' device.
    """
    v = F.normalize(video.to(dtype), dim=-1)
    t = F.normalize(text.to(dtype), dim=-1)
    b, k, _ = t.shape
    if mask is None:
        mask = torch.ones(b, k, dtype=torch.bool)
    mask = mask.to(v.device)
    x = torch.einsum("id,jkd->ijk", v, t) / tau  # (B, B, K): video i vs caption k of clip j
    losses = []
    for i in range(b):
        if not mask[i].any():
            continue
        numerator = torch.logsumexp(x[i, i][mask[i]], dim=0)
        row = x[i][mask]  # every valid caption of every clip
        col = x[:, i][:, mask[i]].reshape(-1)  # every video against clip i's valid captions
        denominator = torch.logsumexp(torch.cat([row, col]), dim=0)
        losses.append(denominator - numerator)
    if per_clip:
        return losses
    if not losses:
        return (v.sum() + t.sum()) * 0.0
    return torch.stack(losses).mean()


def holey_mask(b, k, empty_rows=(1,)):
    """Random holes, every listed row empty, every other row with at least one caption."""
    mask = torch.rand(b, k) > 0.4
    mask[:, 0] |= ~mask.any(dim=1)
    for r in empty_rows:
        mask[r] = False
    return mask


def grads_of(fn, *inputs):
    """``fn(*inputs)`` (a scalar) and its gradients with respect to fresh leaf copies of the inputs."""
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs)
    return out.detach(), grads


def normalized_inputs(b, k, d, dtype=torch.float32, device="cpu"):
    """L2-normalised ``video [b, d]`` and ``text [b, k, d]`` (normalised in fp32, then rounded to ``dtype``)."""
    video = F.normalize(torch.randn(b, d, device=device), dim=-1).to(dtype)
    text = F.normalize(torch.randn(b, k, d, device=device), dim=-1).to(dtype)
    return video, text
