"""Semantic textual similarity: loaders for STS-B, SentEval STS12-16 and SICK, and correlation metrics.

The score of a pair is the cosine similarity of its two sentence embeddings; the metrics are the
Spearman and Pearson correlations with the gold scores, x100 (as reported by SentEval / SimCSE). For
STS12-16 the community reports the "all" setting: the predictions and gold scores of all subsets of a
year concatenated before one Spearman is computed (see :func:`evaluate_many`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from lightcrl.metrics.geometry import l2_normalize, to_numpy

Pairs = tuple[list[str], list[str], np.ndarray]

_STSB_SPLITS = ("train", "dev", "test")


def _read_tsv(path: Path) -> list[list[str]]:
    """Tab-separated rows, no quoting (quotes are literal text in these files), blank lines skipped."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if any(row)]


def load_sts_benchmark(root: str | os.PathLike, split: str = "test") -> Pairs:
    """STS Benchmark ``sts-{split}.csv`` (SentEval or original layout): fields genre, file, year, id,
    score, sentence1, sentence2; fields after the 7th (source info in the original files) are ignored.
    """
    if split not in _STSB_SPLITS:
        raise ValueError(f"split must be one of {_STSB_SPLITS}, got {split!r}")
    path = Path(root) / f"sts-{split}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"STS Benchmark file not found: {path}")
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    for lineno, row in enumerate(_read_tsv(path), 1):
        if len(row) < 7:
            raise ValueError(f"{path}:{lineno}: expected at least 7 tab-separated fields, got {len(row)}")
        scores.append(float(row[4]))
        s1.append(row[5].strip())
        s2.append(row[6].strip())
    return s1, s2, np.asarray(scores, dtype=np.float64)


def load_senteval_sts(root: str | os.PathLike, subsets: list[str] | None = None) -> dict[str, Pairs]:
    """One SentEval STS12-16 folder: ``STS.input.<name>.txt`` (sentence1 TAB sentence2) with
    ``STS.gs.<name>.txt`` (one gold score a line; pairs with an empty gold line are skipped).

    Returns {subset name: (sents1, sents2, scores)}, in sorted name order unless ``subsets`` is given.
    """
    root = Path(root)
    if subsets is None:
        subsets = sorted(p.name[len("STS.input.") : -len(".txt")] for p in root.glob("STS.input.*.txt"))
        subsets = [s for s in subsets if (root / f"STS.gs.{s}.txt").is_file()]
    if not subsets:
        raise FileNotFoundError(f"no STS.input.<name>.txt / STS.gs.<name>.txt pairs in {root}")
    out: dict[str, Pairs] = {}
    for name in subsets:
        with open(root / f"STS.input.{name}.txt", encoding="utf-8", errors="replace") as f:
            inputs = f.read().splitlines()
        with open(root / f"STS.gs.{name}.txt", encoding="utf-8", errors="replace") as f:
            gold = f.read().splitlines()
        if len(gold) > len(inputs):
            raise ValueError(f"{name}: {len(gold)} gold lines for {len(inputs)} input lines")
        s1, s2, sc = [], [], []
        for lineno, (line, gs) in enumerate(zip(inputs, gold), 1):
            if not gs.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise ValueError(f"STS.input.{name}.txt:{lineno}: expected 2 tab-separated sentences")
            s1.append(fields[0].strip())
            s2.append(fields[1].strip())
            sc.append(float(gs))
        out[name] = (s1, s2, np.asarray(sc, dtype=np.float64))
    return out


def load_sick(path: str | os.PathLike, split: str | None = None) -> Pairs:
    """Official SICK tab-separated file (header pair_ID, sentence_A, sentence_B, relatedness_score, ...).

    When the file has a ``SemEval_set`` column (the full SICK.txt), ``split`` ("TRAIN", "TRIAL", "TEST",
    case-insensitive) keeps only that part.
    """
    rows = _read_tsv(Path(path))
    if not rows:
        raise ValueError(f"{path}: empty file")
    header = [h.strip().lstrip("\ufeff") for h in rows[0]]
    col = {h: i for i, h in enumerate(header)}
    for need in ("sentence_A", "sentence_B", "relatedness_score"):
        if need not in col:
            raise ValueError(f"{path}: no {need!r} column in header {header}")
    if split is not None and "SemEval_set" not in col:
        raise ValueError(f"{path}: no SemEval_set column to select split {split!r} from")
    s1, s2, sc = [], [], []
    for row in rows[1:]:
        if split is not None and row[col["SemEval_set"]].strip().upper() != split.upper():
            continue
        s1.append(row[col["sentence_A"]].strip())
        s2.append(row[col["sentence_B"]].strip())
        sc.append(float(row[col["relatedness_score"]]))
    return s1, s2, np.asarray(sc, dtype=np.float64)


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
