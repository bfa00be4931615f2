"""`lightcrl quickstart`: the whole pipeline in a few minutes on a laptop CPU, with no download.

data (synthetic coloured shapes, or a real pairs dataset) -> frozen-encoder feature stores (cached) ->
train the default DFE -> zero-shot classification (held-out colour x shape combos) and retrieval ->
report. ``OUT`` is a normal run directory (``lightcrl.load(OUT)``, ``lightcrl search --run OUT`` work)
that also holds ``summary.json`` (headline numbers and wall times) and ``report.html``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lightcrl import rundir
from lightcrl.app.config import TrainConfig, validate_config
from lightcrl.data.datasets import Dataset, open_dataset
from lightcrl.data.synthetic import SyntheticData, SyntheticSpec, generate
from lightcrl.errors import LightCRLError
from lightcrl.io import read_json, write_json, write_text
from lightcrl.paths import cache_dir

log = logging.getLogger(__name__)

IMAGE_ENCODER = "efficientnet-lite0"
TEXT_ENCODER = "minilm-l6"
#: Defaults of a real-data quickstart (items sampled from each split): minutes on 2 CPU cores.
REAL_TRAIN_LIMIT = 1000
REAL_VAL_LIMIT = 200
REAL_EVAL_LIMIT = 500
#: A dataset that is one split (a csv file): the share of its images held out for evaluation.
HELD_OUT_FRACTION = 0.2
QUICKSTART_MODEL = {"arch": "dfe", "width": 128, "heads": 4, "ffn_dim": 512}


@dataclass
class QuickstartOptions:
    """What to run; the defaults are the no-argument command."""

    out: Path = Path("runs/quickstart")
    data: str | None = None  # a pairs dataset spec (flickr8k:DIR, coco:DIR...); None: synthetic shapes
    zeroshot: str | None = None  # a classification spec (imagefolder:DIR...) evaluated zero-shot
    limit: int | None = None  # training images: rendered (synthetic) or sampled (real data)
    eval_limit: int | None = None  # real data: sample of each evaluation split
    epochs: int | None = None  # default: 20 on synthetic data, 10 on real data
    batch_size: int = 64
    lr: float = 1e-3
    # ModelConfig fields over its defaults (DFE, depth 1, additive context fusion, mean pooling):
    # narrower than the default width 256, so training takes about a minute on two busy CPU cores.
    model: dict[str, Any] = field(default_factory=lambda: dict(QUICKSTART_MODEL))
    synthetic: SyntheticSpec | None = None  # sizes of the synthetic dataset (``limit`` sets n_train)
    data_dir: Path | None = None  # where to render it (default: the cache, so reruns reuse the features)
    untrained_baseline: bool = True  # also zero-shot the untrained model (the chance-level reference)
    device: str = "auto"
    seed: int = 0
    progress: bool = True
    tensorboard: bool = False
    threads: int | None = None  # torch CPU threads; None: the cores other processes leave free


@dataclass
class _Eval:
    name: str  # short name used in results file names and summary keys
    task: str
    spec: str
    split: str | None
    limit: int | None


@dataclass
class _Plan:
    train_spec: str
    train_split: str
    val_split: str | None
    train_limit: int | None
    val_limit: int | None
    evals: list[_Eval]
    synthetic: SyntheticData | None = None
    notes: list[str] = field(default_factory=list)


# -- planning --------------------------------------------------------------------------------------------
def _available_splits(spec: str, candidates: tuple[str, ...]) -> list[str]:
    """The splits of ``spec`` that open: its default one first, then those of ``candidates``.

    A dataset with none raises why (a missing folder...), as ``lightcrl eval`` on it would.
    """
    found: list[str] = []
    first_error: LightCRLError | None = None
    for s in (None, *candidates):
        try:
            split = open_dataset(spec, s).split
        except LightCRLError as e:
            first_error = first_error or e
            continue
        if split not in found:
            found.append(split)
    if not found and first_error is not None:
        raise first_error
    return found


def _hold_out(ds: Dataset, n_test: int, seed: int) -> tuple[str, str]:
    """A one-split image-caption dataset (a csv file) as two csv files of disjoint images: (train, test).

    Quickstart evaluates retrieval on images it did not train on; the files are written once per
    dataset content, held-out size and seed (in the cache, like the synthetic data).
    """
    media = ds.media_records()
    if ds.task != "pairs" or ds.media != "image" or any("::" in (r.path or "") for r in media):
        raise LightCRLError(f"{ds.spec} has only the split {ds.split!r} and quickstart cannot hold images "
                            "of it out for evaluation: give an image-caption dataset with a train split")
    captions: dict[str, list[str]] = {}
    for t in ds.text_records():
        captions.setdefault(t.group, []).append(t.text or "")
    order = torch.randperm(len(media), generator=torch.Generator().manual_seed(seed)).tolist()
    test = {media[i].id for i in order[:n_test]}
    folder = cache_dir() / "quickstart" / f"{_short(ds.spec)}-{ds.fingerprint()[:12]}-{n_test}-{seed}"
    specs = []
    for name, keep in (("train", lambda r: r.id not in test), ("test", lambda r: r.id in test)):
        buf = io.StringIO()
        rows = csv.writer(buf, lineterminator="\n")
        rows.writerow(["filepath", "title"])
        for r in filter(keep, media):
            rows.writerows([os.path.abspath(str(r.path)), c] for c in captions.get(r.id, []))
        if not (folder / f"{name}.csv").is_file():
            write_text(folder / f"{name}.csv", buf.getvalue())
        specs.append(f"csv:{folder / f'{name}.csv'}")
    return specs[0], specs[1]


def _plan(opts: QuickstartOptions) -> _Plan:
    evals: list[_Eval] = []
    if opts.data is None:
        spec = replace(opts.synthetic or SyntheticSpec())
        if opts.limit:
            spec.n_train = opts.limit
        syn = generate(opts.data_dir or synthetic_dir(spec), spec)
        evals.append(_Eval("shapes-unseen", "zeroshot", syn.zeroshot_spec, "test", None))
        if syn.seen_spec:
            evals.append(_Eval("shapes-seen", "zeroshot", syn.seen_spec, "test", None))
        if spec.n_test:
            evals.append(_Eval("shapes-test", "retrieval", syn.pairs_spec, "test", None))
        plan = _Plan(syn.pairs_spec, "train", "dev" if spec.n_dev else None, None, None, evals, syn)
    else:
        splits = _available_splits(opts.data, ("train", "dev", "val", "test"))
        if "train" not in splits and len(splits) > 1:
            raise LightCRLError(f"{opts.data} has no 'train' split (found: {', '.join(splits)})")
        if "train" not in splits:  # one split only (a csv file): hold some of its images out
            plan = _held_out_plan(opts, splits[0], evals)
        else:
            plan = _train_split_plan(opts, splits, evals)
    if opts.zeroshot:
        split = open_dataset(opts.zeroshot).split  # named in its results, as the default one
        evals.insert(0 if opts.data else len(evals),
                     _Eval(_short(opts.zeroshot), "zeroshot", opts.zeroshot, split,
                           opts.eval_limit or REAL_EVAL_LIMIT))
    return plan


def _train_split_plan(opts: QuickstartOptions, splits: list[str], evals: list[_Eval]) -> _Plan:
    """Train on a sample of the train split, pick the checkpoint on dev/val, evaluate on test."""
    val = next((s for s in ("dev", "val") if s in splits), None)
    test = "test" if "test" in splits else val
    eval_limit = opts.eval_limit or REAL_EVAL_LIMIT
    plan = _Plan(opts.data, "train", val, opts.limit or REAL_TRAIN_LIMIT, REAL_VAL_LIMIT, evals)
    if test is not None:
        evals.append(_Eval(f"{_short(opts.data)}-{test}", "retrieval", opts.data, test, eval_limit))
        if test == val:
            plan.notes.append(f"no test split: retrieval is measured on a {eval_limit}-image sample "
                              f"of {val}, whose {REAL_VAL_LIMIT}-image sample also picks the checkpoint")
    return plan


def _held_out_plan(opts: QuickstartOptions, split: str, evals: list[_Eval]) -> _Plan:
    """Train on most images of a one-split dataset, evaluate retrieval on the rest."""
    ds = open_dataset(opts.data, split)
    n_images = len(ds)
    if n_images < 2:
        raise LightCRLError(f"{opts.data} has {n_images} usable image(s): quickstart needs at least 2")
    n_test = max(1, min(opts.eval_limit or REAL_EVAL_LIMIT, round(n_images * HELD_OUT_FRACTION)))
    train_spec, test_spec = _hold_out(ds, n_test, opts.seed)
    evals.append(_Eval(f"{_short(opts.data)}-held-out", "retrieval", test_spec, "all", None))
    plan = _Plan(train_spec, "all", None, opts.limit or REAL_TRAIN_LIMIT, None, evals)
    plan.notes.append(f"{opts.data} has one split ({split}): retrieval is measured on {n_test} of its "
                      f"{n_images} images, held out of training; no validation split, the last epoch is kept")
    return plan


def synthetic_dir(spec: SyntheticSpec) -> Path:
    """Cache folder of a synthetic dataset: equal specs share files, hence feature stores too."""
    key = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "synthetic" / f"shapes-{key}"


def _short(spec: str) -> str:
    kind, _, path = spec.partition(":")
    name = Path(path.split("?", 1)[0]).name or kind
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)


def build_config(opts: QuickstartOptions, plan: _Plan) -> TrainConfig:
    """The run's config: a small DFE (ModelConfig defaults + ``opts.model``) on one pairs source."""
    epochs = opts.epochs or (20 if plan.synthetic else 10)
    raw = {
        "name": "quickstart",
        "seed": opts.seed,
        "device": opts.device,
        "data": {
            "sources": [{
                "spec": plan.train_spec, "split": plan.train_split, "val_split": plan.val_split,
                "media_encoder": IMAGE_ENCODER, "text_encoder": TEXT_ENCODER,
                "limit": plan.train_limit, "val_limit": plan.val_limit,
            }],
            "input": "tokens",
            "pairs": "random_caption",
        },
        "model": {"arch": "dfe", **opts.model},
        "loss": {"lightcrl": 1.0},
        "optim": {"epochs": epochs, "batch_size": opts.batch_size, "lr": opts.lr, "warmup_steps": 20},
        "early_stop": {"metric": "val/mean_recall@1"},  # only computed when there is a val split
        "eval_every": 1,
        "tensorboard": opts.tensorboard,
        "progress": opts.progress,
    }
    return validate_config(raw, source="quickstart config")


