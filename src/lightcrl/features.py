"""Frozen features -> model inputs: the one place that knows a run's input mode.

A run is trained on one of two inputs, recorded in its ``model.json`` (``input``, ``max_text_tokens``):

* ``tokens``: the frozen encoder's token features ``[B, T, D]`` with a mask ``[B, T]`` (True = real token);
  text is cut to ``max_text_tokens`` (the store keeps every token, so the cut can change without
  re-extracting);
* ``pooled``: the encoder's pooled vector as ONE token ``[B, 1, D]``.

Everything that feeds the model — training pairs, anchors, NLI batches, evaluation stores, the API on raw
inputs, ONNX export — goes through :class:`FeatureAdapter`, so they can never disagree on what the model saw.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:  # typing only: the store sits beside this module, not below it
    from lightcrl.store import FeatureStore

__all__ = ["FeatureAdapter", "InputMode", "masked_mean"]

InputMode = Literal["tokens", "pooled"]


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens of ``tokens [B, T, D]``; a row without any real token gives zeros, not NaN."""
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def _one_token(pooled: Tensor) -> tuple[Tensor, Tensor]:
    return pooled.unsqueeze(1), torch.ones(pooled.shape[0], 1, dtype=torch.bool, device=pooled.device)


@dataclass(frozen=True)
class FeatureAdapter:
    """Turns a feature store's items, or a frozen encoder's output, into ``(tokens, mask)`` model inputs."""

    input: InputMode = "tokens"
    max_text_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.input not in ("tokens", "pooled"):
            raise ValueError(f"input mode must be 'tokens' or 'pooled', got {self.input!r}")

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> FeatureAdapter:
        """The adapter a run was trained with (its ``model.json``)."""
        return cls(info.get("input", "tokens"), info.get("max_text_tokens"))

    def token_limit(self, modality: str) -> int | None:
        """How many tokens of ``modality`` the model sees (None = all)."""
        return self.max_text_tokens if modality == "text" and self.max_text_tokens else None

    def from_store(self, store: FeatureStore, indices: np.ndarray | None = None) -> tuple[Tensor, Tensor]:
        """Model inputs (float32 tokens, bool mask) for items of a store (all when ``indices`` is None)."""
        idx = np.arange(len(store)) if indices is None else np.asarray(indices)
        if self.input == "pooled":
            return _one_token(torch.from_numpy(store.pooled(idx)).float())
        return store.batch(idx, self.token_limit(store.modality))

    def from_encoder(
        self, modality: str, tokens: Tensor, mask: Tensor, pooled: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Model inputs from a frozen encoder's output; ``pooled`` defaults to the masked token mean."""
        if self.input == "pooled":
            return _one_token(masked_mean(tokens, mask) if pooled is None else pooled)
        limit = self.token_limit(modality)
        if limit:
            tokens, mask = tokens[:, :limit], mask[:, :limit]
        return tokens, mask

    def frozen_pooled(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """The frozen encoder's pooled feature of model inputs (the masked mean, float32): what the
        anchors and the frozen-target losses compare with."""
        return masked_mean(tokens.float(), mask)

    def describe(self) -> dict[str, Any]:
        """The fields a run's model.json records."""
        return {"input": self.input, "max_text_tokens": self.max_text_tokens}
