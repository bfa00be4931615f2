"""Text angles of the joined views: within-text similarity chosen apart from cross-modal similarity.

offline_best's embedding joins unit-norm views with fixed angles, ``[cos(theta) z, sin(theta) v]``: the
trained DFE part, then the anchor coordinates (anchors.py), then CSA's canonical coordinates
(canonical.py). A cosine is then a weighted sum of the views' cosines, with the SAME weights for an
image-text pair and for a text-text pair. Cross-modal similarity only constrains the PRODUCT of the two
modalities' weights per view: give text the angle ``theta_t`` of a join and the media the angle
``theta_m`` with ``tan(theta_t) tan(theta_m) = kappa_in tan(theta)^2`` (``kappa_in``: the same factor of
the joins inside it, 1 for the first) and every image-text cosine becomes a constant ``kappa`` times the
symmetric one. Retrieval rankings (and the hubness offsets, which scale with it) are exactly what they
were, and the loss sees the same logits when the logit scale is divided by ``kappa``
(``LightCRLModel.get_logit_scale``), so training is unchanged too. Zero-shot moves a little: a class
embedding is the RENORMALISED mean of its template embeddings, and that norm depends on the text angles
(on validation, 1-2 images of 2,000 either way). Text-text cosines, on the other hand,
weigh the views by the text angles alone: ``text_mix`` (``model.anchors.text_mix``,
``model.csa.text_mix``) is chosen on validation STS data. The media's own similarities move the other
way. A model of two modalities only: with three, the products of every pair cannot all be kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["split_angles"]


def split_angles(thetas: list[Tensor], text_thetas: list[float | None]) -> tuple[list[Tensor], list[Tensor],
                                                                                     Tensor]:
    """The nested joins' symmetric angles ``thetas`` (inner first) and the text angles asked for (None:
    as close to symmetric as the inner joins allow) -> (text angles, media angles, kappa), where every
    media-text cosine is ``kappa`` times the one of the symmetric joins."""
    kappa = torch.ones((), dtype=thetas[0].dtype, device=thetas[0].device) if thetas else torch.ones(())
    text, media = [], []
    for theta, asked in zip(thetas, text_thetas):
        target = kappa * torch.tan(theta) ** 2  # tan(text angle) * tan(media angle)
        t = torch.atan(torch.sqrt(target)) if asked is None else torch.as_tensor(asked, dtype=theta.dtype,
                                                                                  device=theta.device)
        m = torch.atan(target / torch.tan(t))
        kappa = torch.sin(t) * torch.sin(m) / torch.sin(theta) ** 2
        text.append(t)
        media.append(m)
    return text, media, kappa
