"""FuseMix (Vouitsis et al., CVPR 2024): mixup in the latent space of the frozen encoders.

Two pairs ``i`` and ``perm[i]`` of a batch are mixed as ``lam_i * x_i + (1 - lam_i) * x_perm[i]`` in EVERY
modality with the SAME ``lam_i`` and the same partner, so a mixed image and its mixed caption remain a
positive pair. ``lam_i ~ Beta(alpha, alpha)``, one per pair.

The mix is taken on the model inputs (frozen features, before any trained layer). With one token per item
(``data.input: pooled``) it is exactly FuseMix's latent mixup. With token sequences the tokens are mixed
position by position over zero padding, and a position is real where it is real in an item that has a
non-zero share of the mix.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["fusemix", "mixed_groups", "sample_fusemix"]


def sample_fusemix(n: int, alpha: float) -> tuple[Tensor, Tensor]:
    """``(lam [n], perm [n])``: a Beta(alpha, alpha) weight per pair and a random partner, drawn from torch's
    global RNG (which the trainer seeds per epoch and checkpoints, so a resumed epoch replays its mixes)."""
    if alpha <= 0:
        raise ValueError(f"FuseMix alpha must be > 0, got {alpha}")
    a = torch.full((n,), float(alpha))
    lam = torch.distributions.Beta(a, a).sample()
    return lam, torch.randperm(n)


def fusemix(
    batch: Mapping[str, tuple[Tensor, Tensor]], lam: Tensor, perm: Tensor
) -> dict[str, tuple[Tensor, Tensor]]:
    """Mix every modality of a batch of pairs ``{modality: (tokens [B, T, D], mask [B, T])}`` with the same
    ``lam [B]`` and partners ``perm [B]``. ``lam = 1`` leaves the batch as it is."""
    out = {}
    for modality, (tokens, mask) in batch.items():
        if tokens.shape[0] != lam.shape[0]:
            raise ValueError(f"{modality}: {tokens.shape[0]} items, {lam.shape[0]} mixing weights")
        lam_d = lam.to(device=tokens.device, dtype=tokens.dtype)
        w = lam_d.view(-1, *([1] * (tokens.dim() - 1)))
        mask = mask.to(torch.bool)
        clean = tokens.masked_fill(~mask.unsqueeze(-1), 0.0) if tokens.dim() == 3 else tokens
        p = perm.to(tokens.device)
        mixed = w * clean + (1 - w) * clean[p]
        own, other = (lam_d > 0).view(-1, 1), (lam_d < 1).view(-1, 1)
        out[modality] = (mixed, (mask & own) | (mask[p] & other))
    return out


def mixed_groups(groups: Tensor, pair_ids: Tensor, lam: Tensor, perm: Tensor) -> Tensor:
    """The media item ("group") of each mixed pair, for multi-positive losses: a pair mixed with another is
    an item of its own (``-1 - pair_id``, unique in the global batch and never a media index); ``lam = 1``
    keeps the row's item and ``lam = 0`` takes its partner's."""
    fresh = -1 - pair_ids.to(groups.device, torch.int64)
    lam = lam.to(groups.device)
    return torch.where(lam == 1, groups, torch.where(lam == 0, groups[perm.to(groups.device)], fresh))
