"""The classes of a fine-tuning run, read from the manifest, and the target of every clip.

The classes are the train split's labels (or ``0 .. num_classes - 1`` with
``--num-classes``). A manifest row's ``label`` is a class index (``"label": 3``) or, for a
multi-label clip such as AudioSet's, a list of them (``"label": [3, 7]``); a dataset with
any list is multi-label. Every problem is an error naming the value, the row and the fix:
a row without a label, a negative label, a label past ``--num-classes``, a single class,
evaluation labels the train split never has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from vatt_fast.data.manifest import VideoRecord

__all__ = ["LabelSpace", "build_label_space", "record_labels"]

_ROW_FIX = "give every row a \"label\": <class index> (or a list of them for a multi-label clip) in manifest.jsonl"


def record_labels(record: VideoRecord) -> Optional[List[int]]:
    """The labels of a record as a list (one entry for a single-label row), or None when it has none."""
    if record.labels is not None:
        return list(record.labels)
    return None if record.label is None else [int(record.label)]


def _examples(ids: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(repr(i) for i in ids[:n])
    return shown + (f" and {len(ids) - n} more" if len(ids) > n else "")


def _check_rows(records: Sequence[VideoRecord], split: str) -> Dict[str, List[int]]:
    """Every row's labels, checked to exist and be >= 0."""
    if not records:
        raise ValueError(f"the {split!r} split has no rows; fine-tuning needs labelled clips in it")
    out: Dict[str, List[int]] = {}
    missing = []
    for rec in records:
        labels = record_labels(rec)
        if not labels:
            missing.append(rec.id)
            continue
        for v in labels:
            if v < 0:
                raise ValueError(
                    f"row {rec.id!r} of the {split!r} split has label {v}: labels are class indices >= 0; fix that "
                    f"row of manifest.jsonl"
                )
        out[rec.id] = labels
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(records)} rows of the {split!r} split have no label ({_examples(missing)}); "
            f"{_ROW_FIX}, or move unlabelled rows to another split"
        )
    return out


@dataclass(frozen=True)
class LabelSpace:
    """The classes of a run: ``classes[k]`` is the manifest label of output ``k``.

    Attributes:
        classes: manifest label values, sorted; the head has ``len(classes)`` outputs.
        multi_label: clips may have several labels (sigmoid outputs, mAP) instead of one (softmax).
    """

    classes: List[int]
    multi_label: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def targets(self, records: Sequence[VideoRecord]) -> torch.Tensor:
        """Targets of ``records`` in order: class positions int64 ``[N]``, or multi-hot float ``[N, C]``."""
        pos = {c: k for k, c in enumerate(self.classes)}
        if not self.multi_label:
            return torch.tensor([pos[record_labels(r)[0]] for r in records], dtype=torch.int64)
        out = torch.zeros(len(records), self.num_classes)
        for i, r in enumerate(records):
            for v in record_labels(r):
                out[i, pos[v]] = 1.0
        return out


def build_label_space(
    train: Sequence[VideoRecord],
    evaluation: Sequence[VideoRecord] = (),
    num_classes: Optional[int] = None,
    eval_split: str = "val",
) -> LabelSpace:
    """The classes of the train split's labels, with every row of both splits checked.

    Args:
        train: the train split's records.
        evaluation: the evaluation split's records (may be empty: no evaluation).
        num_classes: fix the classes to ``0 .. num_classes - 1`` (``--num-classes``) instead of
            the train split's distinct labels.
        eval_split: the evaluation split's name, for the messages.

    Raises:
        ValueError: naming the value and the fix (see the module docstring).
    """
    train_labels = _check_rows(train, "train")
    eval_labels = _check_rows(evaluation, eval_split) if evaluation else {}
    multi = any(r.labels is not None for r in list(train) + list(evaluation))
    if num_classes is not None:
        if num_classes < 2:
            raise ValueError(f"--num-classes must be at least 2, got {num_classes}")
        for split, rows in (("train", train_labels), (eval_split, eval_labels)):
            for rid, labels in rows.items():
                bad = [v for v in labels if v >= num_classes]
                if bad:
                    raise ValueError(
                        f"row {rid!r} of the {split!r} split has label {bad[0]}, out of range for --num-classes "
                        f"{num_classes} (classes 0..{num_classes - 1}); pass --num-classes {max(bad) + 1} or more, or "
                        f"fix that row"
                    )
        return LabelSpace(list(range(num_classes)), multi)
    classes = sorted({v for labels in train_labels.values() for v in labels})
    if len(classes) < 2:
        raise ValueError(
            f"the train split has a single class (label {classes[0]} on all {len(train_labels)} rows); a classifier "
            f"needs at least 2 classes: add rows of other classes, or pass --num-classes N to fix the classes to 0..N-1"
        )
    known = set(classes)
    unseen: Dict[int, str] = {}
    for rid, labels in eval_labels.items():
        for v in labels:
            if v not in known:
                unseen.setdefault(v, rid)
    if unseen:
        values = sorted(unseen)
        raise ValueError(
            f"the {eval_split!r} split has label(s) {values} that the train split never has (e.g. row "
            f"{unseen[values[0]]!r}); the classes come from the train split's labels ({len(classes)} classes): add "
            f"train rows of those classes, drop those rows from {eval_split!r}, or pass --num-classes N to fix the "
            f"classes to 0..N-1"
        )
    return LabelSpace(classes, multi)
