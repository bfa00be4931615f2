"""`lightcrl index`: a searchable index of a collection (images, audio clips or texts) through a trained run.

An index directory holds::

    index.json        what it is: run, modality, count, dim, the search structure and its parameters
    embeddings.npy    [N, d] float32, L2-normalised, row i = item i (written chunk by chunk: a memmap)
    items.sqlite      one row per item: id (= row), key (dataset id), path, caption, label, size (bytes)
    faiss.index       the approximate structure, when the collection is above the exact threshold
    hubness.npy       [N, Q] float32, when the run keeps training embeddings (``model.hubness``): item i's
                      CSLS offset for queries of each other modality (``index.json``'s ``hubness``), added
                      to the cosine, as ``lightcrl eval --task retrieval`` ranks (lightcrl/hubness.py)

Inputs: any dataset spec (``flickr8k:DIR`` with ``--split dev``, ``audiofolder:DIR``...), whose frozen
features come from the feature-store cache (:func:`lightcrl.embed.cached_store`), or a plain folder,
whose features live in the incremental folder index of :mod:`lightcrl.app.search` (only added or
changed files are embedded, removed ones dropped). ``--modality text`` indexes a dataset's captions.

Search structure (``--structure auto``), from the collection size N and the dimension d:

- N <= ``exact_max`` (default 100,000): **exact** inner product over the embeddings (numpy, one thread
  a query). Ties rank the lower row first, as :mod:`lightcrl.metrics.retrieval` does.
- else **IVF-PQ** (``IndexIVFPQ``, below). On 1M synthetic 256-d vectors (``benchmarks/search.py``,
  docs/benchmarks.md) it gave recall@10 0.997 at p99 6.8 ms, built in 78 s into 42 MiB, where HNSW
  (M 16, efConstruction 40, efSearch 256) gave 0.746 after 317 s and 1.1 GiB.

``--structure hnsw`` builds **HNSW** instead (faiss ``IndexHNSWFlat``, inner product): HNSW_M = 16
links per node, efConstruction = 40 and, at query time, efSearch = max(256, 2k); it must fit in M
(N x (4d + 2 x 4 x HNSW_M) bytes plus 20 %) in ``--max-memory-mb``.

**IVF-PQ**: nlist = the power of two nearest 4 sqrt(N) (256..65,536), d/8
  sub-quantisers of 8 bits (32 bytes a vector at d = 256), nprobe = nlist/4, trained (10 k-means
  rounds) on a sample of max(40 nlist, 65,536) vectors (160 MiB at 1M x 256); the top ``RERANK`` x k
  candidates are re-scored exactly from the memory-mapped embeddings, so only the codes (N x (d/8 + 8)
  bytes) sit in memory.

Vectors are added in chunks under a progress bar, so memory while building stays at one chunk plus the
structure itself.

Resume: the run's embeddings are written one chunk (``--chunk-size``, 8,192 items) at a time into
``.parts/`` beside the index, keyed by the run, the feature store and the chunking; a killed build
reuses the finished chunks (and the feature store its finished shards, and an IVF-PQ build its trained
quantiser) and ``.parts/`` is removed once ``index.json`` is written. Every file is replaced atomically.

Hubness correction: a query of a modality listed in ``hubness.npy`` scores ``cosine + offset``. Exact
search adds it to every row; IVF-PQ adds it when it re-scores its candidates; HNSW (inner product only)
re-scores its top ``RERANK`` x k by cosine with the offsets (an offset is small next to a cosine, so
an item outside that cosine top list rarely belongs in the corrected top k).

Under torchrun (``torchrun --nproc_per_node R -m lightcrl index --run-dir RUN ...``; ``--run-dir``
because torchrun's own parser takes ``--run`` for its ``--run-path``): every rank extracts the feature
store's shards s with s % world == rank (:func:`lightcrl.embed.embed`), then embeds through the run a
contiguous block of whole chunks (:func:`rank_rows`); rank 0 assembles the embeddings and writes the
metadata, trains IVF-PQ once on the seeded sample, every rank adds its block of rows to a copy of the
trained index and rank 0 merges the copies in rank order (an HNSW graph is built by rank 0 alone). The
result is the index one process builds from the same collection: same rows, same embeddings, the same
quantiser and inverted lists. Ranks on several machines need the index directory and the feature-store
cache on a file system they share.

Past one machine without a shared file system, or when one index would not fit one machine: index the
parts of the collection separately (its own folder, csv or wds split per machine, each with the same
run) and search them together, ``lightcrl serve DIR1 DIR2 ...`` (:class:`ShardedIndex`): each part
answers its top-k, merged by score (inner products of unit vectors compare across parts), ties to the
lower global id; ids are numbered across the parts in the order given, so parts made from consecutive
pieces of a collection return what one exact index over the union returns (ties included, when the
scores are equal to the bit: BLAS may round one inner product differently by an ulp depending on the
block of rows it is computed in, within one index as across parts).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightcrl.errors import LightCRLError
from lightcrl.io import read_json, write_json
from lightcrl.rundir import RunDir

log = logging.getLogger(__name__)

INDEX_VERSION = 1
EXACT_MAX = 100_000
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 256
KMEANS_ITERATIONS = 10
RERANK = 10
DEFAULT_MEMORY_MB = 4096
CHUNK = 8192  # items per embedding / add chunk
MODALITIES = ("image", "audio", "text")


class IndexDir:
    """File names of an index directory (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def info(self) -> Path:
        return self.path / "index.json"

    @property
    def embeddings(self) -> Path:
        return self.path / "embeddings.npy"

    @property
    def items(self) -> Path:
        return self.path / "items.sqlite"

    @property
    def faiss(self) -> Path:
        return self.path / "faiss.index"

    @property
    def parts(self) -> Path:
        """Scratch of an unfinished build (what a killed run resumes from); removed when it completes."""
        return self.path / ".parts"

    @property
    def hubness(self) -> Path:
        return self.path / "hubness.npy"

    def part(self, chunk: int) -> Path:
        return self.parts / f"emb_{chunk:06d}.npy"


@dataclass
class Item:
    """One indexed item's metadata (``id`` is its row in the index)."""

    id: int
    key: str
    path: str | None
    caption: str | None
    label: str | None
    size: int | None


# -- choosing the structure -------------------------------------------------------------------------------
def hnsw_bytes(n: int, dim: int) -> int:
    return int(1.2 * n * (4 * dim + 2 * 4 * HNSW_M))


STRUCTURES = ("auto", "exact", "ivfpq", "hnsw")


def choose_structure(n: int, dim: int, exact_max: int = EXACT_MAX, memory_mb: int = DEFAULT_MEMORY_MB,
                     kind: str = "auto") -> dict[str, Any]:
    """The search structure and its parameters for N vectors of ``dim`` (see the module docstring)."""
    if kind not in STRUCTURES:
        raise LightCRLError(f"unknown index structure {kind!r} (one of {', '.join(STRUCTURES)})")
    if kind == "exact" or (kind == "auto" and n <= exact_max):
        return {"kind": "exact"}
    if kind == "hnsw":
        if hnsw_bytes(n, dim) > memory_mb * 2**20:
            need = hnsw_bytes(n, dim) / 2**20
            raise LightCRLError(f"an HNSW graph of {n:,} vectors needs about {need:,.0f} MiB, over "
                                f"--max-memory-mb {memory_mb}: use --structure ivfpq")
        return {"kind": "hnsw", "M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION,
                "ef_search": HNSW_EF_SEARCH}
    return ivfpq_params(n, dim)


def ivfpq_params(n: int, dim: int) -> dict[str, Any]:
    """IVF-PQ's parameters for N vectors (see the module docstring)."""
    nlist = int(2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    nlist = min(65536, max(256, nlist), max(1, n // 39))  # k-means wants >= 39 points a centroid
    m = max(1, dim // 8)
    while dim % m:  # PQ needs sub-vectors of equal length
        m -= 1
    train = int(min(n, max(40 * nlist, 65536)))  # k-means wants >= 39 points a list
    nbits = min(8, int(math.log2(max(2, train))))  # 2^nbits PQ centroids need as many points (tiny N)
    return {"kind": "ivfpq", "nlist": nlist, "m": m, "nbits": nbits, "nprobe": max(1, nlist // 4),
            "train": train, "rerank": RERANK}


def build_structure(emb: np.ndarray, params: dict[str, Any], path: Path, progress: bool = True,
                    seed: int = 0, threads: int | None = None, rank: int = 0, world: int = 1,
                    scratch: Path | None = None, chunk: int = CHUNK) -> None:
    """Build the approximate structure over ``emb`` (may be a memmap) and write it to ``path``.

    ``threads``: OpenMP threads for faiss (None: the cores other processes leave idle, shared by the
    ranks of this machine; at load 10 on 2 cores a 10k IVF-PQ build took 233 s with two threads, 101 s
    with one). Under torchrun (``world`` > 1, every rank calls it with the same ``emb``, ``scratch`` a
    folder they share): IVF-PQ is trained once, by rank 0, then each rank adds its block of rows
    (:func:`rank_rows`) to a copy and rank 0 merges the copies in rank order, which puts every inverted
    list in row order: the same structure as one process builds. An HNSW graph is built by rank 0 alone.
    ``scratch`` also keeps the trained quantiser, so a killed build does not train again.
    """
    import faiss

    from lightcrl.app.quickstart import auto_threads

    if threads is None:
        threads = max(1, auto_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        _build(faiss, emb, params, path, progress and rank == 0, seed, rank, world, scratch, chunk)
    finally:
        faiss.omp_set_num_threads(previous)


def _build(faiss, emb: np.ndarray, params: dict[str, Any], path: Path, progress: bool, seed: int, rank: int,
           world: int, scratch: Path | None, chunk: int) -> None:
    n, dim = emb.shape
    kind = params["kind"]
    if kind == "hnsw":
        if rank == 0:
            index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = params["ef_construction"]
            _add(index, emb, 0, n, kind, progress, with_ids=False, step=chunk)
            _write_faiss(faiss, index, path)
        _barrier(world)
        return
    if kind != "ivfpq":
        raise LightCRLError(f"unknown index structure {kind!r}")
    trained = None
    if scratch is not None:
        tag = hashlib.sha256(json.dumps([params, seed, n, dim], sort_keys=True).encode()).hexdigest()[:12]
        trained = scratch / f"trained-{tag}.faiss"
    if rank == 0:
        if trained is not None and trained.is_file():
            log.info("reusing the trained quantiser %s", trained)
            index = faiss.read_index(str(trained))
        else:
            index = _train_ivfpq(faiss, emb, params, seed)
            if trained is not None:
                _write_faiss(faiss, index, trained)
    if world > 1:
        if trained is None:
            raise LightCRLError("a distributed IVF-PQ build needs a scratch folder shared by the ranks")
        _barrier(world)
        if rank != 0:
            index = faiss.read_index(str(trained))
    a, b = rank_rows(n, chunk, rank, world)
    _add(index, emb, a, b, kind, progress, with_ids=True, step=chunk)
    if world > 1:
        mine = scratch / f"added-{rank}.faiss"
        if rank != 0:
            _write_faiss(faiss, index, mine)
        _barrier(world)
        if rank == 0:
            for r in range(1, world):
                index.merge_from(faiss.read_index(str(scratch / f"added-{r}.faiss")), 0)  # keeps the ids
    if rank == 0:
        if index.ntotal != n:
            raise LightCRLError(f"the ranks added {index.ntotal:,} vectors, the collection has {n:,}")
        _write_faiss(faiss, index, path)
    _barrier(world)


def _train_ivfpq(faiss, emb: np.ndarray, params: dict[str, Any], seed: int):
    """An empty IVF-PQ index trained on a seeded sample of ``emb``."""
    n, dim = emb.shape
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["m"], params["nbits"],
                             faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = KMEANS_ITERATIONS  # coarse centroids: 10 rounds of k-means are plenty
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, params["train"]), replace=False))
    index.train(np.ascontiguousarray(emb[sample], np.float32))
    return index


def _add(index, emb: np.ndarray, a: int, b: int, kind: str, progress: bool, with_ids: bool,
         step: int = CHUNK) -> None:
    """Rows [a, b) of ``emb`` into ``index`` in chunks of ``step`` (ids = rows), under a progress bar."""
    from tqdm.auto import tqdm

    bar = tqdm(total=b - a, desc=f"build {kind}", unit="vec", disable=not progress, dynamic_ncols=True)
    for s in range(a, b, step):
        x = np.ascontiguousarray(emb[s : min(s + step, b)], np.float32)
        if with_ids:
            index.add_with_ids(x, np.arange(s, s + len(x), dtype=np.int64))
        else:
            index.add(x)
        bar.update(len(x))
    bar.close()


def _write_faiss(faiss, index, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed

        torch.distributed.barrier()


def rank_rows(n: int, chunk: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s rows [a, b) of N: a contiguous block of whole chunks (the first ranks take one more
    chunk when they do not divide evenly), so the blocks in rank order are the collection in order."""
    chunks = -(-n // chunk)
    per, extra = divmod(chunks, world)
    first = rank * per + min(rank, extra)
    last = first + per + (rank < extra)
    return min(n, first * chunk), min(n, last * chunk)


# -- what gets indexed ------------------------------------------------------------------------------------
@dataclass
class _Collection:
    """Rows to index: metadata, and a function that embeds rows [start, stop)."""

    modality: str
    items: list[Item]
    root: Path | None  # media under it may be served; None for text collections
    source: dict[str, Any]
    embed_rows: Any  # (start, stop) -> np.ndarray [stop - start, d]
    captions_for_export: list[str | None]
    # what the embeddings depend on besides the run: finished chunks of a killed build with the same
    # fingerprint are reused (None: never reused)
    fingerprint: str | None = None


def _is_spec(data: str) -> bool:
    from lightcrl.data.datasets import known_kinds

    kind = data.split(":", 1)[0]
    return ":" in data and kind in known_kinds() and not Path(data).exists()


def _file_size(path: str | None) -> int | None:
    if path is None:
        return None
    try:
        return os.stat(path).st_size
    except OSError:
        return None  # a member of a container (tar, CIFAR batch)


def _spec_collection(pipe, data: str, split: str | None, modality: str | None, limit: int | None,
                     seed: int, device: str, rank: int = 0, world: int = 1,
                     shard_size: int | None = None) -> _Collection:
    from lightcrl.data.datasets import open_dataset
    from lightcrl.data.media import split_container
    from lightcrl.embed import EmbedOptions, cached_store

    ds = open_dataset(data, split)
    if limit:
        ds = ds.subsample(limit, seed=seed)
    modality = modality or ds.media
    if modality == "text" and ds.task != "pairs":
        raise LightCRLError(f"{data} has no captions to index (it is a classification dataset)")
    if modality not in (ds.media, "text"):
        raise LightCRLError(f"{data} holds {ds.media} items, not {modality}")
    encoder = pipe.encoder_names.get(modality)
    if encoder is None:
        raise LightCRLError(f"the run has no {modality} encoder (it has: {', '.join(pipe.encoder_names)})")
    opts = EmbedOptions(limit=limit, seed=seed, device=device, progress=rank == 0)
    if shard_size is not None:
        opts.shard_size = shard_size
    store = cached_store(encoder, data, split, opts, rank=rank, world=world)
    records = {r.id: r for r in (ds.text_records() if modality == "text" else ds.media_records())}
    first_caption: dict[str, str] = {}
    for t in ds.text_records():
        first_caption.setdefault(t.group, t.text or "")
    names = ds.classnames or []
    items = []
    for row, (key, label) in enumerate(zip(store.items.ids, store.items.labels)):
        rec = records[key]
        caption = rec.text if modality == "text" else first_caption.get(key)
        items.append(Item(row, key, rec.path, caption, names[label] if 0 <= label < len(names) else None,
                          _file_size(rec.path)))
    root = None
    if modality != "text":
        paths = [split_container(i.path)[0] for i in items if i.path]
        root = Path(os.path.commonpath(paths)).resolve() if paths else None
        if root is not None and root.is_file():
            root = root.parent
    return _Collection(
        modality, items, root,
        {"data": data, "split": ds.split, "limit": limit, "seed": seed, "store": str(store.dir)},
        lambda a, b: pipe.encode_store(store, indices=np.arange(a, b)),
        [i.caption for i in items] if modality != "text" else [None] * len(items),
        fingerprint=f"{store.fingerprint}:{modality}")


def _folder_modality(pipe, folder: Path) -> str:
    from lightcrl.app.search import list_media

    counts = {m: len(list_media(folder, m)) for m in ("image", "audio") if m in pipe.encoder_names}
    if not counts:
        raise LightCRLError("the run has no image or audio encoder: a folder index needs one")
    return max(counts, key=lambda m: counts[m])


def _folder_collection(pipe, folder: Path, modality: str | None, device: str,
                       progress: bool) -> _Collection:
    from lightcrl.app.search import FolderIndex, folder_embeddings

    modality = modality or _folder_modality(pipe, folder)
    if modality == "text":
        raise LightCRLError("a plain folder is indexed as images or audio: index texts from a dataset spec")
    if not hasattr(pipe, "adapter"):
        raise LightCRLError("folder indexes need a trained lightcrl run; use a dataset spec for this run")
    encoder = pipe.encoder_names.get(modality) or _missing(modality, pipe)
    index = FolderIndex(folder, encoder, device=device, modality=modality)
    stats = index.update(progress=progress)
    log.info("folder index: %d items (%d embedded, %d reused, %d removed, %d unreadable)", stats.total,
             stats.embedded, stats.reused, stats.removed, stats.skipped)
    emb = folder_embeddings(pipe, index)
    items = [Item(i, f["path"], str(index.folder / f["path"]), None, None, f["size"])
             for i, f in enumerate(index.meta.get("files", []))]
    return _Collection(modality, items, index.folder,
                       {"data": str(index.folder), "split": None, "limit": None, "seed": None,
                        "folder_index": str(index.dir)},
                       lambda a, b: emb[a:b], [None] * len(items))


def _missing(modality: str, pipe) -> str:
    raise LightCRLError(f"the run has no {modality} encoder (it has: {', '.join(pipe.encoder_names)})")


def run_key(run_dir: str | Path) -> str:
    """Identifies a run's trained weights (an index made with other weights is stale)."""
    run = RunDir(run_dir)
    h = hashlib.sha256()
    for p in (run.weights, run.model_info, run.convirt_weights):
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


# -- building ---------------------------------------------------------------------------------------------
@dataclass
class IndexSummary:
    dir: Path
    count: int
    modality: str
    structure: str
    export: Path | None = None


def build_index(run: str | Path, data: str, out: str | Path, split: str | None = None,
                modality: str | None = None, limit: int | None = None, seed: int = 0,
                exact_max: int = EXACT_MAX, memory_mb: int = DEFAULT_MEMORY_MB, device: str = "auto",
                progress: bool = True, export: tuple[str, Path] | None = None,
                structure: str = "auto", chunk: int = CHUNK, rank: int = 0, world: int = 1,
                shard_size: int | None = None) -> IndexSummary:
    """Embed ``data`` through ``run`` into the index directory ``out`` (see the module docstring).

    Under torchrun every rank calls it with its ``rank`` and the ``world`` size (see "Under torchrun" in
    the module docstring). ``chunk`` items are the unit of resume and of the split across ranks of the
    run's model and the structure; ``shard_size`` those of a feature store extracted on the way (None:
    :class:`lightcrl.embed.EmbedOptions`' default; a store already in the cache is reused as it is).
    """
    from lightcrl.rundir import load_pipeline

    if modality is not None and modality not in MODALITIES:
        raise LightCRLError(f"unknown modality {modality!r} (one of {', '.join(MODALITIES)})")
    choose_structure(0, 1, kind=structure)  # a typo fails now, not after embedding
    if export is not None and export[0] != "clip-retrieval":
        raise LightCRLError(f"unknown export format {export[0]!r}: only clip-retrieval is supported")
    if chunk < 1:
        raise LightCRLError(f"the chunk size must be at least 1, got {chunk}")
    pipe = load_pipeline(run, device=device)
    if pipe is None:
        raise LightCRLError(f"{run} holds the raw frozen encoders: there is no shared space to index")
    if _is_spec(data):
        col = _spec_collection(pipe, data, split, modality, limit, seed, device, rank, world, shard_size)
    elif Path(data).expanduser().is_dir():
        if world > 1:
            raise LightCRLError("a plain folder is indexed by one process (its incremental index is not "
                                "split across ranks): run `lightcrl index` without torchrun, or index a "
                                "dataset spec")
        col = _folder_collection(pipe, Path(data).expanduser(), modality, device, progress)
    else:
        raise LightCRLError(f"--data {data!r} is neither a dataset spec (KIND:PATH) nor a folder")
    if not col.items:
        raise LightCRLError(f"{data} has no readable {col.modality} items to index")

    d = IndexDir(out)
    n = len(col.items)
    key = None if col.fingerprint is None else {"run_key": run_key(run), "data": col.fingerprint, "count": n,
                                                 "chunk": chunk}
    _prepare_parts(d, key, rank, world)
    _embed_parts(d, col, n, chunk, rank, world, progress and rank == 0)
    if rank == 0:
        _assemble_embeddings(d, n, chunk)
        _write_items(d.items, col.items)
    _barrier(world)
    emb = np.load(d.embeddings, mmap_mode="r")
    dim = int(emb.shape[1])
    params = choose_structure(n, dim, exact_max, memory_mb, kind=structure)
    if params["kind"] == "exact":
        if rank == 0:
            d.faiss.unlink(missing_ok=True)
    else:
        build_structure(emb, params, d.faiss, progress=progress, seed=seed, rank=rank, world=world,
                        scratch=d.parts, chunk=chunk)
    summary = IndexSummary(d.path, n, col.modality, params["kind"])
    if rank == 0:
        info = {"version": INDEX_VERSION, "run": str(Path(run).resolve()), "run_key": run_key(run),
                "modality": col.modality, "count": n, "dim": dim, "structure": params,
                "root": str(col.root) if col.root else None, "source": col.source,
                "hubness": _write_hubness(d, pipe, emb, col.modality)}
        if export is not None:
            summary.export = export_clip_retrieval(pipe, d, col, Path(export[1]))
        write_json(d.info, info)  # last: the index is complete
        shutil.rmtree(d.parts, ignore_errors=True)
    _barrier(world)
    return summary


def _write_hubness(d: IndexDir, pipe, emb: np.ndarray, modality: str) -> dict[str, Any] | None:
    """The gallery's CSLS offsets per query modality (``hubness.npy``), or None (plain cosine)."""
    from lightcrl.hubness import gallery_offsets
    from lightcrl.io import save_npy

    offsets = gallery_offsets(getattr(pipe, "model", None), emb, modality)
    if not offsets:
        d.hubness.unlink(missing_ok=True)
        return None
    save_npy(d.hubness, np.stack(list(offsets.values()), axis=1).astype(np.float32))
    return {"query_modalities": list(offsets), "k": int(pipe.model.cfg.hubness.k)}


def _prepare_parts(d: IndexDir, key: dict[str, Any] | None, rank: int, world: int) -> None:
    """Rank 0 marks the index unfinished and keeps the scratch folder's finished chunks when ``key`` (what
    they were computed from) is unchanged, else empties it; the other ranks wait."""
    if rank == 0:
        d.path.mkdir(parents=True, exist_ok=True)
        d.info.unlink(missing_ok=True)  # the index is not usable until index.json is written again
        old = None
        with contextlib.suppress(OSError, ValueError):
            old = read_json(d.parts / "key.json")
        if key is None or old != key:
            shutil.rmtree(d.parts, ignore_errors=True)
        elif any(d.parts.glob("emb_*.npy")):
            log.info("resuming: %d embedded chunks kept in %s", len(list(d.parts.glob("emb_*.npy"))), d.parts)
        for p in d.parts.glob(".*.tmp"):  # left by a killed run
            p.unlink(missing_ok=True)
        d.parts.mkdir(parents=True, exist_ok=True)
        write_json(d.parts / "key.json", key)
    _barrier(world)


def _embed_parts(d: IndexDir, col: _Collection, n: int, chunk: int, rank: int, world: int,
                 progress: bool) -> None:
    """This rank's block of rows through the run, one ``emb_<chunk>.npy`` a chunk (missing ones only)."""
    from tqdm.auto import tqdm

    from lightcrl.io import save_npy

    a, b = rank_rows(n, chunk, rank, world)
    todo = [s for s in range(a, b, chunk) if not d.part(s // chunk).is_file()]
    done = b - a - sum(min(chunk, b - s) for s in todo)
    bar = tqdm(total=b - a, initial=done, desc=f"embed {col.modality}", unit="item",
               disable=not progress or n <= chunk, dynamic_ncols=True)
    for s in todo:
        stop = min(s + chunk, b)
        save_npy(d.part(s // chunk), np.asarray(col.embed_rows(s, stop), np.float32))
        bar.update(stop - s)
    bar.close()
    _barrier(world)


def _assemble_embeddings(d: IndexDir, n: int, chunk: int) -> None:
    """The chunks into one memmapped .npy (bounded memory: one chunk at a time), replaced atomically."""
    first = np.load(d.part(0), mmap_mode="r")
    tmp = d.embeddings.with_name(f".{d.embeddings.name}.tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, first.shape[1]))
    for c in range(-(-n // chunk)):
        part = np.load(d.part(c), mmap_mode="r")
        rows = min(chunk, n - c * chunk)
        if part.shape != (rows, first.shape[1]):
            raise LightCRLError(f"{d.part(c)} holds {part.shape[0]} rows, expected {rows}: delete {d.parts} "
                                "and run `lightcrl index` again")
        out[c * chunk : c * chunk + len(part)] = part
    out.flush()
    del out
    os.replace(tmp, d.embeddings)


def _write_items(path: Path, items: Sequence[Item]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    try:
        con.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, key TEXT NOT NULL, path TEXT, caption TEXT, "
                    "label TEXT, size INTEGER)")
        con.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)",
                        [(i.id, i.key, i.path, i.caption, i.label, i.size) for i in items])
        con.commit()
    finally:
        con.close()
    os.replace(tmp, path)


def export_clip_retrieval(pipe, d: IndexDir, col: _Collection, out: Path) -> Path:
    """clip-retrieval's layout: img_emb/img_emb_0.npy, text_emb/text_emb_0.npy (captions, when every
    item has one), metadata/metadata_0.parquet (image_path, caption, key, label), float16 embeddings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lightcrl.io import save_npy

    if col.modality == "audio":
        raise LightCRLError("clip-retrieval's layout holds images and texts, not audio")
    emb = np.load(d.embeddings, mmap_mode="r")
    name = "img" if col.modality == "image" else "text"
    (out / f"{name}_emb").mkdir(parents=True, exist_ok=True)
    save_npy(out / f"{name}_emb" / f"{name}_emb_0.npy", np.asarray(emb, np.float16))
    captions = [i.caption for i in col.items]
    if col.modality == "image" and all(c for c in captions):
        text = np.concatenate([pipe.encode_text(captions[s : s + 1024], progress=False)
                               for s in range(0, len(captions), 1024)])
        (out / "text_emb").mkdir(parents=True, exist_ok=True)
        save_npy(out / "text_emb" / "text_emb_0.npy", text.astype(np.float16))
    table = pa.table({
        "image_path": [i.path for i in col.items],
        "caption": captions,
        "key": [i.key for i in col.items],
        "label": [i.label for i in col.items],
    })
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "metadata" / "metadata_0.parquet")
    return out


# -- searching --------------------------------------------------------------------------------------------
class SearchIndex:
    """A built index, loaded once: ``search(vector, k)`` and item metadata. Safe to share across threads."""

    def __init__(self, path: str | Path, memory_mb: int = DEFAULT_MEMORY_MB) -> None:
        self.dir = IndexDir(path)
        if not self.dir.info.is_file():
            hint = " (unfinished: run `lightcrl index` again)" if self.dir.embeddings.exists() else ""
            raise LightCRLError(f"no lightcrl index at {self.dir.path}: index.json missing{hint}")
        self.info: dict[str, Any] = read_json(self.dir.info)
        if self.info.get("version") != INDEX_VERSION:
            raise LightCRLError(f"{self.dir.path} is an index in format version {self.info.get('version')}, "
                                f"this lightcrl reads {INDEX_VERSION}: rebuild it with `lightcrl index`")
        self.structure: dict[str, Any] = self.info["structure"]
        emb = np.load(self.dir.embeddings, mmap_mode="r")
        # exact search reads every row each query: keep them in RAM when they fit (HNSW holds its own
        # copy, IVF-PQ re-ranks a few rows: both read the memmap)
        exact = self.structure["kind"] == "exact"
        self.embeddings = np.asarray(emb) if exact and emb.nbytes <= memory_mb * 2**20 else emb
        self._faiss = None
        if self.structure["kind"] != "exact":
            import faiss

            self._faiss = faiss.read_index(str(self.dir.faiss))
        hub = self.info.get("hubness") or {}
        self.hubness_modalities: list[str] = list(hub.get("query_modalities", []))
        # [N, Q]: 4 bytes an item and query modality, in memory
        self._hubness = np.load(self.dir.hubness) if self.hubness_modalities else None
        self._local = threading.local()

    def __len__(self) -> int:
        return int(self.info["count"])

    @property
    def modality(self) -> str:
        return self.info["modality"]

    @property
    def root(self) -> Path | None:
        return Path(self.info["root"]) if self.info.get("root") else None

    def offsets(self, query_modality: str | None) -> np.ndarray | None:
        """Each row's hubness offset [N] for queries of ``query_modality``, or None (plain cosine)."""
        if query_modality not in self.hubness_modalities:
            return None
        return self._hubness[:, self.hubness_modalities.index(query_modality)]

    def search(self, query: np.ndarray, k: int, query_modality: str | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows for a unit query vector [d]: (ids, scores), best first. ``query_modality``: the
        query's modality; with a hubness offset for it (see the module docstring) a score is cosine +
        offset, else the cosine."""
        q = np.ascontiguousarray(np.asarray(query, np.float32).reshape(1, -1))
        k = max(1, min(int(k), len(self)))
        kind = self.structure["kind"]
        offsets = self.offsets(query_modality)
        if kind == "exact":
            return self._exact(q[0], k, offsets)
        import faiss

        if kind == "hnsw":
            wide = k if offsets is None else min(len(self), k * RERANK)
            params = faiss.SearchParametersHNSW(efSearch=max(self.structure["ef_search"], 2 * wide))
            scores, ids = self._faiss.search(q, wide, params=params)
            keep = ids[0] >= 0
            if offsets is None:
                return ids[0][keep].astype(np.int64), scores[0][keep]
            cand = np.sort(ids[0][keep])
        else:
            params = faiss.SearchParametersIVF(nprobe=self.structure["nprobe"])
            _, cand = self._faiss.search(q, min(len(self), k * self.structure["rerank"]), params=params)
            cand = np.sort(cand[0][cand[0] >= 0])  # ascending rows: sequential reads of the memmap
        exact = np.asarray(self.embeddings[cand], np.float32) @ q[0]
        if offsets is not None:
            exact = exact + offsets[cand]
        order = np.lexsort((cand, -exact))[:k]
        return cand[order].astype(np.int64), exact[order]

    def _exact(self, q: np.ndarray, k: int, offsets: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        scores = np.empty(len(self), np.float32)
        for s in range(0, len(self), 262_144):  # bounded temporaries on a memmap
            scores[s : s + 262_144] = np.asarray(self.embeddings[s : s + 262_144]) @ q
        if offsets is not None:
            scores += offsets
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        # the k-th score may be tied with rows outside the partition: take every row at that score
        top = np.union1d(top, np.flatnonzero(scores == scores[top].min()))
        order = np.lexsort((top, -scores[top]))[:k]  # by score, then the lower row first
        return top[order].astype(np.int64), scores[top[order]]

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:  # one read-only connection per thread
            con = sqlite3.connect(f"file:{self.dir.items.resolve()}?mode=ro", uri=True,
                                  check_same_thread=True)
            self._local.con = con
        return con

    def items(self, ids: Sequence[int]) -> list[Item]:
        """Metadata of the given rows, in that order."""
        ids = [int(i) for i in ids]
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        sql = f"SELECT id, key, path, caption, label, size FROM items WHERE id IN ({marks})"
        rows = self._con().execute(sql, ids).fetchall()
        by_id = {r[0]: Item(*r) for r in rows}
        return [by_id[i] for i in ids if i in by_id]

    def item(self, item_id: int) -> Item | None:
        found = self.items([item_id]) if 0 <= item_id < len(self) else []
        return found[0] if found else None

    def root_of(self, item_id: int) -> Path | None:
        """The folder under which item ``item_id``'s media may be served (the collection's root)."""
        return self.root


class ShardedIndex:
    """Several index directories searched as one: the parts of a collection, built with the same run.

    Part i's rows come after those of parts 0..i-1 (global id = offset + row), so parts made from the
    consecutive pieces of a collection number its items as one index over the whole would. A query runs
    on every part and their top-k lists are merged by score, ties to the lower global id: the merged
    exact top-k is the one index's (inner products of unit vectors compare across parts). Same interface
    as :class:`SearchIndex`.
    """

    def __init__(self, paths: Sequence[str | Path], memory_mb: int = DEFAULT_MEMORY_MB) -> None:
        resolved = [Path(p).resolve() for p in paths]
        if len(set(resolved)) != len(resolved):
            raise LightCRLError("the same index directory is given twice")
        self.parts = [SearchIndex(p, memory_mb // max(1, len(paths))) for p in paths]
        first = self.parts[0].info
        for p in self.parts[1:]:
            for field in ("run_key", "modality", "dim", "hubness"):
                if p.info.get(field) != first.get(field):
                    raise LightCRLError(f"{p.dir.path} and {self.parts[0].dir.path} differ in {field} "
                                        f"({p.info.get(field)} != {first.get(field)}): only indexes built "
                                        "with the same run over the same modality are searched together")
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.hubness_modalities = self.parts[0].hubness_modalities
        kinds = {p.structure["kind"] for p in self.parts}
        self.structure = {"kind": kinds.pop() if len(kinds) == 1 else "mixed",
                          "parts": [p.structure for p in self.parts]}
        self.info: dict[str, Any] = {**first, "count": int(self.offsets[-1]), "structure": self.structure,
                                     "root": None, "parts": [str(p.dir.path) for p in self.parts]}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def modality(self) -> str:
        return self.info["modality"]

    @property
    def root(self) -> Path | None:
        return None

    def _locate(self, item_id: int) -> tuple[int, int] | None:
        if not 0 <= item_id < len(self):
            return None
        part = int(np.searchsorted(self.offsets, item_id, side="right")) - 1
        return part, item_id - int(self.offsets[part])

    def root_of(self, item_id: int) -> Path | None:
        where = self._locate(int(item_id))
        return None if where is None else self.parts[where[0]].root

    def search(self, query: np.ndarray, k: int, query_modality: str | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` global ids for a unit query vector [d]: (ids, scores), best first (scores as
        :meth:`SearchIndex.search`'s: each part's offsets come from the same run's bank)."""
        k = max(1, min(int(k), len(self)))
        found = [p.search(query, k, query_modality) for p in self.parts]
        ids = np.concatenate([f[0] + off for f, off in zip(found, self.offsets)])
        scores = np.concatenate([f[1] for f in found]).astype(np.float32)
        order = np.lexsort((ids, -scores))[:k]  # by score, then the lower global id
        return ids[order], scores[order]

    def items(self, ids: Sequence[int]) -> list[Item]:
        """Metadata of the given global ids, in that order (``Item.id`` is the global id)."""
        located = [(int(i), self._locate(int(i))) for i in ids]
        by_part: dict[int, list[int]] = {}
        for _, where in located:
            if where is not None:
                by_part.setdefault(where[0], []).append(where[1])
        found = {}
        for part, rows in by_part.items():
            for item in self.parts[part].items(rows):
                found[(part, item.id)] = item
        out = []
        for gid, where in located:
            item = found.get(where) if where is not None else None
            if item is not None:
                out.append(Item(gid, item.key, item.path, item.caption, item.label, item.size))
        return out

    def item(self, item_id: int) -> Item | None:
        found = self.items([item_id])
        return found[0] if found else None


def open_index(paths: str | Path | Sequence[str | Path],
               memory_mb: int = DEFAULT_MEMORY_MB) -> SearchIndex | ShardedIndex:
    """One index directory, or several searched together (:class:`ShardedIndex`)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise LightCRLError("no index directory given")
    return SearchIndex(paths[0], memory_mb) if len(paths) == 1 else ShardedIndex(paths, memory_mb)
