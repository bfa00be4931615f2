"""Anchor coordinates: ASIF's relative representation as a learned part of the model.

ASIF (see ``baselines/asif.py``) needs no training: an image is described by its cosine similarities to
the anchor images, a caption by its similarities to the anchor captions, and because anchor i is one
(image, caption) pair, both descriptions share coordinates. It generalises beyond the training captions
(it only uses each frozen encoder's own notion of likeness) but ranks poorly. Trained heads are the
opposite. ``ModelConfig.anchors`` joins the two:

* every item's frozen pooled feature (the masked mean of the tokens the model receives) is compared with
  the anchor keys of its modality (both centred on the anchors' mean); the top-k cosines are clipped at
  0, raised to the power p and L2-normalised, as in ASIF;
* that sparse vector is the anchor part of the embedding as it is (``dim: null``, the default), or it
  weights rows of ONE learned table [n_anchors, dim] shared by all modalities (``dim: N``);
* the model's embedding is ``[cos(theta) * dfe_embedding, sin(theta) * anchor_embedding]`` with a learned
  mixing angle theta, so a similarity is a learned blend of the DFE's and the anchor space's similarity,
  and the DFE learns what ASIF misses rather than relearning what it has.

Measured on the offline grid (docs/results.md): the fixed coordinates keep ASIF's zero-shot transfer and
the DFE adds retrieval; a learned table fits Flickr's pairs and loses part of that transfer.

With ``arch: anchors`` the model is this anchor space alone, with no trained part: that IS ASIF
(``baselines/asif.py`` only chooses k, p and centring on held-out training pairs and saves the run).

Anchors are the training pairs themselves, so during training an item must not see its own anchor (it
would match its partner through it trivially, and learn nothing that transfers): the trainer passes the
anchor index of each batch item and it is left out of the top-k (leave-one-out).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from lightcrl.errors import LightCRLError

__all__ = ["AnchorConfig", "AnchorSet", "AnchorSpace", "build_anchor_set"]


class AnchorConfig(BaseModel):
    """``model.anchors``: ASIF-style anchor coordinates learned next to the DFE (None = off)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    k: int = Field(200, ge=1)  # nearest anchors kept per item (ASIF's top-k)
    p: float = Field(4.0, gt=0.0)  # exponent on the kept cosines (ASIF's p)
    # None: the anchor part of the embedding is ASIF's coordinate vector itself (n_anchors wide, fixed);
    # an int: a learned table [n_anchors, dim] shared by all modalities maps it to dim.
    dim: int | None = Field(None, ge=1)
    # Subtract the anchors' mean feature before the cosines (ASIF's centring): post-ReLU CNN features all
    # point one way, which flattens every cosine; centring restores the contrast.
    center: bool = True
    max_anchors: int | None = Field(None, ge=1)  # subsample the training pairs (memory, paper scale)
    init_mix: float = Field(math.pi / 4, gt=0.0, lt=math.pi / 2)  # theta: equal weight at the start
    # Learning theta on the training pairs favours the DFE, which fits those pairs; a fixed theta is a
    # hyper-parameter to choose on a validation split.
    learn_mix: bool = True
    # "concat": [cos(theta) z_dfe, sin(theta) z_anchor] (width + dim wide). "sum": z_dfe is mapped to
    # dim by a linear layer and the two are added, so the DFE side of one item also meets the anchor
    # side of the other in every similarity (dim wide).
    join: Literal["concat", "sum"] = "concat"
    # the text side's own angle (None: theta): text-text similarity weighs the views apart from
    # cross-modal similarity, which stays exactly as with theta (lightcrl/views.py); concat only
    text_mix: float | None = Field(None, gt=0.0, lt=math.pi / 2)
    # Filled in by the trainer from the training data; a saved model.json carries it, so loading needs
    # no data. 0 = not built yet.
    count: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _text_mix_needs_concat(self) -> AnchorConfig:
        if self.text_mix is not None and self.join != "concat":
            raise ValueError("model.anchors.text_mix needs join: concat (a summed join is normalised per "
                             "item, so the text angle would move cross-modal rankings)")
        return self