# -- stages ----------------------------------------------------------------------------------------------
def _check_out(out: Path) -> None:
    """Refuse to reuse a non-empty folder that is not an earlier quickstart (its results get replaced)."""
    if not out.exists() or not any(out.iterdir()):
        return
    ok = False
    try:
        if (out / "summary.json").is_file():
            ok = read_json(out / "summary.json").get("kind") == "lightcrl-quickstart"
        elif (out / rundir.CONFIG).is_file():  # an interrupted quickstart: no summary yet
            import yaml

            ok = (yaml.safe_load((out / rundir.CONFIG).read_text()) or {}).get("name") == "quickstart"
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise LightCRLError(f"{out} exists and is not a quickstart output: choose another --out")


def _embed_all(cfg: TrainConfig, plan: _Plan, device: str, progress: bool) -> dict[str, int]:
    """Build every feature store up front (through the cache) so the stage timings are separable."""
    from lightcrl.data.datasets import open_dataset
    from lightcrl.embed import EmbedOptions, cached_store

    src = cfg.data.sources[0]
    jobs = [(src.media_encoder, src.spec, src.split, src.limit),
            (src.text_encoder, src.spec, src.split, src.limit)]
    if src.val_split:
        jobs += [(src.media_encoder, src.spec, src.val_split, src.val_limit),
                 (src.text_encoder, src.spec, src.val_split, src.val_limit)]
    for e in plan.evals:
        media = open_dataset(e.spec, e.split).media
        jobs.append((src.media_encoder if media == "image" else media, e.spec, e.split, e.limit))
        if e.task == "retrieval":
            jobs.append((src.text_encoder, e.spec, e.split, e.limit))
    counts: dict[str, int] = {}
    for enc, spec, split, limit in jobs:
        store = cached_store(enc, spec, split, EmbedOptions(limit=limit, seed=cfg.seed, device=device,
                                                            progress=progress))
        counts[f"{enc}:{_short(spec)}:{store.manifest['dataset']['split']}"] = len(store)
    return counts


