"""Data: manifests, caption vocabulary, clip sampling, synthetic data and loaders.

See ``vatt_fast.data.loader.build_loader`` for the batch contract.
"""

from vatt_fast.data.manifest import Caption, VideoRecord, read_manifest, write_manifest
from vatt_fast.data.sampler import ClipPlan, ClipSampler, ClipSpec
from vatt_fast.data.vocab import Vocabulary


def build_loader(*args, **kwargs):
    """See :func:`vatt_fast.data.loader.build_loader` (imported lazily: it pulls in torch workers)."""
    from vatt_fast.data.loader import build_loader as _build_loader

    return _build_loader(*args, **kwargs)


__all__ = [
    "build_loader",
    "read_manifest",
    "write_manifest",
    "Vocabulary",
    "ClipSpec",
    "ClipSampler",
    "ClipPlan",
    "Caption",
    "VideoRecord",
]
