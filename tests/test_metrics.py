"""Retrieval metrics and the linear probe of vatt_fast.metrics, against brute-force computations."""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from vatt_fast.metrics import (
    chance_metrics,
    clip_retrieval,
    format_retrieval_table,
    linear_probe,
    retrieval_metrics,
    retrieval_ranks,
)


def _brute_rank(scores, positives):
    best = max(s for s, p in zip(scores, positives) if p)
    return 1 + sum(1 for s in scores if s > best)


def test_ranks_match_brute_force_with_ties():
    Q, C = 13, 29
    sim = torch.randint(-3, 4, (Q, C)).float()  # many ties
    pos = torch.rand(Q, C) < 0.15
    pos[torch.arange(Q), torch.randint(0, C, (Q,))] = True  # at least one positive per row
    got = retrieval_ranks(sim, pos)
    want = [_brute_rank(sim[q].tolist(), pos[q].tolist()) for q in range(Q)]
    assert got.tolist() == want


def test_metrics_match_statistics_module():
    ranks = torch.randint(1, 40, (17,))
    m = retrieval_metrics(ranks)
    r = ranks.tolist()
    assert m["r1"] == pytest.approx(sum(x <= 1 for x in r) / 17)
    assert m["r5"] == pytest.approx(sum(x <= 5 for x in r) / 17)
    assert m["r10"] == pytest.approx(sum(x <= 10 for x in r) / 17)
    assert m["medr"] == pytest.approx(statistics.median(r))
    assert m["meanr"] == pytest.approx(statistics.mean(r))
    even = torch.tensor([4, 1, 9, 2])
    assert retrieval_metrics(even)["medr"] == pytest.approx(3.0)


def test_ranks_reject_query_without_positive():
    pos = torch.zeros(2, 3, dtype=torch.bool)
    pos[0, 1] = True
    with pytest.raises(ValueError, match="query 1 has no positive"):
        retrieval_ranks(torch.randn(2, 3), pos)


def test_clip_retrieval_brute_force():
    N, K, D = 11, 3, 6
    video_vt = torch.randn(N, D)
    text_vt = video_vt[:, None] + 1.2 * torch.randn(N, K, D)
    mask = torch.rand(N, K) < 0.7
    mask[0] = False  # a clip without captions
    mask[1, 0] = True
    video_va, audio_va = torch.randn(N, 5), torch.randn(N, 5)
    out = clip_retrieval(video_vt, text_vt, mask, video_va, audio_va)

    v = F.normalize(video_vt, dim=-1)
    t = F.normalize(text_vt, dim=-1)
    t2v = []
    for i in range(N):
        for k in range(K):
            if mask[i, k]:
                scores = (v @ t[i, k]).tolist()
                t2v.append(_brute_rank(scores, [j == i for j in range(N)]))
    v2t = []
    caps = [(i, k) for i in range(N) for k in range(K) if mask[i, k]]
    for i in range(N):
        if mask[i].any():
            scores = [float(v[i] @ t[j, k]) for j, k in caps]
            v2t.append(_brute_rank(scores, [j == i for j, _ in caps]))
    va, a = F.normalize(video_va, dim=-1), F.normalize(audio_va, dim=-1)
    v2a = [_brute_rank((a @ va[i]).tolist(), [j == i for j in range(N)]) for i in range(N)]
    for task, ranks in (("t2v", t2v), ("v2t", v2t), ("v2a", v2a)):
        assert out[task]["queries"] == len(ranks)
        assert out[task]["r1"] == pytest.approx(sum(r <= 1 for r in ranks) / len(ranks))
        assert out[task]["r5"] == pytest.approx(sum(r <= 5 for r in ranks) / len(ranks))
        assert out[task]["medr"] == pytest.approx(statistics.median(ranks))
    assert out["chance"]["r1"] == pytest.approx(1 / N)
    assert out["chance"]["medr"] == pytest.approx((N + 1) / 2)
    table = format_retrieval_table(out)
    assert table.splitlines()[0].startswith("task") and "chance" in table and "t2v" in table


def test_perfect_embeddings_rank_first():
    N, K = 9, 2
    e = torch.eye(N, 16)[:, :16]
    out = clip_retrieval(e, e[:, None].expand(N, K, 16), torch.ones(N, K, dtype=torch.bool), e, e)
    for task in ("t2v", "v2t", "v2a"):
        assert out[task]["r1"] == 1.0 and out[task]["medr"] == 1.0


def test_chance():
    c = chance_metrics(64)
    assert c["r1"] == 1 / 64 and c["r5"] == 5 / 64 and c["r10"] == 10 / 64 and c["medr"] == 32.5
    assert chance_metrics(3)["r5"] == 1.0


def test_linear_probe_learns_linear_labels_and_not_shuffled_ones():
    D, C = 7, 4
    w_true = torch.randn(D, C) * 3
    x_train, x_test = torch.randn(403, D) * 2 + 1, torch.randn(201, D) * 2 + 1
    y_train, y_test = (x_train @ w_true).argmax(1), (x_test @ w_true).argmax(1)
    res = linear_probe(x_train, y_train, x_test, y_test)
    assert res["accuracy"] > 0.9 and res["num_classes"] == C
    shuffled = y_train[torch.randperm(len(y_train))]
    res_shuffled = linear_probe(x_train, shuffled, x_test, y_test)
    assert res_shuffled["accuracy"] < 0.6 and res_shuffled["train_accuracy"] > res_shuffled["accuracy"]


def test_linear_probe_reaches_the_optimum():
    """The fitted objective is stationary: compare with an independent gradient-descent fit's loss."""
    D, C = 3, 3
    x = torch.randn(97, D)
    y = torch.randint(0, C, (97,))
    res = linear_probe(x, y, x, y, weight_decay=1e-2)
    # Independent fit: plain full-batch gradient descent on the same standardised objective.
    xs = ((x - x.mean(0)) / x.std(0, unbiased=False)).double()
    w = torch.zeros(D, C, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(C, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w, b], lr=1.0)
    for _ in range(400):
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w + b, y) + 0.5e-2 * (w * w).sum()
        loss.backward()
        opt.step()
    acc_gd = float(((xs @ w + b).argmax(1) == y).double().mean())
    assert res["train_accuracy"] == pytest.approx(acc_gd, abs=2 / 97)


def test_linear_probe_bad_shapes():
    with pytest.raises(ValueError, match="same D"):
        linear_probe(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="differ in length"):
        linear_probe(torch.randn(4, 3), torch.zeros(3, dtype=torch.long), torch.randn(2, 3), torch.zeros(2, dtype=torch.long))
    assert math.isfinite(linear_probe(torch.randn(5, 2), torch.tensor([0, 1, 0, 1, 1]), torch.randn(3, 2), torch.tensor([1, 0, 1]))["accuracy"])
