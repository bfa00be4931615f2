"""Training data on feature stores: which media item goes with which caption, and epoch batching.

A ``PairSet`` links a media store (images or audio) and a text store of the same dataset split through
``text.group == media.id``. Batching is a pure function of (seed, epoch), so an epoch can be replayed
exactly on resume and every DDP rank agrees on the global batch without communicating.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lightcrl.features import FeatureAdapter
from lightcrl.store import FeatureStore


@dataclass
class PairSet:
    name: str
    media: FeatureStore
    text: FeatureStore
    media_index: np.ndarray  # [n_pairs] index into media store
    text_index: np.ndarray  # [n_pairs] index into text store
    adapter: FeatureAdapter = FeatureAdapter()  # what the model sees of each item

    @classmethod
    def link(cls, name: str, media: FeatureStore, text: FeatureStore, **kw) -> PairSet:
        pos = {mid: i for i, mid in enumerate(media.items.ids)}
        mi, ti = [], []
        for j, g in enumerate(text.items.groups):
            i = pos.get(g)
            if i is not None:  # the caption's media item may have been skipped as corrupt
                mi.append(i)
                ti.append(j)
        return cls(name, media, text, np.asarray(mi, np.int64), np.asarray(ti, np.int64), **kw)

    def split_media(self, fraction: float, seed: int) -> tuple[PairSet, PairSet]:
        """``(kept, held_out)``: a seeded ``fraction`` of the media items, with all their pairs, held out."""
        media = np.unique(self.media_index)
        rng = np.random.default_rng([seed, 4243])
        n_out = min(len(media) - 1, max(1, round(fraction * len(media))))
        held = np.isin(self.media_index, rng.choice(media, n_out, replace=False))
        part = lambda keep: PairSet(self.name, self.media, self.text, self.media_index[keep],  # noqa: E731
                                    self.text_index[keep], self.adapter)
        return part(~held), part(held)

    @property
    def media_modality(self) -> str:
        return self.media.modality

    def __len__(self) -> int:
        return len(self.text_index)

    def n_media(self) -> int:
        return len(np.unique(self.media_index))

    def epoch_size(self, mode: str, per_media: int = 2) -> int:
        """Pairs in one epoch of ``epoch_pairs(..., mode, per_media)``."""
        if mode == "all_pairs":
            return len(self)
        if mode == "multi_caption":
            return int(np.minimum(np.unique(self.media_index, return_counts=True)[1], per_media).sum())
        return self.n_media()

    def epoch_pairs(self, seed: int, epoch: int, mode: str, per_media: int = 2) -> np.ndarray:
        """Shuffled pair indices for one epoch: one random caption per media item, all pairs, or
        ``multi_caption``: ``per_media`` distinct random captions of every media item (all it has when it
        has fewer), each item's captions next to each other, items in random order, so a batch holds
        several captions per image (the positives of the ``multipos`` loss)."""
        rng = np.random.default_rng([seed, epoch, 7919])
        if mode == "all_pairs":
            return rng.permutation(len(self))
        order = np.argsort(self.media_index, kind="stable")
        media_sorted = self.media_index[order]
        starts = np.flatnonzero(np.r_[True, media_sorted[1:] != media_sorted[:-1]])
        counts = np.diff(np.r_[starts, len(order)])
        if mode == "multi_caption":
            if per_media < 1:
                raise ValueError(f"per_media must be >= 1, got {per_media}")
            group = np.repeat(np.arange(len(starts)), counts)  # group of each position of `order`
            shuffled = np.lexsort((rng.random(len(order)), group))  # positions, random within each group
            rank = np.arange(len(order)) - starts[group]  # rank of the position within its group
            keep = shuffled[rank < per_media]
            group_pos = rng.permutation(len(starts))  # where each media item comes in the epoch
            return order[keep[np.argsort(group_pos[group[keep]], kind="stable")]]
        pick = order[starts + (rng.random(len(starts)) * counts).astype(np.int64)]
        return pick[rng.permutation(len(pick))]

    def frozen_pooled(self, store: FeatureStore, rows: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """[len(rows), D] float32: the frozen pooled feature of ``store``'s items as the model receives them
        (the adapter's masked token mean), read in row order (fewer page faults on the memmap)."""
        rows = np.asarray(rows, np.int64)
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), store.dim), np.float32)
        for s in range(0, len(rows), batch_size):
            part = order[s : s + batch_size]
            x, m = self.adapter.from_store(store, rows[part])
            out[part] = self.adapter.frozen_pooled(x, m).numpy()
        return out

    def batch(self, pair_idx: np.ndarray, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        m = self.adapter.from_store(self.media, self.media_index[pair_idx])
        t = self.adapter.from_store(self.text, self.text_index[pair_idx])
        return {
            self.media_modality: (m[0].to(device, non_blocking=True), m[1].to(device)),
            "text": (t[0].to(device, non_blocking=True), t[1].to(device)),
        }


def epoch_batches(n: int, batch_size: int, drop_last: bool = True) -> list[slice]:
    """Contrastive batches; the ragged tail is dropped (a tiny last batch gives a noisy, easy loss)."""
    stop = (n // batch_size) * batch_size if drop_last and n >= batch_size else n
    return [slice(s, min(s + batch_size, stop)) for s in range(0, stop, batch_size)]


def rank_slice(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous chunk of a global batch; all_gather puts the chunks back in order."""
    chunks = np.array_split(batch, world)
    return chunks[rank]
