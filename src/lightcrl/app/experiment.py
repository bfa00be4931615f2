"""`lightcrl experiment`: a grid of training runs and baselines, every evaluation, one results table.

An experiment YAML (see ``configs/experiments/``) names

* ``base``: a training config (a YAML path, relative to the experiment file, or an inline mapping) and
  ``set``: overrides applied to it for every cell;
* ``axes``: the grid, e.g. ``fusion`` x ``loss``. An axis is ``{key: model.fusion, values: [add, mul]}``
  (each value is set at ``key``) or ``{values: {label: {dotted.key: value, ...}}}``. An override REPLACES
  the node at its key (``loss: {clip: 1.0}`` drops the base's loss terms rather than adding to them);
  ``data.sources.0.limit`` addresses list items;
* ``baselines``: more cells: ``kind: train`` (a training run with overrides, e.g. two-tower heads),
  ``kind: asif`` (training-free, anchors from the base config's training pairs), ``kind: csa``
  (training-free canonical correlation maps of the same pairs) and ``kind: convirt`` (end-to-end, raw
  images). The training-free kinds honour the source's ``holdout``: they are fitted without the held-out
  items and scored on them (``val/*`` in their metrics.jsonl, as a trained cell);
* ``evals``: the evaluation tasks of :mod:`lightcrl.app.evaluate` with per-eval ``limit``/``options`` and the
  metrics shown in the table.

Every cell lives in ``OUT/cells/<cell>/`` (a normal run directory plus ``results/<eval>.json`` and
``cell.json``). Feature stores come from the shared store cache, so a frozen feature is extracted once for
the whole grid. A cell whose evaluation results are all present is skipped; an interrupted one resumes
(training from its last checkpoint, evaluation from the first missing result); ``--only`` runs a subset.
The table (``results.md``, ``results.csv``) and bar charts (``plots/``) always cover every finished cell.
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import fnmatch
import hashlib
import io
import itertools
import json
import logging
import math
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lightcrl.app.config import EarlyStopConfig, TrainConfig, validate_config
from lightcrl.app.evaluate import TASKS, EvalRequest, EvalTarget, run_eval
from lightcrl.errors import LightCRLError
from lightcrl.hubness import HubnessConfig
from lightcrl.io import read_json, write_json, write_text
from lightcrl.rundir import RunDir

log = logging.getLogger(__name__)

#: Short column names ("image retrieval" = text -> image, CLIP_benchmark's naming).
SHORT = {
    **{f"image_retrieval_recall@{k}": f"t2i_R@{k}" for k in (1, 5, 10)},
    **{f"text_retrieval_recall@{k}": f"i2t_R@{k}" for k in (1, 5, 10)},
    "uniformity_a": "unif_media",
    "uniformity_b": "unif_text",
}
#: The run kind (lightcrl.rundir.KINDS) of each kind of cell: which tasks apply comes from TASKS.
RUN_KIND = {"train": "lightcrl", "asif": "asif", "csa": "csa", "convirt": "convirt", "raw": "raw"}


# -- the experiment file ---------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Axis(_Strict):
    """One grid axis: values set at ``key``, or labelled override sets."""

    key: str | None = None
    values: list[Any] | dict[str, dict[str, Any] | None]

    def options(self, name: str) -> list[tuple[str, dict[str, Any]]]:
        if isinstance(self.values, dict):
            return [(str(label), dict(over or {})) for label, over in self.values.items()]
        if not self.key:
            raise LightCRLError(f"axis {name!r}: a list of values needs `key` (the config field they set)")
        return [(str(v), {self.key: v}) for v in self.values]


class TrainBaseline(_Strict):
    """A training cell: ``set`` overrides on the base config, or on ``config`` (a training YAML relative to
    the experiment file, e.g. a selected configuration) when given."""

    kind: Literal["train"] = "train"
    name: str
    config: str | None = None
    set: dict[str, Any] = Field(default_factory=dict)


class ASIFTune(_Strict):
    k: list[int]
    p: list[float]
    center: list[bool] | None = None  # None: the baseline's own ``center`` only
    val_fraction: float = 0.2


class ASIFBaseline(_Strict):
    """Anchors: the training pairs of the base config's ``source`` (its split and sample unless ``limit``)."""

    kind: Literal["asif"]
    name: str = "asif"
    k: int = 800
    p: float = 8.0
    center: bool = False
    pairs: Literal["random_caption", "all_pairs", "mean_caption"] = "random_caption"
    source: int = 0
    limit: int | None = None
    tune: ASIFTune | None = None  # chosen on held-out training pairs, never on an evaluation split
    media_encoder: str | None = None  # None: the source's encoders (e.g. to compare encoder pairs)
    text_encoder: str | None = None
    hubness: HubnessConfig | None = None  # CSLS in retrieval, as model.hubness (the anchor pairs as bank)


