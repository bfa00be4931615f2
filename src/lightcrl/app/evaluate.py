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
import torch

from lightcrl.api import LightCRLPipeline
from lightcrl.data.sts import SENTEVAL_SETS
from lightcrl.embed import EmbedOptions, cached_store
from lightcrl.errors import LightCRLError
from lightcrl.io import write_json
from lightcrl.store import FeatureStore
from lightcrl.version import __version__

log = logging.getLogger(__name__)
TASKS = ("zeroshot", "retrieval", "linear_probe", "finetune", "geometry", "sts")


@dataclass
class EvalTarget:
    """What is evaluated: a trained run, the same architecture untrained, or the raw frozen encoders."""

    kind: str  # "run" | "untrained" | "raw"
    pipeline: LightCRLPipeline | None
    encoders: dict[str, str]
    identity: dict
    run_dir: Path | None = None

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
        if run == "raw":
            enc = {"image": image_encoder, "text": text_encoder, "audio": audio_encoder}
            return cls("raw", None, enc, {"kind": "raw", "encoders": enc})
        run_dir = Path(run)
        baseline = _baseline_kind(run_dir)
        if baseline is not None:  # training-free / end-to-end baselines have their own pipelines
            if untrained:
                raise LightCRLError(f"--untrained applies to DFE runs, not to a {baseline} baseline")
            if baseline == "asif":
                from lightcrl.baselines.asif import ASIFPipeline as Pipe
            else:
                from lightcrl.baselines.convirt import ConVIRTPipeline as Pipe
            pipe = Pipe.from_run(run_dir, device=device)
            ident = {
                "kind": baseline,
                "run": str(run_dir),
                "name": run_dir.name,
                "encoders": pipe.encoder_names,
                "arch": baseline,
            }
            return cls("run", pipe, pipe.encoder_names, ident, run_dir)
        pipe = LightCRLPipeline.from_run(run_dir, device=device, untrained=untrained)
        info = pipe.info
        ident = {
            "kind": "untrained" if untrained else "run",
            "run": str(run_dir),
            "name": run_dir.name,
            "encoders": pipe.encoder_names,
            "arch": info["model_config"].get("arch"),
            "fusion": info["model_config"].get("fusion"),
            "trainable_params": info.get("parameter_counts", {}).get("total_trainable"),
            "checkpoint": info.get("checkpoint"),
            "epoch": info.get("epoch"),
        }
        return cls(ident["kind"], pipe, pipe.encoder_names, ident, run_dir)

    def require_shared_space(self, task: str):
        if self.pipeline is None:
            raise LightCRLError(
                f"task {task} compares modalities in a shared space: raw encoders have none "
                "(evaluate a run, or --untrained for the untrained model)"
            )

    def embed(self, store: FeatureStore) -> np.ndarray:
        """DFE embeddings of a store, or the raw encoder's pooled vectors for the raw target."""
        if self.pipeline is None:
            return raw_pooled(store)
        return self.pipeline.encode_store(store)


