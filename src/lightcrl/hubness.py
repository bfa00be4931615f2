"""Hubness correction in retrieval: CSLS against a bank of TRAINING embeddings kept with the model.

A shared space learned from a few thousand pairs has hubs: gallery items close to many queries of the
other modality, which then top rankings they do not belong in. CSLS (Conneau et al., ICLR 2018) scores a
query q against a gallery item g as ``2 cos(q, g) - r_q - r_g``, r = the mean cosine to the k nearest
items of the other side. For ranking one query's gallery r_q is a constant, so only ``-r_g / 2`` matters
(added to the cosine). Here r_g is measured against training items of the QUERY modality (training
captions for text -> image, training images for image -> text), as QB-Norm (Bogolin et al., CVPR 2022)
uses training queries: nothing of the evaluation set but the gallery itself is read.

``model.hubness`` keeps up to ``bank`` training embeddings per modality (float16 buffers, refreshed by the
trainer with the weights they belong to) and the model applies the correction in retrieval: the trainer's
validation, ``lightcrl eval --task retrieval``, and search across modalities (``lightcrl search``, and the
indexes of ``lightcrl index`` / ``serve``, which keep each item's offset per query modality: see
:func:`gallery_offsets`). Zero-shot classification is left uncorrected: on
validation (Flickr8k TRAIN held out, CIFAR-10 / Tiny ImageNet TRAIN) it lifted held-out retrieval by 3-6
R@1 points and lowered zero-shot top-1 (docs/results.md, "Hubness correction").
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["HubnessConfig", "bank_rows", "csls_offsets", "gallery_offsets"]


class HubnessConfig(BaseModel):
    """``model.hubness``: CSLS in retrieval against training embeddings (None = off)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    k: int = Field(10, ge=1)  # nearest bank items whose mean cosine is a gallery item's hubness
    bank: int = Field(2048, ge=1)  # training items kept per modality (seeded sample; float16 in the model)


def csls_offsets(gallery: np.ndarray, bank: np.ndarray | torch.Tensor, k: int,
                 chunk: int = 2048) -> np.ndarray:
    """``-r_g / 2`` for each gallery row: r_g = the mean cosine to its ``k`` nearest bank rows (rows of
    both are unit vectors). Added to the cosine scores of every query against that gallery item."""
    g = torch.as_tensor(np.asarray(gallery, np.float32))
    b = torch.as_tensor(bank).float()
    if len(b) == 0:
        return np.zeros(len(g), np.float32)
    k = min(k, len(b))
    out = [(g[s : s + chunk] @ b.T).topk(k, dim=1).values.mean(1) for s in range(0, len(g), chunk)]
    return (-0.5 * torch.cat(out)).numpy() if out else np.zeros(0, np.float32)


def bank_rows(candidates: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded sample of at most ``size`` of the distinct ``candidates`` (sorted: stores read in order)."""
    rows = np.unique(np.asarray(candidates))
    if len(rows) > size:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size, replace=False))
    return rows


def gallery_offsets(model, gallery: np.ndarray, gallery_modality: str,
                    chunk: int = 65_536) -> dict[str, np.ndarray]:
    """``{query modality: offsets [N] float32}`` of a gallery of ``gallery_modality`` items (unit rows; a
    memmap is read ``chunk`` rows at a time) for every OTHER modality whose bank ``model`` keeps; empty
    when the model has no ``model.hubness``. Same-modality queries stay uncorrected: only cross-modal
    retrieval was validated."""
    offsets_of = getattr(model, "retrieval_offsets", None)  # baselines' pipelines may lack it
    if offsets_of is None:
        return {}
    out: dict[str, np.ndarray] = {}
    for query_modality in getattr(model, "modalities", []):
        if query_modality == gallery_modality:
            continue
        parts = [offsets_of(np.array(gallery[s : s + chunk], np.float32), query_modality)
                 for s in range(0, len(gallery), chunk)]
        if parts and all(p is not None for p in parts):
            out[query_modality] = np.concatenate(parts).astype(np.float32)
    return out
