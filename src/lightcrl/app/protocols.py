"""Evaluation protocols for sources whose captions are made from class names (``captions: templates``).

Three protocols, named as in docs/audio.md; each says which classes the training captions may name:

- ``class-disjoint`` (zero-shot): the dataset's classes are split into ``groups`` seeded groups
  (:func:`lightcrl.data.datasets.class_groups`). Fold g tests on group g, validates (epoch selection) on
  group g+1 (mod groups) and trains on the other groups' clips and captions: neither the test classes
  nor the validation classes are ever seen in training, by name, caption or clip. The result is the
  mean, spread and per-fold list of the zero-shot top-1 over the folds (chance = 1 / group size).
- ``supervised-captions``: the old ESC-10 protocol. Train on folds 1..k-2, validate on fold k-1, test on
  fold k, all on the same classes: the captions name every test class, so this is supervised
  classification through captions, not zero-shot.
- ``transfer``: train on one dataset (e.g. ESC-50 without ESC-10's classes, ``esc50:DIR?esc10=exclude``)
  validating on a held-out class group of it (group 0 of its classes), and test zero-shot on another
  (ESC-10, split ``all``). Before training, :func:`check_transfer` refuses a test dataset that shares a
  clip (file name) or a class name with the training data.

Every protocol runs once per seed (``seeds``; default: the config's seed): the result holds every
(fold, seed) row and the mean, spread and range of their top-1 (with one fold, the spread over seeds).

The trainer config and the source to replace (``source``: its index in ``data.sources``) come from a
normal config; the protocol sets that source's spec, splits and validation data, and the early-stopping
metric (validation zero-shot top-1 of that source).
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from urllib.parse import parse_qsl

from lightcrl.app.config import TrainConfig, validate_config
from lightcrl.data.datasets import class_groups, open_dataset
from lightcrl.errors import LightCRLError
from lightcrl.io import write_json

log = logging.getLogger(__name__)

PROTOCOLS = ("class-disjoint", "supervised-captions", "transfer")


def with_options(spec: str, **options) -> str:
    """``spec`` with query options added (replacing ones of the same name)."""
    head, _, query = spec.partition("?")
    kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k not in options]
    kept += [(k, str(v)) for k, v in options.items()]
    return head + ("?" + "&".join(f"{k}={v}" for k, v in kept) if kept else "")


def without_options(spec: str, *names: str) -> str:
    """``spec`` without the query options ``names``."""
    head, _, query = spec.partition("?")
    kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k not in names]
    return head + ("?" + "&".join(f"{k}={v}" for k, v in kept) if kept else "")


#: The options a protocol sets itself: a training spec that already has them is taken without them.
GROUP_OPTIONS = ("classgroup", "exclude_classgroup", "classgroups", "groupseed")


def transfer_split(spec: str, val_group: int = 0) -> dict:
    """The transfer protocol's training and validation specs: class group ``val_group`` (of 5, seed 0) of
    ``spec``'s classes validates, the other classes train."""
    spec = without_options(spec, *GROUP_OPTIONS)
    return {"train": with_options(spec, exclude_classgroup=val_group),
            "val": with_options(spec, classgroup=val_group)}


def _clip_key(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]


def check_transfer(train_spec: str, test_spec: str, val_spec: str | None = None) -> None:
    """Refuse a transfer test that overlaps training (or validation): a shared clip (same file name without
    extension, as ESC-10's clips are in ESC-50) or a shared class name (case-insensitive)."""
    test = open_dataset(test_spec, "all")
    test_clips = {_clip_key(r.path) for r in test.media_records()}
    test_names = {c.strip().lower() for c in test.classnames or []}
    for role, s in [("training", train_spec), ("validation", val_spec)]:
        if not s:
            continue
        ds = open_dataset(s, "all")
        clips = sorted(test_clips & {_clip_key(r.path) for r in ds.media_records()})
        names = sorted(test_names & {c.strip().lower() for c in ds.classnames or []})
        if clips or names:
            what = [f"{len(clips)} clip(s) (e.g. {clips[0]})"] if clips else []
            what += [f"class name(s) {', '.join(names)}"] if names else []
            raise LightCRLError(
                f"transfer: the test dataset {test_spec} shares {' and '.join(what)} with the {role} data "
                f"{s}; remove the test classes from training (for ESC-10 in ESC-50: esc10=exclude)")


def class_disjoint_folds(spec: str, groups: int = 5, seed: int = 0) -> list[dict]:
    """Per fold: the train, validation and test specs (all splits ``all``)."""
    n = len(open_dataset(spec, "all").classnames or [])
    class_groups(n, groups, seed)  # validates the numbers
    extra = {} if (groups, seed) == (5, 0) else {"classgroups": groups, "groupseed": seed}
    folds = []
    for g in range(groups):
        v = (g + 1) % groups
        folds.append({
            "fold": g,
            "train": with_options(spec, exclude_classgroup=f"{g},{v}", **extra),
            "val": with_options(spec, classgroup=v, **extra),
            "test": with_options(spec, classgroup=g, **extra),
        })
    return folds


def fold_config(cfg: TrainConfig, source: int, train: str, val: str | None, split: str = "all",
                val_split: str = "all") -> TrainConfig:
    """``cfg`` with source ``source`` trained on ``train`` and validated on ``val`` (zero-shot top-1)."""
    raw = cfg.model_dump(mode="json")
    if not 0 <= source < len(raw["data"]["sources"]):
        raise LightCRLError(f"source {source}: the config has {len(raw['data']['sources'])} source(s)")
    src = raw["data"]["sources"][source]
    if src.get("captions") != "templates":
        raise LightCRLError(f"source {source} ({src['spec']}) must have captions: templates")
    src.update(spec=train, split=split, val_spec=val, val_split=val_split if val else None)
    if val:
        kind = train.split(":", 1)[0]
        name = f"{kind}{source}" if len(raw["data"]["sources"]) > 1 else kind
        prefix = f"val/{name}/" if _n_val_sets(raw) > 1 else "val/"
        target = prefix + "zeroshot_top1"
        metric = raw.get("early_stop", {}).get("metric")
        # a config that already selects on this source's zero-shot together with other sources' metrics
        # (a list: their mean) keeps that selection; otherwise the fold's zero-shot alone selects
        if not (isinstance(metric, list) and target in metric):
            raw["early_stop"] = {"metric": target, "mode": "max", "patience": None}
    return validate_config(raw, "protocol config")