def _run_eval(target, e: _Eval, results_dir: Path, prefix: str, seed: int, device: str) -> dict:
    """One evaluation with a unique results file; its plots renamed after that file (they collide else)."""
    from lightcrl.app.evaluate import EvalRequest, run_eval

    out = results_dir / f"{prefix}{e.task}-{e.name}.json"
    res = run_eval(target, EvalRequest(e.task, e.spec, e.split, e.limit, seed, device, out, {}))
    if res.get("plots"):
        renamed = []
        for rel in res["plots"]:
            src = Path(rel) if Path(rel).is_absolute() else results_dir.parent / rel
            dst = src.with_name(f"{out.stem}-{src.name}")
            if src.is_file():
                os.replace(src, dst)
                rel = str(Path(rel).with_name(dst.name))
            renamed.append(rel)
        res["plots"] = renamed
        write_json(out, {k: v for k, v in res.items() if k != "output"})
    return res


def auto_threads() -> int:
    """CPU threads worth using now: the cores that other running processes leave idle, at least one.

    On a shared machine, more threads than free cores is much slower than fewer: with the two cores of
    a busy box, one thread embedded 3x faster and trained 4x faster than two (OpenMP threads spin
    waiting for each other while the scheduler runs someone else).
    """
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), cores, int(cores - busy + 0.5)))


