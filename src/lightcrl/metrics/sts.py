"""Semantic textual similarity metrics (the data: :mod:`lightcrl.data.sts`).

The score of a pair is the cosine similarity of its two sentence embeddings; the metrics are the
Spearman and Pearson correlations with the gold scores, x100 (as reported by SentEval / SimCSE / MTEB).
For STS12-16 the headline is the "all" setting of SimCSE, which is MTEB's per-year task: the predictions
and gold scores of all subsets of a year concatenated before one Spearman is computed (see
:func:`evaluate_many`; why this convention: :mod:`lightcrl.data.sts`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import stats

from lightcrl.metrics.geometry import l2_normalize, to_numpy


def cosine_scores(emb1: Any, emb2: Any) -> np.ndarray:
    """Row-wise cosine similarity of two [n, d] arrays."""
    a, b = l2_normalize(emb1), l2_normalize(emb2)
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {a.shape} vs {b.shape}")
    return np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))


def _correlations(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    if len(pred) < 2:
        raise ValueError("need at least 2 pairs for a correlation")
    return {
        "spearman": float(100.0 * stats.spearmanr(pred, gold)[0]),
        "pearson": float(100.0 * stats.pearsonr(pred, gold)[0]),
        "n": len(pred),
    }


def evaluate(emb1: Any, emb2: Any, gold: Any) -> dict[str, float]:
    """Spearman and Pearson (x100) between cos(emb1_i, emb2_i) and ``gold``, and the pair count ``n``."""
    pred = cosine_scores(emb1, emb2)
    gold = to_numpy(gold, dtype=np.float64).reshape(-1)
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold scores for {len(pred)} pairs")
    return _correlations(pred, gold)


def evaluate_many(subsets: Mapping[str, tuple[Any, Any, Any]]) -> dict[str, float]:
    """Per subset {name: (emb1, emb2, gold)}: ``{name}/spearman``, ``{name}/pearson``, ``{name}/n``;
    plus ``all/spearman`` and ``all/pearson`` on the concatenation of all subsets (SimCSE's "all"),
    ``mean/spearman`` (unweighted mean of subsets) and ``wmean/spearman`` (weighted by pair count).
    """
    if not subsets:
        raise ValueError("no subsets")
    out: dict[str, float] = {}
    preds, golds = [], []
    for name, (e1, e2, g) in subsets.items():
        pred = cosine_scores(e1, e2)
        gold = to_numpy(g, dtype=np.float64).reshape(-1)
        if len(gold) != len(pred):
            raise ValueError(f"{name}: {len(gold)} gold scores for {len(pred)} pairs")
        for k, v in _correlations(pred, gold).items():
            out[f"{name}/{k}"] = v
        preds.append(pred)
        golds.append(gold)
    for k, v in _correlations(np.concatenate(preds), np.concatenate(golds)).items():
        out[f"all/{k}"] = v
    sp = np.array([out[f"{name}/spearman"] for name in subsets])
    ns = np.array([out[f"{name}/n"] for name in subsets], dtype=np.float64)
    out["mean/spearman"] = float(sp.mean())
    out["wmean/spearman"] = float((sp * ns).sum() / ns.sum())
    return out


def evaluate_sets(sets: Mapping[str, Mapping[str, tuple[Any, Any, Any]]]) -> dict[str, float]:
    """Several STS sets {set: {subset: (emb1, emb2, gold)}}, each scored by one headline correlation.

    A set of one subset (STS-B, SICK) is :func:`evaluate`; a set of several (an STS year) is
    :func:`evaluate_many` with ``spearman``/``pearson``/``n`` = its "all" setting (concatenation).
    One set: its metrics as they are. Several: each prefixed ``{set}/``, plus ``spearman`` and
    ``pearson`` = the plain mean over sets and ``n`` = all their pairs.
    """
    if not sets:
        raise ValueError("no STS sets")
    per_set = {}
    for name, subsets in sets.items():
        if len(subsets) == 1:
            ((e1, e2, g),) = subsets.values()
            per_set[name] = evaluate(e1, e2, g)
        else:
            res = evaluate_many(subsets)
            for k in ("spearman", "pearson", "n"):
                res[k] = res.pop(f"all/{k}")
            per_set[name] = res
    if len(per_set) == 1:
        return next(iter(per_set.values()))
    out: dict[str, float] = {f"{name}/{k}": v for name, res in per_set.items() for k, v in res.items()}
    out["spearman"] = float(np.mean([res["spearman"] for res in per_set.values()]))
    out["pearson"] = float(np.mean([res["pearson"] for res in per_set.values()]))
    out["n"] = int(sum(res["n"] for res in per_set.values()))
    return out