def _n_val_sets(raw: dict) -> int:
    """Sources that validate (build_pairsets): a val_split, or a holdout of the training split."""
    return sum(1 for s in raw["data"]["sources"] if s.get("val_split") or s.get("holdout"))


def _train_and_test(cfg: TrainConfig, run_dir: Path, test_spec: str, test_split: str) -> dict:
    from lightcrl.app.evaluate import EvalRequest, EvalTarget, run_eval
    from lightcrl.app.train import train

    if not (run_dir / "train_summary.json").exists():
        train(cfg, run_dir, overwrite=True)
    target = EvalTarget.from_run_dir(run_dir, device=cfg.device)
    res = run_eval(target, EvalRequest("zeroshot", test_spec, test_split, device=cfg.device))
    m = res["metrics"]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    return {"test": test_spec, "split": test_split, "top1": m["top1"], "chance": m["chance"],
            "n_classes": len(m["per_class_accuracy"]), "n": m["n"],
            "best_epoch": summary.get("best_epoch"), "best_val": summary.get("best"),
            "run": str(run_dir)}


def run_protocol(cfg: TrainConfig, source: int, protocol: str, out: str | Path, *, spec: str | None = None,
                 test_spec: str | None = None, groups: int = 5, group_seed: int = 0,
                 folds: list[int] | None = None, seeds: list[int] | None = None) -> dict:
    """Train and test every fold (and seed) of ``protocol``; writes and returns ``out/protocol.json``.

    ``spec``: the training dataset (default: the source's spec without class-group options). ``test_spec``:
    the transfer protocol's test dataset (split ``all``). ``seeds``: train every fold once per seed, in
    ``out/<fold>-s<seed>`` (default: the config's seed, in ``out/<fold>``). A run directory that holds a
    finished training is evaluated again, not retrained.
    """
    if protocol not in PROTOCOLS:
        raise LightCRLError(f"unknown protocol {protocol!r}: {', '.join(PROTOCOLS)}")
    if protocol == "transfer" and not test_spec:
        raise LightCRLError("the transfer protocol needs a test dataset (--test, e.g. esc10:DIR)")
    out = Path(out)
    if not 0 <= source < len(cfg.data.sources):
        raise LightCRLError(f"source {source}: the config has {len(cfg.data.sources)} source(s)")
    spec = spec or without_options(cfg.data.sources[source].spec, *GROUP_OPTIONS)
    jobs = []  # (fold, run name, fold config, test spec, test split)
    if protocol == "class-disjoint":
        for f in class_disjoint_folds(spec, groups, group_seed):
            if folds is None or f["fold"] in folds:
                jobs.append((f["fold"], f"fold{f['fold']}", fold_config(cfg, source, f["train"], f["val"]),
                             f["test"], "all"))
    elif protocol == "supervised-captions":
        ds = open_dataset(spec, "all")
        k = max(int(r.path.rsplit("/", 1)[-1].split("-", 1)[0]) for r in ds.media_records())
        fc = fold_config(cfg, source, spec, spec, split=f"folds1-{k - 2}", val_split=f"fold{k - 1}")
        jobs.append((k, "supervised", fc, spec, f"fold{k}"))
    else:
        split = transfer_split(spec)
        check_transfer(split["train"], test_spec, split["val"])
        jobs.append((0, "transfer", fold_config(cfg, source, split["train"], split["val"]), test_spec, "all"))
    rows = []
    for seed in seeds if seeds is not None else [None]:
        for fold, name, fc, t_spec, t_split in jobs:
            if seed is not None:
                fc, name = fc.model_copy(update={"seed": seed}), f"{name}-s{seed}"
            rows.append({"fold": fold, "seed": fc.seed, **_train_and_test(fc, out / name, t_spec, t_split)})
    tops = [r["top1"] for r in rows]
    result = {
        "protocol": protocol,
        "spec": spec,
        "test_spec": test_spec,
        "groups": groups if protocol == "class-disjoint" else None,
        "group_seed": group_seed if protocol == "class-disjoint" else None,
        "seeds": sorted({r["seed"] for r in rows}),
        "top1_mean": statistics.fmean(tops),
        "top1_std": statistics.stdev(tops) if len(tops) > 1 else 0.0,
        "top1_min": min(tops),
        "top1_max": max(tops),
        "chance": rows[0]["chance"],
        "folds": rows,
    }
    write_json(out / "protocol.json", result)
    return result


def protocol_lines(result: dict) -> list[str]:
    """One line per (fold, seed) and the summary line, as the CLI prints them."""
    lines = [f"fold {r['fold']} seed {r['seed']}: top1 {r['top1']:.2f} (chance {r['chance']:.1f}, "
             f"n={r['n']}, best epoch {r['best_epoch']}, val {r['best_val']})" for r in result["folds"]]
    lines.append(f"{result['protocol']}: top1 {result['top1_mean']:.2f} ± {result['top1_std']:.2f} "
                 f"({result['top1_min']:.2f}..{result['top1_max']:.2f}) over {len(result['folds'])} run(s); "
                 f"chance {result['chance']:.1f}")
    return lines
