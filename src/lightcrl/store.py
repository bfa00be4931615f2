"""The feature store: frozen-encoder outputs computed once, read many times through numpy memmaps.

Layout of a store directory::

    plan.json                 what is being extracted: fingerprint, records, shard size (written first)
    shard_00000.tokens.npy    [n_tokens, D] float16, the tokens of the shard's items back to back (ragged)
    shard_00000.offsets.npy   [n_items + 1] int64, item i's tokens are tokens[offsets[i]:offsets[i+1]]
    shard_00000.pooled.npy    [n_items, D] float32
    shard_00000.json          the shard's kept record positions and skipped items; written LAST, so its
                              presence means the shard is complete (resume skips it)
    manifest.json             written when every shard is done: count, skipped, fingerprint, items

Every file is written atomically (temp file + rename): a kill leaves complete shards or nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lightcrl.errors import LightCRLError, StoreMismatch
from lightcrl.io import NpyRowWriter, read_json, save_npy, write_json

if TYPE_CHECKING:  # torch is imported where needed: writing and reading a store need numpy only
    import torch

STORE_VERSION = 1


def store_fingerprint(encoder_fp: str, dataset_fp: str, record_ids: list[str]) -> str:
    h = hashlib.sha256()
    h.update(f"lightcrl-store-v{STORE_VERSION}|{encoder_fp}|{dataset_fp}|".encode())
    for rid in record_ids:
        h.update(rid.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def completed_shards(directory: Path) -> set[int]:
    done = set()
    for p in Path(directory).glob("shard_*.json"):
        try:
            done.add(int(p.stem.split("_")[1]))
        except (IndexError, ValueError):
            continue
    return done


class ShardWriter:
    """One shard, written as extraction goes: token rows are appended in record order as they are
    computed (:meth:`append`), offsets, pooled and the JSON at :meth:`commit`, the JSON last (it marks the
    shard complete). :meth:`abort` leaves nothing. Every file is atomic, as in :func:`write_shard`.
    """

    def __init__(self, directory: Path, index: int):
        self.directory, self.index, self.name = Path(directory), index, shard_name(index)
        self.lengths: list[int] = []
        self._rows: NpyRowWriter | None = None  # opened at the first item, once the width is known

    def append(self, tokens: Iterable[np.ndarray]) -> None:
        for t in tokens:
            if self._rows is None:
                self._rows = NpyRowWriter(self.directory / f"{self.name}.tokens.npy", np.float16, t.shape[1])
            self._rows.append(t)
            self.lengths.append(int(t.shape[0]))

    def commit(self, pooled: np.ndarray, meta: dict) -> None:
        try:
            dim = pooled.shape[1] if pooled.ndim == 2 and pooled.shape[0] else 0
            rows = self._rows or NpyRowWriter(self.directory / f"{self.name}.tokens.npy", np.float16, dim)
            self._rows = rows
            if dim and rows.width != dim:
                raise ValueError(f"rows of width {dim} expected, got tokens of width {rows.width}")
            offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)]).astype(np.int64)
            rows.commit()
            save_npy(self.directory / f"{self.name}.offsets.npy", offsets)
            save_npy(self.directory / f"{self.name}.pooled.npy", pooled.astype(np.float32, copy=False))
            write_json(self.directory / f"{self.name}.json",
                       {**meta, "index": self.index, "count": len(self.lengths)}, indent=None)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if self._rows is not None:
            self._rows.abort()


def write_shard(
    directory: Path, index: int, tokens: list[np.ndarray], pooled: np.ndarray, meta: dict
) -> None:
    """Write one finished shard; the JSON goes last and marks it complete."""
    w = ShardWriter(directory, index)
    try:
        w.append(tokens)
    except BaseException:
        w.abort()
        raise
    w.commit(pooled, meta)


@dataclass
class Items:
    """Per stored item: id, the media id it belongs to, class label, caption text (text stores)."""

    ids: list[str]
    groups: list[str]
    labels: np.ndarray
    texts: list[str | None]


class FeatureStore:
    """Read side of a finished store. Token reads are memory-mapped: a store larger than RAM is fine."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        path = self.dir / "manifest.json"
        if not path.exists():
            hint = (
                " (extraction unfinished: rerun the same `lightcrl embed` to resume)"
                if (self.dir / "plan.json").exists()
                else ""
            )
            raise LightCRLError(f"no feature store at {self.dir}: manifest.json missing{hint}")
        self.manifest = read_json(path)
        version = self.manifest.get("version")
        if version != STORE_VERSION:
            raise StoreMismatch(
                f"feature store {self.dir} has format version {version}, this lightcrl reads "
                f"version {STORE_VERSION}: re-extract it with `lightcrl embed ... --overwrite`"
            )
        items = self.manifest["items"]
        self.items = Items(
            items["ids"], items["groups"], np.asarray(items["labels"], np.int64), items["texts"]
        )
        self._tokens = []
        self._offsets = []
        self._pooled = []
        starts = [0]
        for shard in self.manifest["shards"]:
            name = shard["name"]
            self._tokens.append(np.load(self.dir / f"{name}.tokens.npy", mmap_mode="r"))
            self._offsets.append(np.load(self.dir / f"{name}.offsets.npy"))
            self._pooled.append(np.load(self.dir / f"{name}.pooled.npy", mmap_mode="r"))
            starts.append(starts[-1] + shard["count"])
        self._starts = np.asarray(starts, np.int64)
        self.lengths = np.concatenate([np.diff(o) for o in self._offsets] or [np.zeros(0, np.int64)]).astype(
            np.int64
        )
        self._index = {rid: i for i, rid in enumerate(self.items.ids)}

    # -- identity -------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def modality(self) -> str:
        return self.manifest["encoder"]["modality"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def classnames(self) -> list[str] | None:
        return self.manifest["dataset"].get("classnames")

    @property
    def templates(self) -> list[str] | None:
        return self.manifest["dataset"].get("templates")

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def index_of(self, item_id: str) -> int:
        return self._index[item_id]

    # -- reads ----------------------------------------------------------------------------------
    def pooled(self, indices: np.ndarray | None = None) -> np.ndarray:
        """Pooled features [N, D] float32 (all items, or the given indices in that order)."""
        full = (
            np.concatenate([np.asarray(p) for p in self._pooled]) if self._pooled else np.zeros((0, self.dim))
        )
        return full if indices is None else full[np.asarray(indices)]

    def _locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shard = np.searchsorted(self._starts, indices, side="right") - 1
        return shard, indices - self._starts[shard]

    def tokens(
        self, indices, max_tokens: int | None = None, dtype=np.float16
    ) -> tuple[np.ndarray, np.ndarray]:
        """Padded tokens [B, T, D] and mask [B, T] bool for the given items (T = longest in batch).

        ``dtype``: float16 (as stored) or the model's float32, cast while each item is copied out of the
        memmap (one pass over the batch; the padding comes zeroed from the allocator)."""
        indices = np.asarray(indices, np.int64)
        lengths = self.lengths[indices]
        if max_tokens:
            lengths = np.minimum(lengths, max_tokens)
        T = int(lengths.max()) if len(indices) else 0
        out = np.zeros((len(indices), T, self.dim), dtype)
        mask = np.arange(T)[None, :] < lengths[:, None]
        shards, local = self._locate(indices)
        for row, (s, i, n) in enumerate(zip(shards, local, lengths)):
            start = self._offsets[s][i]
            out[row, :n] = self._tokens[s][start : start + n]
        return out, mask

    def batch(self, indices, max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens as float32 tensor + bool mask: the model's input (no float16 copy in between)."""
        import torch

        tok, mask = self.tokens(indices, max_tokens, dtype=np.float32)
        return torch.from_numpy(tok), torch.from_numpy(mask)

    def skipped(self) -> list[dict]:
        return self.manifest.get("skipped", [])

    def summary(self) -> dict:
        m = self.manifest
        return {
            "dir": str(self.dir),
            "encoder": m["encoder"]["name"],
            "dataset": m["dataset"]["spec"],
            "split": m["dataset"]["split"],
            "count": m["count"],
            "skipped": len(m.get("skipped", [])),
            "dim": m["dim"],
            "fingerprint": m["fingerprint"][:16],
        }


def finalize(directory: Path, plan: dict) -> dict:
    """Assemble manifest.json from the plan and the completed shard metadata."""
    n_shards = plan["n_shards"]
    records = plan["records"]
    shards, keep, skipped = [], [], []
    for i in range(n_shards):
        meta = read_json(directory / f"{shard_name(i)}.json")
        shards.append({"name": shard_name(i), "count": meta["count"], "tokens": meta.get("tokens", 0)})
        keep.extend(meta["kept"])
        skipped.extend(meta["skipped"])
    skipped = plan.get("listing_skipped", []) + skipped
    kept = [records[k] for k in keep]
    manifest = {
        "version": STORE_VERSION,
        "fingerprint": plan["fingerprint"],
        "encoder": plan["encoder"],
        "dataset": plan["dataset"],
        "dim": plan["dim"],
        "count": len(kept),
        "skipped": skipped,
        "skipped_by_reason": dict(Counter(s["reason"] for s in skipped)),
        "shards": shards,
        "max_tokens": max(
            (int(np.diff(np.load(directory / f"{s['name']}.offsets.npy")).max(initial=0)) for s in shards),
            default=0,
        ),
        "items": {
            "ids": [r["id"] for r in kept],
            "groups": [r["group"] for r in kept],
            "labels": [r["label"] for r in kept],
            "texts": [r["text"] for r in kept],
        },
    }
    write_json(directory / "manifest.json", manifest, indent=None)
    return manifest


def read_plan(directory: Path) -> dict | None:
    p = Path(directory) / "plan.json"
    if not p.exists():
        return None
    try:
        return read_json(p)
    except (OSError, json.JSONDecodeError):
        return None