@contextlib.contextmanager
def cpu_threads(threads: int | None, device: str = "auto") -> Iterator[int]:
    """Run the block with ``threads`` torch CPU threads (None: :func:`auto_threads` on CPU); restore after."""
    previous = torch.get_num_threads()
    n = threads or (auto_threads() if _device(device).type == "cpu" else previous)
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)


def quickstart(opts: QuickstartOptions | None = None) -> dict:
    """Run the whole pipeline into ``opts.out``; returns (and writes to OUT/summary.json) the summary."""
    opts = opts or QuickstartOptions()
    _check_out(Path(opts.out))
    with cpu_threads(opts.threads, opts.device):
        return _quickstart(opts)


def _quickstart(opts: QuickstartOptions) -> dict:
    from lightcrl.app.evaluate import EvalTarget
    from lightcrl.app.report import build_report
    from lightcrl.app.train import train

    out = Path(opts.out)
    t_start = time.time()
    times: dict[str, float] = {}

    t = time.time()
    plan = _plan(opts)
    cfg = build_config(opts, plan)
    times["data_s"] = time.time() - t

    t = time.time()
    store_counts = _embed_all(cfg, plan, opts.device, opts.progress)
    times["embed_s"] = time.time() - t

    t = time.time()
    out.mkdir(parents=True, exist_ok=True)
    for stale in (rundir.RESULTS, "report_files"):  # results of an earlier quickstart in OUT
        shutil.rmtree(out / stale, ignore_errors=True)
    train_summary = train(cfg, out, overwrite=True)
    times["train_s"] = time.time() - t

    t = time.time()
    results_dir = out / rundir.RESULTS
    target = EvalTarget.resolve(str(out), device=opts.device)
    results = {e.name: _run_eval(target, e, results_dir, "", opts.seed, opts.device) for e in plan.evals}
    untrained = None
    first_zs = next((e for e in plan.evals if e.task == "zeroshot"), None)
    if opts.untrained_baseline and first_zs is not None:
        ut = EvalTarget.resolve(str(out), untrained=True, device=opts.device)
        untrained = _run_eval(ut, first_zs, results_dir, "untrained-", opts.seed, opts.device)
    times["eval_s"] = time.time() - t

    t = time.time()
    _, html_path = build_report(out)
    times["report_s"] = time.time() - t
    times["wall_time_s"] = time.time() - t_start

    summary = _summary(opts, plan, cfg, train_summary, results, untrained, store_counts, times, html_path)
    write_json(out / "summary.json", summary)
    return summary


