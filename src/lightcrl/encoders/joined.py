"""Several frozen encoders of one modality used as one: ``efficientnet-lite2+efficientnet-lite0``.

Each part encodes the item as it always does (its own preprocessing, backend and layer). The joined
POOLED feature is the parts' pooled features, each L2-normalised, side by side, divided by sqrt(k): the
cosine of two joined features is the mean of the parts' cosines, so no part dominates by its scale or
width. Encoders trained differently make different errors, and their agreement is a stronger frozen
feature than either one: the cheapest "stronger encoder" there is offline (docs/results.md, "Joined image
encoders").

The joined TOKENS keep the first part's tokens for models that read tokens (the parts' token grids differ:
7x7 for Lite0 at 224 px, 9x9 for Lite2 at 260 px): each part has its own block of channels; the first
part's tokens fill the first block, then each further part adds one token, its pooled feature, in its own
block. The tokens are scaled so that their mean is exactly the joined pooled feature: every consumer that
pools tokens (``masked_mean``: the anchor and canonical views, ``data.input: pooled``) sees the join.

Its stores are built from the parts' own cached stores (``lightcrl.embed.cached_store``), so a part
extracted once serves every joined encoder that contains it, each extraction on the part's fast path.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lightcrl.encoders.base import EncoderOutput, FrozenEncoder, masked_mean
from lightcrl.errors import LightCRLError

#: separates the parts of a joined encoder's name
JOIN_SEP = "+"
#: recorded in the identity: how the tokens are laid out (stores of another layout are never reused)
TOKENS_LAYOUT = "first part's tokens, then one pooled token per further part, in channel blocks"


def join_tokens(first: torch.Tensor, mask: torch.Tensor, pooled: list[torch.Tensor]) -> EncoderOutput:
    """A batch: the first part's tokens [B, T, D1] with their mask [B, T] (real tokens first) and the other
    parts' pooled features [B, D2], ... -> the joined tokens [B, T + k - 1, D1 + D2 + ...], their mask and
    the joined pooled feature, which is the tokens' mean (see the module docstring). The first part's own
    pooled feature is taken as its tokens' mean (what EfficientNet and the mean-pooled text encoders give).
    """
    first, k = first.float(), 1 + len(pooled)
    batch, width = first.shape[0], first.shape[1] + k - 1
    dims = [first.shape[2]] + [p.shape[-1] for p in pooled]
    n = mask.sum(1)  # real tokens per item
    total = (n + k - 1).float()
    mean = masked_mean(first, mask)
    blocks = [F.normalize(mean, dim=-1)] + [F.normalize(p.float(), dim=-1) for p in pooled]
    joined = torch.cat(blocks, dim=-1) / math.sqrt(k)
    tokens = first.new_zeros(batch, width, sum(dims))
    # block 1: the tokens, scaled so that their share of the mean is the first block of ``joined``
    scale = total / (n.clamp(min=1).float() * math.sqrt(k) * mean.norm(dim=-1).clamp(min=1e-12))
    tokens[:, : first.shape[1], : dims[0]] = first * (scale[:, None, None] * mask[..., None])
    rows, start = torch.arange(batch), dims[0]
    for j, (d, b) in enumerate(zip(dims[1:], blocks[1:], strict=True)):  # one token per further part
        tokens[rows, n + j, start : start + d] = b * (total / math.sqrt(k))[:, None]
        start += d
    joined_mask = torch.arange(width)[None, :] < (n + k - 1)[:, None]
    return EncoderOutput(tokens, joined_mask, joined)


class _JoinedTransform:
    """Picklable: every part's transform of one input."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, item: Any) -> tuple:
        return tuple(t(item) for t in self.transforms)


class _JoinedCollate:
    """Picklable: each part's collate of its own transformed inputs, as ``{"part0": batch0, ...}``."""

    def __init__(self, collates):
        self.collates = list(collates)

    def __call__(self, rows: list[tuple]) -> dict:
        return {f"part{i}": c([r[i] for r in rows]) for i, c in enumerate(self.collates)}


class JoinedEncoder(FrozenEncoder):
    """The parts' joined pooled features (see the module docstring); built by ``get_encoder("a+b")``."""

    no_graph_reason = (
        "it is a joined encoder, whose parts take differently preprocessed inputs (one graph input cannot "
        "describe them); `lightcrl export` without --full exports the trained part"
    )

    def __init__(self, parts: list[FrozenEncoder]):
        if len(parts) < 2:
            raise LightCRLError(
                "a joined encoder needs two or more parts, e.g. efficientnet-lite0+efficientnet-lite2"
            )
        modalities = {p.modality for p in parts}
        if len(modalities) != 1:
            raise LightCRLError(
                "the parts of a joined encoder must share one modality, got "
                + ", ".join(f"{p.name} ({p.modality})" for p in parts)
            )
        names = [p.name for p in parts]
        if len(set(names)) != len(names):
            raise LightCRLError(f"a joined encoder lists a part twice: {JOIN_SEP.join(names)}")
        self.parts = list(parts)
        self.name = JOIN_SEP.join(names)
        self.modality = parts[0].modality
        self.dim = sum(p.dim for p in parts)
        self.device = parts[0].device
        self._model = None
        self._onnx = None
        self.backend = JOIN_SEP.join(p.backend for p in parts)

    def use_backend(self, backend: str) -> None:
        raise LightCRLError(f"{self.name}: choose the backend of each part (get_encoder builds them)")

    def set_forward_threads(self, threads: int | None) -> None:
        for p in self.parts:
            p.set_forward_threads(threads)

    @property
    def transform(self):
        return _JoinedTransform(p.transform for p in self.parts)

    @property
    def collate(self):
        return _JoinedCollate(p.collate for p in self.parts)

    def select_layer(self, layer: str) -> None:
        raise LightCRLError(
            f"{self.name}: give the layer on a part, e.g. efficientnet-lite0@block14+efficientnet-lite2"
        )

    @property
    def model(self) -> torch.nn.Module:
        raise LightCRLError(f"{self.name} has no single model: {self.no_graph_reason}")

    def release(self) -> None:
        for p in self.parts:
            p.release()

    def identity(self) -> dict:
        return {"joined": [p.identity() for p in self.parts], "tokens": TOKENS_LAYOUT}

    def store_identity(self) -> dict:
        return {"joined": [p.store_identity() for p in self.parts], "tokens": TOKENS_LAYOUT,
                "backend": self.backend}

    @torch.inference_mode()
    def encode_batch(self, batch: dict, tokens_dtype: torch.dtype = torch.float32) -> EncoderOutput:
        outs = [p.encode_batch(batch[f"part{i}"]) for i, p in enumerate(self.parts)]
        joined = join_tokens(outs[0].tokens, outs[0].mask, [o.pooled for o in outs[1:]])
        return EncoderOutput(joined.tokens.to(tokens_dtype), joined.mask, joined.pooled)
