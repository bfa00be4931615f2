"""NLI triplets (anchor, entailment, contradiction) for supervised SimCSE.

Spec kinds:
- ``simcse-csv:FILE``: SimCSE's ``nli_for_simcse.csv`` layout, header ``sent0,sent1,hard_neg``.
- ``snli:PATH``: the official SNLI 1.0 jsonl (a file, or the folder holding ``snli_1.0_{split}.jsonl``);
  for every premise, each entailed hypothesis is paired with one of its contradictions (cycled).
- ``sick-nli:FILE``: the official SICK tab-separated file (``sentence_A``, ``sentence_B``,
  ``entailment_judgment``), triplets built the same way from ENTAILMENT / CONTRADICTION pairs.

``open_nli`` exposes the unique sentences as a text-only Dataset so that the feature store caches their
frozen token features like any caption; ``triplet_index`` maps triplets to store rows.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path

from lightcrl.data.datasets import Dataset
from lightcrl.data.records import Record
from lightcrl.errors import LightCRLError

NLI_KINDS = ("simcse-csv", "snli", "sick-nli")
Triplet = tuple[str, str, str]


def is_nli_spec(spec: str) -> bool:
    return spec.split(":", 1)[0] in NLI_KINDS


def sentence_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _from_groups(pairs: list[tuple[str, str, str]]) -> list[Triplet]:
    """(premise, hypothesis, label) rows -> triplets, deterministic order of first appearance."""
    ent: dict[str, list[str]] = defaultdict(list)
    con: dict[str, list[str]] = defaultdict(list)
    order: dict[str, None] = {}
    for premise, hyp, label in pairs:
        order.setdefault(premise)
        if label == "entailment":
            ent[premise].append(hyp)
        elif label == "contradiction":
            con[premise].append(hyp)
    triplets = []
    for p in order:
        for k, e in enumerate(ent.get(p, [])):
            cs = con.get(p, [])
            if cs:
                triplets.append((p, e, cs[k % len(cs)]))
    return triplets


def load_triplets(spec: str, split: str | None = None) -> list[Triplet]:
    kind, _, raw = spec.partition(":")
    path = Path(raw)
    if kind == "simcse-csv":
        if not path.is_file():
            raise LightCRLError(f"SimCSE NLI csv not found: {path}")
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            need = {"sent0", "sent1", "hard_neg"}
            if not need <= set(reader.fieldnames or []):
                raise LightCRLError(f"{path}: expected columns sent0,sent1,hard_neg, got {reader.fieldnames}")
            out = [(r["sent0"].strip(), r["sent1"].strip(), r["hard_neg"].strip()) for r in reader]
        return [t for t in out if all(t)]
    if kind == "snli":
        file = path if path.is_file() else path / f"snli_1.0_{split or 'train'}.jsonl"
        if not file.is_file():
            raise LightCRLError(f"SNLI jsonl not found: {file}")
        rows = []
        with open(file, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    rows.append((r["sentence1"].strip(), r["sentence2"].strip(), r.get("gold_label", "")))
        return _from_groups(rows)
    if kind == "sick-nli":
        if not path.is_file():
            raise LightCRLError(f"SICK file not found: {path}")
        with open(path, encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            rows = [
                (r["sentence_A"].strip(), r["sentence_B"].strip(), r["entailment_judgment"].strip().lower())
                for r in reader
            ]
        return _from_groups(rows)
    raise LightCRLError(f"unknown NLI spec {spec!r}; kinds: {', '.join(k + ':PATH' for k in NLI_KINDS)}")


class _NliDataset(Dataset):
    """Text-only: each unique sentence is an item; the fingerprint hashes the triplets themselves."""

    triplets: list[Triplet]

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps([self.kind, self.split]).encode())
        for t in self.triplets:
            h.update(json.dumps(t).encode() + b"\n")
        return h.hexdigest()


def open_nli(spec: str, split: str | None = None, limit: int | None = None, seed: int = 0) -> Dataset:
    """The unique sentences of the (optionally sampled) triplets, as a text-only dataset."""
    triplets = load_triplets(spec, split)
    if not triplets:
        raise LightCRLError(f"{spec}: no (anchor, entailment, contradiction) triplets found")
    if limit and limit < len(triplets):
        keep = sorted(random.Random(seed).sample(range(len(triplets)), limit))
        triplets = [triplets[i] for i in keep]
    seen: dict[str, Record] = {}
    for t in triplets:
        for s in t:
            sid = sentence_id(s)
            seen.setdefault(sid, Record(id=sid, text=s, group=sid))
    kind, _, raw = spec.partition(":")
    ds = _NliDataset(
        spec=spec,
        kind=kind,
        root=Path(raw),
        split=split or "train",
        task="pairs",
        media="text",
        classnames=None,
        templates=None,
        media_records=list(seen.values()),
        text_records=[],
        skipped=[],
        base=Path(raw).parent,
        stats={},
    )
    ds.triplets = triplets
    return ds


def triplet_index(triplets: list[Triplet], ids: list[str]):
    """[n, 3] store rows of (anchor, positive, hard negative); triplets with a skipped sentence dropped."""
    import numpy as np

    pos = {i: k for k, i in enumerate(ids)}
    rows = [[pos.get(sentence_id(s), -1) for s in t] for t in triplets]
    arr = np.asarray(rows, np.int64).reshape(-1, 3)
    return arr[(arr >= 0).all(1)]
