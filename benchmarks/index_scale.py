"""Indexing past one process: `lightcrl index` in 1 process vs torchrun x2, and parts searched as one.

    .venv/bin/python benchmarks/index_scale.py --run runs/smoke \
        --data flickr8k:../shared/data/flickr8k --split dev --limit 400
    .venv/bin/python benchmarks/index_scale.py --skip-build --vectors 100000 --parts 2 4

Build rate: the same ``lightcrl index --run-dir RUN --data SPEC --split S --limit N --structure exact
--shard-size 64 --chunk-size 128`` once in one process (``OMP_NUM_THREADS=2``: torch on both cores) and
once under ``torch.distributed.run --nproc_per_node=2`` (gloo, one thread a rank), each with an empty
feature-store cache, so the frozen encoder runs (the expensive step): the ranks split the store's shards
and the chunks through the run's model. Wall time of the whole command (start-up and model loading
included); items/s = N / wall; the two indexes' embeddings are compared (max abs diff).

Merged query latency: N synthetic unit vectors (``benchmarks/search.py``'s clustered mixture, dim 256) as
one exact index and as P consecutive parts searched together (:class:`lightcrl.app.index.ShardedIndex`,
the class ``lightcrl serve DIR DIR...`` uses), single queries on one thread as the server runs them:
p50/p99 latency, and whether the merged top-10 ids equal the one index's for every query.

Last line: ``speedup=<torchrun x2 items/s / 1 process items/s>`` (or ``merged_p99_ms=`` with --skip-build).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np
from search import K, _sample, exact_topk, make_vectors, mixture

from lightcrl.app.index import INDEX_VERSION, IndexDir, SearchIndex, open_index
from lightcrl.app.serve import single_query_threads


def build(name: str, args, tmp: Path) -> dict:
    out = tmp / f"index-{name}"
    cmd = [sys.executable, "-m", "lightcrl", "index", "--run-dir", str(args.run), "--data", args.data,
           "--limit", str(args.limit), "--structure", "exact", "--shard-size", "64", "--chunk-size", "128",
           "--out", str(out)]
    if args.split:
        cmd[cmd.index("--out"):cmd.index("--out")] = ["--split", args.split]
    if name == "torchrun x2":
        cmd[1:3] = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={args.port}", "-m",
                    "lightcrl"]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if name == "torchrun x2" else "2",
           "PYTHONPATH": str(common.REPO / "src"), "LIGHTCRL_CACHE": str(tmp / f"cache-{name[:8]}")}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
    count = json.loads((out / "index.json").read_text())["count"]
    print(f"# {name}: {count} items in {wall:.1f} s = {count / wall:.1f} items/s "
          f"(load {os.getloadavg()[0]:.1f})", flush=True)
    return {"wall": wall, "count": count, "emb": np.load(out / "embeddings.npy")}


def write_exact(path: Path, emb: np.ndarray) -> Path:
    d = IndexDir(path)
    d.path.mkdir(parents=True)
    np.save(d.embeddings, emb)
    from lightcrl.app.index import Item, _write_items

    _write_items(d.items, [Item(i, str(i), None, None, None, None) for i in range(len(emb))])
    info = {"version": INDEX_VERSION, "run": "synthetic", "run_key": "synthetic", "modality": "image",
            "count": len(emb), "dim": emb.shape[1], "structure": {"kind": "exact"}, "root": None}
    d.info.write_text(json.dumps(info))
    return d.path


def latency(index, queries: np.ndarray) -> tuple[list[float], list[list[int]]]:
    index.search(queries[0], K)  # warm-up
    lat, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        ids, _ = index.search(q, K)
        lat.append(1000 * (time.perf_counter() - t0))
        found.append(ids.tolist())
    return lat, found


def merged(args, tmp: Path) -> float:
    n, dim = args.vectors, 256
    emb = np.asarray(make_vectors(tmp / "emb.npy", n, dim, 0, False))
    centres, bases = mixture(dim, 0)
    queries = _sample(np.random.default_rng(2), args.queries, dim, centres, bases, False)
    truth = exact_topk(emb, queries, K)
    single_query_threads()
    rows = {}
    lat, found = latency(SearchIndex(write_exact(tmp / "one", emb)), queries)
    rows["1 index"] = (lat, found)
    for p in args.parts:
        bounds = np.linspace(0, n, p + 1).astype(int)
        dirs = [write_exact(tmp / f"p{p}-{i}", emb[a:b]) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        rows[f"{p} parts"] = latency(open_index(dirs), queries)
    print(f"\n{n:,} vectors (dim {dim}), exact, {len(queries)} single queries, k={K}")
    print("| index | p50 ms | p99 ms | top-10 = one index's | recall@10 vs exact |")
    print("|---|---|---|---|---|")
    for name, (lat, found) in rows.items():
        same = sum(f == o for f, o in zip(found, rows["1 index"][1]))
        recall = np.mean([len(set(f) & set(t.tolist())) / K for f, t in zip(found, truth)])
        print(f"| {name} | {np.percentile(lat, 50):.2f} | {np.percentile(lat, 99):.2f} | "
              f"{same}/{len(found)} | {recall:.3f} |")
    return float(np.percentile(rows[f"{args.parts[-1]} parts"][0], 99))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--run", type=Path, help="a trained run directory (for the build rate)")
    p.add_argument("--data", default="flickr8k:../shared/data/flickr8k")
    p.add_argument("--split", default="dev")
    p.add_argument("--limit", type=int, default=400)
    p.add_argument("--port", type=int, default=29563)
    p.add_argument("--skip-build", action="store_true", help="only the merged-parts latency")
    p.add_argument("--vectors", type=int, default=100_000)
    p.add_argument("--parts", type=int, nargs="+", default=[2, 4])
    p.add_argument("--queries", type=int, default=200)
    common.add_load_args(p)
    args = p.parse_args(argv)
    if not args.skip_build and args.run is None:
        p.error("--run is needed for the build rate (or pass --skip-build)")

    common.wait_for_quiet(args.max_load, args.wait)
    with tempfile.TemporaryDirectory(prefix="lightcrl-bench-index-") as tmp:
        tmp = Path(tmp)
        res = {}
        if not args.skip_build:
            for name in ("1 process", "torchrun x2"):
                res[name] = build(name, args, tmp)
        p99 = merged(args, tmp)
    common.report_load_after()
    if not res:
        common.headline("merged_p99_ms", p99, ".1f")
        return
    one, two = res["1 process"], res["torchrun x2"]
    diff = float(np.abs(one["emb"] - two["emb"]).max())
    print(f"\n{one['count']} items of {args.data} [{args.split}] through {args.run} (features extracted)")
    for name, r in res.items():
        print(f"{name:12s} {r['wall']:7.1f} s  {r['count'] / r['wall']:7.1f} items/s")
    print(f"embeddings max abs diff (torchrun x2 vs 1 process): {diff:.1e}")
    common.headline("speedup", (two["count"] / two["wall"]) / (one["count"] / one["wall"]), ".2f")


if __name__ == "__main__":
    main()
