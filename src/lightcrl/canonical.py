"""Canonical coordinates (CSA, Li, Chinchali & Topcu, ICLR 2025) as a part of the model.

Regularised CCA of paired frozen features finds one linear map per modality whose output dimensions are
maximally correlated between the modalities (:func:`fit_cca`); weighting each dimension by its canonical
correlation gives CSA's similarity. Nothing in it is trained, it only uses what the two frozen encoders
share on the training pairs, and it carries to data the training never saw better than trained heads do
(docs/results.md, "generalisation"). Two ways to use it:

* ``model.arch: csa``: the canonical space alone, i.e. CSA (``baselines/csa.py`` fits and tunes it);
* ``model.csa`` on a trained arch (dfe, two_tower): the trainer fits the CCA on the training pairs and
  the model's embedding becomes ``[cos(theta) z_model, sin(theta) z_csa]`` with a fixed angle theta, so a
  similarity is ``cos^2(theta) sim_model + sin^2(theta) sim_csa`` and the loss, applied to the joined
  embedding, trains the DFE on what CSA misses instead of relearning what it already has (as
  ``model.anchors`` does for ASIF's coordinates; both may be on, CSA joins last).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from lightcrl.errors import LightCRLError

__all__ = ["CCAFit", "CanonicalConfig", "CanonicalSpace", "canonical_embed", "fit_cca", "fit_pairs"]


class CCAFit:
    """Means, canonical maps (columns sorted by correlation) and the canonical correlations of one fit."""

    def __init__(self, mean_x: np.ndarray, mean_y: np.ndarray, a: np.ndarray, b: np.ndarray,
                 rho: np.ndarray) -> None:
        self.mean_x, self.mean_y, self.a, self.b, self.rho = mean_x, mean_y, a, b, rho

    @property
    def rank(self) -> int:
        return len(self.rho)


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def _inv_sqrt(c: np.ndarray, reg: float) -> np.ndarray:
    """(C + r I)^-1/2 with r = reg * mean variance (so ``reg`` does not depend on the feature scale)."""
    r = reg * float(np.trace(c)) / len(c)
    w, v = np.linalg.eigh(c + r * np.eye(len(c)))
    return (v / np.sqrt(w.clip(1e-12))) @ v.T


def fit_cca(x: np.ndarray, y: np.ndarray, reg: float = 1e-2) -> CCAFit:
    """Regularised CCA of paired features x [n, Dx], y [n, Dy] (each row L2-normalised first)."""
    x, y = _normalize(x), _normalize(y)
    if len(x) != len(y) or len(x) < 2:
        raise LightCRLError(f"CSA needs at least 2 pairs of equal count, got {len(x)} and {len(y)}")
    if reg <= 0:
        raise LightCRLError(f"CSA needs reg > 0 (ridge on the covariances), got {reg}")
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    n = len(x) - 1
    wx, wy = _inv_sqrt(xc.T @ xc / n, reg), _inv_sqrt(yc.T @ yc / n, reg)
    u, s, vt = np.linalg.svd(wx @ (xc.T @ yc / n) @ wy, full_matrices=False)
    return CCAFit(mx.astype(np.float32), my.astype(np.float32), (wx @ u).astype(np.float32),
                  (wy @ vt.T).astype(np.float32), s.clip(0.0, 1.0).astype(np.float32))


def weighted_maps(fit: CCAFit, dims: int, exponent: float) -> tuple[np.ndarray, np.ndarray]:
    """The first ``dims`` columns of both canonical maps, each scaled by rho^(exponent/2): the cosine of
    two mapped items is then CSA's correlation-weighted similarity."""
    if not 1 <= dims <= fit.rank:
        raise LightCRLError(f"CSA dims must be in 1..{fit.rank} (the CCA's rank), got {dims}")
    if exponent < 0:
        raise LightCRLError(f"CSA exponent must be >= 0, got {exponent}")
    scale = fit.rho[:dims] ** (exponent / 2)
    return fit.a[:, :dims] * scale, fit.b[:, :dims] * scale


def canonical_embed(pooled: Tensor, mean: Tensor, weighted_map: Tensor) -> Tensor:
    """A frozen pooled feature [B, D] in canonical coordinates [B, dims], unit norm (L2-normalised and
    centred first, as the fit saw it)."""
    x = F.normalize(pooled.to(mean.dtype), dim=-1) - mean
    return F.normalize(x @ weighted_map, dim=-1)


