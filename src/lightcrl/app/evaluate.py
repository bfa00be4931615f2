"""`lightcrl eval`: run one evaluation task for a trained run, its untrained twin, or the raw encoders.

Tasks (CLIP_benchmark semantics; each metric lives in ``lightcrl.metrics.<task>``):
zeroshot, retrieval, linear_probe, finetune, geometry, sts. Evaluation data is embedded with the
model's own frozen encoders through the store cache, and nothing from a test split is used for
selection. Every task writes one JSON file: task, dataset, split, model identity, metrics, plots.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightcrl.api import LightCRLPipeline
from lightcrl.app.tasks import Task
from lightcrl.data.sts import SENTEVAL_SETS
from lightcrl.embed import EmbedOptions, cached_store
from lightcrl.errors import LightCRLError
from lightcrl.features import FeatureAdapter
from lightcrl.io import write_json
from lightcrl.rundir import RESULTS, RunDir, load_pipeline
from lightcrl.store import FeatureStore
from lightcrl.version import __version__

log = logging.getLogger(__name__)


@dataclass
class EvalTarget:
    """What is evaluated: a trained run, the same architecture untrained, or the raw frozen encoders."""

    kind: str  # "run" | "untrained" | "raw"
    pipeline: LightCRLPipeline | None
    encoders: dict[str, str]
    identity: dict
    run_dir: Path | None = None
    run_kind: str = "lightcrl"  # lightcrl.rundir.KINDS: which tasks apply (see TASKS)

    @classmethod
    def resolve(
        cls,
        run: str,
        untrained: bool = False,
        device: str = "auto",
        image_encoder: str = "efficientnet-lite0",
        text_encoder: str = "minilm-l6",
        audio_encoder: str = "aisfx",
    ) -> EvalTarget:
        """``run``: a run directory of any kind (see :mod:`lightcrl.rundir`), or "raw" with the encoders."""
        if run == "raw":
            enc = {"image": image_encoder, "text": text_encoder, "audio": audio_encoder}
            return cls("raw", None, enc, {"kind": "raw", "encoders": enc}, run_kind="raw")
        return cls.from_run_dir(Path(run), untrained=untrained, device=device)

    @classmethod
    def from_run_dir(cls, run_dir: Path, untrained: bool = False, device: str = "auto",
                     name: str | None = None) -> EvalTarget:
        """Any run directory: the pipeline comes from its kind (``load_pipeline``), never a ladder here."""
        run = RunDir(run_dir)
        kind = run.kind()
        pipe = load_pipeline(run.path, device=device, untrained=untrained)
        info = run.info()
        # raw cells of older grids named their encoders image_encoder, ...: modality names now
        encoders = {k.removesuffix("_encoder"): v for k, v in (info["encoders"] if pipe is None
                                                                else pipe.encoder_names).items()}
        ident: dict[str, Any] = {"kind": "raw" if kind == "raw" else kind, "run": str(run.path),
                                 "name": name or run.path.name, "encoders": encoders}
        if kind == "lightcrl":
            cfg = info["model_config"]
            ident.update(kind="untrained" if untrained else "run", arch=cfg.get("arch"),
                         fusion=cfg.get("fusion"), checkpoint=info.get("checkpoint"), epoch=info.get("epoch"))
        else:
            ident["arch"] = kind
        ident["trainable_params"] = info.get("parameter_counts", {}).get("total_trainable")
        target_kind = "raw" if pipe is None else ("untrained" if untrained else "run")
        return cls(target_kind, pipe, encoders, ident, run.path, run_kind=kind)

    def embed(self, store: FeatureStore) -> np.ndarray:
        """DFE embeddings of a store, or the raw encoder's pooled vectors for the raw target."""
        if self.pipeline is None:
            return raw_pooled(store)
        return self.pipeline.encode_store(store)


def raw_pooled(store: FeatureStore) -> np.ndarray:
    """The frozen encoder's own pooled vectors, L2-normalised: the reference for every comparison."""
    x = store.pooled()
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


