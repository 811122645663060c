"""Data: manifests, caption vocabulary, clip sampling, synthetic data and loaders.

See ``vatt_fast.data.loader.build_loader`` for the batch contract.
"""

from vatt_fast.data.loader import build_loader
from vatt_fast.data.manifest import Caption, VideoRecord, read_manifest, write_manifest
from vatt_fast.data.options import LoaderOptions
from vatt_fast.data.sampler import ClipPlan, ClipSampler, ClipSpec, ShardedSchedule
from vatt_fast.data.vocab import Vocabulary

__all__ = [
    "build_loader",
    "LoaderOptions",
    "read_manifest",
    "write_manifest",
    "Vocabulary",
    "ClipSpec",
    "ClipSampler",
    "ClipPlan",
    "ShardedSchedule",
    "Caption",
    "VideoRecord",
]
