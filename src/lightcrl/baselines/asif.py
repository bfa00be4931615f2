"""ASIF (Norelli et al. 2023): a training-free multimodal model from frozen encoders and anchor pairs.

An item is represented *relative to the anchors* of its own modality: its cosine similarities to the
anchor images (for an image) or anchor captions (for a caption). Anchor pair i is the same "coordinate"
in both modalities, so an image and a caption become comparable. As in the paper, each relative vector
keeps only its top-k entries (the rest are set to 0), the kept entries are raised to the power p (which
sharpens the vector towards its nearest anchors) and the row is L2-normalised; cross-modal similarity is
then the dot product. Negative cosines carry no evidence of likeness and are clipped to 0 before the power.

Defaults k=800, p=8 are the paper's. :func:`tune` chooses them on held-out *training* pairs, never on test.

:class:`ASIFPipeline` wraps an :class:`ASIF` with the frozen encoders so that ``lightcrl.app.evaluate`` tasks
can use it like a trained model (``encode_store``, ``encode_text``, ``encode_image``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightcrl.errors import LightCRLError
from lightcrl.io import read_json, write_json
from lightcrl.store import FeatureStore

__all__ = ["ASIF", "ASIFPipeline", "anchor_features", "anchor_pairs", "tune"]


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


class ASIF:
    """Relative representations against anchor pairs (row i of every modality's anchors is pair i)."""

    def __init__(self, anchors: dict[str, np.ndarray], k: int = 800, p: float = 8.0, center: bool = False,
                 chunk: int = 1024) -> None:
        sizes = {m: len(a) for m, a in anchors.items()}
        if len(set(sizes.values())) != 1 or not all(sizes.values()):
            raise LightCRLError(f"ASIF anchors must be non-empty pairs of equal count, got {sizes}")
        if k < 1 or p <= 0:
            raise LightCRLError(f"ASIF needs k >= 1 and p > 0, got k={k}, p={p}")
        self.k, self.p, self.center, self.chunk = int(k), float(p), bool(center), int(chunk)
        # Optional centering by the anchor mean: image features of a CNN all point the same way (post-ReLU),
        # which flattens every cosine; subtracting the mean restores contrast.
        self.means = {m: (np.asarray(a, np.float32).mean(0) if center else None) for m, a in anchors.items()}
        self.anchors = {m: torch.from_numpy(self._prepare(m, a)) for m, a in anchors.items()}

    @property
    def n_anchors(self) -> int:
        return len(next(iter(self.anchors.values())))

    @property
    def modalities(self) -> list[str]:
        return list(self.anchors)

    def _prepare(self, modality: str, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        mean = self.means[modality]
        return _normalize(x - mean if mean is not None else x)

    def encode_features(self, modality: str, pooled: np.ndarray) -> np.ndarray:
        """Frozen pooled features [N, D] of ``modality`` -> relative representations [N, n_anchors]."""
        if modality not in self.anchors:
            raise LightCRLError(f"ASIF has no {modality} anchors (it has {', '.join(self.anchors)})")
        x = torch.from_numpy(self._prepare(modality, pooled))
        basis = self.anchors[modality]
        if x.shape[1] != basis.shape[1]:
            raise LightCRLError(f"{modality} features have dim {x.shape[1]}, the anchors {basis.shape[1]}")
        k = min(self.k, len(basis))
        out = torch.zeros(len(x), len(basis))
        for s in range(0, len(x), self.chunk):
            vals, idx = (x[s : s + self.chunk] @ basis.T).topk(k, dim=1)
            vals = vals.clamp(min=0)
            # Divide by the row max before the power: the same direction, without underflow at large p.
            vals = (vals / vals[:, :1].clamp(min=1e-12)) ** self.p
            out[s : s + self.chunk].scatter_(1, idx, vals)
        return torch.nn.functional.normalize(out, dim=1).numpy()

    def encode_image_features(self, pooled: np.ndarray) -> np.ndarray:
        return self.encode_features("image", pooled)

    def encode_text_features(self, pooled: np.ndarray) -> np.ndarray:
        return self.encode_features("text", pooled)


def anchor_pairs(media: FeatureStore, text: FeatureStore, pairs: str = "random_caption",
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(media rows, text rows) of the anchor pairs of a training split: one random caption per media item
    (seeded), or every (media, caption) pair."""
    from lightcrl.pairs import PairSet

    ps = PairSet.link("anchors", media, text)
    if len(ps) == 0:
        raise LightCRLError(f"no (media, caption) pairs between {media.dir} and {text.dir}")
    pick = np.sort(ps.epoch_pairs(seed, 0, pairs))
    return ps.media_index[pick], ps.text_index[pick]


def anchor_features(media: FeatureStore, text: FeatureStore, pairs: str = "random_caption",
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pooled (media, text) features of the anchor pairs, row i of each = pair i. ``mean_caption``: one
    anchor per media item whose text is the mean of its L2-normalised captions (steadier than one
    random caption); otherwise the pairs of :func:`anchor_pairs`."""
    if pairs != "mean_caption":
        mi, ti = anchor_pairs(media, text, pairs, seed)
        return media.pooled(mi), text.pooled(ti)
    from lightcrl.pairs import PairSet

    ps = PairSet.link("anchors", media, text)
    if len(ps) == 0:
        raise LightCRLError(f"no (media, caption) pairs between {media.dir} and {text.dir}")
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
        model = ASIF({modality: media[anchor], "text": text[anchor]}, k=k, p=p, center=c)
        r = retrieval.evaluate(model.encode_features(modality, media[val]),
                               model.encode_features("text", text[val]), np.arange(n_val))
        scores[(k, p, c)] = (r["image_retrieval_recall@1"] + r["text_retrieval_recall@1"]) / 2
    best = max(scores, key=lambda kpc: scores[kpc])
    return {"k": int(best[0]), "p": float(best[1]), "center": bool(best[2]),
            "val_mean_recall@1": scores[best], "n_val": n_val,
            "grid": [{"k": int(k), "p": float(p), "center": bool(c), "val_mean_recall@1": v}
                     for (k, p, c), v in scores.items()]}


class ASIFPipeline:
    """An ASIF model with its frozen encoders, usable wherever evaluation expects a trained pipeline.

    ``spec`` describes the anchors (dataset spec, split, sample, encoders, k, p); the anchor features come
    from the feature-store cache, so building one costs nothing once the training stores exist.
    """

    input = "pooled"
    model = None  # no trainable model: tasks that fine-tune one do not apply

    def __init__(self, asif: ASIF, encoders: dict[str, str], info: dict, device: str = "auto") -> None:
        from lightcrl.devices import resolve_device

        self.asif = asif
        self.encoder_names = dict(encoders)
        self.info = info
        self.device = resolve_device(device)

    @classmethod
    def build(cls, spec: dict, device: str = "auto", progress: bool = False) -> ASIFPipeline:
        """``spec``: data, split, limit, seed, media_encoder, text_encoder, pairs, k, p, center[, tune]."""
        from lightcrl.embed import EmbedOptions, cached_store

        opts = EmbedOptions(limit=spec.get("limit"), seed=spec.get("seed", 0), device=device,
                            progress=progress)
        media = cached_store(spec["media_encoder"], spec["data"], spec["split"], opts)
        text = cached_store(spec["text_encoder"], spec["data"], spec["split"], opts)
        pairs = spec.get("pairs", "random_caption")
        m_feat, t_feat = anchor_features(media, text, pairs, spec.get("seed", 0))
        info = dict(spec, kind="asif", n_anchors=len(m_feat),
                    anchor_stores={"media": media.summary(), "text": text.summary()})
        k, p, center = spec.get("k", 800), spec.get("p", 8.0), spec.get("center", False)
        if spec.get("tune"):
            t = spec["tune"]
            res = tune(m_feat, t_feat, t.get("k", [k]), t.get("p", [p]), t.get("center") or center,
                       t.get("val_fraction", 0.2), spec.get("seed", 0), media.modality)
            k, p, center = res["k"], res["p"], res["center"]
            info["tuning"] = res
        info.update(k=k, p=p, center=center)
        asif = ASIF({media.modality: m_feat, "text": t_feat}, k=k, p=p, center=center)
        encoders = {media.modality: spec["media_encoder"], "text": spec["text_encoder"]}
        return cls(asif, encoders, info, device)

    def save(self, run_dir: str | Path) -> None:
        """``model.json`` (kind "asif") describing how to rebuild this model from the store cache."""
        write_json(Path(run_dir) / "model.json", dict(self.info, encoders=self.encoder_names,
                                                      parameter_counts={"total_trainable": 0}))

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto") -> ASIFPipeline:
        info = read_json(Path(run_dir) / "model.json")
        if info.get("kind") != "asif":
            raise LightCRLError(f"{run_dir} is not an ASIF run (model.json kind {info.get('kind')!r})")
        # the tuned (k, p) are fixed now: rebuilding must not tune again
        spec = {k: v for k, v in info.items() if k not in ("tune", "tuning", "anchor_stores", "n_anchors")}
        return cls.build(spec, device)

    # -- the pipeline interface used by lightcrl.app.evaluate ---------------------------------------
    def _check_store(self, store: FeatureStore) -> None:
        expected = self.encoder_names.get(store.modality)
        if store.manifest["encoder"]["name"] != expected:
            raise LightCRLError(f"store {store.dir} was made with {store.manifest['encoder']['name']}, "
                                f"this ASIF model uses {expected}")

    def encode_store(self, store: FeatureStore, batch_size: int = 0, indices: Any = None) -> np.ndarray:
        self._check_store(store)
        return self.asif.encode_features(store.modality, store.pooled(indices))

    def _pooled(self, modality: str, items: Sequence[Any], batch_size: int) -> np.ndarray:
        from lightcrl.encoders import get_encoder

        enc = get_encoder(self.encoder_names[modality], device=self.device)
        out = [enc.encode(list(items[s : s + batch_size])).pooled.cpu().numpy()
               for s in range(0, len(items), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, enc.dim), np.float32)

    def encode_text(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        return self.asif.encode_features("text", self._pooled("text", list(texts), batch_size))

    def encode_image(self, images: Sequence[Any], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        return self.asif.encode_features("image", self._pooled("image", list(images), batch_size))
