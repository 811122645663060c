"""What every loader backend shares: the schedule, the position, the bad-data counts.

A backend subclasses :class:`ClipLoaderBase` and implements ``__iter__`` (yielding
batch dicts, advancing ``_epoch``/``_batch`` as it goes) and ``_shutdown`` (stop
workers or pipelines; called before a restart, a resume and at ``close``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, Optional, Sequence

from vatt_fast.data.manifest import VideoRecord
from vatt_fast.data.sampler import ClipSampler, ClipSpec, ShardedSchedule
from vatt_fast.data.vocab import Vocabulary

__all__ = ["ClipLoaderBase"]


class ClipLoaderBase:
    """The loader API common to the PyAV and DALI backends (see ``build_loader``).

    Args:
        records: the split's records.
        spec: clip geometry.
        vocab: caption vocabulary.
        batch_size: clips per batch on this rank.
        train: random clips, infinite iteration, reshuffled every epoch; else one ordered pass.
        seed: seed of the permutations and of every clip draw (shared by the backends).
        rank, world_size: this process's shard.
        drop_last: drop the last incomplete batch of an epoch.
        bad_data: initial counts (e.g. ``bad_manifest_line`` from reading the manifest).
    """

    backend = "base"

    def __init__(
        self,
        records: Sequence[VideoRecord],
        spec: ClipSpec,
        vocab: Vocabulary,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        bad_data: Optional[Dict[str, int]] = None,
    ) -> None:
        self.spec = spec
        self.train = bool(train)
        self.seed = int(seed)
        self.records = list(records)
        self.with_label = any(r.label is not None for r in self.records)
        self.sampler = ClipSampler(spec, vocab, train=train, seed=seed)
        self.schedule = ShardedSchedule(
            len(self.records), batch_size, train=train, seed=seed, rank=rank, world_size=world_size,
            drop_last=drop_last,
        )
        self._epoch, self._batch = 0, 0
        self._bad: Counter = Counter(bad_data or {})

    def __len__(self) -> int:
        return self.schedule.batches_per_epoch

    @property
    def batch_size(self) -> int:
        return self.schedule.batch_size

    @property
    def bad_data(self) -> Dict[str, int]:
        """Counts per kind of bad sample met so far (replaced or padded), plus manifest rows left out."""
        return dict(self._bad)

    def state_dict(self) -> Dict[str, Any]:
        """Position of the next batch (epoch, batch) and the bad-data counts."""
        return {"epoch": self._epoch, "batch": self._batch, "bad_data": dict(self._bad), **self.schedule.identity()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken (the same batches follow)."""
        self.schedule.check_identity(state)
        self._shutdown()
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])
        self._bad = Counter(state.get("bad_data", {}))

    def close(self) -> None:
        """Stop workers / pipelines."""
        self._shutdown()

    def _restart_eval_pass(self) -> None:
        """In eval mode, a new ``iter()`` after a finished pass starts the next pass."""
        if not self.train and self._batch >= self.schedule.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0

    def _shutdown(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(records={len(self.records)}, batch_size={self.batch_size}, train={self.train}, "
            f"rank={self.schedule.rank}/{self.schedule.world_size}, batches_per_epoch={len(self)})"
        )
