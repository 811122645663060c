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


def _sorted_rank(scores, positives):
    """Rank by sorting: candidates by decreasing score, a positive before any equal-scoring negative
    (ties count in the query's favour); the rank is the 1-based place of the first positive."""
    order = sorted(range(len(scores)), key=lambda c: (-scores[c], not positives[c]))
    return 1 + next(place for place, c in enumerate(order) if positives[c])


def _unit(vec):
    norm = math.sqrt(sum(float(x) * float(x) for x in vec))
    return [float(x) / norm for x in vec]


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def brute_force_retrieval(video_vt, text_vt, text_mask, video_va=None, audio_va=None):
    """Ranks of every query of clip_retrieval's protocol, in float64 Python loops: {task: [rank, ...]}."""
    n, k = text_mask.shape
    v = [_unit(row) for row in video_vt.tolist()]
    captions = [(i, _unit(text_vt[i, j].tolist())) for i in range(n) for j in range(k) if text_mask[i, j]]
    ranks = {"t2v": [], "v2t": []}
    for owner, cap in captions:  # every present caption queries the n clips
        ranks["t2v"].append(_sorted_rank([_dot(cap, v[c]) for c in range(n)], [c == owner for c in range(n)]))
    for i in range(n):  # every clip with a caption queries all present captions
        if any(owner == i for owner, _ in captions):
            scores = [_dot(v[i], cap) for _, cap in captions]
            ranks["v2t"].append(_sorted_rank(scores, [owner == i for owner, _ in captions]))
    if video_va is not None:
        va, a = [_unit(r) for r in video_va.tolist()], [_unit(r) for r in audio_va.tolist()]
        ranks["v2a"] = [_sorted_rank([_dot(va[i], a[c]) for c in range(n)], [c == i for c in range(n)]) for i in range(n)]
    return ranks


def metrics_from_ranks(ranks):
    """R@1/5/10, median and mean rank of a list of ranks, by counting."""
    q = len(ranks)
    return {
        "r1": sum(r <= 1 for r in ranks) / q,
        "r5": sum(r <= 5 for r in ranks) / q,
        "r10": sum(r <= 10 for r in ranks) / q,
        "medr": float(statistics.median(ranks)),
        "meanr": sum(ranks) / q,
        "queries": float(q),
    }


def test_clip_retrieval_hand_built_ranks():
    """Features whose ranks are read off by hand, with ties, several captions per clip, masked
    captions and a clip without captions. Videos are one-hot, so a caption's score against clip
    j is its j-th entry over its norm; every present caption (and audio) vector is a permutation
    of (3, 2, 1, 1, 0), so all norms are equal and every score is exact: ties are real ties."""
    video = torch.eye(5)
    text = torch.tensor(
        [
            [[3, 2, 1, 1, 0], [1, 3, 2, 1, 0]],  # clip 0: own entries 3 (rank 1), 1 (3 and 2 above: rank 3)
            [[3, 1, 2, 1, 0], [0, 3, 1, 1, 2]],  # clip 1: own entry 1 (rank 3); second caption masked
            [[1, 1, 3, 2, 0], [0, 0, 3, 2, 1]],  # clip 2: own entry 3 (rank 1); second caption masked
            [[2, 3, 1, 0, 1], [1, 0, 1, 2, 3]],  # clip 3: own entries 0 (rank 5) and 2 (3 above: rank 2)
            [[0, 0, 0, 3, 0], [0, 0, 0, 3, 0]],  # clip 4: no captions (both masked), still a t2v candidate
        ],
        dtype=torch.float32,
    )
    mask = torch.tensor([[1, 1], [1, 0], [1, 0], [1, 1], [0, 0]], dtype=torch.bool)
    # v2t: clip i scores caption q by q's i-th entry; present captions in order 00 01 10 20 30 31.
    #   clip 0: column (3,1,3,1,2,1), own best 3, tie with caption 10 -> rank 1
    #   clip 1: column (2,3,1,1,3,0), own 1 -> 2, 3, 3 above -> rank 4
    #   clip 2: column (1,2,2,3,1,1), own 3 -> rank 1
    #   clip 3: column (1,1,1,2,0,2), own best 2 (its second caption), tie -> rank 1
    #   clip 4: no caption, no query
    audio = torch.tensor(
        [[1, 3, 2, 1, 0], [3, 1, 0, 2, 1], [0, 2, 3, 1, 1], [2, 1, 1, 0, 3], [1, 0, 2, 3, 1]], dtype=torch.float32
    )
    # v2a: clip i scores audio j by a_j[i]; columns (1,3,0,2,1) (3,1,2,1,0) (2,0,3,1,2) (1,2,1,0,3) (0,1,1,3,1)
    #   own entries 1, 1, 3, 0, 1 -> ranks 3, 3, 1, 5, 2
    want = {"t2v": [1, 3, 3, 1, 5, 2], "v2t": [1, 4, 1, 1], "v2a": [3, 3, 1, 5, 2]}
    assert brute_force_retrieval(video, text, mask, video, audio) == want
    out = clip_retrieval(video, text, mask, video, audio)
    for task, ranks in want.items():
        assert out[task] == metrics_from_ranks(ranks), task


