"""mmedge.runtime.metrics against a hand-checked case and a naive loop."""

from __future__ import annotations

import numpy as np
import pytest

import mmedge.runtime.metrics as metrics
from mmedge.errors import UsageError
from mmedge.runtime.metrics import ranks_of_positives, retrieval_metrics


def test_hand_checked_case() -> None:
    # 2-d unit vectors with exactly representable dot products (scores listed per query).
    gallery = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8], [-0.8, 0.6]])
    queries = np.array([[1.0, 0.0], [0.0, 1.0], [-0.8, 0.6]])
    # query 0: scores 1, .8, .6, 0, -.6, -.8 -> positive g2 has rank 3
    # query 1: scores 0, .6, .8, 1, .8, .6 -> positives {g0, g4}: best g4 (.8), tied with g2;
    #          ties count against the query -> g3 and g2 ahead -> rank 3
    # query 2: scores -.8, -.28, 0, .6, .96, 1 -> positive g5 -> rank 1
    positives = [{2}, {0, 4}, {5}]
    ranks = ranks_of_positives(queries, gallery, positives)
    assert ranks.tolist() == [3, 3, 1]
    m = retrieval_metrics(queries, gallery, positives, ks=(1, 2, 3, 5))
    assert m["R@1"] == pytest.approx(1 / 3)
    assert m["R@2"] == pytest.approx(1 / 3)
    assert m["R@3"] == pytest.approx(1.0)
    assert m["R@5"] == pytest.approx(1.0)
    assert m["median_rank"] == 3.0
    assert m["mean_rank"] == pytest.approx(7 / 3)
    assert m["n_queries"] == 3
    # an integer array of one positive per query is the same as singleton sets
    as_array = retrieval_metrics(queries, gallery, np.array([2, 4, 5]))
    as_sets = retrieval_metrics(queries, gallery, [{2}, {4}, {5}])
    assert as_array == as_sets
    assert retrieval_metrics(queries, gallery, [2, 4, 5]) == as_array
    assert set(as_array) == {"R@1", "R@5", "R@10", "median_rank", "mean_rank", "n_queries"}


def test_constant_scores_are_not_perfect() -> None:
    q = np.ones((4, 3), np.float32)
    g = np.ones((5, 3), np.float32)
    m = retrieval_metrics(q, g, np.array([0, 1, 2, 3]))
    assert m["R@1"] == 0.0 and m["median_rank"] == 5.0


def naive(query: np.ndarray, gallery: np.ndarray, positives: list[set[int]], ks: tuple[int, ...]) -> dict:
    ranks = []
    for i in range(len(query)):
        scores = [float(np.dot(query[i].astype(np.float64), gallery[j].astype(np.float64)))
                  for j in range(len(gallery))]
        best_pos = max(scores[j] for j in positives[i])
        ahead = sum(1 for j in range(len(gallery)) if j not in positives[i] and scores[j] >= best_pos)
        ranks.append(ahead + 1)
    out = {f"R@{k}": sum(r <= k for r in ranks) / len(ranks) for k in ks}
    out["median_rank"] = float(np.median(ranks))
    out["mean_rank"] = sum(ranks) / len(ranks)
    out["n_queries"] = len(ranks)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_loop(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(seed)
    q, g, d = 37, 53, 8
    query = rng.standard_normal((q, d)).astype(np.float32)
    gallery = rng.standard_normal((g, d)).astype(np.float32)
    positives = [set(rng.choice(g, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(q)]
    ks = (1, 3, 5, 10)
    expected = naive(query, gallery, positives, ks)
    got = retrieval_metrics(query, gallery, positives, ks=ks)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value)
    # tiny chunks give the same result
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 7)
    chunked = retrieval_metrics(query, gallery, positives, ks=ks)
    assert chunked == got


def test_bad_arguments() -> None:
    q = np.zeros((2, 3), np.float32)
    g = np.zeros((4, 3), np.float32)
    with pytest.raises(UsageError):
        retrieval_metrics(q, np.zeros((4, 2)), np.array([0, 1]))
    with pytest.raises(UsageError):
        retrieval_metrics(q, g, np.array([0]))
    with pytest.raises(UsageError):
        retrieval_metrics(q, g, np.array([0, 4]))
    with pytest.raises(UsageError):
        retrieval_metrics(q, g, [{0}, set()])
    with pytest.raises(UsageError):
        retrieval_metrics(q, g, np.array([0, 1]), ks=(0,))
    with pytest.raises(UsageError):
        retrieval_metrics(np.full((2, 3), np.nan), g, np.array([0, 1]))
    with pytest.raises(UsageError):
        retrieval_metrics(np.zeros((0, 3)), g, np.array([], dtype=np.int64))
