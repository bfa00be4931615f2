"""Descriptions of training data sources, shared by the trainer's config and the ConVIRT baseline.

A source names a dataset spec, its splits and sample sizes, and the frozen encoders that embed it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["NliSource", "PairSource"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PairSource(_Strict):
    """One paired dataset: media (image or audio) + captions, each embedded by its frozen encoder."""

    spec: str
    split: str = "train"
    val_split: str | None = None  # a held-out split of the same dataset for validation/model selection
    # the validation data's spec when it is not ``spec`` (e.g. other classes of the same dataset:
    # ``esc50:DIR?classgroup=3`` to validate zero-shot on classes held out of training)
    val_spec: str | None = None
    media_encoder: str = "efficientnet-lite0"
    text_encoder: str = "minilm-l6"
    limit: int | None = None  # seeded sample of N media items (all their captions kept)
    val_limit: int | None = None
    # a seeded fraction of the split's media items (with all their captions) kept out of training; when
    # val_split is None they are the validation set (model selection on TRAINING data, never dev/test)
    holdout: float | None = Field(None, gt=0.0, lt=1.0)
    # classification datasets become pairs through captions made from class names and templates
    captions: Literal["dataset", "templates"] = "dataset"
    weight: float = 1.0  # share of training steps relative to the source's size


class NliSource(_Strict):
    """NLI triplets for supervised SimCSE (loss ``simcse_sup``): simcse-csv:, snli: or sick-nli: spec."""

    spec: str
    split: str | None = None
    limit: int | None = None  # seeded sample of N triplets
    text_encoder: str | None = None  # default: the first source's text encoder
    batch_size: int | None = None  # default: optim.batch_size
