"""Dataset manifests: one JSON object per source video, in ``manifest.jsonl``.

A dataset folder holds ``manifest.jsonl``, ``vocab.txt`` and the media. Each manifest
line describes one source video::

    {"id": "v000", "video": "media/v000.webm", "audio": "media/v000.flac",
     "duration": 6.0, "captions": [{"start": 0.0, "end": 2.0, "text": "a red circle"}],
     "label": 3, "split": "train", "width": 64, "height": 48}

``id``, ``video``, ``audio``, ``duration`` and ``captions`` are required (``captions``
may be an empty list); ``label`` (an int, or a list of ints for a multi-label clip such as
AudioSet's), ``split`` (default ``"train"``) and the stored frame size ``width``/``height``
are optional. Paths are relative to the dataset folder.
``duration`` is the video length in seconds, i.e. ``number_of_frames / fps``.

A line that is not JSON is an error naming the file and line; a line that parses but
lacks a required field (or holds a value of the wrong type) is left out and counted under
``"bad_manifest_line"`` in the ``stats`` counter, so one broken row never stops a run.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

from vatt_fast.io import atomic_path, atomic_write

__all__ = [
    "MANIFEST_NAME",
    "VOCAB_NAME",
    "REQUIRED_FIELDS",
    "Caption",
    "VideoRecord",
    "read_manifest",
    "write_manifest",
    "write_jsonl",
    "append_manifest",
    "repair_manifest_tail",
    "manifest_ids",
    "record_to_json",
    "record_from_json",
]

MANIFEST_NAME = "manifest.jsonl"
VOCAB_NAME = "vocab.txt"
REQUIRED_FIELDS = ("id", "video", "audio", "duration", "captions")

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Caption:
    """One timed caption (e.g. an ASR sentence): ``text`` spoken from ``start`` to ``end`` seconds."""

    start: float
    end: float
    text: str


@dataclass
class VideoRecord:
    """One source video of a dataset, with paths already resolved to absolute ones.

    Attributes:
        id: unique name of the video within the dataset.
        video: absolute path of the video file (VP9 webm by default, 10 fps, short GOP).
        audio: absolute path of the audio file (48 kHz mono FLAC).
        duration: length of the video in seconds (``frames / fps``).
        captions: timed captions, possibly empty (caption-less video).
        label: class index for linear probing, or ``None`` (also for a multi-label row).
        labels: the class indices of a multi-label row (``"label": [3, 7]``), else ``None``.
        split: ``"train"``, ``"val"``, ... (``"train"`` when the manifest row has none).
        width, height: stored frame size in pixels when the manifest knows it, else ``None``
            (the sampler then reads it from the file header).
    """

    id: str
    video: str
    audio: str
    duration: float
    captions: List[Caption] = field(default_factory=list)
    label: Optional[int] = None
    split: str = "train"
    width: Optional[int] = None
    height: Optional[int] = None
    labels: Optional[List[int]] = None


def _dataset_root(dataset_dir: PathLike) -> Path:
    """The dataset folder for ``dataset_dir`` (a folder, or its ``manifest.jsonl``)."""
    p = Path(dataset_dir)
    return p.parent if p.name.endswith(".jsonl") else p


def _manifest_path(dataset_dir: PathLike) -> Path:
    p = Path(dataset_dir)
    return p if p.name.endswith(".jsonl") else p / MANIFEST_NAME


def _resolve(root: Path, rel: str) -> str:
    p = Path(rel)
    return str(p if p.is_absolute() else (root / p))


def record_from_json(obj: Dict[str, Any], root: PathLike) -> VideoRecord:
    """Build a :class:`VideoRecord` from one parsed manifest row.

    Args:
        obj: the parsed JSON object of one manifest line.
        root: the dataset folder the row's paths are relative to.

    Raises:
        KeyError: a required field is missing.
        TypeError, ValueError: a field holds a value of the wrong type.
    """
    if not isinstance(obj, dict):
        raise TypeError(f"manifest row must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in obj or obj[k] is None]
    if missing:
        raise KeyError(f"missing required field(s) {missing}")
    root = Path(root)
    caps_in = obj["captions"]
    if not isinstance(caps_in, list):
        raise TypeError(f"'captions' must be a list of {{start, end, text}}, got {type(caps_in).__name__}")
    captions = []
    for c in caps_in:
        start, end = float(c["start"]), float(c["end"])
        if not end >= start:
            raise ValueError(f"caption end {end} is before its start {start}")
        captions.append(Caption(start, end, str(c["text"])))
    duration = float(obj["duration"])
    if not duration > 0:
        raise ValueError(f"duration must be positive, got {duration}")
    label = obj.get("label")
    labels = None
    if isinstance(label, list):
        labels, label = [int(v) for v in label], None
    width, height = obj.get("width"), obj.get("height")
    return VideoRecord(
        id=str(obj["id"]),
        video=_resolve(root, str(obj["video"])),
        audio=_resolve(root, str(obj["audio"])),
        duration=duration,
        captions=captions,
        label=None if label is None else int(label),
        split=str(obj.get("split") or "train"),
        width=None if width is None else int(width),
        height=None if height is None else int(height),
        labels=labels,
    )


def record_to_json(record: VideoRecord, root: PathLike) -> Dict[str, Any]:
    """The manifest row of ``record``, with its paths made relative to ``root`` when inside it."""
    root = Path(root).resolve()

    def rel(p: str) -> str:
        ap = Path(p).resolve()
        try:
            return ap.relative_to(root).as_posix()
        except ValueError:
            return str(p)

    row: Dict[str, Any] = {
        "id": record.id,
        "video": rel(record.video),
        "audio": rel(record.audio),
        "duration": round(float(record.duration), 6),
        "captions": [{"start": c.start, "end": c.end, "text": c.text} for c in record.captions],
        "split": record.split,
    }
    if record.labels is not None:
        row["label"] = [int(v) for v in record.labels]
    elif record.label is not None:
        row["label"] = int(record.label)
    if record.width is not None and record.height is not None:
        row["width"], row["height"] = int(record.width), int(record.height)
    return row


def read_manifest(
    dataset_dir: PathLike,
    split: Optional[str] = None,
    stats: Optional[Counter] = None,
) -> List[VideoRecord]:
    """Read ``manifest.jsonl`` of a dataset folder.

    Args:
        dataset_dir: the dataset folder (or the path of its ``manifest.jsonl``).
        split: keep only rows of this split (rows without a split count as ``"train"``);
            ``None`` keeps every row.
        stats: a counter that receives ``"bad_manifest_line"`` for each row left out
            because a required field is missing or malformed.

    Returns:
        The records in file order (blank lines are ignored).

    Raises:
        FileNotFoundError: there is no manifest.
        ValueError: a line is not valid JSON (the message names the file and line number).
    """
    path = _manifest_path(dataset_dir)
    root = _dataset_root(dataset_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"no manifest at {path}; a dataset folder needs {MANIFEST_NAME} "
            f"(create one with `python -m vatt_fast.data.prepare` or `python -m vatt_fast.data.synthetic`)"
        )
    records: List[VideoRecord] = []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}): {line.strip()[:120]!r}; "
                    f"fix or delete that line"
                ) from None
            try:
                rec = record_from_json(obj, root)
            except (KeyError, TypeError, ValueError):
                if stats is not None:
                    stats["bad_manifest_line"] += 1
                continue
            if split is None or rec.split == split:
                records.append(rec)
    return records


def manifest_ids(dataset_dir: PathLike) -> set:
    """The ``id`` of every parsable row already in a manifest (empty when there is none).

    Used by resumable writers to skip finished videos; unparsable lines are ignored here.
    """
    path = _manifest_path(dataset_dir)
    ids = set()
    if not path.is_file():
        return ids
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "id" in obj:
                ids.add(str(obj["id"]))
    return ids


def write_jsonl(path: PathLike, rows: Iterable[Dict[str, Any]], **dumps_kw: Any) -> Path:
    """Write ``rows`` as JSON lines, atomically (:func:`vatt_fast.io.atomic_path`); ``dumps_kw`` go to ``json.dumps``."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, **dumps_kw) + "\n")
    return Path(path)


