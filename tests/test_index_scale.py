"""`lightcrl index` past one process: torchrun ranks build the index one process builds, a killed build
resumes, and the parts of a collection (one index each) are searched as one index over the union."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_pairs_csv
from test_train import toy_config

import lightcrl.io
from lightcrl.app.config import validate_config
from lightcrl.app.index import (
    INDEX_VERSION,
    IndexDir,
    Item,
    SearchIndex,
    ShardedIndex,
    _write_items,
    build_index,
    open_index,
    rank_rows,
)
from lightcrl.app.train import train
from lightcrl.errors import LightCRLError
from lightcrl.io import write_json

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy run (one epoch on 40 coloured squares) and two csv files splitting its collection in two."""
    root = tmp_path_factory.mktemp("scale")
    spec = make_pairs_csv(root / "pairs", n=40)
    train(validate_config(toy_config(spec, **{"optim.epochs": 1})), root / "run")
    lines = (root / "pairs" / "pairs.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:]  # two captions an image, images in order
    parts = []
    for i, (a, b) in enumerate(((0, 30), (30, 80))):  # 15 and 25 images
        (root / "pairs" / f"part{i}.csv").write_text("\n".join([header, *rows[a:b]]) + "\n")
        parts.append(f"csv:{root / 'pairs' / f'part{i}.csv'}")
    return {"root": root, "spec": spec, "run": root / "run", "parts": parts}


def _queries(dim: int, n: int = 12) -> np.ndarray:
    q = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_rank_rows_are_consecutive_blocks_of_whole_chunks():
    for n, chunk, world in ((40, 8, 2), (41, 8, 3), (5, 8, 2), (100_000, 8192, 4)):
        blocks = [rank_rows(n, chunk, r, world) for r in range(world)]
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        assert all(blocks[r][1] == blocks[r + 1][0] for r in range(world - 1))
        assert all(a % chunk == 0 or a == b == n for a, b in blocks)  # an idle rank: (n, n)
    assert rank_rows(40, 8, 0, 2) == (0, 24) and rank_rows(40, 8, 1, 2) == (24, 40)


@pytest.mark.slow
def test_torchrun_index_equals_one_process(toy, tmp_path):
    """2 ranks (gloo, CPU) extract the store, embed and add their rows: the same index as 1 process."""
    import torch

    out = {"one": tmp_path / "one", "two": tmp_path / "two"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs (OMP_NUM_THREADS=1), faiss included
    try:
        build_index(toy["run"], toy["spec"], out["one"], structure="ivfpq", chunk=8, progress=False)
    finally:
        torch.set_num_threads(threads)
    # --run-dir: torchrun's parser would take --run for its --run-path
    args = ["index", "--run-dir", str(toy["run"]), "--data", toy["spec"], "--structure", "ivfpq",
            "--chunk-size", "8", "--shard-size", "8", "--out", str(out["two"])]
    # its own feature-store cache: the two ranks extract the store (its 5 shards split between them)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LIGHTCRL_CACHE": str(tmp_path / "cache-two")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port=29547", str(TESTS / "toy_cli.py"), *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("indexed 40 image items (ivfpq search)") == 1  # rank 0 alone reports
    assert not (out["two"] / ".parts").exists()
    stores = list((tmp_path / "cache-two" / "stores").glob("toy-image-*"))
    assert len(stores) == 1 and len(list(stores[0].glob("shard_*.npy"))) >= 5
    one, two = SearchIndex(out["one"]), SearchIndex(out["two"])
    emb = [np.load(out[name] / "embeddings.npy") for name in ("one", "two")]
    np.testing.assert_array_equal(*emb)
    assert [i.key for i in one.items(range(40))] == [i.key for i in two.items(range(40))]
    assert two.info["structure"] == one.info["structure"]
    import faiss

    a, b = (faiss.read_index(str(out[name] / "faiss.index")) for name in ("one", "two"))
    assert a.ntotal == b.ntotal == 40
    np.testing.assert_array_equal(*(faiss.vector_to_array(x.pq.centroids) for x in (a, b)))
    queries = _queries(one.info["dim"])
    da, ia = a.search(queries, 10)
    db, ib = b.search(queries, 10)
    np.testing.assert_array_equal(ia, ib)  # same trained quantiser: the same approximate neighbours
    np.testing.assert_array_equal(da, db)
    for q in queries:
        assert one.search(q, 5)[0].tolist() == two.search(q, 5)[0].tolist()


def test_killed_build_resumes_from_finished_chunks(toy, tmp_path, monkeypatch):
    out = tmp_path / "ix"
    written: list[str] = []
    save = lightcrl.io.save_npy

    def dies_on_third_chunk(path, array):
        if Path(path).name.startswith("emb_") and len(written) == 2:
            raise KeyboardInterrupt  # as if the process were killed while embedding chunk 2
        written.append(Path(path).name)
        save(path, array)

    monkeypatch.setattr(lightcrl.io, "save_npy", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        build_index(toy["run"], toy["spec"], out, chunk=8, progress=False)
    assert not (out / "index.json").exists() and sorted(p.name for p in (out / ".parts").glob("emb_*")) == [
        "emb_000000.npy", "emb_000001.npy"]
    written.clear()
    monkeypatch.setattr(lightcrl.io, "save_npy", lambda p, a: (written.append(Path(p).name), save(p, a)))
    res = build_index(toy["run"], toy["spec"], out, chunk=8, progress=False)
    assert res.count == 40 and written == ["emb_000002.npy", "emb_000003.npy", "emb_000004.npy"]
    fresh = build_index(toy["run"], toy["spec"], tmp_path / "fresh", chunk=8, progress=False)
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), np.load(fresh.dir / "embeddings.npy"))
    # other chunking: the finished chunks are not reused
    written.clear()
    build_index(toy["run"], toy["spec"], out, chunk=16, progress=False)
    assert written == ["emb_000000.npy", "emb_000001.npy", "emb_000002.npy"]


def test_parts_searched_together_equal_one_index_over_the_union(toy, tmp_path):
    from lightcrl.app.serve import SearchService

    union = build_index(toy["run"], toy["spec"], tmp_path / "union", progress=False).dir
    parts = [build_index(toy["run"], p, tmp_path / f"part{i}", progress=False).dir
             for i, p in enumerate(toy["parts"])]
    one, merged = SearchIndex(union), open_index(parts)
    assert isinstance(merged, ShardedIndex) and len(merged) == len(one) == 40
    assert [i.key for i in merged.items(range(40))] == [i.key for i in one.items(range(40))]
    for q in _queries(one.info["dim"]):
        for k in (1, 5, 40):
            ids, scores = merged.search(q, k)
            want_ids, want_scores = one.search(q, k)
            assert ids.tolist() == want_ids.tolist()
            np.testing.assert_allclose(scores, want_scores, atol=1e-6)

    service = SearchService(parts)
    whole = SearchService(union)
    got, want = service.search_text("a blue square", 10), whole.search_text("a blue square", 10)
    assert [(r["id"], r["path"], r["caption"]) for r in got["results"]] == [
        (r["id"], r["path"], r["caption"]) for r in want["results"]]
    assert got["count"] == 40 and service.describe()["parts"] == 2
    item, path = service.media_item("39")  # the last item of the second part
    assert item.key == "img039.png" and path.name == "img039.png"

    text = build_index(toy["run"], toy["parts"][0], tmp_path / "text", modality="text", progress=False).dir
    with pytest.raises(LightCRLError, match="differ in modality"):
        open_index([parts[0], text])
    with pytest.raises(LightCRLError, match="twice"):
        open_index([parts[0], parts[0]])


def _write_index(path: Path, emb: np.ndarray, keys: list[str]) -> Path:
    d = IndexDir(path)
    d.path.mkdir(parents=True)
    np.save(d.embeddings, emb)
    _write_items(d.items, [Item(i, k, None, None, None, None) for i, k in enumerate(keys)])
    write_json(d.info, {"version": INDEX_VERSION, "run": "r", "run_key": "k", "modality": "text",
                        "count": len(emb), "dim": emb.shape[1], "structure": {"kind": "exact"}, "root": None})
    return d.path


def test_merged_ties_rank_the_lower_global_id_first(tmp_path):
    """Equal scores across parts (duplicate vectors) rank as in one index: the lower global id first.

    Entries in {-0.5, 0, 0.5}: every inner product is exact in float32, so duplicates tie exactly (BLAS
    may round one inner product differently by an ulp depending on the block of rows it sits in)."""
    rng = np.random.default_rng(1)
    base = (rng.integers(-1, 2, (6, 8)) * 0.5).astype(np.float32)
    emb = np.concatenate([base, base[::-1], base])  # every vector three times, across both parts
    keys = [f"k{i}" for i in range(len(emb))]
    one = SearchIndex(_write_index(tmp_path / "one", emb, keys))
    merged = open_index([_write_index(tmp_path / "a", emb[:7], keys[:7]),
                         _write_index(tmp_path / "b", emb[7:], keys[7:])])
    for q in base:
        for k in (1, 2, 3, 4, 18):
            ids, scores = merged.search(q, k)
            assert ids.tolist() == one.search(q, k)[0].tolist()
            assert np.all(np.diff(scores) <= 0)
    assert [i.key for i in merged.items([17, 0, 7])] == ["k17", "k0", "k7"]
    assert merged.item(18) is None and merged.root_of(3) is None
