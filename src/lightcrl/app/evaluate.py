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
from lightcrl.embed import EmbedOptions, cached_store
from lightcrl.encoders import get_encoder
from lightcrl.errors import LightCRLError
from lightcrl.features import FeatureAdapter
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

    t.require_shared_space("geometry")
    media_emb, text_emb, text_to_media, _ = _pair_embeddings(t, r)
    a, b = media_emb[text_to_media], text_emb
    m = geometry.evaluate(a, b, seed=r.seed)
    png = plots_dir / f"{r.options.get('_stem', _slug(r))}-geometry.png"
    plots.cosine_histogram(a, b, png, title=f"matched vs unmatched cosine, {r.data}")
    return m, [png]


def _load_sts(spec: str, split: str | None):
    from lightcrl.metrics import sts

    kind, _, path = spec.partition(":")
    if kind in ("stsb", "stsbenchmark"):
        s1, s2, g = sts.load_sts_benchmark(path, split or "test")
        return {"stsb": (s1, s2, g)}
    if kind == "sick":
        return {"sick": sts.load_sick(path, split)}
    if kind in ("senteval", "senteval-sts"):
        return sts.load_senteval_sts(path)
    raise LightCRLError(f"sts data must be stsb:DIR, sick:FILE or senteval:DIR (got {spec!r})")


def task_sts(t: EvalTarget, r: EvalRequest, plots_dir: Path) -> tuple[dict, list[str]]:
    from lightcrl.metrics import sts

    subsets = _load_sts(r.data, r.split)
    if r.limit:
        rng = np.random.default_rng(r.seed)
        subsets = {k: _take(v, rng, r.limit) for k, v in subsets.items()}
    m: dict[str, Any] = {}
    encoders = {"raw_encoder": None} if t.pipeline is None else {"raw_encoder": None, "dfe": t.pipeline}
    for name, pipe in encoders.items():
        per = {}
        for sub, (s1, s2, g) in subsets.items():
            e1, e2 = _encode_sentences(t, pipe, s1), _encode_sentences(t, pipe, s2)
            per[sub] = (e1, e2, g)
        if len(per) == 1:
            ((e1, e2, g),) = per.values()
            res = sts.evaluate(e1, e2, g)
        else:
            res = sts.evaluate_many(per)
        m.update({f"{name}/{k}": v for k, v in res.items()})
    # headline: the trained path when there is one
    m["spearman"] = m.get("dfe/spearman", m.get("raw_encoder/spearman", m.get("dfe/all/spearman")))
    return m, []


def _take(pairs, rng, n):
    s1, s2, g = pairs
    if n >= len(g):
        return pairs
    idx = np.sort(rng.choice(len(g), n, replace=False))
    return [s1[i] for i in idx], [s2[i] for i in idx], g[idx]


def _encode_sentences(t: EvalTarget, pipe: LightCRLPipeline | None, sentences: list[str]) -> np.ndarray:
    if pipe is not None:
        return pipe.encode_text(sentences, progress=False)
    enc = get_encoder(t.encoders["text"])
    out = []
    for s in range(0, len(sentences), 256):
        o = enc.encode(sentences[s : s + 256])
        out.append(o.pooled.cpu().numpy())
    return np.concatenate(out)


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
    "sts": ["spearman", "raw_encoder/spearman", "dfe/spearman"],
}


def headline(result: dict) -> dict:
    m = result["metrics"]
    keys = HEADLINE.get(result["task"], [])
    shown = {k: m[k] for k in keys if k in m}
    shown.update({k: v for k, v in m.items() if k.startswith("acc@epoch") and isinstance(v, (int, float))})
    return shown