class CSATune(_Strict):
    dims: list[int]
    exponent: list[float]
    reg: list[float]
    val_fraction: float = 0.2


class CSABaseline(_Strict):
    """CSA (lightcrl.baselines.csa) on the training pairs of the base config's ``source``."""

    kind: Literal["csa"]
    name: str = "csa"
    dims: int = 128
    exponent: float = 1.0
    reg: float = 1e-2
    pairs: Literal["random_caption", "all_pairs", "mean_caption"] = "all_pairs"
    source: int = 0
    limit: int | None = None
    tune: CSATune | None = None  # chosen on held-out training pairs, never on an evaluation split
    hubness: HubnessConfig | None = None  # CSLS in retrieval, as model.hubness (the fitted pairs as bank)


class ConVIRTBaseline(_Strict):
    """``config``: a ConVIRT YAML (relative to the experiment file) or inline fields; ``data`` defaults to
    the base config's first source. ``set``: dotted overrides on top."""

    kind: Literal["convirt"]
    name: str = "convirt"
    config: str | dict[str, Any] = Field(default_factory=dict)
    set: dict[str, Any] = Field(default_factory=dict)


class RawBaseline(_Strict):
    """The frozen encoders themselves: the reference for linear probes and STS (no shared space)."""

    kind: Literal["raw"]
    name: str = "raw"
    image_encoder: str = "efficientnet-lite0"
    text_encoder: str = "minilm-l6"
    audio_encoder: str = "aisfx"


Baseline = Annotated[
    TrainBaseline | ASIFBaseline | CSABaseline | ConVIRTBaseline | RawBaseline, Field(discriminator="kind")
]


class EvalSpec(_Strict):
    name: str
    task: str  # a name in lightcrl.app.evaluate.TASKS
    data: str
    split: str | None = None
    limit: int | None = None
    options: dict[str, Any] = Field(default_factory=dict)  # train_split, train_limit, epochs, probe_mode...
    metrics: list[str] | None = None  # table columns (default: the task's columns in TASKS)
    cells: list[str] | None = None  # glob patterns of the cells that run it (default: all)

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        if v not in TASKS:
            raise ValueError(f"unknown task {v!r}; tasks: {', '.join(TASKS)}")
        return v

    def columns(self) -> list[str]:
        return self.metrics or list(TASKS[self.task].columns)


class ExperimentConfig(_Strict):
    name: str = "experiment"
    base: str | dict[str, Any]
    set: dict[str, Any] = Field(default_factory=dict)
    prefix: str = "dfe"  # grid cells are named <prefix>-<value>-<value>...
    axes: dict[str, Axis] = Field(default_factory=dict)
    baselines: list[Baseline] = Field(default_factory=list)
    evals: list[EvalSpec] = Field(default_factory=list)
    seed: int = 0  # evaluation sampling seed
    # training seeds: every cell is repeated once per seed (named <cell>-s<seed>, its config's `seed` set),
    # and results.md gets a mean ± spread table over them. None: each cell once, with its config's seed.
    seeds: list[int] | None = None
    # columns read from each training cell's metrics.jsonl at its best epoch (the early-stop metric),
    # e.g. the held-out validation retrieval of data.sources[].holdout: ["val/mean_recall@1"]
    val_metrics: list[str] = Field(default_factory=list)
    device: str = "auto"
    notes: str | None = None  # a markdown file (relative to the experiment file) appended to results.md


