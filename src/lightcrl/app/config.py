"""Typed run configuration: pydantic models, YAML files, and ``--set key=value`` overrides.

An unknown or ill-typed field fails with a message naming it (``optim.lr: Input should be a valid
number``). Relative data paths in a YAML file are taken relative to the current directory, as on the
command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lightcrl.app.tasks import metric_direction
from lightcrl.data.sources import NliSource, PairSource
from lightcrl.errors import LightCRLError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FuseMixConfig(_Strict):
    """FuseMix: mixup of the frozen inputs, the same weight ~ Beta(alpha, alpha) in both modalities."""

    alpha: float = Field(1.0, gt=0.0)


class DataConfig(_Strict):
    sources: list[PairSource]
    nli: NliSource | None = None
    input: Literal["tokens", "pooled"] = "tokens"
    max_text_tokens: int = 64
    # one random caption per media item per epoch (cheap, paper-like), every (media, caption) pair, or
    # `captions_per_media` captions of every media item side by side (positives of the `multipos` loss)
    pairs: Literal["random_caption", "all_pairs", "multi_caption"] = "random_caption"
    captions_per_media: int | None = Field(None, ge=1)  # multi_caption only; None = 2
    fusemix: FuseMixConfig | None = None  # mixup of the frozen inputs (lightcrl.mixing); None = off
    embed_batch_size: int = 64
    num_workers: int | None = None


class OptimConfig(_Strict):
    epochs: int = 10
    batch_size: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    schedule: Literal["cosine", "plateau", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    plateau_factor: float = 0.5
    plateau_patience: int = 1
    grad_clip: float | None = 1.0
    # autocast dtype of the training step (lightcrl/devices.py): auto = bf16/fp16 on GPUs, fp32 on CPUs;
    # bf16 on a CPU with AMX is ~1.5x faster a step (docs/benchmarks.md)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Also save the "last" checkpoint every N steps inside an epoch (None: at epoch ends only), so a kill
    # in a long epoch loses at most N steps; the resumed run is still bit-exact. Not part of the run's
    # fingerprint: it may be changed when resuming.
    checkpoint_every_steps: int | None = Field(default=None, ge=1)


class EarlyStopConfig(_Strict):
    # The validation metric that picks the published epoch: "val/mean_recall@1", "val/loss", ... or a LIST
    # of metrics whose mean picks it, so a multi-source config selects for every task (three_modalities.yaml:
    # audio zero-shot and image-text retrieval; one alone stops where the other is untrained).
    metric: str | list[str] = "val/mean_recall@1"
    mode: Literal["max", "min"] | None = None  # default: "min" for losses and ranks, else "max"
    patience: int | None = None  # epochs without improvement before stopping; None = never stop early

    @field_validator("metric")
    @classmethod
    def _one_direction(cls, v):
        names = [v] if isinstance(v, str) else v
        if not names:
            raise ValueError("give at least one metric")
        if len({metric_direction(m) < 0 for m in names}) > 1:
            raise ValueError(f"{names} mixes lower-is-better and higher-is-better metrics: their mean "
                             "selects nothing meaningful")
        return v

    @property
    def metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def name(self) -> str:
        """How the selection metric is reported: the metric, or ``mean(a, b)``."""
        return self.metric if isinstance(self.metric, str) else f"mean({', '.join(self.metric)})"

    @property
    def direction(self) -> str:
        if self.mode:
            return self.mode
        return "min" if metric_direction(self.metrics[0]) < 0 else "max"

    def value(self, row: dict[str, Any]) -> float | None:
        """The selection value of a metrics row (the mean of the metrics); None when one is missing."""
        vals = [row.get(m) for m in self.metrics]
        if any(not isinstance(x, (int, float)) for x in vals):
            return None
        return float(sum(vals) / len(vals))


class TrainConfig(_Strict):
    name: str = "run"
    seed: int = 0
    device: str = "auto"
    data: DataConfig
    model: dict[str, Any] = Field(default_factory=dict)  # validated by lightcrl.model.ModelConfig
    loss: dict[str, Any] = Field(default_factory=lambda: {"lightcrl": 1.0})
    optim: OptimConfig = Field(default_factory=OptimConfig)
    early_stop: EarlyStopConfig = Field(default_factory=EarlyStopConfig)
    eval_every: int = 1  # epochs
    log_every: int = 10  # steps
    tensorboard: bool = True
    progress: bool = True

    @field_validator("model")
    @classmethod
    def _check_model(cls, v):
        from lightcrl.model import ModelConfig

        return ModelConfig(**v).model_dump()


def parse_overrides(pairs: list[str] | None) -> dict:
    """``["optim.lr=1e-3", "model.fusion=mul"]`` -> nested dict, values parsed as YAML scalars."""
    out: dict = {}
    for item in pairs or []:
        if "=" not in item:
            raise LightCRLError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        elif k.isdigit() is False and isinstance(merged.get(k), list) and isinstance(v, dict):
            # list items addressed by index: data.sources.0.limit=100
            items = list(merged[k])
            for idx, sub in v.items():
                i = int(idx)
                items[i] = deep_merge(items[i], sub) if isinstance(sub, dict) else sub
            merged[k] = items
        else:
            merged[k] = v
    return merged


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> TrainConfig:
    raw: dict = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise LightCRLError(f"config file not found: {p}")
        try:
            raw = deep_merge(raw, yaml.safe_load(p.read_text()) or {})
        except yaml.YAMLError as e:
            raise LightCRLError(f"{p}: invalid YAML: {e}") from e
    raw = deep_merge(raw, parse_overrides(overrides))
    return validate_config(raw, source=str(path) if path else "config")


def validate_config(raw: dict, source: str = "config") -> TrainConfig:
    try:
        return TrainConfig(**raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise LightCRLError(f"invalid {source}:\n" + "\n".join(lines)) from None


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
