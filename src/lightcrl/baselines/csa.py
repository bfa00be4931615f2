"""CSA (Li, Chinchali & Topcu, ICLR 2025): canonical correlation analysis of paired frozen features, then a
similarity that weights the canonical dimensions by how well they correlate. Nothing is trained.

On the training pairs (row i of the media and text features is pair i), every pooled frozen feature is
L2-normalised and centred on the pairs' mean. Regularised CCA then finds maps ``A`` (media) and ``B``
(text) whose columns are maximally correlated between the modalities, with canonical correlations
``rho_1 >= rho_2 >= ...``: with ``C_xx + r I`` and ``C_yy + r I`` (``r`` = ``reg`` times the mean
variance of that modality) as whitening, ``A = C_xx^-1/2 U`` and ``B = C_yy^-1/2 V`` from the SVD
``U S V^T`` of the whitened cross-covariance, ``rho = S``.

An item's embedding keeps the first ``dims`` canonical coordinates, each scaled by ``rho_i^(exponent/2)``,
and is L2-normalised, so the cosine of two embeddings is the weighted cosine of the paper,
``sum_i rho_i^e u_i v_i / (||rho^(e/2) u|| ||rho^(e/2) v||)``: dimensions the two encoders agree on count
most, weakly correlated (modality-specific) ones are dropped. ``exponent = 0`` is plain CCA cosine.

The model is ``arch: csa`` of :mod:`lightcrl.model` (one fixed linear map per modality, buffers saved with
the weights), so a CSA run loads and evaluates like any other (``lightcrl.load``). :func:`tune` chooses
``dims``, ``exponent`` and ``reg`` by retrieval on held-out TRAINING pairs only (as ``asif.tune``). The
fit itself lives in :mod:`lightcrl.canonical`, shared with ``model.csa`` (CSA joined to a trained model).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lightcrl.baselines.asif import anchor_features, anchor_pairs, encode_pooled, fill_hubness_bank, save_run
from lightcrl.canonical import CCAFit, fit_cca, weighted_maps
from lightcrl.errors import LightCRLError
from lightcrl.model import LightCRLModel, create_model

__all__ = ["CCAFit", "build_pipeline", "csa_model", "fit_cca", "save_run", "tune"]


def csa_model(fit: CCAFit, modalities: tuple[str, str] = ("image", "text"), dims: int = 128,
              exponent: float = 1.0, hubness: dict | None = None) -> LightCRLModel:
    """The ``arch: csa`` model of a fit: the first ``dims`` canonical dimensions weighted rho^(exponent/2).
    ``hubness``: ``model.hubness`` (the caller fills its bank: ``asif.fill_hubness_bank``)."""
    media, text = modalities
    cfg = {"arch": "csa", "width": int(dims), "heads": 1, "learn_logit_scale": False, "dropout": 0.0,
           "hubness": hubness}
    model = create_model(cfg, {media: fit.a.shape[0], text: fit.b.shape[0]})
    maps = weighted_maps(fit, dims, exponent)
    with torch.no_grad():
        for m, mean, proj in ((media, fit.mean_x, maps[0]), (text, fit.mean_y, maps[1])):
            getattr(model, f"csa_mean_{m}").copy_(torch.from_numpy(mean))
            getattr(model, f"csa_map_{m}").copy_(torch.from_numpy(np.ascontiguousarray(proj)))
    return model.eval()


def tune(media: np.ndarray, text: np.ndarray, dims: Sequence[int], exponents: Sequence[float],
         regs: Sequence[float], val_fraction: float = 0.2, seed: int = 0, modality: str = "image",
         groups: np.ndarray | None = None) -> dict[str, Any]:
    """Choose (dims, exponent, reg) by mean retrieval R@1 on held-out TRAINING pairs (fit on the rest).

    ``groups``: the media item of every pair; the held-out part is then whole media items, so no held-out
    image is also in the fit through another caption. Dims beyond a fit's rank are skipped.
    """
    from lightcrl.metrics import retrieval

    n = len(media)
    keys = np.arange(n) if groups is None else np.asarray(groups)
    uniq = np.unique(keys)
    n_val = max(2, int(round(len(uniq) * val_fraction)))
    if len(uniq) - n_val < 2:
        raise LightCRLError(f"too few training pairs ({n}) to tune CSA")
    val_keys = np.random.default_rng([seed, 577]).permutation(uniq)[:n_val]
    is_val = np.isin(keys, val_keys)
    # one pair per held-out media item: its first caption (retrieval with one positive each way)
    val = np.flatnonzero(is_val)[np.unique(keys[is_val], return_index=True)[1]]
    scores: dict[tuple[int, float, float], float] = {}
    for reg in regs:
        fit = fit_cca(media[~is_val], text[~is_val], reg)
        for d, e in itertools.product(dims, exponents):
            if d > fit.rank:
                continue
            model = csa_model(fit, (modality, "text"), d, e)
            r = retrieval.evaluate(encode_pooled(model, modality, media[val]),
                                   encode_pooled(model, "text", text[val]), np.arange(len(val)))
            scores[(int(d), float(e), float(reg))] = (r["image_retrieval_recall@1"]
                                                      + r["text_retrieval_recall@1"]) / 2
    if not scores:
        raise LightCRLError(f"CSA tune: no dims in {list(dims)} fit the CCA's rank")
    best = max(scores, key=lambda key: scores[key])
    return {"dims": best[0], "exponent": best[1], "reg": best[2], "val_mean_recall@1": scores[best],
            "n_val": int(len(val)),
            "grid": [{"dims": d, "exponent": e, "reg": r, "val_mean_recall@1": v}
                     for (d, e, r), v in scores.items()]}


def build_pipeline(spec: dict, device: str = "auto", progress: bool = False):
    """A CSA model with its frozen encoders, as a :class:`lightcrl.api.LightCRLPipeline`.

    ``spec``: data, split, limit, seed, media_encoder, text_encoder, pairs, dims, exponent, reg[, tune,
    holdout] (``holdout``: leave the training source's held-out media items out of the fit, as the trainer
    does). The pipeline's ``info`` is the run's model.json (kind "csa").
    """
    from lightcrl.api import LightCRLPipeline
    from lightcrl.embed import EmbedOptions, cached_store
    from lightcrl.features import FeatureAdapter

    t0 = time.time()
    seed, holdout = spec.get("seed", 0), spec.get("holdout")
    opts = EmbedOptions(limit=spec.get("limit"), seed=seed, device=device, progress=progress)
    media = cached_store(spec["media_encoder"], spec["data"], spec["split"], opts)
    text = cached_store(spec["text_encoder"], spec["data"], spec["split"], opts)
    pairs = spec.get("pairs", "all_pairs")
    m_feat, t_feat = anchor_features(media, text, pairs, seed, holdout)
    dims, exponent, reg = spec.get("dims", 128), spec.get("exponent", 1.0), spec.get("reg", 1e-2)
    csa_spec = {key: v for key, v in spec.items() if key != "tuning"}
    if spec.get("tune"):
        t = spec["tune"]
        groups = anchor_pairs(media, text, pairs, seed, holdout)[0] if pairs != "mean_caption" else None
        res = tune(m_feat, t_feat, t.get("dims", [dims]), t.get("exponent", [exponent]), t.get("reg", [reg]),
                   t.get("val_fraction", 0.2), seed, media.modality, groups)
        dims, exponent, reg = res["dims"], res["exponent"], res["reg"]
        csa_spec["tuning"] = res
    csa_spec.update(dims=dims, exponent=exponent, reg=reg)
    fit = fit_cca(m_feat, t_feat, reg)
    model = csa_model(fit, (media.modality, "text"), min(dims, fit.rank), exponent, spec.get("hubness"))
    fill_hubness_bank(model, {media.modality: m_feat, "text": t_feat}, seed)
    info = {
        "kind": "csa",
        "model_config": model.cfg.model_dump(),
        "input_dims": model.input_dims,
        "encoders": {media.modality: spec["media_encoder"], "text": spec["text_encoder"]},
        **FeatureAdapter("pooled").describe(),
        "parameter_counts": model.parameter_counts(),
        "csa": csa_spec,  # how it was fitted: enough to refit from the store cache
        "canonical_correlations": [round(float(r), 6) for r in fit.rho[: model.cfg.width]],
        "n_pairs": len(m_feat),
        "pair_stores": {"media": media.summary(), "text": text.summary()},
        "build_time_s": time.time() - t0,
    }
    return LightCRLPipeline(model, info, device)

