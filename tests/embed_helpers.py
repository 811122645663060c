"""Helpers shared by the patch-embedding tests (layer and kernel)."""

import torch


def gather_tokens(full, keep):
    """``full`` (B, N, D) at ``keep``: None (all), shared (N_keep,) or per-sample (B, N_keep)."""
    if keep is None:
        return full
    if keep.dim() == 1:
        return full[:, keep]
    return torch.stack([full[b, keep[b]] for b in range(full.shape[0])])


def random_video(shape, dtype, device):
    """Raw pixels in [0, 255]: uint8, or float of ``dtype``."""
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    return torch.rand(shape, device=device, dtype=dtype) * 255.0
