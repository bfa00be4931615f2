"""Mutual k-nearest-neighbour alignment of two representations of the same items.

Huh et al. (ICML 2024, "The Platonic Representation Hypothesis", arXiv 2405.07987): for items
``i = 1..n`` seen through two representations A and B (an image layer and a text layer of matched pairs,
or one modality before and after training), the score is the mean over items of
``|kNN_A(i) ∩ kNN_B(i)| / k``, with cosine kNN among the other items (an item is never its own
neighbour). 1 = the same neighbourhoods, ``k / (n - 1)`` = what unrelated representations give on average.

STRUCTURE (Gröger et al., NeurIPS 2025) aligns the pair of layers that scores highest on the paired
training set; ``lightcrl align-probe`` ranks them with :func:`mutual_knn`. The same score between an
encoder's frozen features and the trained embeddings of the same items measures how much of the frozen
neighbourhood structure training kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lightcrl.metrics.geometry import l2_normalize

#: rows of the n x n similarity matrix computed at once (bounds memory to ROW_CHUNK x n floats)
ROW_CHUNK = 2048


def knn_indices(x: Any, k: int) -> np.ndarray:
    """``[n, k]`` indices of each row's ``k`` nearest other rows by cosine similarity, nearest first
    (ties broken by the lower index). The row itself is excluded."""
    x = l2_normalize(x)
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"k must be in 1..{n - 1} for {n} items, got {k}")
    out = np.empty((n, k), np.int64)
    for start in range(0, n, ROW_CHUNK):
        sim = x[start : start + ROW_CHUNK] @ x.T  # [c, n]
        rows = np.arange(sim.shape[0])
        sim[rows, start + rows] = -np.inf  # not its own neighbour
        # a stable sort of -sim: equal similarities keep index order, so the result is deterministic
        out[start : start + len(rows)] = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return out


def knn_overlap(nn_a: np.ndarray, nn_b: np.ndarray) -> np.ndarray:
    """Per item, ``|nn_a[i] ∩ nn_b[i]| / k`` for two ``[n, k]`` neighbour index arrays."""
    if nn_a.shape != nn_b.shape:
        raise ValueError(f"neighbour arrays differ in shape: {nn_a.shape} vs {nn_b.shape}")
    n, k = nn_a.shape
    out = np.empty(n, np.float64)
    for start in range(0, n, ROW_CHUNK):  # [c, k, k] comparisons at a time
        a, b = nn_a[start : start + ROW_CHUNK], nn_b[start : start + ROW_CHUNK]
        out[start : start + len(a)] = (a[:, :, None] == b[:, None, :]).any(2).sum(1) / k
    return out


def mutual_knn(a: Any, b: Any, k: int = 10) -> float:
    """Mutual-kNN alignment of ``a [n, da]`` and ``b [n, db]`` (row i of each = the same item), in [0, 1].

    The dimensions may differ; only each side's own cosine neighbourhoods are compared.
    """
    a, b = l2_normalize(a), l2_normalize(b)
    if len(a) != len(b):
        raise ValueError(f"need the same items on both sides, got {len(a)} and {len(b)} rows")
    return float(knn_overlap(knn_indices(a, k), knn_indices(b, k)).mean())


def chance_mutual_knn(n: int, k: int) -> float:
    """The expected score of two unrelated representations: each of the k neighbours in B is one of the
    k in A with probability k / (n - 1)."""
    return k / (n - 1)


def rank_pairs(a: dict[str, Any], b: dict[str, Any], k: int = 10) -> list[dict]:
    """Mutual-kNN alignment of every (A representation, B representation) pair, best first.

    ``a`` and ``b`` map names (e.g. an image layer, a text layer) to ``[n, d]`` features of the same n
    items in the same order. Each representation's neighbours are computed once. Ties keep the input
    order. Returns ``[{"media": name_a, "text": name_b, "mutual_knn": score}, ...]``.
    """
    nn_a = {name: knn_indices(x, k) for name, x in a.items()}
    nn_b = {name: knn_indices(x, k) for name, x in b.items()}
    sizes = {len(v) for v in [*nn_a.values(), *nn_b.values()]}
    if len(sizes) > 1:
        raise ValueError(f"every representation needs the same items; got row counts {sorted(sizes)}")
    rows = [
        {"media": na, "text": nb, "mutual_knn": float(knn_overlap(ia, ib).mean())}
        for na, ia in nn_a.items()
        for nb, ib in nn_b.items()
    ]
    return sorted(rows, key=lambda r: -r["mutual_knn"])