@dataclass
class EvalRequest:
    task: str
    data: str
    split: str | None = None
    limit: int | None = None
    seed: int = 0
    device: str = "auto"
    output: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)


def _store(
    target: EvalTarget, modality: str, spec: str, split: str | None, limit, seed, device
) -> FeatureStore:
    name = target.encoders.get(modality)
    if name is None:
        raise LightCRLError(f"the model has no {modality} encoder")
    return cached_store(name, spec, split, EmbedOptions(limit=limit, seed=seed, device=device))


def _media_modality(spec: str) -> str:
    from lightcrl.data.datasets import open_dataset  # listing only (cheap)

    return open_dataset(spec, None).media if ":" in spec else "image"


# -- tasks ------------------------------------------------------------------------------------------
def task_zeroshot(t: EvalTarget, r: EvalRequest, plots_dir: Path) -> tuple[dict, list[str]]:
    from lightcrl.app import plots
    from lightcrl.data.datasets import open_dataset
    from lightcrl.metrics import zeroshot

    media = open_dataset(r.data, r.split).media
    store = _store(t, media, r.data, r.split, r.limit, r.seed, r.device)
    classnames = r.options.get("classnames") or store.classnames
    templates = r.options.get("templates") or store.templates or list(zeroshot.DEFAULT_TEMPLATES)
    if not classnames:
        raise LightCRLError(f"{r.data} has no class names: pass --classnames")
    class_emb = zeroshot.build_classifier(
        lambda texts: t.pipeline.encode_text(texts, progress=False), classnames, templates
    )
    model = getattr(t.pipeline, "model", None)
    bias = model.zeroshot_bias(class_emb, media) if hasattr(model, "zeroshot_bias") else None
    m = zeroshot.evaluate(t.embed(store), store.items.labels, class_emb, classnames, class_bias=bias)
    m.update(n_templates=len(templates), chance=100.0 / len(classnames))
    png = plots_dir / f"{r.options.get('_stem', _slug(r))}-confusion.png"
    plots.confusion_matrix(
        m["confusion_matrix"],
        classnames,
        png,
        title=f"zero-shot {r.data} [{store.manifest['dataset']['split']}]",
    )
    return m, [png]


def task_retrieval(t: EvalTarget, r: EvalRequest, plots_dir: Path) -> tuple[dict, list[str]]:
    from lightcrl.metrics import retrieval

    media_emb, text_emb, text_to_media, (ms, ts) = _pair_embeddings(t, r)
    # model.hubness: CSLS offsets of the gallery items against the model's training embeddings, else None
    offsets = getattr(getattr(t.pipeline, "model", None), "retrieval_offsets", lambda *_: None)
    image_off, text_off = offsets(media_emb, "text"), offsets(text_emb, ms.modality)
    metrics = retrieval.evaluate(media_emb, text_emb, text_to_media, image_offsets=image_off,
                                 text_offsets=text_off)
    if image_off is not None or text_off is not None:  # and the plain cosine's, to see what it changed
        plain = retrieval.evaluate(media_emb, text_emb, text_to_media)
        metrics.update({f"uncorrected/{k}": v for k, v in plain.items() if "recall@" in k})
    labels = ms.items.labels
    if len(labels) and (labels >= 0).all():  # captions of class-labelled media: class relevance too
        metrics.update(retrieval.evaluate_by_class(media_emb, text_emb, labels, labels[text_to_media]))
    return metrics, []


def _pair_embeddings(t: EvalTarget, r: EvalRequest):
    from lightcrl.data.datasets import open_dataset

    media = open_dataset(r.data, r.split).media
    ms = _store(t, media, r.data, r.split, r.limit, r.seed, r.device)
    ts = _store(t, "text", r.data, r.split, r.limit, r.seed, r.device)
    pos = {mid: i for i, mid in enumerate(ms.items.ids)}
    keep = np.array([g in pos for g in ts.items.groups])
    text_to_media = np.array([pos[g] for g, k in zip(ts.items.groups, keep) if k], np.int64)
    text_emb = t.embed(ts)[keep]
    return t.embed(ms), text_emb, text_to_media, (ms, ts)


