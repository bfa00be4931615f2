"""The trainer's data: pair sets over cached feature stores, NLI triplets, and the epoch schedule.

Everything here is a pure function of the config, the stores and (seed, epoch, step), so an epoch replays
exactly on resume and every DDP rank agrees on the global batch without communicating. Under torchrun rank 0
builds each store in the cache while the others wait at a barrier.
"""

from __future__ import annotations

import numpy as np
import torch

from lightcrl.app.config import TrainConfig
from lightcrl.embed import EmbedOptions, cached_store
from lightcrl.errors import LightCRLError
from lightcrl.features import FeatureAdapter
from lightcrl.pairs import PairSet, epoch_batches, rank_slice
from lightcrl.store import FeatureStore

__all__ = ["NliBatches", "UnpairedBatches", "build_pairsets", "epoch_schedule", "feature_adapter",
           "input_dims", "shared_store", "steps_per_epoch"]


def feature_adapter(cfg: TrainConfig) -> FeatureAdapter:
    """What the model sees of each stored item (recorded in model.json, so every reader agrees)."""
    return FeatureAdapter(cfg.data.input, cfg.data.max_text_tokens)


def _embed_options(cfg: TrainConfig, limit: int | None, rank: int, **kw) -> EmbedOptions:
    return EmbedOptions(limit=limit, seed=cfg.seed, device=cfg.device, progress=cfg.progress and rank == 0,
                        num_workers=cfg.data.num_workers, **kw)


def shared_store(encoder: str, spec: str, split: str | None, opts: EmbedOptions, rank: int = 0,
                 world: int = 1) -> FeatureStore:
    """A store from the cache; under DDP rank 0 builds it while the other ranks wait, then open it."""
    if world > 1 and rank != 0:
        torch.distributed.barrier()
        return cached_store(encoder, spec, split, opts)
    store = cached_store(encoder, spec, split, opts)
    if world > 1:
        torch.distributed.barrier()
    return store


def build_pairsets(cfg: TrainConfig, split_kind: str, rank: int = 0, world: int = 1) -> list[PairSet]:
    """PairSets for every source's train split ("train") or validation split ("val")."""
    sets = []
    for i, src in enumerate(cfg.data.sources):
        split = src.split if split_kind == "train" else src.val_split
        held_out = split_kind == "val" and split is None and src.holdout is not None
        if held_out:  # validation on the media items held out of the training split
            split = src.split
        if split is None:
            continue
        limit = src.limit if split_kind == "train" or held_out else src.val_limit
        spec = src.spec if split_kind == "train" or held_out else (src.val_spec or src.spec)
        opts = _embed_options(cfg, limit, rank, batch_size=cfg.data.embed_batch_size)
        media = shared_store(src.media_encoder, spec, split, opts, rank, world)
        # classification datasets become pairs through captions made from class names and templates
        text_spec = f"labelcaptions:{spec}" if src.captions == "templates" else spec
        text = shared_store(src.text_encoder, text_spec, split, opts, rank, world)
        kind = src.spec.split(":", 1)[0]
        name = f"{kind}{i}" if len(cfg.data.sources) > 1 else kind
        ps = PairSet.link(name, media, text, adapter=feature_adapter(cfg))
        if src.holdout is not None and (split_kind == "train" or held_out):
            kept, out = ps.split_media(src.holdout, cfg.seed)
            ps = kept if split_kind == "train" else out
        sets.append(ps)
        if len(sets[-1]) == 0:
            raise LightCRLError(f"no (media, caption) pairs in {spec} split {split}")
    return sets


def input_dims(sets: list[PairSet]) -> dict[str, int]:
    """The frozen feature width of every modality of the pair sets (one encoder width per modality)."""
    dims: dict[str, int] = {}
    for s in sets:
        for store in (s.media, s.text):
            if dims.setdefault(store.modality, store.dim) != store.dim:
                raise LightCRLError(f"two {store.modality} encoders of different width in one model")
    return dims


# -- the epoch schedule -----------------------------------------------------------------------------------
def captions_per_media(cfg: TrainConfig) -> int:
    return cfg.data.captions_per_media or 2


def _epoch_size(cfg: TrainConfig, s: PairSet) -> int:
    return s.epoch_size(cfg.data.pairs, captions_per_media(cfg))


def batches_of_source(cfg: TrainConfig, sets: list[PairSet], si: int) -> int:
    """Batches of source ``si`` per epoch: its own size, scaled by its ``weight``."""
    n = len(epoch_batches(_epoch_size(cfg, sets[si]), cfg.optim.batch_size))
    return max(1, round(n * cfg.data.sources[si].weight)) if n else 0


def steps_per_epoch(cfg: TrainConfig, sets: list[PairSet]) -> int:
    return sum(batches_of_source(cfg, sets, si) for si in range(len(sets)))


