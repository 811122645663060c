"""What every loader backend shares: the schedule, the position, the bad-data counts.

A backend subclasses :class:`ClipLoaderBase` and implements ``__iter__`` (yielding
batch dicts, advancing ``_epoch``/``_batch`` as it goes) and ``_shutdown`` (stop
workers or pipelines; called before a restart, a resume and at ``close``).

Bad records (:func:`fill_batch`, used by both backends): a record that cannot give a
clip is replaced by the next record, in index order, that is *not* in the same optimizer
step, so the contrastive loss never sees a clip twice (a duplicate would be a false
negative). "The same step" is every rank's batch of that step
(:meth:`ShardedSchedule.global_batch`), and rank ``r`` of ``W`` only takes replacements
``j`` with ``j % W == r``, so ranks never pick the same one. The choice depends only on
the schedule (seed, epoch, batch) and on which records fail, so it is the same with any
number of workers and after a resume. Each failure is counted in ``bad_data`` under its
kind and the first one of each kind is logged.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

from vatt_fast.data.manifest import VideoRecord
from vatt_fast.data.options import LoaderOptions
from vatt_fast.data.sampler import ClipPlan, ClipSampler, ClipSpec, ShardedSchedule
from vatt_fast.data.vocab import Vocabulary

__all__ = [
    "ClipLoaderBase",
    "fill_batch",
    "kept_problems",
    "summarize_problems",
    "MAX_REPLACEMENTS",
    "KEPT_KINDS",
    "DUPLICATE",
    "TooMuchBadData",
]

log = logging.getLogger("vatt_fast.data")

# Records tried for one slot of a batch (the record and its replacements) before giving up.
MAX_REPLACEMENTS = 64
# Kinds counted for clips that are kept (padded), not replaced.
KEPT_KINDS = ("short", "no_captions")
# Kind counted when no record outside the step was left, so a replacement repeats a clip of the step.
DUPLICATE = "duplicate"

Problem = Tuple[str, str]  # (bad_data kind, message naming the file and the cause)


class TooMuchBadData(RuntimeError):
    """A batch slot found no decodable record among ``MAX_REPLACEMENTS`` tries: the dataset is broken."""


def _candidates(index: int, num_records: int, rank: int, world_size: int, excluded: Set[int]) -> Iterator[int]:
    """Replacements for ``index`` in the order they are tried: the next records (cyclically)
    of this rank's residue class that are not ``excluded``, then, only when those run out,
    every other record in the same cyclic order (a fallback that may repeat a clip of the
    step: counted as ``duplicate`` when it does)."""
    def first(j: int) -> bool:
        return j % world_size == rank and j not in excluded

    ring = range(index + 1, index + num_records)
    yield from (j % num_records for j in ring if first(j % num_records))
    yield from (j % num_records for j in ring if not first(j % num_records))


def fill_batch(
    indices: Sequence[int],
    attempt: Callable[[int], Tuple[Any, Optional[Problem]]],
    *,
    num_records: int,
    step_records: Callable[[], Iterable[int]],
    rank: int = 0,
    world_size: int = 1,
    limit: int = MAX_REPLACEMENTS,
) -> Tuple[List[Any], List[Problem]]:
    """One result per record of a batch, replacing the records whose ``attempt`` fails.

    Args:
        indices: the batch's record indices, in order.
        attempt: ``attempt(i)`` returns ``(result, None)`` when record ``i`` gives a clip,
            ``(None, (kind, message))`` when it does not.
        num_records: records in the split.
        step_records: all records of this optimizer step on every rank (called only when a
            record fails); replacements come from outside them.
        rank, world_size: this process's shard (replacements come from records
            ``j % world_size == rank``).
        limit: records tried per slot before giving up.

    Returns:
        ``(results, problems)``: ``results[k]`` for ``indices[k]`` (or its replacement), and
        every failure met, in order (a record that fails as a replacement counts again).

    Raises:
        TooMuchBadData: ``limit`` records failed for one slot (the dataset is broken).
    """
    n = int(num_records)
    results: List[Any] = []
    problems: List[Problem] = []
    excluded: Optional[Set[int]] = None  # the step's records and the replacements chosen so far
    for index in indices:
        index = int(index)
        result, problem = attempt(index)
        if problem is None:
            results.append(result)
            continue
        errors = [problem]
        if excluded is None:
            excluded = {int(i) for i in step_records()} | {index}
        chosen = None
        for j in _candidates(index, n, rank, world_size, excluded):
            if len(errors) >= min(n, limit):
                break
            result, problem = attempt(j)
            if problem is None:
                chosen = j
                break
            errors.append(problem)
        problems.extend(errors)
        if chosen is None:
            raise TooMuchBadData(
                f"record {index} and the {len(errors) - 1} records tried in its place could not be decoded; "
                f"first errors: {[f'{k}: {m}' for k, m in errors[:3]]}; check the dataset (e.g. re-run the "
                f"prepare tool)"
            )
        if chosen in excluded:
            problems.append((DUPLICATE, f"no record outside the step could replace record {index}; record "
                                        f"{chosen} appears twice in the step (the dataset is nearly all bad "
                                        f"or smaller than a global batch)"))
        excluded.add(chosen)
        results.append(result)
    return results, problems


def summarize_problems(problems: Iterable[Problem]) -> Tuple[Dict[str, int], Dict[str, str]]:
    """Counts per kind and the first message of each kind."""
    counts: Counter = Counter()
    first: Dict[str, str] = {}
    for kind, message in problems:
        counts[kind] += 1
        first.setdefault(kind, message)
    return dict(counts), first


def kept_problems(plan: ClipPlan, spec: ClipSpec) -> List[Problem]:
    """``short`` / ``no_captions`` entries for a clip that is kept but padded."""
    out: List[Problem] = []
    if plan.short:
        out.append(("short", f"{plan.video} is shorter than the {spec.num_frames}-frame window; its last frame is "
                             f"repeated and its audio zero-padded"))
    if not plan.text_mask.any():
        out.append(("no_captions", f"{plan.video} has no caption with a word; text_mask is all False"))
    return out


class ClipLoaderBase:
    """The loader API common to the PyAV and DALI backends (see ``build_loader``).

    Args:
        records: the split's records.
        spec: clip geometry.
        vocab: caption vocabulary.
        options: batch size, train/eval, seed, shard, workers, device... (see
            :class:`~vatt_fast.data.options.LoaderOptions`; a backend reads what it uses).
        bad_data: initial counts (e.g. ``bad_manifest_line`` from reading the manifest).
    """

    backend = "base"

    def __init__(
        self,
        records: Sequence[VideoRecord],
        spec: ClipSpec,
        vocab: Vocabulary,
        options: LoaderOptions,
        bad_data: Optional[Dict[str, int]] = None,
    ) -> None:
        self.spec = spec
        self.options = options
        self.device = options.device  # where batches are delivered (None: where the backend makes them)
        self.records = list(records)
        self.with_label = any(r.label is not None for r in self.records)
        self.sampler = ClipSampler(spec, vocab, train=options.train, seed=options.seed)
        self.schedule = ShardedSchedule(len(self.records), options)
        self._epoch, self._batch = 0, 0
        self._bad: Counter = Counter(bad_data or {})
        self._logged: Set[str] = set()

    def __len__(self) -> int:
        return self.schedule.batches_per_epoch

    # The options callers read from the loader itself (the trainer, tests, benchmarks).
    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    @property
    def train(self) -> bool:
        """Random clips, infinite iteration (else one ordered pass per ``iter()``)."""
        return self.options.train

    @property
    def num_workers(self) -> int:
        return self.options.num_workers

    @property
    def prefetch_factor(self) -> int:
        return self.options.prefetch_factor

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

    def _account(self, counts: Mapping[str, int], first: Mapping[str, str]) -> None:
        """Add a batch's bad-data counts; log the first case of each kind (once per loader)."""
        self._bad.update(counts)
        for kind, message in first.items():
            if kind in self._logged:
                continue
            self._logged.add(kind)
            if kind in KEPT_KINDS:
                log.info("%s: %s (kept and padded; counted in bad_data[%r], further cases are not logged)",
                         kind, message, kind)
            elif kind == DUPLICATE:
                log.warning("%s (counted in bad_data[%r], further cases are not logged)", message, kind)
            else:
                log.log(logging.ERROR if kind.startswith("error:") else logging.WARNING,
                        "bad data, %s: %s -- the clip is replaced by another record and counted in bad_data[%r]; "
                        "further cases of this kind are counted, not logged", kind, message, kind)

    def _deliver(self, batch: Dict[str, Any], epoch: int, b: int) -> Dict[str, Any]:
        """``batch`` (batch ``b`` of ``epoch``) on ``self.device``; the position moves past it
        (to the next epoch after a training epoch's last batch)."""
        self._epoch, self._batch = epoch, b + 1
        if self.train and self._batch >= self.schedule.batches_per_epoch:
            self._epoch, self._batch = epoch + 1, 0
        if self.device is None:
            return batch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _restart_eval_pass(self) -> None:
        """In eval mode, a new ``iter()`` after a finished pass starts the next pass."""
        if not self.train and self._batch >= self.schedule.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0

    def _shutdown(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(records={len(self.records)}, batch_size={self.batch_size}, train={self.train}, "
            f"rank={self.options.rank}/{self.options.world_size}, batches_per_epoch={len(self)})"
        )