class StoreSource:
    """A labelled feature store as the FeatureSource that fine-tuning reads, in the run's input mode."""

    def __init__(self, store: FeatureStore, adapter: FeatureAdapter):
        self.store, self.adapter = store, adapter
        self.labels = store.items.labels

    def __len__(self):
        return len(self.store)

    def batch(self, indices):
        return self.adapter.from_store(self.store, indices)


def _labelled_stores(t: EvalTarget, r: EvalRequest):
    from lightcrl.data.datasets import open_dataset

    media = open_dataset(r.data, r.split).media
    train_split = r.options.get("train_split") or "train"
    train = _store(t, media, r.data, train_split, r.options.get("train_limit"), r.seed, r.device)
    test = _store(t, media, r.data, r.split, r.limit, r.seed, r.device)
    return train, test, media


def task_linear_probe(t: EvalTarget, r: EvalRequest, plots_dir: Path) -> tuple[dict, list[str]]:
    from lightcrl.metrics import linear_probe

    train, test, _ = _labelled_stores(t, r)
    mode = r.options.get("probe_mode", "logreg")
    kw = {"epochs": r.options["epochs"]} if mode == "sgd" and r.options.get("epochs") else {}
    m = linear_probe.evaluate(
        t.embed(train), train.items.labels, t.embed(test), test.items.labels, mode=mode, seed=r.seed, **kw
    )
    if t.pipeline is not None and r.options.get("raw_reference", True):  # the raw encoder as reference
        ref = _raw_reference(train, test, mode, r.seed, kw)
        m.update({f"raw_encoder/{k}": v for k, v in ref.items() if not isinstance(v, (dict, list))})
    m.update(n_train=len(train), n_test=len(test), mode=mode)
    return m, []


def _raw_reference(train: FeatureStore, test: FeatureStore, mode: str, seed: int, kw: dict) -> dict:
    """The raw-encoder probe depends only on the two stores: computed once, cached beside the test store."""
    import hashlib
    import json

    from lightcrl.io import read_json
    from lightcrl.metrics import linear_probe

    key = json.dumps([train.fingerprint, test.fingerprint, mode, seed, kw])
    path = test.dir / f"probe-reference-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.exists():
        return read_json(path)
    ref = linear_probe.evaluate(
        raw_pooled(train), train.items.labels, raw_pooled(test), test.items.labels, mode=mode, seed=seed, **kw
    )
    try:
        write_json(path, ref)
    except OSError:
        pass  # a read-only store only costs recomputing
    return ref


def task_finetune(t: EvalTarget, r: EvalRequest, plots_dir: Path) -> tuple[dict, list[str]]:
    from lightcrl.metrics import finetune, linear_probe

    train, test, media = _labelled_stores(t, r)
    n_cls = int(max(train.items.labels.max(), test.items.labels.max()) + 1)
    epochs = int(r.options.get("epochs") or 100)
    every = int(r.options.get("eval_every") or min(20, epochs))
    dev = str(t.pipeline.device)
    common = dict(
        num_classes=n_cls,
        epochs=epochs,
        eval_every=every,
        seed=r.seed,
        device=dev,
        lr=float(r.options.get("lr") or 1e-3),
    )
    src_train, src_test = StoreSource(train, t.pipeline.adapter), StoreSource(test, t.pipeline.adapter)
    full = finetune.evaluate(t.pipeline.model, media, src_train, src_test, **common)
    head = finetune.evaluate(t.pipeline.model, media, src_train, src_test, freeze_encoder=True, **common)
    probe = linear_probe.evaluate(
        t.embed(train), train.items.labels, t.embed(test), test.items.labels, seed=r.seed
    )
    m = {k: v for k, v in full.items()}
    m.update({f"frozen_dfe_head_only/{k}": v for k, v in head.items()})
    m.update({f"linear_probe/{k}": v for k, v in probe.items() if not isinstance(v, (dict, list))})
    m.update(n_train=len(train), n_test=len(test))
    return m, []


