"""Integration on real data: index 100 Flickr8k dev images through a quick-trained run, search over HTTP."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from test_serve import live_server

from lightcrl.app.config import load_config
from lightcrl.app.index import build_index
from lightcrl.app.serve import SearchService
from lightcrl.app.train import train
from lightcrl.data.datasets import open_dataset
from lightcrl.metrics import retrieval

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
N = 100


@pytest.fixture(scope="module")
def flickr_index(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-real")
    spec = f"flickr8k:{shared_data / 'flickr8k'}"
    cfg = load_config(REPO / "configs" / "smoke.yaml", [
        f"data.sources.0.spec={spec}", "data.sources.0.limit=100", f"data.sources.0.val_limit={N}",
        "optim.epochs=1", "progress=false"])
    train(cfg, root / "run")
    res = build_index(root / "run", spec, root / "index", split="dev", limit=N, progress=False)
    return spec, res


def _get(port: int, q: str, k: int) -> dict:
    url = f"http://127.0.0.1:{port}/api/search?" + urllib.parse.urlencode({"q": q, "k": k})
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def test_http_search_on_flickr8k_dev_matches_the_evaluator(flickr_index):
    spec, res = flickr_index
    assert res.count == N and res.structure == "exact"
    service = SearchService(res.dir)
    ds = open_dataset(spec, "dev").subsample(N, seed=0)
    keys = [i.key for i in service.index.items(range(N))]
    assert sorted(keys) == sorted(r.id for r in ds.media_records())
    first_caption: dict[str, str] = {}
    for t in ds.text_records():
        first_caption.setdefault(t.group, t.text)
    captions = [first_caption[k] for k in keys]

    with live_server(service) as port:
        hits = _get(port, "a dog runs on the grass", 10)["results"]
        assert len(hits) == 10 and {h["key"] for h in hits} <= set(keys)
        top1 = [_get(port, c, 1)["results"][0]["id"] for c in captions]
    http_r1 = 100.0 * np.mean(np.array(top1) == np.arange(N))

    # the same vectors through lightcrl.metrics.retrieval: caption i describes image (row) i
    text = service.pipe.encode_text(captions, progress=False)
    images = np.load(res.dir / "embeddings.npy")
    ref = retrieval.evaluate(images, text, np.arange(N))
    assert http_r1 == pytest.approx(ref["image_retrieval_recall@1"], abs=1e-9)
    assert http_r1 > 2  # above chance (1 % on 100 images), after one epoch on 100 pairs
