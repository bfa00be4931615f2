"""A run directory: every file name and format of a run in one place, and loading a run by its kind.

::

    <run>/
      config.yaml          the training config, as validated (trainer runs)
      model.json           what the run is: kind, model config, input dims, encoders, input mode, weights' tag
      model_info.json      the same description, written when training starts (before any weights exist)
      model.safetensors    the published weights (best checkpoint on validation, else the last)
      metrics.jsonl        one JSON row per logged step or epoch (torn last lines are tolerated)
      train_summary.json   written when training ends
      checkpoints/         <tag>-<step>/ folders and <tag>.json pointers (lightcrl.checkpoint)
      tensorboard/         event files
      results/             one JSON per evaluation, plots/ beside them
      export/              ONNX graphs and export.json; export/full/: `export --full` (graphs, tokenizer,
                           pipeline.json)
      report.md, report.html
      convirt.safetensors  (ConVIRT runs) the end-to-end baseline's trained layers

``model.json``'s ``kind`` says which pipeline loads the run: ``lightcrl`` (the default: a DFE or two-tower
model over cached features, also ASIF's anchor space), ``asif``, ``csa``, ``convirt`` or ``raw`` (the frozen
encoders alone, no shared space). :func:`load_pipeline` is the only place that dispatches on it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightcrl.errors import LightCRLError
from lightcrl.io import read_json, write_json, write_text

__all__ = ["KINDS", "RunDir", "load_pipeline"]

MODEL_INFO = "model.json"
MODEL_INFO_STARTED = "model_info.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TRAIN_SUMMARY = "train_summary.json"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
RESULTS = "results"
EXPORT = "export"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
CONVIRT_WEIGHTS = "convirt.safetensors"

#: kind -> what it is; ``load_pipeline`` holds how each is loaded.
KINDS = {
    "lightcrl": "a trained model over cached frozen features (DFE or two-tower heads)",
    "asif": "ASIF: the anchor space alone, no training",
    "csa": "CSA: canonical correlation maps of the frozen features, no training",
    "convirt": "ConVIRT: encoders fine-tuned end to end",
    "raw": "the frozen encoders alone (no shared space)",
}


class RunDir:
    """Paths and readers of one run directory (nothing is created until written)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- paths -------------------------------------------------------------------------------------------
    @property
    def model_info(self) -> Path:
        return self.path / MODEL_INFO

    @property
    def model_info_started(self) -> Path:
        return self.path / MODEL_INFO_STARTED

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def train_summary(self) -> Path:
        return self.path / TRAIN_SUMMARY

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def results(self) -> Path:
        return self.path / RESULTS

    @property
    def export(self) -> Path:
        return self.path / EXPORT

    @property
    def report_md(self) -> Path:
        return self.path / REPORT_MD

    @property
    def report_html(self) -> Path:
        return self.path / REPORT_HTML

    @property
    def convirt_weights(self) -> Path:
        return self.path / CONVIRT_WEIGHTS

    # -- what the run is -----------------------------------------------------------------------------------
    def is_run(self) -> bool:
        return self.model_info.is_file() or self.model_info_started.is_file()

    def info(self) -> dict[str, Any]:
        """``model.json`` (or, before the first weights, ``model_info.json``); refuses a non-run."""
        for path in (self.model_info, self.model_info_started):
            if path.is_file():
                return read_json(path)
        if not self.path.exists():
            raise LightCRLError(f"run directory not found: {self.path}")
        raise LightCRLError(
            f"{self.path} is not a lightcrl run (no {MODEL_INFO}): train one with `lightcrl train`"
        )

    def kind(self) -> str:
        kind = self.info().get("kind", "lightcrl")
        if kind not in KINDS:
            raise LightCRLError(f"{self.model_info}: unknown run kind {kind!r} (known: {', '.join(KINDS)})")
        return kind

    def write_info(self, info: dict[str, Any], started: bool = False) -> None:
        write_json(self.model_info_started if started else self.model_info, info)

    def read_train_summary(self) -> dict[str, Any] | None:
        return read_json(self.train_summary) if self.train_summary.is_file() else None

    # -- metrics.jsonl ---------------------------------------------------------------------------------------
    def iter_metrics(self) -> Iterator[dict[str, Any]]:
        """Rows of metrics.jsonl in order; a line torn by a kill mid-write is skipped."""
        if not self.metrics.is_file():
            return
        for line in self.metrics.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                yield row

    def read_metrics(self) -> list[dict[str, Any]]:
        return list(self.iter_metrics())

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Keep the rows up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
        if not self.metrics.is_file():
            return
        keep = [json.dumps(r) for r in self.iter_metrics() if r.get("step", 0) <= step]
        write_text(self.metrics, "".join(line + "\n" for line in keep))


def load_pipeline(run_dir: str | Path, device: str = "auto", checkpoint: str | None = None,
                  untrained: bool = False, seed: int = 0) -> Any:
    """The pipeline of a run, by its kind: ``encode_store`` / ``encode_text`` / ``encode_image`` ...

    ``raw`` runs have none (the frozen encoders are not a shared space): this returns None for them.
    ``untrained`` (the same architecture at initialisation) and ``checkpoint`` apply to trained models.
    """
    run = RunDir(run_dir)
    kind = run.kind()
    if kind != "lightcrl" and (untrained or checkpoint):
        what = "--untrained" if untrained else "checkpoint"
        raise LightCRLError(f"{what} applies to trained lightcrl runs, not to a {kind} run")
    if kind == "raw":
        return None
    if kind == "convirt":
        from lightcrl.baselines.convirt import ConVIRTPipeline

        return ConVIRTPipeline.from_run(run.path, device=device)
    if kind == "asif" and "model_config" not in run.info():
        from lightcrl.baselines.asif import build_pipeline, legacy_spec

        # written by an older lightcrl: the anchor space is rebuilt from the store cache
        return build_pipeline(legacy_spec(run.info()), device=device)
    from lightcrl.api import LightCRLPipeline

    return LightCRLPipeline.from_run(run.path, device=device, checkpoint=checkpoint, untrained=untrained,
                                     seed=seed)