def _summary(opts, plan: _Plan, cfg: TrainConfig, train_summary: dict, results: dict[str, dict],
             untrained: dict | None, store_counts: dict, times: dict, html_path: Path) -> dict:
    zs = {n: r for n, r in results.items() if r["task"] == "zeroshot"}
    head = next(iter(zs.values()), None)
    keep_zs = ("top1", "top5", "mean_per_class_recall", "chance", "n")
    retrieval_keys = ("image_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@1",
                      "text_retrieval_recall@5")
    summary: dict[str, Any] = {
        "kind": "lightcrl-quickstart",
        "data": opts.data or "synthetic shapes",
        "zeroshot_dataset": next(iter(zs), None),
        "zeroshot_top1": head["metrics"]["top1"] if head else None,
        "chance": head["metrics"]["chance"] if head else None,
        "zeroshot_top1_untrained": untrained["metrics"]["top1"] if untrained else None,
        "zeroshot": {n: {k: r["metrics"][k] for k in keep_zs if k in r["metrics"]} for n, r in zs.items()},
        "retrieval": {n: {k: r["metrics"].get(k) for k in retrieval_keys} for n, r in results.items()
                      if r["task"] == "retrieval"},
        "train": train_summary,
        "wall_time_s": round(times["wall_time_s"], 1),
        "timings_s": {k: round(v, 1) for k, v in times.items() if k != "wall_time_s"},
        "stores": store_counts,
        "model": dict(cfg.model),
        "epochs": cfg.optim.epochs,
        "device": str(_device(opts.device)),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "run_dir": str(Path(opts.out)),
        "report": str(html_path),
        "results": sorted(str(Path(r["output"]).name) for r in [*results.values(), *([untrained] if untrained
                                                                                     else [])]),
        "notes": plan.notes,
    }
    if plan.synthetic is not None:
        summary["held_out"] = [" ".join(c) for c in plan.synthetic.held_out]
        summary["synthetic_counts"] = plan.synthetic.counts
        summary["synthetic_data"] = str(plan.synthetic.root)
    return json.loads(json.dumps(summary, default=str))


def _device(name: str):
    from lightcrl.devices import resolve_device

    return resolve_device(name)


def headline_lines(summary: dict) -> list[str]:
    """Human-readable lines for the terminal."""
    lines = []
    if summary.get("zeroshot_top1") is not None:
        ut = summary.get("zeroshot_top1_untrained")
        lines.append(f"zero-shot top-1 on {summary['zeroshot_dataset']}: {summary['zeroshot_top1']:.1f}% "
                     f"(chance {summary['chance']:.1f}%"
                     + (f", untrained model {ut:.1f}%)" if ut is not None else ")"))
    for name, z in summary.get("zeroshot", {}).items():
        if name != summary.get("zeroshot_dataset"):
            lines.append(f"zero-shot top-1 on {name}: {z['top1']:.1f}% (chance {z['chance']:.1f}%)")
    for name, r in summary.get("retrieval", {}).items():
        lines.append(f"retrieval on {name}: image R@1 {r['image_retrieval_recall@1']:.1f}%, "
                     f"R@5 {r['image_retrieval_recall@5']:.1f}%; "
                     f"text R@1 {r['text_retrieval_recall@1']:.1f}%")
    tm = summary["timings_s"]
    lines.append(f"wall time {summary['wall_time_s']:.0f} s (embed {tm['embed_s']:.0f} s, train "
                 f"{tm['train_s']:.0f} s, eval {tm['eval_s']:.0f} s, report {tm['report_s']:.0f} s) "
                 f"on {summary['device']}")
    lines += [f"note: {n}" for n in summary.get("notes", [])]
    return lines
