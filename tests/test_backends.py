"""Encoder backends (eager PyTorch vs ONNX Runtime) and length-bucketed text batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toy_encoders import ToyImage

from lightcrl.embed import EmbedOptions, cached_store, embed, plan_batches
from lightcrl.encoders import get_encoder
from lightcrl.encoders.backends import graph_path, onnx_available
from lightcrl.errors import LightCRLError, StoreMismatch

needs_onnx = pytest.mark.skipif(not onnx_available(), reason="onnxruntime/onnxscript not installed")

# The tolerance the docs state for the ONNX path: features differ by float error only.
TOKENS_ATOL = 1e-3
MIN_COSINE = 0.99999


def _compare(enc_name: str, items: list) -> tuple[float, float]:
    eager = get_encoder(enc_name, device="cpu", backend="eager")
    fast = get_encoder(enc_name, device="cpu", backend="onnx")
    batch = eager.collate([eager.transform(x) for x in items])
    a, b = eager.encode_batch(batch), fast.encode_batch(batch)
    assert torch.equal(a.mask, b.mask) and a.tokens.shape == b.tokens.shape
    diff = float((a.tokens - b.tokens)[a.mask].abs().max())
    cos = float(torch.nn.functional.cosine_similarity(a.pooled, b.pooled).min())
    return diff, cos


@needs_onnx
def test_image_encoder_onnx_equals_eager(shared_data):
    images = sorted((shared_data / "flickr8k" / "Images").glob("*.jpg"))[:6]
    diff, cos = _compare("efficientnet-lite0", images)
    assert diff < TOKENS_ATOL and cos > MIN_COSINE
    assert get_encoder("efficientnet-lite0", device="cpu").backend == "onnx"  # auto picks it on CPU


@needs_onnx
def test_text_encoder_onnx_equals_eager():
    texts = ["a dog", "two children are playing football on a sandy beach near the sea", "x"]
    diff, cos = _compare("minilm-l6", texts)
    assert diff < TOKENS_ATOL and cos > MIN_COSINE
    assert get_encoder("minilm-l6", device="cpu").backend == "eager"  # with bucketing, faster when quiet


def test_backend_choices_are_checked():
    with pytest.raises(LightCRLError, match="unknown encoder backend 'onnxx'"):
        get_encoder("toy-image", backend="onnxx")
    with pytest.raises(LightCRLError, match="has no ONNX path"):
        get_encoder("toy-text", backend="onnx")
    assert get_encoder("toy-text").backend == "eager"


@needs_onnx
def test_store_of_one_backend_is_refused_for_the_other(tmp_path, pairs_csv):
    out = tmp_path / "img"
    eager = EmbedOptions(shard_size=16, batch_size=8, num_workers=0, encoder_backend="eager")
    onnx = EmbedOptions(shard_size=16, batch_size=8, num_workers=0, encoder_backend="onnx")
    s_eager = embed("toy-image", pairs_csv, None, out, eager)
    assert s_eager.manifest["encoder"]["identity"]["backend"] == "eager"
    refusal = "eager encoder backend; this run asks for onnx.*--encoder-backend eager"
    with pytest.raises(StoreMismatch, match=refusal):
        embed("toy-image", pairs_csv, None, out, onnx)
    assert embed("toy-image", pairs_csv, None, out, eager).fingerprint == s_eager.fingerprint  # reusable
    onnx.overwrite = True
    s_onnx = embed("toy-image", pairs_csv, None, out, onnx)
    assert s_onnx.manifest["encoder"]["identity"]["backend"] == "onnx"
    np.testing.assert_allclose(s_onnx.pooled(), s_eager.pooled(), atol=1e-5)


@needs_onnx
def test_cache_keeps_one_store_per_backend_and_one_graph(tmp_path, pairs_csv):
    opts = {"shard_size": 16, "batch_size": 8, "num_workers": 0}
    a = cached_store("toy-image", pairs_csv, None, EmbedOptions(encoder_backend="eager", **opts))
    b = cached_store("toy-image", pairs_csv, None, EmbedOptions(encoder_backend="onnx", **opts))
    assert a.dir != b.dir and a.fingerprint != b.fingerprint  # re-extracted, never mixed
    graph = graph_path(get_encoder("toy-image", backend="onnx"))
    assert graph.exists()
    mtime = graph.stat().st_mtime_ns
    ToyImage(device="cpu", backend="onnx").encode([_png(tmp_path)])  # a new session reads the cached graph
    assert graph.stat().st_mtime_ns == mtime
    graph.write_bytes(b"damaged")  # a damaged cache file is exported again
    out = ToyImage(device="cpu", backend="onnx").encode([_png(tmp_path)])
    assert graph.stat().st_size > 100 and out.tokens.shape == (1, 4, 16)


@needs_onnx
def test_graph_exported_from_a_one_item_batch_keeps_the_batch_dynamic(tmp_path, monkeypatch):
    """torch.export specialises a size-1 axis: EfficientNet-Lite0 exported from a first batch of ONE image
    (``encode_image(["one.jpg"])`` on a fresh cache) failed with "Constraints violated (batch)". The sample
    the exporter gets has every dynamic axis at 2 or more (the toy's export alone would not fail)."""
    import lightcrl.encoders.backends as backends

    seen = []
    real_export = torch.onnx.export

    def spy(module, args, *a, **kw):
        seen.append([tuple(x.shape) for x in args])
        return real_export(module, args, *a, **kw)

    monkeypatch.setattr(backends.torch.onnx, "export", spy)
    monkeypatch.setenv("LIGHTCRL_CACHE", str(tmp_path / "cache"))  # no graph yet: this batch exports it
    enc = ToyImage(device="cpu", backend="onnx")
    one = enc.encode([_png(tmp_path)])
    assert seen == [[(2, 4, 3)]]
    three = enc.encode([_png(tmp_path)] * 3)
    assert one.tokens.shape == (1, 4, 16) and three.tokens.shape == (3, 4, 16)
    eager = ToyImage(device="cpu", backend="eager").encode([_png(tmp_path)])
    torch.testing.assert_close(one.tokens, eager.tokens, atol=1e-5, rtol=0)


def _png(tmp_path):
    from PIL import Image

    p = tmp_path / "one.png"
    Image.new("RGB", (8, 8), (10, 200, 30)).save(p)
    return p


def test_plan_batches_sorts_text_by_length_within_shards():
    lengths = [5, 1, 4, 1, 3, 9, 2, 0, 7, 6]
    batches = plan_batches([0, 1], shard_size=6, batch_size=2, n=10, lengths=lengths)
    assert batches == [[1, 3], [4, 2], [0, 5], [7, 6], [9, 8]]
    assert plan_batches([1], 6, 4, 10) == [[6, 7, 8, 9]]  # media: consecutive positions


def test_bucketed_text_store_keeps_record_order(tmp_path):
    texts = ["one", "a much longer caption with many words in it", "two words", "x y z w", "the end"] * 3
    csv = tmp_path / "t.csv"
    csv.write_text("filepath,title\n" + "".join(f"img{i}.png,{t} {i}\n" for i, t in enumerate(texts)))
    from PIL import Image

    for i in range(len(texts)):
        Image.new("RGB", (4, 4)).save(tmp_path / f"img{i}.png")
    store = embed("toy-text", f"csv:{csv}", None, tmp_path / "s", EmbedOptions(shard_size=8, batch_size=3))
    enc = get_encoder("toy-text")
    assert list(store.items.texts) == [f"{t} {i}" for i, t in enumerate(texts)]
    for i, text in enumerate(store.items.texts):  # each row holds its own caption's features
        np.testing.assert_allclose(store.pooled()[i], enc.encode([text]).pooled[0].numpy(), atol=2e-3)


def test_prefetch_thread_keeps_order_and_raises_errors():
    from lightcrl.embed import _prefetched

    assert list(_prefetched(iter(range(50)), depth=2)) == list(range(50))

    def broken():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(_prefetched(broken()))