def write_manifest(path: PathLike, records: Iterable[VideoRecord]) -> Path:
    """Write ``records`` as a manifest, atomically (temp file in the same folder, then ``os.replace``).

    Args:
        path: the dataset folder or the manifest path; paths are written relative to its folder.
        records: the records to write.

    Returns:
        The manifest path.
    """
    root = _dataset_root(path)
    return write_jsonl(_manifest_path(path), (record_to_json(rec, root) for rec in records), ensure_ascii=False)


def append_manifest(path: PathLike, records: Iterable[VideoRecord]) -> Path:
    """Append ``records`` to a manifest, one complete line per record, flushed and fsynced.

    For resumable writers: call it only once a video's media files are in place, so a
    listed video is always complete. Each line goes out in a single ``write`` call; a
    crash can at worst leave a final partial line, which :func:`repair_manifest_tail`
    removes before the next append.
    """
    mpath = _manifest_path(path)
    root = _dataset_root(path)
    mpath.parent.mkdir(parents=True, exist_ok=True)
    repair_manifest_tail(mpath)
    with open(mpath, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(record_to_json(rec, root), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return mpath


def repair_manifest_tail(path: PathLike) -> bool:
    """Drop a partial last line (no trailing newline) left by an interrupted append.

    Returns:
        True when a partial line was removed.
    """
    mpath = _manifest_path(path)
    if not mpath.is_file() or mpath.stat().st_size == 0:
        return False
    data = mpath.read_bytes()
    if data.endswith(b"\n"):
        return False
    atomic_write(mpath, data[: data.rfind(b"\n") + 1])
    return True

