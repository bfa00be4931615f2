"""ASIF (Norelli et al. 2023): a training-free multimodal model from frozen encoders and anchor pairs.

An item is represented *relative to the anchors* of its own modality: its cosine similarities to the
anchor images (for an image) or anchor captions (for a caption). Anchor pair i is the same "coordinate"
in both modalities, so an image and a caption become comparable. As in the paper, each relative vector
keeps only its top-k entries, the kept entries are raised to the power p and the row is L2-normalised;
cross-modal similarity is then the dot product. Negative cosines carry no evidence of likeness and are
clipped to 0 before the power.

That computation is the model's anchor space (:class:`lightcrl.anchors.AnchorSpace`); ASIF is the model
with ``arch: anchors`` — the anchor space alone, nothing trained. This module only chooses its settings
(:func:`tune`: k, p, centring on held-out *training* pairs, never on test) and builds and saves such a run
(:func:`build_pipeline`, :func:`save_run`), which then loads and evaluates like any other
(``lightcrl.load``, ``lightcrl.rundir.load_pipeline``). Defaults k=800, p=8 are the paper's.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from lightcrl.errors import LightCRLError
from lightcrl.hubness import bank_rows
from lightcrl.model import LightCRLModel, create_model
from lightcrl.store import FeatureStore

__all__ = ["anchor_features", "anchor_pairs", "asif_model", "build_pipeline", "encode_pooled",
           "fill_hubness_bank", "linked_pairs", "save_run", "tune"]


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def asif_model(anchors: dict[str, np.ndarray], k: int = 800, p: float = 8.0,
               center: bool = False, hubness: dict | None = None) -> LightCRLModel:
    """The anchor space alone over anchor pairs (row i of every modality's pooled features is pair i);
    ``hubness``: ``model.hubness``, its bank filled from the anchors (:func:`fill_hubness_bank`)."""
    sizes = {m: len(a) for m, a in anchors.items()}
    if len(set(sizes.values())) != 1 or not all(sizes.values()):
        raise LightCRLError(f"ASIF anchors must be non-empty pairs of equal count, got {sizes}")
    if k < 1 or p <= 0:
        raise LightCRLError(f"ASIF needs k >= 1 and p > 0, got k={k}, p={p}")
    count = next(iter(sizes.values()))
    cfg = {"arch": "anchors", "learn_logit_scale": False, "dropout": 0.0,
           "anchors": {"k": int(k), "p": float(p), "center": bool(center), "count": count},
           "hubness": hubness}
    model = create_model(cfg, {m: int(np.asarray(a).shape[1]) for m, a in anchors.items()})
    model.anchors.set_keys({m: np.asarray(a, np.float32) for m, a in anchors.items()})
    fill_hubness_bank(model, anchors)
    return model.eval()


def fill_hubness_bank(model: LightCRLModel, pooled: dict[str, np.ndarray], seed: int = 0) -> None:
    """``model.hubness`` of a training-free model: its bank = a seeded sample of the training items it was
    built from (pooled features per modality), embedded by the model itself. No-op without hubness.

    An item repeated in ``pooled`` (CSA's ``all_pairs`` lists an image once per caption) enters the sample
    once, as in the trainer's bank: a copy among an item's k nearest bank rows would count one neighbour
    twice."""
    hcfg = model.cfg.hubness
    if hcfg is None:
        return
    bank = {}
    for m, feats in pooled.items():
        feats = np.asarray(feats)
        distinct = np.sort(np.unique(feats, axis=0, return_index=True)[1])  # first copies, in order
        rows = distinct[bank_rows(np.arange(len(distinct)), hcfg.bank, seed)]
        bank[m] = encode_pooled(model.eval(), m, feats[rows])
    model.set_hubness_bank(bank)


@torch.no_grad()
def encode_pooled(model: LightCRLModel, modality: str, pooled: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Pooled frozen features [N, D] -> the model's embeddings [N, d] (for ASIF: its relative vectors)."""
    if modality not in model.input_dims:
        raise LightCRLError(f"ASIF has no {modality} anchors (it has {', '.join(model.input_dims)})")
    x = torch.as_tensor(np.asarray(pooled, np.float32))
    if x.ndim != 2 or x.shape[1] != model.input_dims[modality]:
        raise LightCRLError(f"{modality} features have shape {tuple(x.shape)}; the anchors have dim "
                            f"{model.input_dims[modality]}")
    out = [model.encode(modality, x[s : s + chunk]) for s in range(0, len(x), chunk)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.embed_dim), np.float32)


def linked_pairs(media: FeatureStore, text: FeatureStore, holdout: float | None = None, seed: int = 0):
    """The (media, caption) PairSet of a training split; with ``holdout``, the part the trainer trains on
    (the same seeded media items are held out as by ``data.sources[].holdout`` with that seed)."""
    from lightcrl.pairs import PairSet

    ps = PairSet.link("anchors", media, text)
    if len(ps) == 0:
        raise LightCRLError(f"no (media, caption) pairs between {media.dir} and {text.dir}")
    return ps.split_media(holdout, seed)[0] if holdout else ps


def anchor_pairs(media: FeatureStore, text: FeatureStore, pairs: str = "random_caption",
                 seed: int = 0, holdout: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(media rows, text rows) of the anchor pairs of a training split: one random caption per media item
    (seeded), or every (media, caption) pair; ``holdout``: without the held-out media items."""
    ps = linked_pairs(media, text, holdout, seed)
    pick = np.sort(ps.epoch_pairs(seed, 0, pairs))
    return ps.media_index[pick], ps.text_index[pick]


def anchor_features(media: FeatureStore, text: FeatureStore, pairs: str = "random_caption",
                    seed: int = 0, holdout: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pooled (media, text) features of the anchor pairs, row i of each = pair i. ``mean_caption``: one
    anchor per media item whose text is the mean of its L2-normalised captions (steadier than one
    random caption); otherwise the pairs of :func:`anchor_pairs`. ``holdout``: see :func:`linked_pairs`."""
    if pairs != "mean_caption":
        mi, ti = anchor_pairs(media, text, pairs, seed, holdout)
        return media.pooled(mi), text.pooled(ti)
    ps = linked_pairs(media, text, holdout, seed)
    rows, anchor_of_pair = np.unique(ps.media_index, return_inverse=True)
    order = np.argsort(ps.text_index)  # read the text store in order
    caps = _normalize(text.pooled(ps.text_index[order]))
    mean = np.zeros((len(rows), caps.shape[1]), np.float32)
    np.add.at(mean, anchor_of_pair[order], caps)
    return media.pooled(rows), mean


def tune(media: np.ndarray, text: np.ndarray, ks: Sequence[int], ps: Sequence[float],
         center: bool | Sequence[bool] = False, val_fraction: float = 0.2, seed: int = 0,
         modality: str = "image") -> dict[str, Any]:
    """Choose (k, p[, center]) by mean retrieval R@1 on held-out TRAINING pairs (the rest are the anchors).

    ``media``/``text``: pooled features of the training pairs, row i of each is pair i. ``center``: one
    value, or the values to choose from.
    """
    centers = [center] if isinstance(center, bool) else list(center)
    from lightcrl.metrics import retrieval

    n = len(media)
    n_val = max(2, int(round(n * val_fraction)))
    if n - n_val < 2:
        raise LightCRLError(f"too few training pairs ({n}) to tune ASIF")
    perm = np.random.default_rng(seed).permutation(n)
    val, anchor = perm[:n_val], perm[n_val:]
    scores = {}
    for k, p, c in itertools.product(ks, ps, centers):
        model = asif_model({modality: media[anchor], "text": text[anchor]}, k=k, p=p, center=c)
        r = retrieval.evaluate(encode_pooled(model, modality, media[val]),
                               encode_pooled(model, "text", text[val]), np.arange(n_val))
        scores[(k, p, c)] = (r["image_retrieval_recall@1"] + r["text_retrieval_recall@1"]) / 2
    best = max(scores, key=lambda kpc: scores[kpc])
    return {"k": int(best[0]), "p": float(best[1]), "center": bool(best[2]),
            "val_mean_recall@1": scores[best], "n_val": n_val,
            "grid": [{"k": int(k), "p": float(p), "center": bool(c), "val_mean_recall@1": v}
                     for (k, p, c), v in scores.items()]}


def build_pipeline(spec: dict, device: str = "auto", progress: bool = False):
    """An ASIF model with its frozen encoders, as a :class:`lightcrl.api.LightCRLPipeline`.

    ``spec``: data, split, limit, seed, media_encoder, text_encoder, pairs, k, p, center[, tune, holdout]
    (``holdout``: leave the training source's held-out media items out of the anchors). The anchor
    features come from the feature-store cache, so building one costs nothing once the training stores
    exist. The pipeline's ``info`` is the run's model.json (kind "asif").
    """
    from lightcrl.api import LightCRLPipeline
    from lightcrl.embed import EmbedOptions, cached_store
    from lightcrl.features import FeatureAdapter

    t0 = time.time()
    opts = EmbedOptions(limit=spec.get("limit"), seed=spec.get("seed", 0), device=device, progress=progress)
    media = cached_store(spec["media_encoder"], spec["data"], spec["split"], opts)
    text = cached_store(spec["text_encoder"], spec["data"], spec["split"], opts)
    m_feat, t_feat = anchor_features(media, text, spec.get("pairs", "random_caption"), spec.get("seed", 0),
                                     spec.get("holdout"))
    k, p, center = spec.get("k", 800), spec.get("p", 8.0), spec.get("center", False)
    asif_spec = {key: v for key, v in spec.items() if key != "tuning"}
    if spec.get("tune"):
        t = spec["tune"]
        res = tune(m_feat, t_feat, t.get("k", [k]), t.get("p", [p]), t.get("center") or center,
                   t.get("val_fraction", 0.2), spec.get("seed", 0), media.modality)
        k, p, center = res["k"], res["p"], res["center"]
        asif_spec["tuning"] = res
    asif_spec.update(k=k, p=p, center=center)
    model = asif_model({media.modality: m_feat, "text": t_feat}, k=k, p=p, center=center,
                       hubness=spec.get("hubness"))
    info = {
        "kind": "asif",
        "model_config": model.cfg.model_dump(),
        "input_dims": model.input_dims,
        "encoders": {media.modality: spec["media_encoder"], "text": spec["text_encoder"]},
        **FeatureAdapter("pooled").describe(),
        "parameter_counts": model.parameter_counts(),
        "asif": asif_spec,  # how the anchors were chosen: enough to rebuild from the store cache
        "n_anchors": len(m_feat),
        "anchor_stores": {"media": media.summary(), "text": text.summary()},
        "build_time_s": time.time() - t0,
    }
    return LightCRLPipeline(model, info, device)


def save_run(pipe, run_dir: str | Path) -> None:
    """Write an ASIF pipeline as a run: model.json (kind "asif") + model.safetensors (the anchor keys)."""
    from lightcrl.rundir import RunDir

    run = RunDir(run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in pipe.model.state_dict().items()}
    save_file(state, str(run.weights))
    run.write_info(pipe.info)


def legacy_spec(info: dict) -> dict:
    """The build spec of an ASIF run written by an older lightcrl (model.json held only the spec)."""
    spec = {k: v for k, v in info.items() if k not in ("kind", "tune", "tuning", "anchor_stores", "n_anchors",
                                                       "encoders", "parameter_counts")}
    return spec
