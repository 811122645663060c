"""Evaluation metrics: zero-shot retrieval (R@K, median rank) and a linear probe.

Retrieval follows the usual protocol (YouCook2 / MSR-VTT, as in VATT and MIL-NCE):
embeddings are L2-normalised and ranked by cosine similarity; the rank of a query
is ``1 + the number of candidates scoring strictly higher than its best correct
candidate`` (ties counted in the query's favour); R@K is the fraction of queries
whose rank is at most K, medR the median rank. Chance for ``N`` candidates is
``R@K = K / N`` and ``medR = (N + 1) / 2``.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "retrieval_ranks",
    "retrieval_metrics",
    "chance_metrics",
    "clip_retrieval",
    "linear_probe",
    "format_retrieval_table",
]

RECALL_AT = (1, 5, 10)


def retrieval_ranks(sim: Tensor, positives: Tensor) -> Tensor:
    """1-based rank of each query's best positive candidate.

    Args:
        sim: ``[Q, C]`` query-candidate scores (higher is better).
        positives: ``[Q, C]`` bool, True where the candidate is a correct answer; every
            row needs at least one.

    Returns:
        int64 ``[Q]``: ``1 + #{c : sim[q, c] > max over positives of sim[q]}``.
    """
    if sim.shape != positives.shape or sim.dim() != 2:
        raise ValueError(f"sim and positives must both be [Q, C], got {tuple(sim.shape)} and {tuple(positives.shape)}")
    if not bool(positives.any(dim=1).all()):
        bad = int((~positives.any(dim=1)).nonzero()[0])
        raise ValueError(f"query {bad} has no positive candidate; drop queries without a ground truth first")
    best = sim.masked_fill(~positives, float("-inf")).max(dim=1, keepdim=True).values  # (Q, 1)
    return 1 + (sim > best).sum(dim=1)


def retrieval_metrics(ranks: Tensor, recall_at: Sequence[int] = RECALL_AT) -> Dict[str, float]:
    """R@K (fractions in [0, 1]), median and mean rank from 1-based ``ranks`` ``[Q]``."""
    r = ranks.double()
    out = {f"r{k}": float((r <= k).double().mean()) for k in recall_at}
    # numpy's median (the mean of the two middle ranks for an even count), as MIL-NCE's eval code uses.
    out["medr"] = float(torch.quantile(r, 0.5))
    out["meanr"] = float(r.mean())
    return out


def chance_metrics(num_candidates: int, recall_at: Sequence[int] = RECALL_AT) -> Dict[str, float]:
    """Expected metrics of a random ranking over ``num_candidates`` with one correct answer."""
    n = max(1, int(num_candidates))
    out = {f"r{k}": min(1.0, k / n) for k in recall_at}
    out["medr"] = (n + 1) / 2
    out["meanr"] = (n + 1) / 2
    return out


def clip_retrieval(
    video_vt: Tensor,
    text_vt: Tensor,
    text_mask: Tensor,
    video_va: Optional[Tensor] = None,
    audio_va: Optional[Tensor] = None,
) -> Dict[str, Dict[str, float]]:
    """Zero-shot retrieval among ``N`` clips: text->video, video->text, video->audio.

    Args:
        video_vt: ``[N, D_vt]`` clip embeddings in S_vt.
        text_vt: ``[N, K, D_vt]`` caption embeddings (K per clip).
        text_mask: ``[N, K]`` bool, True where the caption exists.
        video_va, audio_va: ``[N, D_va]`` clip and audio embeddings in S_va (optional).

    Returns:
        ``{"t2v": ..., "v2t": ..., "v2a": ..., "chance": ...}``, each a dict of
        ``r1, r5, r10, medr, meanr`` (and ``queries``). ``t2v``: every present caption
        queries the N clips, its own clip is correct. ``v2t``: every clip with a
        caption queries all present captions, any of its own is correct (the query's
        rank is that of its best-scoring own caption). ``v2a``: every clip queries the
        N audio tracks, its own is correct. Masked captions are neither queries nor
        candidates; a clip without captions is no v2t query but still a t2v candidate.
        ``chance``: a random ranking over N candidates with one correct answer (t2v and
        v2a; for v2t with several captions per clip it is only indicative).
    """
    n, k, _ = text_vt.shape
    v = F.normalize(video_vt.float(), dim=-1)
    t = F.normalize(text_vt.float(), dim=-1).reshape(n * k, -1)
    mask = text_mask.reshape(n * k).bool()
    owner = torch.arange(n, device=v.device).repeat_interleave(k)  # (N*K,) clip of each caption
    t, owner = t[mask], owner[mask]
    out: Dict[str, Dict[str, float]] = {}
    if t.shape[0]:
        sim_tv = t @ v.T  # (Q, N)
        pos_tv = owner[:, None] == torch.arange(n, device=v.device)[None, :]
        out["t2v"] = {**retrieval_metrics(retrieval_ranks(sim_tv, pos_tv)), "queries": float(t.shape[0])}
        has_text = pos_tv.any(dim=0)  # (N,) clips with at least one caption
        sim_vt = sim_tv.T[has_text]  # (N', Q)
        pos_vt = pos_tv.T[has_text]
        out["v2t"] = {**retrieval_metrics(retrieval_ranks(sim_vt, pos_vt)), "queries": float(sim_vt.shape[0])}
    if video_va is not None and audio_va is not None:
        va = F.normalize(video_va.float(), dim=-1)
        a = F.normalize(audio_va.float(), dim=-1)
        out["v2a"] = {
            **retrieval_metrics(retrieval_ranks(va @ a.T, torch.eye(n, dtype=torch.bool, device=va.device))),
            "queries": float(n),
        }
    out["chance"] = {**chance_metrics(n), "candidates": float(n)}
    return out


def format_retrieval_table(results: Dict[str, Dict[str, float]]) -> str:
    """A fixed-width table of R@1/5/10 (%) and medR per task, with the chance row last."""
    rows = ["task    R@1     R@5     R@10    medR    queries"]
    for task in ("t2v", "v2t", "v2a", "chance"):
        if task not in results:
            continue
        m = results[task]
        queries = f"{int(m['queries']):d}" if "queries" in m else "-"
        rows.append(
            f"{task:<7} {100 * m['r1']:6.1f}  {100 * m['r5']:6.1f}  {100 * m['r10']:6.1f}  {m['medr']:6.1f}  {queries}"
        )
    return "\n".join(rows)


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> Dict[str, float]:
    """Multinomial logistic regression on frozen features, fitted with L-BFGS in torch.

    Features are standardised with the training set's mean and std; the objective is
    ``mean cross-entropy + weight_decay / 2 * ||W||^2`` (bias not decayed), minimised
    full-batch with L-BFGS (strong Wolfe line search), in float64.

    Args:
        train_x: ``[N, D]`` features; train_y: ``[N]`` int64 labels in ``[0, C)``.
        test_x: ``[M, D]``; test_y: ``[M]``.
        weight_decay: L2 strength on the weights.
        max_iter: L-BFGS iterations.

    Returns:
        ``{"accuracy", "train_accuracy", "num_classes", "chance", "train_loss"}`` (accuracies
        in [0, 1]; chance = the test frequency of the most common training class;
        train_loss = the objective above at the fitted weights).
    """
    if train_x.dim() != 2 or test_x.dim() != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"features must be [N, D] and [M, D] with the same D, got {tuple(train_x.shape)} and {tuple(test_x.shape)}"
        )
    if train_x.shape[0] != train_y.shape[0] or test_x.shape[0] != test_y.shape[0]:
        raise ValueError(
            f"features and labels differ in length: train {train_x.shape[0]} vs {train_y.shape[0]}, "
            f"test {test_x.shape[0]} vs {test_y.shape[0]}"
        )
    if train_y.numel() == 0 or test_y.numel() == 0:
        raise ValueError("linear probe needs at least one labelled training and one labelled test sample")
    x = train_x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    x = (x - mean) / std
    xt = (test_x.double() - mean) / std
    y, yt = train_y.long(), test_y.long()
    num_classes = int(max(int(y.max()), int(yt.max())) + 1)
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        acc = float(((xt @ w + b).argmax(1) == yt).double().mean())
        train_acc = float(((x @ w + b).argmax(1) == y).double().mean())
        majority = int(torch.bincount(y, minlength=num_classes).argmax())
        chance = float((yt == majority).double().mean())
        train_loss = float(F.cross_entropy(x @ w + b, y) + 0.5 * weight_decay * (w * w).sum())
    return {
        "accuracy": acc,
        "train_accuracy": train_acc,
        "num_classes": float(num_classes),
        "chance": chance,
        "train_loss": train_loss,
    }
