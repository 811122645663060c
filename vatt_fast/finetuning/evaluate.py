"""Testing a classifier: the multi-view protocol, a single view, top-k accuracy and mAP.

The paper tests video with 4 temporal windows x 3 spatial crops and averages the
predictions. Here the evaluation loader gives each clip once as a long centred span
(``span`` frames, ``--test-span``) of a square of side ``resize_to`` (the frame's short side
after the training resize, centred on the long side), and :func:`make_views` cuts the views
from it: ``temporal`` windows of ``num_frames`` frames evenly spaced over the span (first at
its start, last at its end), times ``spatial`` crops of ``frame_size`` at the left, centre and
right of the square (vertically centred); audio gets the same temporal windows and no spatial
crops. The class probabilities (softmax, or sigmoid for multi-label) are averaged over the
views. The single view is the centre window's centre crop: the clip the trainer's
evaluation loader gives (centred window, centred crop).
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.distributed as dist
from torch import nn

from vatt_fast.distributed import get_world_size, is_dist
from vatt_fast.training.precision import autocast

__all__ = [
    "average_precision",
    "evaluate_classifier",
    "make_views",
    "mean_average_precision",
    "predict_views",
    "topk_accuracy",
    "view_offsets",
]


def view_offsets(total: int, window: int, count: int) -> List[int]:
    """Starts of ``count`` windows of ``window`` evenly spaced over ``total`` (one: the centred one)."""
    if window > total:
        raise ValueError(f"a view of {window} does not fit in {total}; make the test span at least one clip long")
    if count == 1:
        return [(total - window) // 2]
    return [round(i * (total - window) / (count - 1)) for i in range(count)]


def make_views(
    x: torch.Tensor,
    *,
    num_frames: int,
    frame_size: int = 0,
    temporal: int = 1,
    spatial: int = 1,
    samples_per_frame: int = 0,
) -> torch.Tensor:
    """Cut the test views of a batch of long clips.

    Args:
        x: video ``[B, T_span, S, S', 3]`` or audio ``[B, T_span * samples_per_frame]``.
        num_frames: frames per view.
        frame_size: crop side (video).
        temporal: windows per clip (evenly spaced; 1: centred).
        spatial: crops per window (video): 1 = centre, 3 = left, centre, right (top, centre,
            bottom when the square is taller than wide), vertically (horizontally) centred.
        samples_per_frame: audio samples per video frame (audio).

    Returns:
        ``[B, V, ...]`` with ``V = temporal * spatial`` views, temporal-major.
    """
    if x.dim() == 5:
        span, H, W = x.shape[1], x.shape[2], x.shape[3]
        starts = view_offsets(span, num_frames, temporal)
        if spatial not in (1, 3):
            raise ValueError(f"spatial crops must be 1 or 3, got {spatial}")
        long_w = W >= H
        along = view_offsets(W if long_w else H, frame_size, spatial)
        across = (H - frame_size) // 2 if long_w else (W - frame_size) // 2
        views = []
        for t in starts:
            for a in along:
                y, xo = (across, a) if long_w else (a, across)
                views.append(x[:, t : t + num_frames, y : y + frame_size, xo : xo + frame_size])
        return torch.stack(views, dim=1)
    if samples_per_frame < 1:
        raise ValueError("audio views need samples_per_frame >= 1")
    span = x.shape[1] // samples_per_frame
    starts = view_offsets(span, num_frames, temporal)
    n = num_frames * samples_per_frame
    return torch.stack([x[:, t * samples_per_frame : t * samples_per_frame + n] for t in starts], dim=1)


@torch.no_grad()
def predict_views(
    model: nn.Module,
    views: torch.Tensor,
    multi_label: bool,
    device: torch.device,
    precision: str = "fp32",
    chunk: int = 64,
) -> torch.Tensor:
    """Class probabilities ``[B, C]`` averaged over the views ``[B, V, ...]`` (softmax or sigmoid each)."""
    B, V = views.shape[:2]
    flat = views.reshape(B * V, *views.shape[2:])
    probs = []
    for i in range(0, flat.shape[0], chunk):
        with autocast(device, precision):
            logits = model(flat[i : i + chunk].to(device, non_blocking=True))
        logits = logits.float()
        probs.append(torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1))
    return torch.cat(probs).reshape(B, V, -1).mean(dim=1)


def topk_accuracy(probs: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Fraction of clips whose class (``targets [N]``; multi-hot ``[N, C]``: any of them) is among the top ``k``."""
    top = probs.topk(min(k, probs.shape[1]), dim=1).indices  # (N, k)
    if targets.dim() == 1:
        hit = (top == targets[:, None]).any(dim=1)
    else:
        hit = targets.gather(1, top).amax(dim=1) > 0
    return float(hit.float().mean()) if len(hit) else float("nan")


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Average precision of one class: mean over the positives of the precision at their rank
    (ties broken by order), as ``sklearn.metrics.average_precision_score`` without ties."""
    order = torch.argsort(scores, descending=True, stable=True)
    pos = positives[order].double()
    if pos.sum() == 0:
        return float("nan")
    hits = torch.cumsum(pos, 0)
    precision = hits / torch.arange(1, len(pos) + 1, dtype=torch.float64)
    return float((precision * pos).sum() / pos.sum())


def mean_average_precision(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over the classes that have a positive of :func:`average_precision` (``targets``: multi-hot or positions)."""
    if targets.dim() == 1:
        targets = torch.nn.functional.one_hot(targets, probs.shape[1])
    aps = [average_precision(probs[:, c], targets[:, c] > 0) for c in range(probs.shape[1]) if targets[:, c].any()]
    return float(sum(aps) / len(aps)) if aps else float("nan")


def _scores(probs: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> Dict[str, float]:
    out = {"top1": topk_accuracy(probs, targets, 1), "top5": topk_accuracy(probs, targets, 5)}
    if multi_label:
        out["map"] = mean_average_precision(probs, targets)
    return out


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    loader: Any,
    targets: torch.Tensor,
    *,
    modality: str,
    num_frames: int,
    frame_size: int,
    temporal: int,
    spatial: int,
    samples_per_frame: int,
    multi_label: bool,
    device: torch.device,
    precision: str = "fp32",
    shard_gather: bool = True,
    chunk: int = 64,
) -> Dict[str, Any]:
    """Multi-view and single-view scores over one pass of an evaluation loader of long clips.

    Args:
        model: the classifier (eval mode is set for the pass, then restored).
        loader: evaluation loader (``train=False``) whose batches hold ``index`` and the long clips.
        targets: targets of the split's records, by record index (positions ``[N]`` or multi-hot ``[N, C]``).
        modality, num_frames, frame_size, temporal, spatial, samples_per_frame: the views
            (see :func:`make_views`).
        multi_label: sigmoid outputs and mAP.
        device, precision: where and how to run.
        shard_gather: in a process group, gather the ranks' predictions (duplicates by record
            index dropped); off when every rank reads the whole split (FSDP).
        chunk: clips per forward.

    Returns:
        ``{"top1", "top5", ("map"), "single_view": {...}, "clips", "views", "chance_top1", "chance_top5"}``.
    """
    was_training = model.training
    model.eval()
    parts: Dict[str, List[torch.Tensor]] = {"multi": [], "single": [], "index": []}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for batch in loader:
            x = batch[modality]
            kw = dict(num_frames=num_frames, frame_size=frame_size, samples_per_frame=samples_per_frame)
            multi = make_views(x, temporal=temporal, spatial=spatial if modality == "video" else 1, **kw)
            single = make_views(x, temporal=1, spatial=1, **kw)
            parts["multi"].append(predict_views(model, multi, multi_label, device, precision, chunk).cpu())
            parts["single"].append(predict_views(model, single, multi_label, device, precision, chunk).cpu())
            parts["index"].append(batch["index"].cpu())
    model.train(was_training)
    local = {k: torch.cat(v) for k, v in parts.items()}
    if shard_gather and is_dist():
        gathered: List[Any] = [None] * get_world_size()
        dist.all_gather_object(gathered, local)
        local = {k: torch.cat([g[k] for g in gathered]) for k in local}
    order = torch.argsort(local["index"])
    idx = local["index"][order]
    keep = torch.ones_like(idx, dtype=torch.bool)
    keep[1:] = idx[1:] != idx[:-1]  # one row per record
    sel, idx = order[keep], idx[keep]
    y = targets[idx]
    num_classes = local["multi"].shape[1]
    views = temporal * (spatial if modality == "video" else 1)
    out: Dict[str, Any] = _scores(local["multi"][sel], y, multi_label)
    out["single_view"] = _scores(local["single"][sel], y, multi_label)
    out.update(clips=int(len(sel)), views=views, chance_top1=1.0 / num_classes, chance_top5=min(5, num_classes) / num_classes)
    return out

