"""Exact vs approximate search of `lightcrl index` on 10k, 100k and 1M synthetic unit vectors.

    .venv/bin/python benchmarks/search.py                          # 10k, 100k, 1M at dim 256
    .venv/bin/python benchmarks/search.py --sizes 10000 100000 --queries 100

Vectors imitate a trained model's embeddings (the default model's ``embed_dim`` is its width, 256): unit
vectors around 2,000 cluster centres, each cluster spread in its own 16-dimensional subspace plus a
little isotropic noise (real embeddings have a low intrinsic dimension; ``--uniform`` draws uniform unit
vectors instead, the worst case for any approximate index). Queries come from the same distribution and
are not in the collection. Per size and structure (exact numpy; HNSW; IVF-PQ with exact re-ranking, the
memory-bounded fallback), through :class:`lightcrl.app.index.SearchIndex`, the class the server uses:
build time and rate (vectors/s), peak private memory while building (RssAnon), the structure's size,
p50/p99 latency of
single queries (one at a time, as a server sees them) and recall@10 against exact search.
Last line: ``recall10_1m=X p99_ms_1m=Y`` for the structure ``lightcrl index`` picks at 1M by default
(IVF-PQ).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np

from lightcrl.app.index import (
    INDEX_VERSION,
    IndexDir,
    SearchIndex,
    build_structure,
    choose_structure,
    ivfpq_params,
)
from lightcrl.app.serve import single_query_threads

K = 10


def mixture(dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster centres [2000, dim] (unit) and each cluster's 16-dimensional spread [2000, 16, dim]."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((2000, dim)).astype(np.float32))
    return centres, rng.standard_normal((2000, 16, dim)).astype(np.float32) / np.sqrt(dim)


def make_vectors(path: Path, n: int, dim: int, seed: int, uniform: bool, chunk: int = 100_000) -> np.ndarray:
    """[n, dim] float32 unit vectors written chunk by chunk to a .npy memmap (1M x 256 = 1 GiB)."""
    rng = np.random.default_rng(seed + 1)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    centres, bases = mixture(dim, seed)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        out[s : s + m] = _sample(rng, m, dim, centres, bases, uniform)
    out.flush()
    return out


def _sample(rng, m, dim, centres, bases, uniform):
    if uniform:
        return _unit(rng.standard_normal((m, dim)).astype(np.float32))
    c = rng.integers(0, len(centres), m)
    coef = rng.standard_normal((m, 16)).astype(np.float32) * 0.5
    noise = 0.2 * rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
    return _unit(centres[c] + np.einsum("mk,mkd->md", coef, bases[c]) + noise)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_topk(emb: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(queries), k), np.int64)
    best = np.full((len(queries), k), -np.inf, np.float32)
    for s in range(0, len(emb), 200_000):
        scores = queries @ np.asarray(emb[s : s + 200_000]).T
        both = np.concatenate([best, scores], 1)
        ids = np.concatenate([out, np.arange(s, s + scores.shape[1])[None].repeat(len(queries), 0)], 1)
        top = np.argsort(-both, 1, kind="stable")[:, :k]
        best, out = np.take_along_axis(both, top, 1), np.take_along_axis(ids, top, 1)
    return out


def measure(root: Path, emb_path: Path, n: int, dim: int, structure: dict, queries: np.ndarray,
            truth: np.ndarray, threads: int | None) -> dict:
    d = IndexDir(root)
    d.path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(emb_path, d.embeddings) if not d.embeddings.exists() else None
    emb = np.load(d.embeddings, mmap_mode="r")
    build_s, peak = 0.0, 0.0
    d.faiss.unlink(missing_ok=True)
    if structure["kind"] != "exact":
        with common.AnonPeak() as mem, common.timer() as t:
            before = common.proc_status_mb("RssAnon")
            build_structure(emb, structure, d.faiss, progress=False, threads=threads)
        build_s, peak = t[0], mem.peak - before
    info = {"version": INDEX_VERSION, "count": n, "dim": dim, "structure": structure, "modality": "image",
            "root": None}
    d.info.write_text(json.dumps(info))
    index = SearchIndex(d.path)
    single_query_threads()  # as the server does
    index.search(queries[0], K)  # warm-up (pages in the memmap)
    lat, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        ids, _ = index.search(q, K)
        lat.append(1000 * (time.perf_counter() - t0))
        found.append(ids)
    recall = float(np.mean([len(set(f.tolist()) & set(t.tolist())) / K for f, t in zip(found, truth)]))
    size = d.faiss.stat().st_size / 2**20 if d.faiss.exists() else d.embeddings.stat().st_size / 2**20
    del index
    return {"build_s": build_s, "peak_mb": peak, "size_mb": size, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "recall10": recall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--uniform", action="store_true", help="uniform unit vectors (no cluster structure)")
    ap.add_argument("--tmp", type=Path, default=None, help="scratch folder (needs ~2.2 GB at 1M)")
    ap.add_argument("--structures", nargs="+", default=["exact", "hnsw", "ivfpq"],
                    help="which to measure (default: exact hnsw ivfpq)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="faiss threads while building (default: the "
                    "cores other processes leave idle, as lightcrl index)")
    common.add_load_args(ap)
    args = ap.parse_args(argv)

    import faiss

    common.wait_for_quiet(args.max_load, args.wait)
    print(f"# faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads, dim {args.dim}, "
          f"{args.queries} single queries, {'uniform' if args.uniform else 'clustered'} vectors")
    rows, headline = [], None
    scratch = Path(tempfile.mkdtemp(prefix="lightcrl-bench-search-", dir=args.tmp))
    try:
        for n in args.sizes:
            emb_path = scratch / f"emb-{n}.npy"
            emb = make_vectors(emb_path, n, args.dim, args.seed, args.uniform)
            centres, bases = mixture(args.dim, args.seed)
            queries = _sample(np.random.default_rng(args.seed + 2), args.queries, args.dim, centres, bases,
                              args.uniform)
            truth = exact_topk(emb, queries, K)
            candidates = [("exact", {"kind": "exact"}), ("hnsw", choose_structure(n, args.dim, kind="hnsw")),
                          ("ivfpq", ivfpq_params(n, args.dim))]
            picked = choose_structure(n, args.dim)["kind"]
            for name, structure in (c for c in candidates if c[0] in args.structures):
                r = measure(scratch / f"ix-{n}-{name}", emb_path, n, args.dim, structure, queries, truth,
                            args.threads)
                r.update(n=n, name=name, picked=name == picked)
                rows.append(r)
                rate = f"{n / r['build_s']:9,.0f} vec/s" if r["build_s"] else " " * 15
                print(f"{n:>9,} {name:6s} build {r['build_s']:7.1f} s {rate}  peak +{r['peak_mb']:7.0f} MiB  "
                      f"size {r['size_mb']:7.0f} MiB  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
                      f"recall@10 {r['recall10']:.3f}{'  <- lightcrl index default' if r['picked'] else ''}",
                      flush=True)
                shutil.rmtree(scratch / f"ix-{n}-{name}", ignore_errors=True)
                if n == 1_000_000 and r["picked"]:
                    headline = r
            del emb
            emb_path.unlink(missing_ok=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("\n| N | structure | build s | build vectors/s | peak build MiB | size MiB | p50 ms | p99 ms | "
          "recall@10 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mark = " (default)" if r["picked"] else ""
        rate = f"{r['n'] / r['build_s']:,.0f}" if r["build_s"] else "-"
        print(f"| {r['n']:,} | {r['name']}{mark} | {r['build_s']:.1f} | {rate} | {r['peak_mb']:.0f} | "
              f"{r['size_mb']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['recall10']:.3f} |")
    common.report_load_after()
    if headline is not None:
        print(f"recall10_1m={headline['recall10']:.3f} p99_ms_1m={headline['p99_ms']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