# -- cells -----------------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One row of the table: what to build (``spec``) and which axis values it stands for."""

    name: str
    kind: str  # a key of RUN_KIND
    spec: dict[str, Any]
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def spec_hash(self) -> str:
        # Unset (None) entries are left out, so a new optional setting (default None) does not mark every
        # finished cell as changed.
        return _hash(_without_none(self.spec))


def _without_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_without_none(v) for v in obj]
    return obj


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def set_path(raw: dict, path: str, value: Any) -> dict:
    """A copy of ``raw`` with the node at dotted ``path`` replaced (digits index lists)."""
    out = copy.deepcopy(raw)
    node: Any = out
    parts = path.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise LightCRLError(f"override {path!r}: no list item {part!r}")
            if last:
                node[int(part)] = copy.deepcopy(value)
            else:
                node = node[int(part)]
        elif last:
            node[part] = copy.deepcopy(value)
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise LightCRLError(f"override {path!r}: {part!r} is not a mapping")
    return out


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    for path, value in overrides.items():
        raw = set_path(raw, path, value)
    return raw


def _expand_data_root(obj: Any) -> Any:
    """``{data}`` in any string -> the shared data folder (``$LIGHTCRL_DATA`` or ``../shared/data``)."""
    from lightcrl.paths import data_root

    if isinstance(obj, str):
        return obj.replace("{data}", str(data_root())) if "{data}" in obj else obj
    if isinstance(obj, dict):
        return {k: _expand_data_root(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_expand_data_root(v) for v in obj]
    return obj


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise LightCRLError(f"config file not found: {path}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise LightCRLError(f"{path}: invalid YAML: {e}") from e


@dataclass
class Experiment:
    """A validated experiment: its config, the folder relative paths start from, and every cell."""

    cfg: ExperimentConfig
    root: Path
    cells: list[Cell]
    source: str = ""

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)

    def select(self, only: list[str] | None) -> list[Cell]:
        if not only:
            return list(self.cells)
        chosen = [c for c in self.cells if any(fnmatch.fnmatchcase(c.name, pat) for pat in only)]
        if not chosen:
            raise LightCRLError(
                f"--only {' '.join(only)} matches no cell; cells: " + ", ".join(c.name for c in self.cells)
            )
        return chosen

    def evals_for(self, cell: Cell) -> list[EvalSpec]:
        return [
            e
            for e in self.cfg.evals
            if TASKS[e.task].applies_to(RUN_KIND[cell.kind])
            and (not e.cells or any(fnmatch.fnmatchcase(cell.name, p) for p in e.cells))
        ]


def load_experiment(path: str | Path | dict, root: str | Path | None = None) -> Experiment:
    """Read, validate and expand an experiment (a YAML path, or a mapping with ``root`` for its paths).

    Every cell's training / ConVIRT / ASIF config is validated here, so a bad grid fails before any work.
    """
    if isinstance(path, dict):
        raw, base_dir, source = path, Path(root or "."), "experiment"
    else:
        p = Path(path)
        raw, base_dir, source = _read_yaml(p), p.parent, str(p)
    try:
        cfg = ExperimentConfig(**_expand_data_root(raw))
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise LightCRLError(f"invalid experiment {source}:\n" + "\n".join(lines)) from None
    if cfg.notes and not (base_dir / cfg.notes).exists():
        raise LightCRLError(f"experiment {source}: notes file not found: {base_dir / cfg.notes}")
    base = _expand_data_root(_read_yaml(base_dir / cfg.base)) if isinstance(cfg.base, str) else cfg.base
    base = apply_overrides(base, cfg.set)
    cells = []
    for seed in cfg.seeds if cfg.seeds else [None]:
        seeded = base if seed is None else dict(base, seed=seed)
        group = _grid_cells(cfg, seeded)
        group += [_baseline_cell(b, cfg, seeded, base_dir, seed) for b in cfg.baselines]
        if seed is not None:
            group = [Cell(f"{c.name}-s{seed}", c.kind, c.spec, {**c.labels, "seed": str(seed)})
                     for c in group]
        cells += group
    names = [c.name for c in cells]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LightCRLError(f"experiment {source}: duplicate cell names {dup}")
    bad = [n for n in names if not n or "/" in n or n.startswith(".")]
    if bad:
        raise LightCRLError(f"experiment {source}: invalid cell names {bad}")
    evals = [e.name for e in cfg.evals]
    if len(set(evals)) != len(evals):
        raise LightCRLError(f"experiment {source}: duplicate eval names")
    return Experiment(cfg, base_dir, cells, source)


def _train_cell(name: str, base: dict, overrides: dict, labels: dict[str, str]) -> Cell:
    raw = apply_overrides(base, overrides)
    raw["name"] = name
    cfg: TrainConfig = validate_config(raw, source=f"cell {name}")
    return Cell(name, "train", cfg.model_dump(mode="json"), labels)


def _grid_cells(cfg: ExperimentConfig, base: dict) -> list[Cell]:
    axes = [(name, axis.options(name)) for name, axis in cfg.axes.items()]
    if not axes:
        return [_train_cell(cfg.prefix, base, {}, {})]
    cells = []
    for combo in itertools.product(*(opts for _, opts in axes)):
        labels = {axis: label for (axis, _), (label, _) in zip(axes, combo)}
        overrides: dict[str, Any] = {}
        for _, over in combo:
            overrides.update(over)
        cells.append(_train_cell("-".join([cfg.prefix, *labels.values()]), base, overrides, labels))
    return cells


def _baseline_cell(b: Baseline, cfg: ExperimentConfig, base: dict, root: Path,
                   seed: int | None = None) -> Cell:
    if isinstance(b, TrainBaseline):
        start = _expand_data_root(_read_yaml(root / b.config)) if b.config else base
        return _train_cell(b.name, start if seed is None else dict(start, seed=seed), b.set, {})
    if isinstance(b, RawBaseline):
        return Cell(b.name, "raw", b.model_dump(exclude={"kind", "name"}))
    train_cfg = validate_config(dict(base, name=b.name), source=f"cell {b.name}")
    if isinstance(b, (ASIFBaseline, CSABaseline)):
        if b.source >= len(train_cfg.data.sources):
            raise LightCRLError(f"{b.kind}: the base config has no data source {b.source}")
        src = train_cfg.data.sources[b.source]
        spec = {
            "data": src.spec,
            "split": src.split,
            "limit": b.limit or src.limit,
            "seed": train_cfg.seed,
            "media_encoder": getattr(b, "media_encoder", None) or src.media_encoder,
            "text_encoder": getattr(b, "text_encoder", None) or src.text_encoder,
            "holdout": src.holdout,  # fitted without the held-out items, scored on them
            # (hubness only when set: the specs, and so the cells' hashes, of earlier grids stay as they were)
            **b.model_dump(exclude={"kind", "name", "source", "limit", "tune", "media_encoder",
                                    "text_encoder"} | ({"hubness"} if b.hubness is None else set())),
            "tune": b.tune.model_dump() if b.tune else None,
        }
        return Cell(b.name, b.kind, spec)
    from lightcrl.baselines.convirt import load_config as load_convirt

    raw = _expand_data_root(_read_yaml(root / b.config)) if isinstance(b.config, str) else dict(b.config)
    raw.setdefault("data", train_cfg.data.sources[0].model_dump())
    raw.setdefault("seed", train_cfg.seed)
    raw = apply_overrides(raw, b.set)
    raw["name"] = b.name
    return Cell(b.name, "convirt", load_convirt(raw).model_dump(mode="json"))


# -- running ---------------------------------------------------------------------------------------------
def _cell_dir(out: Path, cell: Cell) -> Path:
    return out / "cells" / cell.name


def _eval_hash(e: EvalSpec, seed: int) -> str:
    # the table columns and cell filter do not change a result
    return _hash([e.model_dump(exclude={"metrics", "cells"}), seed])


def _read_state(cell_dir: Path) -> dict:
    path = cell_dir / "cell.json"
    return read_json(path) if path.exists() else {}


def cell_status(exp: Experiment, cell: Cell, out: Path) -> str:
    """ "done", "partial" (trained or some results present), "changed" (run with another definition of the
    cell: delete its folder to rerun) or "todo"."""
    cell_dir = _cell_dir(out, cell)
    state = _read_state(cell_dir)
    if not state:
        return "todo"
    if state.get("spec_hash") != cell.spec_hash:
        return "changed"
    done = state.get("evals", {})
    results = RunDir(cell_dir).results
    if state.get("trained") and all(
        done.get(e.name) == _eval_hash(e, exp.cfg.seed) and (results / f"{e.name}.json").exists()
        for e in exp.evals_for(cell)
    ):
        return "done"
    return "partial"


def _train_time(cell_dir: Path) -> float | None:
    """Seconds spent in training epochs (summed over resumed sessions), else the summary's total."""
    run = RunDir(cell_dir)
    times = [r["time/epoch_s"] for r in run.iter_metrics() if r.get("time/epoch_s") is not None]
    if times:
        return float(sum(times))
    summary = run.read_train_summary()
    return summary.get("train_time_s") if summary else None


def _build(cell: Cell, cell_dir: Path, device: str) -> None:
    """Train (or set up) the cell's model in ``cell_dir``; a finished one is left as it is."""
    if cell.kind == "train":
        if not RunDir(cell_dir).train_summary.exists():
            from lightcrl.app.train import train

            train(validate_config(cell.spec, source=f"cell {cell.name}"), cell_dir)
    elif cell.kind == "convirt":
        from lightcrl.app.train_convirt import train_convirt
        from lightcrl.baselines.convirt import load_config

        train_convirt(load_config(cell.spec), cell_dir)
    elif cell.kind == "raw":
        run = RunDir(cell_dir)
        if not run.model_info.exists():
            encoders = {k.removesuffix("_encoder"): v for k, v in cell.spec.items()}
            run.write_info({"kind": "raw", "encoders": encoders, "parameter_counts": {"total_trainable": 0}})
            write_json(run.train_summary, {"train_time_s": 0.0})
    elif not RunDir(cell_dir).model_info.exists():  # asif, csa: no training, a fit of the training pairs
        _build_training_free(cell, cell_dir, device)


def _build_training_free(cell: Cell, cell_dir: Path, device: str) -> None:
    """An ASIF or CSA run from the training pairs; with a ``holdout``, its ``val/*`` retrieval on the held-out
    items (the trainer's validation, on the same items) is the one row of its metrics.jsonl."""
    from lightcrl.baselines import asif, csa

    module = asif if cell.kind == "asif" else csa
    pipe = module.build_pipeline(cell.spec, device)
    chosen = {k: pipe.info[cell.kind][k] for k in (("k", "p") if cell.kind == "asif" else ("dims", "exponent",
                                                                                         "reg"))}
    run = RunDir(cell_dir)
    if cell.spec.get("holdout"):
        from lightcrl.app.train import validate
        from lightcrl.embed import EmbedOptions, cached_store
        from lightcrl.features import FeatureAdapter
        from lightcrl.pairs import PairSet

        s = cell.spec
        opts = EmbedOptions(limit=s.get("limit"), seed=s["seed"], device=device, progress=False)
        media = cached_store(s["media_encoder"], s["data"], s["split"], opts)
        text = cached_store(s["text_encoder"], s["data"], s["split"], opts)
        pairs = PairSet.link("val", media, text, adapter=FeatureAdapter.from_info(pipe.info))
        held_out = pairs.split_media(s["holdout"], s["seed"])[1]
        run.path.mkdir(parents=True, exist_ok=True)
        run.append_metrics({"step": 0, "epoch": 0, **validate(pipe.model, [held_out], pipe.device, 512,
                                                               s["seed"])})
    n_pairs = pipe.info.get("n_anchors", pipe.info.get("n_pairs"))
    module.save_run(pipe, cell_dir)
    write_json(run.train_summary, {"train_time_s": pipe.info["build_time_s"], "n_pairs": n_pairs, **chosen})


def _target(cell: Cell, cell_dir: Path, device: str) -> EvalTarget:
    """Every kind of cell is a run directory: its kind picks the pipeline (lightcrl.rundir.load_pipeline)."""
    return EvalTarget.from_run_dir(cell_dir, device=device, name=cell.name)


def run_cell(exp: Experiment, cell: Cell, out: Path) -> str:
    """Build and evaluate one cell; returns "skipped" (already done) or "done"."""
    cell_dir = _cell_dir(out, cell)
    state = _read_state(cell_dir)
    if state and state.get("spec_hash") != cell.spec_hash:
        raise LightCRLError(
            f"{cell_dir} was run with another definition of cell {cell.name}: delete it to "
            "rerun, or choose another --out"
        )
    if cell_status(exp, cell, out) == "done":
        log.info("cell %s: finished, skipped", cell.name)
        return "skipped"
    state = state or {
        "name": cell.name,
        "kind": cell.kind,
        "labels": cell.labels,
        "spec_hash": cell.spec_hash,
        "evals": {},
    }
    state.pop("error", None)
    cell_dir.mkdir(parents=True, exist_ok=True)
    write_json(cell_dir / "cell.json", state)
    if not state.get("trained"):
        log.info("cell %s: building (%s)", cell.name, cell.kind)
    _build(cell, cell_dir, exp.cfg.device)  # a no-op for a built cell (a resumed one continues)
    info = RunDir(cell_dir).info()
    state.update(
        trained=True,
        train_time_s=_train_time(cell_dir),
        trainable_params=info.get("parameter_counts", {}).get("total_trainable"),
    )
    write_json(cell_dir / "cell.json", state)
    target = None
    for e in exp.evals_for(cell):
        h = _eval_hash(e, exp.cfg.seed)
        result_path = RunDir(cell_dir).results / f"{e.name}.json"
        if state["evals"].get(e.name) == h and result_path.exists():
            continue
        target = target or _target(cell, cell_dir, exp.cfg.device)
        log.info("cell %s: eval %s (%s on %s)", cell.name, e.name, e.task, e.data)
        run_eval(
            target,
            EvalRequest(
                e.task, e.data, e.split, e.limit, exp.cfg.seed, exp.cfg.device, result_path, dict(e.options)
            ),
        )
        state["evals"][e.name] = h
        write_json(cell_dir / "cell.json", state)
    return "done"


@dataclass
class ExperimentResult:
    out: Path
    ran: list[str]
    skipped: list[str]
    failed: dict[str, str]
    rows: list[dict[str, Any]]
    markdown: Path
    csv: Path
    plots: list[Path]


def run_experiment(
    path: str | Path,
    only: list[str] | None = None,
    out: str | Path | None = None,
    results_md: str | Path | None = None,
    command: str | None = None,
    keep_going: bool = True,
) -> ExperimentResult:
    """Run the selected cells of an experiment (resuming / skipping finished ones), then write the table.

    A failing cell is logged and recorded (``failed``) and the others still run, unless ``keep_going``
    is False.
    """
    exp = load_experiment(path)
    default_command = f"lightcrl experiment {path}" + (f" --out {out}" if out else "")
    out = Path(out) if out else Path("runs") / "experiments" / exp.cfg.name
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(path, dict):
        write_text(out / "experiment.yaml", Path(path).read_text())
    ran, skipped, failed = [], [], {}
    for cell in exp.select(only):
        try:
            status = run_cell(exp, cell, out)
        except Exception as e:  # noqa: BLE001 -- one broken cell must not stop a multi-hour grid
            if not keep_going:
                raise
            log.error("cell %s failed: %s\n%s", cell.name, e, traceback.format_exc())
            failed[cell.name] = f"{type(e).__name__}: {e}"
            state = _read_state(_cell_dir(out, cell))
            if state:
                write_json(_cell_dir(out, cell) / "cell.json", dict(state, error=failed[cell.name]))
            continue
        (skipped if status == "skipped" else ran).append(cell.name)
    rows = collect(exp, out)
    md, csv_path, plots = write_results(exp, rows, out, command or default_command, results_md)
    return ExperimentResult(out, ran, skipped, failed, rows, md, csv_path, plots)


# -- results ---------------------------------------------------------------------------------------------
def collect(exp: Experiment, out: Path) -> list[dict[str, Any]]:
    """One row per cell with results on disk: identity, axis values, size, time, then every eval metric."""
    rows = []
    for cell in exp.cells:
        cell_dir = _cell_dir(out, cell)
        state = _read_state(cell_dir)
        if not state or state.get("spec_hash") != cell.spec_hash:
            continue
        row: dict[str, Any] = {"cell": cell.name, "kind": cell.kind}
        row.update({axis: cell.labels.get(axis, "") for axis in exp.cfg.axes})
        if exp.cfg.seeds:
            row["seed"] = cell.labels.get("seed", "")
        row["trainable_params"] = state.get("trainable_params")
        row["train_time_s"] = state.get("train_time_s")
        if exp.cfg.val_metrics:
            row.update(best_val_metrics(cell, cell_dir, exp.cfg.val_metrics))
        for e in exp.cfg.evals:
            applies = e in exp.evals_for(cell)
            path = RunDir(cell_dir).results / f"{e.name}.json"
            metrics = {}
            current = state.get("evals", {}).get(e.name) == _eval_hash(e, exp.cfg.seed)
            if applies and current and path.exists():
                metrics = read_json(path)["metrics"]
            for m in e.columns():
                row[f"{e.name}/{SHORT.get(m, m)}"] = metrics.get(m) if applies else "n/a"
        row["status"] = "failed" if state.get("error") else cell_status(exp, cell, out)
        rows.append(row)
    return rows


def best_val_metrics(cell: Cell, cell_dir: Path, names: list[str]) -> dict[str, Any]:
    """``names`` from the metrics.jsonl row of the cell's best epoch (by its early-stop metric; the
    training-free kinds write one such row when they are built); "n/a" for kinds without one."""
    run = RunDir(cell_dir)
    stop = EarlyStopConfig()  # the training-free kinds: val/mean_recall@1, higher is better
    if cell.kind == "train":
        stop = validate_config(cell.spec, source=f"cell {cell.name}").early_stop
    scored = [(v, r) for r in run.iter_metrics() if (v := stop.value(r)) is not None]
    if not scored:
        return {n: None if cell.kind in ("train", "asif", "csa") else "n/a" for n in names}
    sign = 1.0 if stop.direction == "max" else -1.0
    best = max(scored, key=lambda vr: sign * vr[0])[1]
    return {n: best.get(n) for n in names}


def seed_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the FINISHED cells run for several seeds, grouped by cell name without ``-s<seed>``: every
    numeric column as ``mean ± spread`` (spread = half the range, max - min over 2), and the seeds counted."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("seed", "") == "" or r.get("status") != "done":
            continue
        groups.setdefault(r["cell"].removesuffix(f"-s{r['seed']}"), []).append(r)
    out = []
    skip = {"cell", "kind", "seed", "status"}
    for name, members in groups.items():
        summary: dict[str, Any] = {"cell": name, "kind": members[0]["kind"], "seeds": len(members)}
        for col in members[0]:
            if col in skip:
                continue
            vals = [m.get(col) for m in members]
            nums = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if len(nums) != len(vals) or not nums or len(set(nums)) == 1:  # text, missing or one value
                summary[col] = vals[0] if len(set(map(str, vals))) == 1 else ""
                continue
            mean, spread = sum(nums) / len(nums), (max(nums) - min(nums)) / 2
            summary[col] = f"{_fmt(mean)} ± {_fmt(spread)}"
        out.append(summary)
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_no finished cells yet_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _plot_metrics(exp: Experiment) -> list[tuple[str, str]]:
    """(column, title) of the charts: the first metric of every eval, plus size and training time."""
    cols = [
        (f"{e.name}/{SHORT.get(e.columns()[0], e.columns()[0])}", f"{e.name}: {e.columns()[0]}")
        for e in exp.cfg.evals
    ]
    return cols + [("trainable_params", "trainable parameters"), ("train_time_s", "training time (s)")]


def write_plots(exp: Experiment, rows: list[dict[str, Any]], plot_dir: Path) -> list[Path]:
    """One horizontal bar chart per headline column across cells (cells without the value left out)."""
    from lightcrl.app import plots

    written = []
    for col, title in _plot_metrics(exp):
        values = {
            r["cell"]: float(r[col])
            for r in rows
            if isinstance(r.get(col), (int, float)) and not isinstance(r.get(col), bool)
        }
        if not values:
            continue
        path = plot_dir / (col.replace("/", "--").replace("@", "at") + ".png")
        plots.bar_table(values, path, title=title)
        written.append(path)
    return written


def write_results(
    exp: Experiment, rows: list[dict[str, Any]], out: Path, command: str, results_md: str | Path | None = None
) -> tuple[Path, Path, list[Path]]:
    """``OUT/results.csv``, ``OUT/results.md``, ``OUT/plots/*.png``; with ``results_md`` also a copy of the
    table there and of the plots in ``<results_md stem>_plots/`` beside it (so the copy is self-contained)."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    csv_path = out / "results.csv"
    write_text(csv_path, buf.getvalue())
    plot_paths = write_plots(exp, rows, out / "plots")
    md_path = out / "results.md"
    write_text(md_path, _markdown(exp, rows, command, plot_paths, md_path.parent))
    if results_md:  # a copy with its own plots beside it (docs/results.md -> docs/results_plots/)
        target = Path(results_md)
        copies = write_plots(exp, rows, target.parent / f"{target.stem}_plots")
        write_text(target, _markdown(exp, rows, command, copies, target.parent))
    return md_path, csv_path, plot_paths


def _markdown(
    exp: Experiment, rows: list[dict[str, Any]], command: str, plot_paths: list[Path], base: Path
) -> str:
    n_done = sum(r["status"] == "done" for r in rows)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        f"# Results: {exp.cfg.name}",
        "",
        "Produced by:",
        "",
        "```",
        command,
        "```",
        "",
        f"{n_done} of {len(exp.cells)} cells finished ({when}; experiment config `{exp.source}`). "
        "Recalls and accuracies in percent; `t2i` = text->image retrieval, `i2t` = image->text; "
        "`n/a` = the task does not apply to that kind of model; empty = not run yet. "
        "`train_time_s` sums the training epochs only (feature extraction is cached and shared).",
        "",
        "",
    ]
    evals = ["| eval | task | data | split | limit | options |", "|---|---|---|---|---|---|"]
    evals += [
        f"| {e.name} | {e.task} | `{e.data}` | {e.split or 'default'} | {e.limit or 'all'} | "
        f"{json.dumps(e.options) if e.options else ''} |"
        for e in exp.cfg.evals
    ]
    figs = [f"![{p.stem}]({os.path.relpath(p, base)})" for p in plot_paths]
    notes = ""
    if exp.cfg.notes:  # the reading of the table, kept beside the experiment config
        notes = "\n" + (exp.root / exp.cfg.notes).read_text().strip() + "\n"
    seeds = ""
    summary = seed_summary(rows)
    if summary:
        seeds = ("\n## Mean ± spread over seeds\n\nSpread = half the range (max - min) / 2 over the seeds "
                 "finished so far (`seeds`).\n\n" + markdown_table(summary))
    return (
        "\n".join(head)
        + markdown_table(rows)
        + seeds
        + notes
        + "\n## Evaluations\n\n"
        + "\n".join(evals)
        + "\n"
        + ("\n## Plots\n\n" + "\n\n".join(figs) + "\n" if figs else "")
    )