class AnchorSpace(nn.Module):
    """Anchor keys per modality (buffers, saved with the weights) and the shared learned table."""

    def __init__(self, cfg: AnchorConfig, input_dims: dict[str, int], width: int | None) -> None:
        """``width``: the trained part's embedding width this space is joined to (mixing angle theta and,
        for ``join: sum``, a map to the anchor width); None = the anchor space alone (ASIF)."""
        super().__init__()
        if cfg.count < 1:
            raise LightCRLError(
                "model.anchors.count is 0: the anchors are built from the training pairs by the trainer "
                "(lightcrl train), or come with a saved model.json"
            )
        self.cfg = cfg
        self.modalities = list(input_dims)
        for m, d in input_dims.items():
            self.register_buffer(f"keys_{m}", torch.zeros(cfg.count, d))
            self.register_buffer(f"mean_{m}", torch.zeros(d))  # stays 0 without centring
        self.table: nn.Parameter | None = None
        if cfg.dim is not None:
            self.table = nn.Parameter(torch.randn(cfg.count, cfg.dim) / math.sqrt(cfg.dim))
        self.mix: nn.Parameter | None = None
        self.out: nn.Linear | None = None
        if width is not None:
            self.mix = nn.Parameter(torch.tensor(float(cfg.init_mix)), requires_grad=cfg.learn_mix)
            self.out = nn.Linear(width, self.dim) if cfg.join == "sum" else None

    @property
    def dim(self) -> int:
        """Width of the anchor part of the embedding."""
        return self.cfg.dim if self.cfg.dim is not None else self.cfg.count

    def keys(self, modality: str) -> Tensor:
        return getattr(self, f"keys_{modality}")

    @torch.no_grad()
    def set_keys(self, keys: dict[str, np.ndarray | Tensor]) -> None:
        """Install the anchor keys (frozen pooled features, row i of every modality = anchor pair i)."""
        missing = sorted(set(self.modalities) - set(keys))
        if missing:
            raise LightCRLError(f"anchor keys missing for modalities {missing}")
        for m in self.modalities:
            k = torch.as_tensor(np.asarray(keys[m]), dtype=torch.float32)
            buf = self.keys(m)
            if tuple(k.shape) != tuple(buf.shape):
                raise LightCRLError(
                    f"{m} anchor keys have shape {tuple(k.shape)}, expected {tuple(buf.shape)}"
                )
            mean = k.mean(0) if self.cfg.center else torch.zeros(k.shape[1])
            getattr(self, f"mean_{m}").copy_(mean)
            buf.copy_(F.normalize(k - mean, dim=-1).to(buf.device))

    def coordinates(self, modality: str, key: Tensor, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """ASIF's sparse relative vector of ``key`` [B, D]: weights [B, k] (unit norm), anchor ids [B, k]."""
        keys = self.keys(modality)
        sims = F.normalize(key.to(keys.dtype) - getattr(self, f"mean_{modality}"), dim=-1) @ keys.T
        if exclude is not None:
            rows = torch.nonzero(exclude >= 0).squeeze(1)
            sims[rows, exclude[rows]] = -2.0  # below any cosine: never among the top-k
        vals, ids = sims.topk(min(self.cfg.k, keys.shape[0]), dim=1)
        vals = vals.clamp(min=0.0)
        # Divide by the row max before the power: same direction, no underflow at large p.
        vals = (vals / vals[:, :1].clamp(min=1e-12)) ** self.cfg.p
        return F.normalize(vals, dim=-1), ids

    def embed(self, modality: str, key: Tensor, exclude: Tensor | None = None) -> Tensor:
        """Anchor-space embedding [B, dim], L2-normalised: ASIF's vector itself, or the weighted sum of the
        item's rows of the learned table."""
        weights, ids = self.coordinates(modality, key, exclude)
        if self.table is None:
            # shape[0], not len(): len() is a plain int, which would fix the batch size of an exported graph
            return weights.new_zeros((weights.shape[0], self.cfg.count)).scatter(1, ids, weights)
        return F.normalize(torch.einsum("bk,bkd->bd", weights.to(self.table.dtype), self.table[ids]), dim=-1)

    def join(self, dfe_embedding: Tensor, anchor_embedding: Tensor, angle: Tensor | None = None) -> Tensor:
        """The model's embedding from its two L2-normalised parts (see ``AnchorConfig.join``), unit norm.
        ``angle``: this modality's angle (lightcrl/views.py), else theta."""
        if self.mix is None:
            raise LightCRLError("this anchor space stands alone (no trained part to join)")
        angle = self.mix if angle is None else angle
        a = anchor_embedding.to(dfe_embedding.dtype) * torch.sin(angle)
        if self.out is None:
            return torch.cat([dfe_embedding * torch.cos(angle), a], dim=-1)
        z = F.normalize(self.out(dfe_embedding), dim=-1) * torch.cos(angle)
        return F.normalize(z + a, dim=-1)


class AnchorSet:
    """The anchor pairs of one training pair set: their keys and each media item's anchor id."""

    def __init__(self, keys: dict[str, np.ndarray], media_anchor: np.ndarray, media_modality: str):
        self.keys = keys
        self.media_anchor = media_anchor  # [len(media store)] anchor id, -1 when not an anchor
        self.media_modality = media_modality

    def __len__(self) -> int:
        return len(self.media_anchor[self.media_anchor >= 0])

    def exclude(self, media_rows: np.ndarray) -> Tensor:
        """Leave-one-out ids for a batch: the anchor of each pair's media item, for both modalities."""
        return torch.from_numpy(self.media_anchor[np.asarray(media_rows)])


def build_anchor_set(pairs, max_anchors: int | None = None, seed: int = 0) -> AnchorSet:
    """Anchor pairs from a training ``PairSet``: every media item with a caption (or ``max_anchors`` of
    them, seeded); its key is the masked token mean the model sees, the caption key the mean over ALL its
    captions (a steadier description of the item than one random caption)."""
    media_rows = np.unique(pairs.media_index)
    if len(media_rows) == 0:
        raise LightCRLError(f"anchors: pair set {pairs.name!r} has no (media, caption) pairs")
    if max_anchors is not None and len(media_rows) > max_anchors:
        rng = np.random.default_rng([seed, 4099])
        media_rows = np.sort(rng.choice(media_rows, max_anchors, replace=False))
    media_anchor = np.full(len(pairs.media), -1, np.int64)
    media_anchor[media_rows] = np.arange(len(media_rows))

    media_keys = pairs.frozen_pooled(pairs.media, media_rows)
    keep = media_anchor[pairs.media_index] >= 0
    cap_anchor, cap_rows = media_anchor[pairs.media_index[keep]], pairs.text_index[keep]
    order = np.argsort(cap_rows)  # sum each anchor's captions in row order (as the keys always were)
    cap_anchor, cap_rows = cap_anchor[order], cap_rows[order]
    text_feat = pairs.frozen_pooled(pairs.text, cap_rows)
    # normalise each caption first, so a long caption with a large pooled norm does not dominate the mean
    text_feat /= np.linalg.norm(text_feat, axis=1, keepdims=True).clip(1e-12)
    text_keys = np.zeros((len(media_rows), text_feat.shape[1]), np.float32)
    np.add.at(text_keys, cap_anchor, text_feat)
    keys = {pairs.media_modality: media_keys, "text": text_keys}
    return AnchorSet(keys, media_anchor, pairs.media_modality)
