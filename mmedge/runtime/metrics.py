"""Exact retrieval metrics (Recall@k, median and mean rank) from embeddings.

Scores are exact dot products computed in float64, in chunks of queries so that at most
about :data:`CHUNK_ELEMENTS` scores are held at once.

Rank convention: the rank of a query is the 1-based position of its best-scored positive
among all gallery items, counting every non-positive item that scores **greater than or
equal to** it as ranked ahead (ties go against the query, so a degenerate model that gives
every item the same score does not look perfect). Recall@k is the fraction of queries whose
rank is ``<= k``, i.e. with any positive in the top ``k``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np

from mmedge.errors import UsageError

logger = logging.getLogger(__name__)

#: Most query x gallery scores held in memory at once (float64: 8 bytes each).
CHUNK_ELEMENTS: int = 1 << 22


def _positives_as_sets(positives: Sequence[Iterable[int]] | np.ndarray, q: int, g: int) -> list[np.ndarray]:
    if not isinstance(positives, np.ndarray) and all(isinstance(p, (int, np.integer)) for p in positives):
        positives = np.asarray(list(positives), dtype=np.int64)
    if isinstance(positives, np.ndarray) and positives.ndim == 1:
        if not np.issubdtype(positives.dtype, np.integer):
            raise UsageError(f"positives as an array must hold integer gallery indices, got {positives.dtype}")
        sets = [np.asarray([int(p)], dtype=np.int64) for p in positives]
    else:
        try:
            sets = [np.unique(np.asarray(sorted(int(x) for x in p), dtype=np.int64)) for p in positives]
        except TypeError as exc:
            raise UsageError(
                "positives must be a (Q,) integer array or a list of Q sets of gallery indices"
            ) from exc
    if len(sets) != q:
        raise UsageError(f"{len(sets)} positive sets for {q} queries")
    for i, s in enumerate(sets):
        if s.size == 0:
            raise UsageError(f"query {i} has no positive gallery item")
        if s.min() < 0 or s.max() >= g:
            raise UsageError(f"query {i} names a positive outside the gallery (0..{g - 1}): {s.tolist()}")
    return sets


def ranks_of_positives(
    query_emb: np.ndarray,
    gallery_emb: np.ndarray,
    positives: Sequence[Iterable[int]] | np.ndarray,
) -> np.ndarray:
    """``(Q, D)`` queries, ``(G, D)`` gallery, ``Q`` positive sets -> ``(Q,) int64`` 1-based ranks.

    See the module docstring for the tie convention.
    """
    q = np.asarray(query_emb)
    g = np.asarray(gallery_emb)
    if q.ndim != 2 or g.ndim != 2:
        raise UsageError(f"embeddings must be 2-d: query {q.shape}, gallery {g.shape}")
    if q.shape[1] != g.shape[1]:
        raise UsageError(f"query dim {q.shape[1]} differs from gallery dim {g.shape[1]}")
    if q.shape[0] == 0 or g.shape[0] == 0:
        raise UsageError(f"need at least one query and one gallery item, got {q.shape[0]} and {g.shape[0]}")
    q64 = q.astype(np.float64)
    g64 = g.astype(np.float64)
    if not (np.isfinite(q64).all() and np.isfinite(g64).all()):
        raise UsageError("embeddings contain NaN or infinity")
    sets = _positives_as_sets(positives, q.shape[0], g.shape[0])

    n_q, n_g = q.shape[0], g.shape[0]
    chunk = max(1, CHUNK_ELEMENTS // n_g)
    ranks = np.empty(n_q, dtype=np.int64)
    gt = g64.T
    for start in range(0, n_q, chunk):
        scores = q64[start : start + chunk] @ gt  # (c, G)
        for row, s in enumerate(scores):
            pos = sets[start + row]
            pos_scores = s[pos]
            best = pos_scores.max()
            at_least = int(np.count_nonzero(s >= best))
            positives_at_least = int(np.count_nonzero(pos_scores >= best))
            ranks[start + row] = at_least - positives_at_least + 1
    return ranks


def retrieval_metrics(
    query_emb: np.ndarray,
    gallery_emb: np.ndarray,
    positives: Sequence[Iterable[int]] | np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float | int]:
    """Recall@k and rank statistics of exact dot-product retrieval.

    Args:
        query_emb: ``(Q, D)`` query embeddings.
        gallery_emb: ``(G, D)`` gallery embeddings.
        positives: per query, the gallery indices that count as correct: a ``(Q,)`` integer
            array or list of ints (one positive each) or a list of ``Q`` non-empty sets.
        ks: cut-offs for Recall@k (positive integers).

    Returns:
        ``{"R@k": fraction for each k, "median_rank": float, "mean_rank": float,
        "n_queries": Q}``; ranks are 1-based (see the module docstring).
    """
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise UsageError(f"ks must be positive integers, got {k!r}")
    ranks = ranks_of_positives(query_emb, gallery_emb, positives)
    out: dict[str, float | int] = {f"R@{int(k)}": float(np.mean(ranks <= k)) for k in ks}
    out["median_rank"] = float(np.median(ranks))
    out["mean_rank"] = float(np.mean(ranks))
    out["n_queries"] = int(ranks.size)
    return out
