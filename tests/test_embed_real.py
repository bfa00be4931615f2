"""Integration: extraction with the two offline encoders on 200 real Flickr8k dev images."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lightcrl.embed import EmbedOptions, embed
from lightcrl.store import FeatureStore

pytestmark = pytest.mark.integration
N_IMAGES = 200
SHARD = 64


@pytest.fixture(scope="module")
def image_store(flickr_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("img") / "store"
    return embed(
        "efficientnet-lite0",
        flickr_spec,
        "dev",
        out,
        EmbedOptions(limit=N_IMAGES, shard_size=SHARD, batch_size=32),
    )


@pytest.fixture(scope="module")
def text_store(flickr_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("txt") / "store"
    return embed("minilm-l6", flickr_spec, "dev", out, EmbedOptions(limit=N_IMAGES, shard_size=512))


def test_image_store_shapes_counts(image_store):
    m = image_store.manifest
    assert m["count"] == N_IMAGES and m["skipped"] == [] and len(m["fingerprint"]) == 64
    assert image_store.dim == 1280
    assert (image_store.lengths == 49).all()  # 7x7 map
    tok, mask = image_store.tokens(np.arange(5))
    assert tok.shape == (5, 49, 1280) and mask.all()
    # pooled = spatial mean of the map (fp16 token storage tolerance)
    np.testing.assert_allclose(image_store.pooled(np.arange(5)), tok.astype(np.float32).mean(1), atol=2e-2)
    assert len(m["shards"]) == (N_IMAGES + SHARD - 1) // SHARD


def test_text_store_every_caption_linked_and_padding_masked(image_store, text_store):
    assert len(text_store) == 5 * N_IMAGES
    assert set(text_store.items.groups) == set(image_store.items.ids)
    assert all(t and t.strip() for t in text_store.items.texts)
    idx = np.arange(64)
    tok, mask = text_store.tokens(idx)
    lengths = text_store.lengths[idx]
    assert (mask.sum(1) == lengths).all() and lengths.min() < lengths.max()
    # the pooled vector is the masked mean: padding never counted
    manual = (tok.astype(np.float32) * mask[..., None]).sum(1) / lengths[:, None]
    np.testing.assert_allclose(text_store.pooled(idx), manual, atol=2e-2)
    # and it equals sentence-transformers' mean pooling of the same caption
    from lightcrl.encoders import get_encoder

    enc = get_encoder("minilm-l6")
    live = enc.encode([text_store.items.texts[0]]).pooled.numpy()[0]
    np.testing.assert_allclose(text_store.pooled([0])[0], live, atol=1e-4)


def test_two_runs_identical(flickr_spec, text_store, tmp_path):
    again = embed(
        "minilm-l6", flickr_spec, "dev", tmp_path / "again", EmbedOptions(limit=N_IMAGES, shard_size=512)
    )
    for name in ("tokens", "offsets", "pooled"):
        a = np.load(text_store.dir / f"shard_00000.{name}.npy")
        b = np.load(again.dir / f"shard_00000.{name}.npy")
        np.testing.assert_array_equal(a, b)
    assert again.fingerprint == text_store.fingerprint


def test_kill_after_first_shard_then_resume_is_bitwise_identical(flickr_spec, image_store, tmp_path):
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "lightcrl",
        "embed",
        "--encoder",
        "efficientnet-lite0",
        "--data",
        flickr_spec,
        "--split",
        "dev",
        "--out",
        str(out),
        "--limit",
        str(N_IMAGES),
        "--shard-size",
        str(SHARD),
        "--batch-size",
        "32",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (out / "shard_00000.json").exists():
        assert proc.poll() is None, "extraction ended before the first shard was seen"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    done = len(list(out.glob("shard_*.json")))
    assert 1 <= done < len(image_store.manifest["shards"])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed = FeatureStore(out)
    assert resumed.fingerprint == image_store.fingerprint
    for p in sorted(image_store.dir.glob("shard_*.npy")):
        np.testing.assert_array_equal(np.load(p), np.load(out / p.name))
    assert resumed.manifest["items"] == image_store.manifest["items"]
