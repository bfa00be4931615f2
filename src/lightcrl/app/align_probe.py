"""`lightcrl align-probe`: which encoders, and which of their layers, already agree on paired data.

Before anything is trained: on a seeded sample of TRAINING pairs (one caption per media item), every
(media encoder or layer, text encoder or layer) pair gets its mutual-kNN alignment (lightcrl.metrics.
alignment, Huh et al. 2024). STRUCTURE (Gröger et al. 2025) aligns the layer pair that scores highest.

Features come from the feature store cache (a ``--sample`` store per encoder and layer, extracted once and
reused by later probes and by training on the same sample); the score uses the pooled features.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from lightcrl.errors import LightCRLError
from lightcrl.metrics.alignment import chance_mutual_knn, rank_pairs

log = logging.getLogger(__name__)


@dataclass
class ProbeOptions:
    pairs: str
    split: str | None = "train"
    sample: int = 1000
    k: int = 10
    seed: int = 0
    # None: every encoder registered under a plain name for that modality (the offline ones)
    media_encoders: list[str] | None = None
    text_encoders: list[str] | None = None
    layers: bool = True  # a plain NAME also brings its probe_layers (NAME@LAYER is taken as given)
    device: str = "auto"
    encoder_backend: str = "auto"
    progress: bool = True
    out: Path | None = None


@dataclass
class ProbeResult:
    summary: dict
    skipped: list[dict] = field(default_factory=list)


def expand_encoders(names: list[str] | None, modality: str, opts: ProbeOptions) -> tuple[list, list[dict]]:
    """The encoders to probe for ``modality`` (built, models not loaded) and the ones skipped, with why.

    An unknown name or layer is an error; an encoder whose weights are not installed (a missing package
    or weights file) is skipped with the reason.
    """
    from lightcrl.encoders import get_encoder, is_registered, list_encoders, named_encoders, split_layer

    explicit = names is not None
    encoders, skipped = [], []
    build = lambda n: get_encoder(n, device=opts.device, backend=opts.encoder_backend)  # noqa: E731
    for name in names if explicit else named_encoders():
        if not is_registered(name):
            raise LightCRLError(f"unknown encoder {name!r}; known: {', '.join(list_encoders())}")
        base, layer = split_layer(name)
        try:
            root = build(base)
        except (LightCRLError, ImportError, OSError) as e:  # weights missing: a package, a part, a file
            skipped.append({"encoder": name, "reason": f"weights not installed? {type(e).__name__}: {e}"})
            continue
        if root.modality != modality:
            if explicit:
                raise LightCRLError(f"{name} is a {root.modality} encoder; this side of the probe takes "
                                    f"{modality} encoders")
            continue
        if layer is not None:
            encoders.append(build(name))  # an unknown layer raises, naming the valid ones
        else:
            encoders.append(root)
            if opts.layers:
                encoders.extend(build(f"{name}@{extra}") for extra in root.probe_layers)
    return encoders, skipped


def _sample_pairs(opts: ProbeOptions):
    """The sampled dataset, one seeded caption per media item (what the probe's stores hold)."""
    from lightcrl.data.datasets import open_dataset

    ds = open_dataset(opts.pairs, opts.split)
    if ds.task != "pairs":
        raise LightCRLError(f"{opts.pairs} is a classification dataset: align-probe needs pairs "
                            "(media items with captions)")
    return ds.subsample(opts.sample, seed=opts.seed).keep_captions(1, seed=opts.seed)


def align_probe(opts: ProbeOptions) -> ProbeResult:
    from lightcrl.embed import EmbedOptions, cached_store
    from lightcrl.encoders import split_layer

    t0 = time.perf_counter()
    ds = _sample_pairs(opts)
    chosen = {t.group: t.id for t in ds.text_records()}
    media, skipped_m = expand_encoders(opts.media_encoders, ds.media, opts)
    text, skipped_t = expand_encoders(opts.text_encoders, "text", opts)
    skipped = skipped_m + skipped_t
    for s in skipped:
        log.warning("align-probe: skipping %s: %s", s["encoder"], s["reason"])
    if not media or not text:
        raise LightCRLError(f"align-probe needs at least one {ds.media} and one text encoder that load; "
                            f"skipped: {', '.join(s['encoder'] for s in skipped) or 'none'}")
    eopts = EmbedOptions(limit=opts.sample, seed=opts.seed, captions_per_item=1, device=opts.device,
                         encoder_backend=opts.encoder_backend, progress=opts.progress)
    stores = {}
    for enc in media + text:
        t = time.perf_counter()
        stores[enc.name] = cached_store(enc, opts.pairs, opts.split, eopts)
        enc.release()  # one model in memory at a time (the registry keeps every encoder object)
        gc.collect()
        log.info("align-probe: %s store ready in %.1fs", enc.name, time.perf_counter() - t)
    # the pairs every store kept (a corrupt image is skipped by the media stores)
    pairs = [(m.id, chosen[m.id]) for m in ds.media_records() if m.id in chosen]
    kept = {name: set(store.items.ids) for name, store in stores.items()}
    pairs = [(m, c) for m, c in pairs
             if all(m in kept[e.name] for e in media) and all(c in kept[e.name] for e in text)]
    n = len(pairs)
    if n <= opts.k:
        raise LightCRLError(f"align-probe: {n} usable pairs in the sample, need more than k={opts.k}")
    feats_m = {e.name: stores[e.name].pooled([stores[e.name].index_of(m) for m, _ in pairs]) for e in media}
    feats_t = {e.name: stores[e.name].pooled([stores[e.name].index_of(c) for _, c in pairs]) for e in text}
    ranked = rank_pairs(feats_m, feats_t, opts.k)
    for row in ranked:
        row["default_pair"] = split_layer(row["media"])[1] is None and split_layer(row["text"])[1] is None
    defaults = [r for r in ranked if r["default_pair"]]
    summary = {
        "pairs": opts.pairs,
        "split": ds.split,
        "sample": opts.sample,
        "seed": opts.seed,
        "n": n,
        "k": opts.k,
        "chance": chance_mutual_knn(n, opts.k),
        "features": "pooled",
        "media": [{"encoder": e.name, "dim": e.dim, "backend": e.backend, "store": str(stores[e.name].dir)}
                  for e in media],
        "text": [{"encoder": e.name, "dim": e.dim, "backend": e.backend, "store": str(stores[e.name].dir)}
                 for e in text],
        "results": ranked,
        "best_layer_pair": ranked[0],
        "best_encoder_pair": defaults[0] if defaults else None,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if opts.out is not None:
        from lightcrl.io import write_json

        write_json(opts.out, summary)
    return ProbeResult(summary, skipped)


def print_probe(summary: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    chance = summary["chance"]
    table = Table(title=escape(
        f"mutual-kNN alignment (k={summary['k']}, {summary['n']} {summary['split']} pairs of "
        f"{summary['pairs']}, pooled features; chance {chance:.3f})"))
    for col, justify in (("#", "right"), ("media", "left"), ("text", "left"), ("mutual-kNN", "right"),
                         ("x chance", "right")):
        table.add_column(col, justify=justify)
    for i, r in enumerate(summary["results"], 1):
        style = "bold" if r["default_pair"] else None
        table.add_row(str(i), escape(r["media"]), escape(r["text"]), f"{r['mutual_knn']:.4f}",
                      f"{r['mutual_knn'] / chance:.1f}", style=style)
    console = Console()
    console.print(table)
    best = summary["best_layer_pair"]
    console.print(f"best layer pair: {escape(best['media'])} x {escape(best['text'])} "
                  f"({best['mutual_knn']:.4f})")
    enc = summary["best_encoder_pair"]
    if enc:
        console.print(f"best encoder pair (default layers, in bold): {escape(enc['media'])} x "
                      f"{escape(enc['text'])} ({enc['mutual_knn']:.4f})")
    for s in summary["skipped"]:
        console.print(f"skipped {escape(s['encoder'])}: {escape(s['reason'])}")
