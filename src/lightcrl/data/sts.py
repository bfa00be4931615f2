"""Semantic textual similarity data: sentence pairs with gold scores, read from the official layouts.

Spec kinds (the split is passed separately):

- ``stsb:DIR``: STS Benchmark ``sts-{train,dev,test}.csv`` (SentEval or original layout). Splits test
  (default), dev, train.
- ``sick:FILE``: an official SICK tab-separated file. Split ``all`` (default); with a ``SemEval_set``
  column (the full ``SICK.txt``) also ``train``, ``trial``, ``test``.
- ``senteval:DIR``: SentEval's ``data/downstream/STS`` folder, holding ``STS12-en-test`` ...
  ``STS16-en-test`` (``STS.input.<subset>.txt``: sentence1 TAB sentence2; ``STS.gs.<subset>.txt``: one
  gold score a line, EMPTY for an unscored pair, which is dropped as SentEval does) and ``STSBenchmark/``
  (its test split); or DIR = one of those folders. Split ``test`` only. A year reads SentEval's own list
  of subsets (STS13 without SMT, which the public release lacks; other files in the folder are ignored).

Convention for a year (STS12-16): ONE Spearman over the concatenation of all its scored pairs, the
setting of MTEB's STS12..STS16 tasks (one test split per year, ``cosine_spearman``), which is where the
published all-MiniLM-L6-v2 scores come from (MTEB leaderboard / model card), and SimCSE's "all". SentEval
itself reports only the plain and the pair-weighted mean of per-subset correlations; both are kept
beside it (``mean``, ``wmean``, see ``lightcrl.metrics.sts.evaluate_many``) but are not the headline.
Several sets (the years found, STS-B) are summarised by the plain mean of their headline Spearman.

An STS split is also a text-only :class:`~lightcrl.data.datasets.Dataset` (:func:`open_sts`, reached
through ``open_dataset``): its items are the unique sentences, so the feature store caches their frozen
features like captions, and ``StsDataset.sets`` keeps the pairs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lightcrl.data.datasets import Dataset
from lightcrl.data.nli import sentence_id
from lightcrl.data.records import Record
from lightcrl.errors import LightCRLError


class Pairs(NamedTuple):
    sents1: list[str]
    sents2: list[str]
    gold: np.ndarray  # float64, one score per pair

    def take(self, idx: np.ndarray) -> Pairs:
        return Pairs([self.sents1[i] for i in idx], [self.sents2[i] for i in idx], self.gold[idx])


#: set name -> subset name -> pairs; a set is what gets one headline Spearman (an STS year, STS-B, SICK)
StsSets = dict[str, dict[str, Pairs]]

STS_KINDS = ("stsb", "sick", "senteval")
STSB_SPLITS = ("test", "dev", "train")
SICK_SPLITS = ("all", "train", "trial", "test")
STSB_SET = "STSBenchmark"
# SentEval's folder and subsets per year (senteval/sts.py); STS13's SMT is not in the public release
SENTEVAL_YEARS: dict[str, tuple[str, tuple[str, ...]]] = {
    "STS12": ("STS12-en-test", ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews")),
    "STS13": ("STS13-en-test", ("FNWN", "headlines", "OnWN")),
    "STS14": (
        "STS14-en-test",
        ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"),
    ),
    "STS15": (
        "STS15-en-test",
        ("answers-forums", "answers-students", "belief", "headlines", "images"),
    ),
    "STS16": (
        "STS16-en-test",
        ("answer-answer", "headlines", "plagiarism", "postediting", "question-question"),
    ),
}
SENTEVAL_SETS = (*SENTEVAL_YEARS, STSB_SET)  # what senteval:DIR can hold, in reporting order


def is_sts_spec(spec: str) -> bool:
    return spec.split(":", 1)[0].strip().lower() in STS_KINDS


# ------------------------------------------------------------------------------------------- file parsers


def _read_tsv(path: Path) -> list[list[str]]:
    """Tab-separated rows, no quoting (quotes are literal text in these files), blank lines skipped."""
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            return [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if any(row)]
    except OSError as exc:
        raise LightCRLError(f"cannot read {path}: {exc}") from exc


def _unknown_split(kind: str, split: str, available: tuple[str, ...]) -> LightCRLError:
    return LightCRLError(f"unknown split {split!r} for {kind}: available splits are {', '.join(available)}")


def _score(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise LightCRLError(f"{where}: gold score {text.strip()!r} is not a number") from None


def load_sts_benchmark(root: str | os.PathLike, split: str = "test") -> Pairs:
    """STS Benchmark ``sts-{split}.csv`` (SentEval or original layout): fields genre, file, year, id,
    score, sentence1, sentence2; fields after the 7th (source info in the original files) are ignored.
    """
    if split not in STSB_SPLITS:
        raise _unknown_split("stsb", split, STSB_SPLITS)
    path = Path(root) / f"sts-{split}.csv"
    if not path.is_file():
        raise LightCRLError(f"STS Benchmark file not found: {path}")
    s1, s2, scores = [], [], []
    for lineno, row in enumerate(_read_tsv(path), 1):
        if len(row) < 7:
            raise LightCRLError(f"{path}:{lineno}: expected at least 7 tab-separated fields, got {len(row)}")
        scores.append(_score(row[4], f"{path}:{lineno}"))
        s1.append(row[5].strip())
        s2.append(row[6].strip())
    return Pairs(s1, s2, np.asarray(scores, dtype=np.float64))


def senteval_subsets(folder: Path) -> list[str]:
    """The subsets of a folder with both ``STS.input.<name>.txt`` and ``STS.gs.<name>.txt``, sorted."""
    names = sorted(p.name[len("STS.input.") : -len(".txt")] for p in folder.glob("STS.input.*.txt"))
    return [n for n in names if (folder / f"STS.gs.{n}.txt").is_file()]


def load_senteval_year(folder: str | os.PathLike, subsets: list[str] | None = None) -> dict[str, Pairs]:
    """One SentEval STS folder: {subset: pairs}, in ``subsets`` order (default: every subset found).

    A pair whose gold line is empty (or missing at the end of the file) is unscored and dropped.
    """
    folder = Path(folder)
    subsets = senteval_subsets(folder) if subsets is None else subsets
    if not subsets:
        raise LightCRLError(f"no STS.input.<subset>.txt / STS.gs.<subset>.txt pairs in {folder}")
    out: dict[str, Pairs] = {}
    for name in subsets:
        inputs_path, gold_path = folder / f"STS.input.{name}.txt", folder / f"STS.gs.{name}.txt"
        if not (inputs_path.is_file() and gold_path.is_file()):
            raise LightCRLError(f"{folder.name}: subset {name} needs {inputs_path.name} and {gold_path.name}")
        with open(inputs_path, encoding="utf-8", errors="replace") as f:
            inputs = f.read().splitlines()
        with open(gold_path, encoding="utf-8", errors="replace") as f:
            gold = f.read().splitlines()
        if len(gold) > len(inputs):
            raise LightCRLError(f"{gold_path}: {len(gold)} gold lines for {len(inputs)} sentence pairs")
        s1, s2, sc = [], [], []
        for lineno, (line, gs) in enumerate(zip(inputs, gold), 1):
            if not gs.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise LightCRLError(f"{inputs_path}:{lineno}: expected 2 tab-separated sentences")
            s1.append(fields[0].strip())
            s2.append(fields[1].strip())
            sc.append(_score(gs, f"{gold_path}:{lineno}"))
        out[name] = Pairs(s1, s2, np.asarray(sc, dtype=np.float64))
    return out


_YEAR_FOLDER = {folder: year for year, (folder, _) in SENTEVAL_YEARS.items()}


def load_senteval(root: str | os.PathLike) -> StsSets:
    """SentEval's STS folder (every year found, then STS-B's test split) or one of its year folders.

    A known year must have all of SentEval's subsets: a partial year would not be comparable to
    published numbers. An unknown folder with ``STS.input/STS.gs`` files is one set of all its subsets.
    """
    root = Path(root)
    if not root.is_dir():
        raise LightCRLError(f"senteval STS folder not found: {root}")
    if root.name in _YEAR_FOLDER:
        return {_YEAR_FOLDER[root.name]: _load_known_year(root, _YEAR_FOLDER[root.name])}
    if (root / "sts-test.csv").is_file():
        return {STSB_SET: {"test": load_sts_benchmark(root, "test")}}
    sets: StsSets = {}
    for year, (folder, _) in SENTEVAL_YEARS.items():
        if (root / folder).is_dir():
            sets[year] = _load_known_year(root / folder, year)
    if (root / STSB_SET / "sts-test.csv").is_file():
        sets[STSB_SET] = {"test": load_sts_benchmark(root / STSB_SET, "test")}
    if not sets and senteval_subsets(root):
        sets[root.name] = load_senteval_year(root)
    if not sets:
        folders = ", ".join(f for f, _ in SENTEVAL_YEARS.values())
        raise LightCRLError(
            f"no SentEval STS data in {root}: expected {folders} or {STSB_SET}/sts-test.csv "
            "(SentEval's data/downstream/STS), or one of those folders"
        )
    return sets


def _load_known_year(folder: Path, year: str) -> dict[str, Pairs]:
    wanted = SENTEVAL_YEARS[year][1]
    missing = [s for s in wanted if not (folder / f"STS.input.{s}.txt").is_file()]
    if missing:
        raise LightCRLError(
            f"{folder}: {year} lacks subset(s) {', '.join(missing)} (SentEval's {year}: {', '.join(wanted)})"
        )
    return load_senteval_year(folder, list(wanted))


def load_sick(path: str | os.PathLike, split: str | None = None) -> Pairs:
    """Official SICK tab-separated file (header pair_ID, sentence_A, sentence_B, relatedness_score, ...).

    When the file has a ``SemEval_set`` column (the full SICK.txt), ``split`` ("train", "trial", "test",
    case-insensitive) keeps only that part; ``None`` or ``all`` keeps every row.
    """
    path = Path(path)
    if not path.is_file():
        raise LightCRLError(f"SICK file not found: {path}")
    rows = _read_tsv(path)
    if not rows:
        raise LightCRLError(f"{path}: empty file")
    header = [h.strip().lstrip("\ufeff") for h in rows[0]]
    col = {h: i for i, h in enumerate(header)}
    for need in ("sentence_A", "sentence_B", "relatedness_score"):
        if need not in col:
            raise LightCRLError(f"{path}: no {need!r} column in header {header}")
    part = None if split is None or split.lower() == "all" else split.upper()
    if part is not None and "SemEval_set" not in col:
        raise LightCRLError(f"{path}: no SemEval_set column to select split {split!r} from (use split all)")
    s1, s2, sc = [], [], []
    for lineno, row in enumerate(rows[1:], 2):
        if len(row) < len(header):
            raise LightCRLError(f"{path}:{lineno}: {len(row)} fields for {len(header)} columns")
        if part is not None and row[col["SemEval_set"]].strip().upper() != part:
            continue
        s1.append(row[col["sentence_A"]].strip())
        s2.append(row[col["sentence_B"]].strip())
        sc.append(_score(row[col["relatedness_score"]], f"{path}:{lineno}"))
    return Pairs(s1, s2, np.asarray(sc, dtype=np.float64))


def load_sts(spec: str, split: str | None = None) -> tuple[str, StsSets]:
    """``(split name, sets)`` of an STS spec (see the module docstring)."""
    kind, _, raw = spec.partition(":")
    kind, path = kind.strip().lower(), Path(raw).expanduser()
    if kind not in STS_KINDS or not raw:
        raise LightCRLError(f"sts data must be stsb:DIR, sick:FILE or senteval:DIR (got {spec!r})")
    if kind == "stsb":
        split = split or "test"
        return split, {STSB_SET: {split: load_sts_benchmark(path, split)}}
    if kind == "sick":
        split = (split or "all").lower()
        if split not in SICK_SPLITS:
            raise _unknown_split("sick", split, SICK_SPLITS)
        return split, {"SICK": {split: load_sick(path, split)}}
    if split not in (None, "test"):
        raise LightCRLError(f"unknown split {split!r} for senteval: its STS sets are test sets (split test)")
    return "test", load_senteval(path)


# ------------------------------------------------------------------------------------ as a text dataset


class StsDataset(Dataset):
    """Text-only: each unique sentence of the pairs is an item; the fingerprint hashes the pairs."""

    sets: StsSets

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps([self.kind, self.split, self.sample]).encode())
            for set_name, subsets in self.sets.items():
                for subset, (s1, s2, gold) in subsets.items():
                    h.update(json.dumps([set_name, subset, s1, s2, gold.tolist()]).encode() + b"\n")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def subsample(self, n: int, seed: int = 0) -> StsDataset:
        """A seeded sample of ``n`` pairs per subset (order kept), with only their sentences."""
        if n < 1:
            raise LightCRLError(f"subsample size must be at least 1, got {n}")
        rng = np.random.default_rng(seed)  # one stream over the subsets, in order
        sets: StsSets = {}
        for set_name, subsets in self.sets.items():
            sets[set_name] = {}
            for subset, pairs in subsets.items():
                if n < len(pairs.gold):
                    idx = np.sort(rng.choice(len(pairs.gold), n, replace=False))
                    pairs = pairs.take(idx)
                sets[set_name][subset] = pairs
        sub = _sts_dataset(self.spec, self.kind, self.root, self.split, sets)
        sub.sample = (n, seed)
        return sub


def open_sts(spec: str, split: str | None = None) -> StsDataset:
    """An STS spec as a text dataset of its unique sentences (``.sets``: the pairs themselves)."""
    split, sets = load_sts(spec, split)
    kind, _, raw = spec.partition(":")
    return _sts_dataset(spec, kind.strip().lower(), Path(raw).expanduser(), split, sets)


def _sts_dataset(spec: str, kind: str, root: Path, split: str, sets: StsSets) -> StsDataset:
    sentences: dict[str, Record] = {}
    for subsets in sets.values():
        for s1, s2, _ in subsets.values():
            for s in (*s1, *s2):
                sid = sentence_id(s)
                sentences.setdefault(sid, Record(id=sid, text=s, group=sid))
    if not sentences:
        raise LightCRLError(f"{spec} split {split!r} has no scored sentence pairs")
    ds = StsDataset(
        spec=spec,
        kind=kind,
        root=root,
        split=split,
        task="sts",
        media="text",
        classnames=None,
        templates=None,
        media_records=list(sentences.values()),
        text_records=[],
        skipped=[],
        base=root.parent,
        stats={},
    )
    ds.sets = sets
    return ds


def pair_rows(row_of: Mapping[str, int], pairs: Pairs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Store rows (``row_of``: store item id -> row) of each pair's two sentences, and the indices of the
    pairs kept: a pair with a sentence the encoder skipped (not in the store) is dropped."""
    r1 = np.array([row_of.get(sentence_id(s), -1) for s in pairs.sents1], np.int64)
    r2 = np.array([row_of.get(sentence_id(s), -1) for s in pairs.sents2], np.int64)
    kept = np.flatnonzero((r1 >= 0) & (r2 >= 0))
    return r1[kept], r2[kept], kept