def epoch_schedule(cfg: TrainConfig, sets: list[PairSet], epoch: int) -> list[tuple[int, np.ndarray]]:
    """(pair set, global batch of pair indices) for one epoch, sources interleaved evenly."""
    bs = cfg.optim.batch_size
    rng = np.random.default_rng([cfg.seed, epoch, 31])
    keyed = []
    for si, s in enumerate(sets):
        want, batches, rep = batches_of_source(cfg, sets, si), [], 0
        while len(batches) < want:  # weight > 1 draws further shuffles of the same source
            pairs = s.epoch_pairs(cfg.seed + 1000 * si + 100_003 * rep, epoch, cfg.data.pairs,
                                  captions_per_media(cfg))
            batches += [pairs[sl] for sl in epoch_batches(len(pairs), bs)]
            rep += 1
        keyed += [((j + rng.random()) / want, si, b) for j, b in enumerate(batches[:want])]
    keyed.sort(key=lambda k: (k[0], k[1]))
    return [(si, b) for _, si, b in keyed]


# -- NLI triplets for supervised SimCSE ---------------------------------------------------------------------
class NliBatches:
    """NLI (anchor, positive, hard negative) triplets over a text feature store; a seeded batch per step."""

    def __init__(self, cfg: TrainConfig, needed_by: list[str], rank: int = 0, world: int = 1) -> None:
        from lightcrl.data.nli import open_nli, triplet_index

        src = cfg.data.nli
        if src is None:
            raise LightCRLError(
                f"loss {', '.join(needed_by)} needs data.nli: NLI triplets (simcse-csv:, snli: or sick-nli:)"
            )
        encoder = src.text_encoder or cfg.data.sources[0].text_encoder
        opts = _embed_options(cfg, src.limit, rank)
        self.store = shared_store(encoder, src.spec, src.split, opts, rank, world)
        triplets = open_nli(src.spec, src.split, limit=src.limit, seed=cfg.seed).triplets
        self.rows = triplet_index(triplets, self.store.items.ids)
        self.batch_size = src.batch_size or cfg.optim.batch_size
        self.seed, self.rank, self.world = cfg.seed, rank, world
        self.adapter = feature_adapter(cfg)

    def inputs(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of step ``step``'s triplets as model inputs: [anchors, positives, negatives]."""
        rng = np.random.default_rng([self.seed, step, 104729])
        pick = rng.choice(len(self.rows), min(self.batch_size, len(self.rows)), replace=False)
        rows = self.rows[rank_slice(pick, self.rank, self.world)]
        return [self.adapter.from_store(self.store, rows[:, col]) for col in range(3)]


# -- unpaired items for the structure term -----------------------------------------------------------------
class UnpairedBatches:
    """Unpaired items of one modality per source (``structure: {unpaired: [...]}``): a seeded draw per step.

    A source whose store is also a training source's store (e.g. Flickr8k train images) only draws the
    items that source trains on, so a ``holdout`` stays unseen.
    """

    def __init__(self, cfg: TrainConfig, sources: list, train_sets: list[PairSet], dims: dict[str, int],
                 rank: int = 0, world: int = 1) -> None:
        self.sources, self.stores, self.rows = list(sources), [], []
        first = cfg.data.sources[0]
        for i, src in enumerate(self.sources):
            trained_on = any(src.spec == t.spec and src.split == t.split for t in cfg.data.sources)
            if src.split != "train" and not trained_on:
                raise LightCRLError(
                    f"structure.unpaired[{i}] ({src.spec}): split {src.split!r} is not a training split; "
                    "unpaired items may only come from training data (split: train, or the split a "
                    "data.sources entry trains on), never from an evaluation set"
                )
            if src.modality not in dims:
                raise LightCRLError(f"structure.unpaired[{i}] ({src.spec}): modality {src.modality!r} is "
                                    f"not a modality of this model ({', '.join(dims)})")
            encoder = src.encoder or (first.text_encoder if src.modality == "text" else first.media_encoder)
            opts = _embed_options(cfg, src.limit, rank)
            store = shared_store(encoder, src.spec, src.split, opts, rank, world)
            if store.modality != src.modality or store.dim != dims[src.modality]:
                raise LightCRLError(f"structure.unpaired[{i}] ({src.spec}): a {store.modality} store of "
                                    f"width {store.dim}, the model's {src.modality} inputs have width "
                                    f"{dims[src.modality]}")
            rows = np.arange(len(store))
            for s in train_sets:  # the training items of that store only (never a held-out one)
                if store.dir == s.media.dir:
                    rows = np.unique(s.media_index)
                elif store.dir == s.text.dir:
                    rows = np.unique(s.text_index)
            self.stores.append(store)
            self.rows.append(rows)
        self.seed, self.rank, self.world = cfg.seed, rank, world
        self.adapter = feature_adapter(cfg)

    def inputs(self, step: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(modality, tokens, mask) of this rank's share of step ``step``'s draw from every source."""
        out = []
        for i, (src, store, rows) in enumerate(zip(self.sources, self.stores, self.rows)):
            rng = np.random.default_rng([self.seed, step, i, 611953])
            pick = np.sort(rng.choice(rows, min(src.per_batch, len(rows)), replace=False))
            tokens, mask = self.adapter.from_store(store, pick[rank_slice(np.arange(len(pick)), self.rank,
                                                                         self.world)])
            out.append((src.modality, tokens, mask))
        return out