def raw_pooled(store: FeatureStore) -> np.ndarray:
    """The frozen encoder's own pooled vectors, L2-normalised: the reference for every comparison."""
    x = store.pooled()
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def _baseline_kind(run_dir: Path) -> str | None:
    from lightcrl.io import read_json

    path = run_dir / "model.json"
    if not path.exists():
        return None
    kind = read_json(path).get("kind")
    return kind if kind in ("asif", "convirt") else None


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
    from lightcrl.metrics import zeroshot

    t.require_shared_space("zeroshot")
    from lightcrl.data.datasets import open_dataset

    media = open_dataset(r.data, r.split).media
    store = _store(t, media, r.data, r.split, r.limit, r.seed, r.device)
    classnames = r.options.get("classnames") or store.classnames
    templates = r.options.get("templates") or store.templates or ["a photo of a {c}."]
    if not classnames:
        raise LightCRLError(f"{r.data} has no class names: pass --classnames")
    class_emb = zeroshot.build_classifier(
        lambda texts: t.pipeline.encode_text(texts, progress=False), classnames, templates
    )
    m = zeroshot.evaluate(t.embed(store), store.items.labels, class_emb, classnames)
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

    t.require_shared_space("retrieval")
    media_emb, text_emb, text_to_media, (ms, ts) = _pair_embeddings(t, r)
    metrics = retrieval.evaluate(media_emb, text_emb, text_to_media)
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
    """A labelled feature store as the FeatureSource that fine-tuning reads."""

    def __init__(self, store: FeatureStore, input_mode: str = "tokens"):
        self.store, self.input_mode = store, input_mode
        self.labels = store.items.labels

    def __len__(self):
        return len(self.store)

    def batch(self, indices):
        if self.input_mode == "pooled":
            x = torch.from_numpy(self.store.pooled(indices)).float().unsqueeze(1)
            return x, torch.ones(x.shape[:2], dtype=torch.bool)
        return self.store.batch(indices)


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

    t.require_shared_space("finetune")
    if not hasattr(getattr(t.pipeline, "model", None), "encode"):
        raise LightCRLError(f"finetune needs a trainable model; {t.identity.get('arch')} has none")
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
    src_train, src_test = StoreSource(train, t.pipeline.input), StoreSource(test, t.pipeline.input)
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

    t.require_shared_space("geometry")
    media_emb, text_emb, text_to_media, _ = _pair_embeddings(t, r)
    a, b = media_emb[text_to_media], text_emb
    m = geometry.evaluate(a, b, seed=r.seed)
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


_TASK_FUNCS = {
    "zeroshot": task_zeroshot,
    "retrieval": task_retrieval,
    "linear_probe": task_linear_probe,
    "finetune": task_finetune,
    "geometry": task_geometry,
    "sts": task_sts,
}


def _slug(r: EvalRequest) -> str:
    """kind-name-split[-nLIMIT]: two datasets of one kind (cifar10, tinyimagenet folders) never collide."""
    import re

    kind, _, path = r.data.partition(":")
    name = Path(path.split("?", 1)[0].rstrip("/")).name.replace(".", "_") if path else ""
    parts = [kind] + ([name] if name and name != kind else []) + [r.split or "default"]
    slug = "-".join(re.sub(r"[^A-Za-z0-9_]+", "_", p) for p in parts)
    return slug + (f"-n{r.limit}" if r.limit else "")


def default_output(target: EvalTarget, r: EvalRequest) -> Path:
    base = target.run_dir / "results" if target.run_dir is not None else Path("results")
    prefix = "untrained-" if target.kind == "untrained" else ("raw-" if target.kind == "raw" else "")
    return base / f"{prefix}{r.task}-{_slug(r)}.json"


def run_eval(target: EvalTarget, r: EvalRequest) -> dict:
    if r.task not in _TASK_FUNCS:
        raise LightCRLError(f"unknown task {r.task!r}; tasks: {', '.join(TASKS)}")
    out = Path(r.output) if r.output else default_output(target, r)
    plots_dir = out.parent / "plots"
    r.options.setdefault("_stem", out.stem)  # plots named after their results file: no collisions
    t0 = time.time()
    metrics, pngs = _TASK_FUNCS[r.task](target, r, plots_dir)
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


HEADLINE = {
    "zeroshot": ["top1", "top5", "mean_per_class_recall", "chance"],
    "retrieval": [
        "image_retrieval_recall@1",
        "image_retrieval_recall@5",
        "image_retrieval_recall@10",
        "text_retrieval_recall@1",
        "text_retrieval_recall@5",
        "text_retrieval_recall@10",
        "class_precision@1",
        "class_precision@5",
        "class_map",
    ],
    "linear_probe": ["top1", "raw_encoder/top1", "C"],
    "finetune": ["top1", "frozen_dfe_head_only/top1", "linear_probe/top1"],
    "geometry": [
        "alignment",
        "uniformity_a",
        "uniformity_b",
        "modality_gap",
        "matched_cosine_mean",
        "unmatched_cosine_mean",
    ],
    "sts": ["spearman", *(f"{s}/spearman" for s in SENTEVAL_SETS), "raw_encoder/spearman", "dfe/spearman"],
}


def headline(result: dict) -> dict:
    m = result["metrics"]
    keys = HEADLINE.get(result["task"], [])
    shown = {k: m[k] for k in keys if k in m}
    shown.update({k: v for k, v in m.items() if k.startswith("acc@epoch") and isinstance(v, (int, float))})
    return shown
