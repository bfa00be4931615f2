"""Descriptions of training data sources, shared by the trainer's config and the ConVIRT baseline.

A source names a dataset spec, its splits and sample sizes, and the frozen encoders that embed it.
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["NliSource", "PairSource", "UnpairedSource"]


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


#: words in a file name that mark an evaluation split (for specs that name one file, e.g. sick-nli:FILE)
_EVAL_FILE = re.compile(r"(^|[^a-z])(test|dev|val|valid|validation|trial)([^a-z]|$)")


class UnpairedSource(_Strict):
    """Unpaired items of ONE modality for the neighbour-structure term only (``structure: {unpaired:
    [...]}``), e.g. NLI sentences (``sick-nli:.../SICK_train.txt``) or Flickr8k train images.

    Only a TRAINING split is accepted: evaluation data must never shape the model, even without labels.
    Here an evaluation split name (test, dev, val, ...) or a spec naming an evaluation file
    (``sick-nli:.../SICK_trial.txt``) is refused; the trainer also refuses any split other than ``train``
    unless it is the split a training source trains on (e.g. ``all`` of a ``csv:`` pairs file).
    """

    spec: str
    split: str = "train"
    modality: str  # "text", "image", "audio": the side of the batch the items join
    per_batch: int = Field(128, ge=2)  # items drawn (seeded) per training step
    encoder: str | None = None  # default: the encoder of that modality in the first data source
    limit: int | None = Field(None, ge=1)  # seeded sample of N items

    @model_validator(mode="after")
    def _training_split_only(self) -> UnpairedSource:
        if _EVAL_FILE.search(self.split.lower()):
            raise ValueError(
                f"unpaired source {self.spec!r}: split {self.split!r} is not a training split; unpaired "
                "items may only come from training data (split: train), never from an evaluation set"
            )
        name = PurePath(self.spec.partition(":")[2].split("?")[0]).name.lower()
        if _EVAL_FILE.search(name):
            raise ValueError(
                f"unpaired source {self.spec!r}: the file {name!r} looks like an evaluation split; unpaired "
                "items may only come from training data (e.g. sick-nli:.../SICK_train.txt)"
            )
        return self