def test_clip_retrieval_matches_brute_force_on_random_features():
    N, K, D = 11, 3, 6
    video_vt = torch.randn(N, D)
    text_vt = video_vt[:, None] + 1.2 * torch.randn(N, K, D)
    mask = torch.rand(N, K) < 0.7
    mask[0] = False  # a clip without captions
    mask[1, 0] = True
    video_va, audio_va = torch.randn(N, 5), torch.randn(N, 5)
    out = clip_retrieval(video_vt, text_vt, mask, video_va, audio_va)
    ranks = brute_force_retrieval(video_vt, text_vt, mask, video_va, audio_va)
    assert len(ranks["t2v"]) == int(mask.sum()) and len(ranks["v2t"]) == N - 1
    for task in ("t2v", "v2t", "v2a"):
        assert out[task] == pytest.approx(metrics_from_ranks(ranks[task]), rel=1e-12), task
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


def newton_logistic_regression(x, y, num_classes, weight_decay, iters=100):
    """Minimise mean cross-entropy + weight_decay / 2 * ||W||^2 (bias not decayed) on standardised x by
    Newton's method with the analytic gradient and Hessian, in float64.

    Returns (predict, objective): a function of raw features giving labels, and the minimum."""
    mean, std = x.double().mean(0), x.double().std(0, unbiased=False)
    n, d = x.shape
    c = num_classes
    X = torch.cat([(x.double() - mean) / std, torch.ones(n, 1, dtype=torch.float64)], 1)  # (n, d+1): bias last
    Y = F.one_hot(y, c).double()
    decay = torch.ones(d + 1, c, dtype=torch.float64)
    decay[d] = 0.0  # the bias is not decayed
    free = torch.ones(d + 1, c, dtype=torch.bool)
    free[d, c - 1] = False  # softmax ignores a common bias shift: pin one bias at 0

    def objective(theta):
        logits = X @ theta
        return float((torch.logsumexp(logits, 1) - (logits * Y).sum(1)).mean() + 0.5 * weight_decay * (decay * theta**2).sum())

    theta = torch.zeros(d + 1, c, dtype=torch.float64)
    for _ in range(iters):
        p = torch.softmax(X @ theta, 1)  # (n, c)
        grad = X.T @ (p - Y) / n + weight_decay * decay * theta  # (d+1, c)
        curv = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (n, c, c)
        hess = torch.einsum("nab,ni,nj->iajb", curv, X, X).reshape((d + 1) * c, (d + 1) * c) / n
        hess += torch.diag(weight_decay * decay.reshape(-1))
        f = free.reshape(-1)
        g = grad.reshape(-1)[f]
        if float(g.abs().max()) < 1e-13:
            break
        step = torch.zeros((d + 1) * c, dtype=torch.float64)
        step[f] = torch.linalg.solve(hess[f][:, f], g)
        step = step.reshape(d + 1, c)
        t, f0 = 1.0, objective(theta)
        while objective(theta - t * step) > f0 - 0.25 * t * float(g @ step.reshape(-1)[f]) and t > 1e-10:
            t /= 2  # backtracking (Armijo)
        theta = theta - t * step

    def predict(z):
        return (torch.cat([(z.double() - mean) / std, torch.ones(len(z), 1, dtype=torch.float64)], 1) @ theta).argmax(1)

    return predict, objective(theta)