def task_geometry(t: EvalTarget, r: EvalRequest, plots_dir: Path) -> tuple[dict, list[str]]:
    from lightcrl.app import plots
    from lightcrl.metrics import geometry

    media_emb, text_emb, text_to_media, (ms, ts) = _pair_embeddings(t, r)
    a, b = media_emb[text_to_media], text_emb
    m = geometry.evaluate(a, b, seed=r.seed)
    # how much of each frozen encoder's neighbourhood structure the shared space keeps, per modality
    k = int(r.options.get("knn", 10))
    media_ids = set(ms.items.ids)
    keep = np.array([g in media_ids for g in ts.items.groups])
    m[f"knn_overlap_a@{k}"] = geometry.knn_overlap(raw_pooled(ms), media_emb, k, seed=r.seed)
    m[f"knn_overlap_b@{k}"] = geometry.knn_overlap(raw_pooled(ts)[keep], text_emb, k, seed=r.seed)
    png = plots_dir / f"{r.options.get('_stem', _slug(r))}-geometry.png"
    plots.cosine_histogram(a, b, png, title=f"matched vs unmatched cosine, {r.data}")
    return m, [png]


def task_sts(t: EvalTarget, r: EvalRequest, plots_dir: Path) -> tuple[dict, list[str]]:
    """Cosine of sentence embeddings vs gold scores; the sentences' features come from the store cache."""
    from lightcrl.metrics import sts

    sets = _sts_sets(r)
    store = _store(t, "text", r.data, r.split, r.limit, r.seed, r.device)
    embeddings = {"raw_encoder": raw_pooled(store)}
    if t.pipeline is not None:
        embeddings["dfe"] = t.embed(store)
    m: dict[str, Any] = {}
    for name, emb in embeddings.items():
        res = sts.evaluate_sets(_sts_pair_embeddings(store, sets, emb))
        m.update({f"{name}/{k}": v for k, v in res.items()})
    head = "dfe" if t.pipeline is not None else "raw_encoder"  # the trained path when there is one
    m["spearman"] = m[f"{head}/spearman"]
    if len(sets) > 1:  # one headline row per set (STS year, STS-B), their mean above
        m.update({f"{s}/spearman": m[f"{head}/{s}/spearman"] for s in sets})
    return m, []


def _sts_sets(r: EvalRequest):
    """The pairs of the request, sampled exactly as the store's sentences were (StsDataset.subsample)."""
    from lightcrl.data.datasets import open_dataset
    from lightcrl.data.sts import StsDataset

    ds = open_dataset(r.data, r.split)
    if not isinstance(ds, StsDataset):
        raise LightCRLError(f"sts data must be stsb:DIR, sick:FILE or senteval:DIR (got {r.data!r})")
    return (ds.subsample(r.limit, seed=r.seed) if r.limit else ds).sets


def _sts_pair_embeddings(store: FeatureStore, sets, emb: np.ndarray) -> dict:
    """{set: {subset: (emb1, emb2, gold)}}; a pair whose sentence the encoder skipped is left out."""
    from lightcrl.data.sts import pair_rows

    row_of = {rid: k for k, rid in enumerate(store.items.ids)}
    out: dict = {}
    for set_name, subsets in sets.items():
        out[set_name] = {}
        for subset, pairs in subsets.items():
            rows1, rows2, kept = pair_rows(row_of, pairs)
            if len(kept) < len(pairs.gold):
                log.warning("%s/%s: %d pair(s) left out (sentence skipped by the encoder)",
                            set_name, subset, len(pairs.gold) - len(kept))
            out[set_name][subset] = (emb[rows1], emb[rows2], pairs.gold[kept])
    return out


_SHARED_SPACE = frozenset({"lightcrl", "asif", "csa", "convirt"})
_RETRIEVAL = tuple(f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10))