class CanonicalConfig(BaseModel):
    """``model.csa``: CSA's canonical coordinates joined to a trained model (None = off)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dims: int = Field(256, ge=1)  # canonical dimensions kept (fewer when the CCA's rank is lower)
    exponent: float = Field(1.0, ge=0.0)  # weight rho^exponent per dimension in the similarity
    reg: float = Field(1.0, gt=0.0)  # ridge on each covariance, times its mean variance
    # theta: the canonical part's share of every similarity is sin^2(theta); a hyper-parameter chosen on
    # validation data (learning it on the training pairs would favour the part that fits them: the DFE)
    init_mix: float = Field(1.0, gt=0.0, lt=math.pi / 2)
    learn_mix: bool = False
    # the text side's own angle (None: as theta): text-text similarity weighs the parts apart from
    # cross-modal similarity, which stays exactly as with theta (lightcrl/views.py)
    text_mix: float | None = Field(None, gt=0.0, lt=math.pi / 2)
    # Filled in by the trainer from the fit (min(dims, CCA rank)); a saved model.json carries it, so
    # loading needs no data. 0 = not fitted yet.
    rank: int = Field(0, ge=0)


class CanonicalSpace(nn.Module):
    """The fitted maps per modality (buffers, saved with the weights) and the mixing angle."""

    def __init__(self, cfg: CanonicalConfig, input_dims: dict[str, int]) -> None:
        super().__init__()
        if cfg.rank < 1:
            raise LightCRLError(
                "model.csa.rank is 0: the canonical maps are fitted on the training pairs by the trainer "
                "(lightcrl train), or come with a saved model.json"
            )
        self.cfg = cfg
        self.modalities = list(input_dims)
        for m, d in input_dims.items():
            self.register_buffer(f"mean_{m}", torch.zeros(d))
            self.register_buffer(f"map_{m}", torch.zeros(d, cfg.rank))
        self.mix = nn.Parameter(torch.tensor(float(cfg.init_mix)), requires_grad=cfg.learn_mix)

    @property
    def dim(self) -> int:
        return self.cfg.rank

    @torch.no_grad()
    def set_fit(self, fit: CCAFit, media: str, text: str = "text") -> None:
        """Install a fit of (media, text) pairs: the first ``rank`` weighted canonical dimensions."""
        if set(self.modalities) != {media, text}:
            raise LightCRLError(f"a {media}-{text} CCA cannot serve a model of {self.modalities}")
        maps = weighted_maps(fit, self.cfg.rank, self.cfg.exponent)
        for m, mean, proj in ((media, fit.mean_x, maps[0]), (text, fit.mean_y, maps[1])):
            buf = getattr(self, f"map_{m}")
            if tuple(proj.shape) != tuple(buf.shape):
                raise LightCRLError(f"{m} canonical map has shape {proj.shape}, expected {tuple(buf.shape)}")
            buf.copy_(torch.from_numpy(np.ascontiguousarray(proj)))
            getattr(self, f"mean_{m}").copy_(torch.from_numpy(mean))

    def embed(self, modality: str, pooled: Tensor) -> Tensor:
        return canonical_embed(pooled, getattr(self, f"mean_{modality}"), getattr(self, f"map_{modality}"))

    def join(self, z_model: Tensor, z_canonical: Tensor, angle: Tensor | None = None) -> Tensor:
        """[cos(theta) z_model, sin(theta) z_canonical]: unit norm when both parts are. ``angle``: this
        modality's angle (lightcrl/views.py), else theta."""
        angle = self.mix if angle is None else angle
        return torch.cat([z_model * torch.cos(angle), z_canonical.to(z_model.dtype) * torch.sin(angle)],
                         dim=-1)


def fit_pairs(pairs, reg: float) -> CCAFit:
    """CCA of every (media, caption) pair of a training ``PairSet``, on the frozen pooled features the
    model receives (an image appears once per caption, as in CSA's ``all_pairs``)."""
    if len(pairs) < 2:
        raise LightCRLError(f"model.csa: pair set {pairs.name!r} has {len(pairs)} pairs, CCA needs 2+")
    media_rows, media_of_pair = np.unique(pairs.media_index, return_inverse=True)
    media = pairs.frozen_pooled(pairs.media, media_rows)[media_of_pair]
    return fit_cca(media, pairs.frozen_pooled(pairs.text, pairs.text_index), reg)