@pytest.mark.parametrize("weight_decay", [1e-4, 1e-1])
def test_linear_probe_equals_newton_fit(weight_decay):
    """Same objective solved independently: the minimum agrees, and so does every predicted label."""
    gen = torch.Generator().manual_seed(7)
    D, C = 5, 4
    w_true = torch.randn(D, C, generator=gen, dtype=torch.float64)
    x_train = torch.randn(150, D, generator=gen, dtype=torch.float64) * 2 + 1
    x_test = torch.randn(80, D, generator=gen, dtype=torch.float64) * 2 + 1
    gumbel = lambda n: -torch.log(-torch.log(torch.rand(n, C, generator=gen, dtype=torch.float64)))  # noqa: E731
    y_train = (x_train @ w_true + gumbel(150)).argmax(1)  # noisy labels: classes overlap
    y_test = (x_test @ w_true + gumbel(80)).argmax(1)
    res = linear_probe(x_train, y_train, x_test, y_test, weight_decay=weight_decay)
    predict, minimum = newton_logistic_regression(x_train, y_train, C, weight_decay)
    assert res["train_loss"] == pytest.approx(minimum, rel=1e-7)
    assert res["accuracy"] == float((predict(x_test) == y_test).double().mean())
    assert res["train_accuracy"] == float((predict(x_train) == y_train).double().mean())
    assert 0.4 < res["accuracy"] < 1.0  # neither chance nor separable: a test of the fit, not of the data
    counts = torch.bincount(y_train, minlength=C).tolist()
    majority = counts.index(max(counts))
    assert res["chance"] == float((y_test == majority).double().mean()) and res["num_classes"] == C


def test_linear_probe_separable_classes_score_one():
    gen = torch.Generator().manual_seed(3)
    D, C = 6, 4
    centres = 8 * torch.eye(C, D)

    def sample(n):
        y = torch.arange(n) % C
        return centres[y] + 0.5 * torch.randn(n, D, generator=gen), y

    (x_train, y_train), (x_test, y_test) = sample(60), sample(40)
    res = linear_probe(x_train, y_train, x_test, y_test)
    assert res["accuracy"] == 1.0 and res["train_accuracy"] == 1.0 and res["num_classes"] == C


def test_linear_probe_random_labels_are_near_chance():
    gen = torch.Generator().manual_seed(5)
    D, C = 8, 4
    x_train, x_test = torch.randn(200, D, generator=gen), torch.randn(2000, D, generator=gen)
    y_train, y_test = torch.randint(0, C, (200,), generator=gen), torch.randint(0, C, (2000,), generator=gen)
    res = linear_probe(x_train, y_train, x_test, y_test)
    # Labels independent of the features: 25% expected, 1 sd = 1%; the fit memorises some noise.
    assert abs(res["accuracy"] - 1 / C) < 0.05 and res["train_accuracy"] > res["accuracy"] + 0.05


def test_linear_probe_bad_shapes():
    with pytest.raises(ValueError, match="same D"):
        linear_probe(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="differ in length"):
        linear_probe(torch.randn(4, 3), torch.zeros(3, dtype=torch.long), torch.randn(2, 3), torch.zeros(2, dtype=torch.long))
    assert math.isfinite(linear_probe(torch.randn(5, 2), torch.tensor([0, 1, 0, 1, 1]), torch.randn(3, 2), torch.tensor([1, 0, 1]))["accuracy"])