#: Every evaluation task, declared once (see :class:`lightcrl.app.tasks.Task`).
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("zeroshot", task_zeroshot, "zero-shot classification: class-name prompts against media embeddings",
         headline="top1", higher_is_better=True, printed=("top1", "top5", "mean_per_class_recall", "chance"),
         columns=("top1", "top2", "top3", "top4", "top5"), run_kinds=_SHARED_SPACE),
    Task("retrieval", task_retrieval, "text->media and media->text retrieval of paired captions",
         headline="image_retrieval_recall@1", higher_is_better=True,
         printed=(*_RETRIEVAL, "class_precision@1", "class_precision@5", "class_map"),
         columns=_RETRIEVAL, run_kinds=_SHARED_SPACE),
    Task("linear_probe", task_linear_probe, "logistic regression on frozen embeddings (C chosen on train)",
         headline="top1", higher_is_better=True, printed=("top1", "raw_encoder/top1", "C"), columns=("top1",),
         run_kinds=_SHARED_SPACE | {"raw"}),
    Task("finetune", task_finetune, "the trained model fine-tuned with a linear head on labelled features",
         headline="top1", higher_is_better=True,
         printed=("top1", "frozen_dfe_head_only/top1", "linear_probe/top1"), columns=("top1",),
         run_kinds=frozenset({"lightcrl"})),
    Task("geometry", task_geometry, "alignment, uniformity and modality gap of paired embeddings",
         headline="alignment", higher_is_better=False,
         printed=("alignment", "uniformity_a", "uniformity_b", "modality_gap", "matched_cosine_mean",
                  "unmatched_cosine_mean", "knn_overlap_a@10", "knn_overlap_b@10"),
         columns=("alignment", "uniformity_a", "uniformity_b", "modality_gap"), run_kinds=_SHARED_SPACE),
    Task("sts", task_sts, "semantic textual similarity: Spearman of cosine vs gold scores",
         headline="spearman", higher_is_better=True,
         printed=("spearman", *(f"{s}/spearman" for s in SENTEVAL_SETS), "raw_encoder/spearman",
                  "dfe/spearman"),
         columns=("spearman",), run_kinds=_SHARED_SPACE | {"raw"}),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise LightCRLError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]


def _slug(r: EvalRequest) -> str:
    """kind-name-split[-nLIMIT]: two datasets of one kind (cifar10, tinyimagenet folders) never collide."""
    import re

    kind, _, path = r.data.partition(":")
    name = Path(path.split("?", 1)[0].rstrip("/")).name.replace(".", "_") if path else ""
    parts = [kind] + ([name] if name and name != kind else []) + [r.split or "default"]
    slug = "-".join(re.sub(r"[^A-Za-z0-9_]+", "_", p) for p in parts)
    return slug + (f"-n{r.limit}" if r.limit else "")


def default_output(target: EvalTarget, r: EvalRequest) -> Path:
    base = RunDir(target.run_dir).results if target.run_dir is not None else Path(RESULTS)
    prefix = "untrained-" if target.kind == "untrained" else ("raw-" if target.kind == "raw" else "")
    return base / f"{prefix}{r.task}-{_slug(r)}.json"


def run_eval(target: EvalTarget, r: EvalRequest) -> dict:
    task = get_task(r.task)
    if not task.applies_to(target.run_kind):
        raise LightCRLError(f"task {task.name} does not apply to a {target.run_kind} run "
                            f"(it applies to: {', '.join(sorted(task.run_kinds))})")
    out = Path(r.output) if r.output else default_output(target, r)
    plots_dir = out.parent / "plots"
    r.options.setdefault("_stem", out.stem)  # plots named after their results file: no collisions
    t0 = time.time()
    metrics, pngs = task.run(target, r, plots_dir)
    result = {
        "task": r.task,
        "dataset": r.data,
        "split": r.split,
        "limit": r.limit,
        "model": target.identity,
        "metrics": metrics,
        "plots": [_rel(p, target.run_dir) for p in pngs],
        "seconds": round(time.time() - t0, 2),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "lightcrl_version": __version__,
    }
    write_json(out, result)
    result["output"] = str(out)
    return result


def _rel(p: Path, base: Path | None) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path(base).resolve())) if base else str(p)
    except ValueError:
        return str(p)


def headline(result: dict) -> dict:
    """What ``lightcrl eval`` prints of a result: the task's declared metrics."""
    return get_task(result["task"]).printed_metrics(result["metrics"])
