"""Encoder backends (eager PyTorch vs ONNX Runtime) and length-bucketed text batches."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_pairs_csv
from toy_encoders import ToyImage

from lightcrl.embed import EmbedOptions, cached_store, embed, plan_batches
from lightcrl.encoders import get_encoder
from lightcrl.encoders.backends import graph_path, onnx_available
from lightcrl.errors import LightCRLError, StoreMismatch
from lightcrl.store import completed_shards

needs_onnx = pytest.mark.skipif(not onnx_available(), reason="onnxruntime/onnxscript not installed")

# The tolerance the docs state for the ONNX path: features differ by float error only, as stored (float16:
# the two paths' float32 tokens may round to neighbouring float16 values, one step = 2**-10 relative).
TOKENS_ATOL = 1e-3
FP16_STEP = 2.0**-10
MIN_COSINE = 0.99999


def _compare(enc_name: str, items: list) -> tuple[float, float]:
    eager = get_encoder(enc_name, device="cpu", backend="eager")
    fast = get_encoder(enc_name, device="cpu", backend="onnx")
    batch = eager.collate([eager.transform(x) for x in items])
    a, b = (e.encode_batch(batch, tokens_dtype=torch.float16) for e in (eager, fast))
    assert torch.equal(a.mask, b.mask) and a.tokens.shape == b.tokens.shape
    assert a.tokens.dtype == b.tokens.dtype == torch.float16
    ta, tb = a.tokens.float(), b.tokens.float()
    diff = float(((ta - tb).abs() - FP16_STEP * ta.abs())[a.mask].max())  # beyond float16 rounding
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
    torch.testing.assert_close(one.tokens, eager.tokens, atol=1e-5, rtol=FP16_STEP)  # float16 graph output


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


def test_repeated_texts_are_encoded_once_per_shard(tmp_path, monkeypatch):
    # label captions: the same few prompts for every item of a class, plus one unique caption
    texts = ["a dog barking .", "the sound of a dog .", "a cat meowing .", "the sound of a cat ."] * 5
    texts[7] = "one unique caption with more words"
    csv = tmp_path / "t.csv"
    csv.write_text("filepath,title\n" + "".join(f"img{i}.png,{t}\n" for i, t in enumerate(texts)))
    from PIL import Image

    for i in range(len(texts)):
        Image.new("RGB", (4, 4)).save(tmp_path / f"img{i}.png")
    enc = get_encoder("toy-text")
    seen: list[int] = []
    real = type(enc).encode_batch

    def counting(self, batch, *a, **k):
        out = real(self, batch, *a, **k)
        seen.append(out.pooled.shape[0])
        return out

    monkeypatch.setattr(type(enc), "encode_batch", counting)
    opts = EmbedOptions(shard_size=8, batch_size=3, progress=False)
    store = embed(enc, f"csv:{csv}", None, tmp_path / "dedup", opts)
    # shards of 8: 0-7 (4 + the unique), 8-15 (4), 16-19 (4): each shard encodes its distinct texts once
    assert sum(seen) == 5 + 4 + 4
    seen.clear()
    plain = embed(enc, f"csv:{csv}", None, tmp_path / "plain", replace(opts, dedupe_text=False))
    assert sum(seen) == len(texts)
    assert list(store.items.texts) == list(plain.items.texts) == texts
    np.testing.assert_allclose(store.pooled(), plain.pooled(), atol=1e-6)
    t1, m1 = store.tokens(np.arange(len(texts)))
    t2, m2 = plain.tokens(np.arange(len(texts)))
    assert np.array_equal(m1, m2)
    np.testing.assert_allclose(t1.astype(np.float32), t2.astype(np.float32), atol=2e-3)


def test_a_skipped_text_skips_its_repeats():
    from lightcrl.data.records import Record
    from lightcrl.embed import _copy_repeats, _Shard, shard_repeats

    records = [Record(id=f"c{i}", path=None, text=t) for i, t in enumerate(["a", "", "a", "", "b"])]
    repeats = shard_repeats([r.text for r in records], [0], 8)
    assert repeats == {0: [(2, 0), (3, 1)]}
    shard = _Shard(0, writer=None, tokens=[np.ones((1, 2)), np.zeros((1, 2))], kept=[0, 4],
                   pooled=[np.array([[1.0], [2.0]])], skipped=[{"id": "c1", "reason": "empty"}])
    _copy_repeats(shard, repeats[0], records)
    assert shard.kept == [0, 4, 2] and np.concatenate(shard.pooled).ravel().tolist() == [1.0, 2.0, 1.0]
    assert shard.skipped[-1] == {"id": "c3", "reason": "empty"}


def test_prefetch_thread_keeps_order_and_raises_errors():
    from lightcrl.embed import _prefetched

    assert list(_prefetched(iter(range(50)), depth=2)) == list(range(50))

    def broken():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(_prefetched(broken()))


# --------------------------------------------------------------- decode processes, background writes


def _corrupt_pairs(tmp_path) -> str:
    """The tiny colour pairs plus a zero-byte and a truncated image, in the middle of the listing."""
    spec = make_pairs_csv(tmp_path / "pairs", n=30)
    root = tmp_path / "pairs"
    (root / "zero.png").write_bytes(b"")
    (root / "cut.png").write_bytes((root / "img000.png").read_bytes()[:40])
    rows = (root / "pairs.csv").read_text().splitlines()
    rows[20:20] = ["zero.png,a broken image", "cut.png,a cut image"]
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return spec


@needs_onnx
def test_decode_processes_and_background_writes_keep_order_and_skips(tmp_path):
    """The ONNX Runtime path with decoding worker processes and the writer thread writes the same store
    as decoding in this process with writes in turn: same rows in record order, same skips, same bytes."""
    import lightcrl.embed as embed_mod

    spec = _corrupt_pairs(tmp_path)
    opts = {"shard_size": 8, "batch_size": 3, "encoder_backend": "onnx", "progress": False}
    par = embed("toy-image", spec, None, tmp_path / "par", EmbedOptions(num_workers=2, **opts))
    embed_mod.BACKGROUND_WRITES, embed_mod.PREFETCH_THREAD = False, False
    try:
        seq = embed("toy-image", spec, None, tmp_path / "seq", EmbedOptions(num_workers=0, **opts))
    finally:
        embed_mod.BACKGROUND_WRITES, embed_mod.PREFETCH_THREAD = True, True
    assert len(par.manifest["shards"]) == 4 and len(par) == 30
    assert sorted(s["reason"] for s in par.skipped()) == ["corrupt_image", "empty_file"]
    why = lambda store: [(s["id"], s["reason"], s["path"]) for s in store.skipped()]  # noqa: E731
    assert why(par) == why(seq) and par.items.ids == seq.items.ids
    for f in sorted(p.name for p in seq.dir.glob("shard_*.npy")):  # (the .json name a PIL object address)
        assert (par.dir / f).read_bytes() == (seq.dir / f).read_bytes(), f


@needs_onnx
def test_forward_streams_write_the_same_store_as_one_stream(tmp_path):
    """Three batches in the ONNX Runtime forward at once (one shared session) write the very bytes of one
    batch at a time: rows in record order, skips (a batch may hold only skipped items) in place."""
    spec = _corrupt_pairs(tmp_path)
    opts = {"shard_size": 8, "batch_size": 3, "encoder_backend": "onnx", "progress": False}
    streams = embed("toy-image", spec, None, tmp_path / "s3", EmbedOptions(forward_streams=3, **opts))
    one = embed("toy-image", spec, None, tmp_path / "s1", EmbedOptions(forward_streams=1, **opts))
    assert len(streams) == len(one) == 30 and streams.items.ids == one.items.ids
    why = lambda store: [(s["id"], s["reason"], s["path"]) for s in store.skipped()]  # noqa: E731
    assert why(streams) == why(one) and len(why(one)) == 2
    for f in sorted(p.name for p in one.dir.glob("shard_*.npy")):
        assert (streams.dir / f).read_bytes() == (one.dir / f).read_bytes(), f


def test_encoded_streams_keep_order_and_raise_errors():
    """``encoded`` with several streams yields in input order (batches finish out of order), passes
    skip-only batches through, and re-raises a forward's error in the caller."""
    import time

    from lightcrl.embed import encoded

    class Slow:
        def encode_batch(self, batch, tokens_dtype=None):
            time.sleep(0.002 * (batch % 3))  # later batches often finish first
            if batch == 13:
                raise RuntimeError("bad batch 13")
            return batch * 10

    items = [([i], None if i % 5 == 4 else i, [(i, "skip")] if i % 5 == 4 else []) for i in range(12)]
    for streams in (1, 2, 4):
        got = list(encoded(iter(items), Slow(), streams))
        assert got == [(p, None if b is None else b * 10, s) for p, b, s in items]
    with pytest.raises(RuntimeError, match="bad batch 13"):
        list(encoded(iter([([i], i, []) for i in range(20)]), Slow(), 2))


@needs_onnx
def test_write_error_in_the_writer_thread_fails_cleanly_then_resumes(tmp_path, monkeypatch):
    import errno

    import lightcrl.store as store_mod

    spec = make_pairs_csv(tmp_path / "pairs", n=24)
    opts = EmbedOptions(shard_size=4, batch_size=2, num_workers=1, encoder_backend="onnx", progress=False)
    real = store_mod.ShardWriter.commit

    def full_disk(self, *a):
        if self.index == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, *a)

    monkeypatch.setattr(store_mod.ShardWriter, "commit", full_disk)
    with pytest.raises(LightCRLError, match="No space left on device.*rerun the same command to resume"):
        embed("toy-image", spec, None, tmp_path / "s", opts)
    assert 2 not in completed_shards(tmp_path / "s") and {0, 1} <= completed_shards(tmp_path / "s")
    monkeypatch.setattr(store_mod.ShardWriter, "commit", real)
    resumed = embed("toy-image", spec, None, tmp_path / "s", opts)
    clean = embed("toy-image", spec, None, tmp_path / "clean", opts)
    np.testing.assert_array_equal(resumed.pooled(), clean.pooled())


def test_writer_runs_jobs_in_order_and_reraises():
    from lightcrl.embed import _Writer

    seen = []
    w = _Writer(background=True, depth=2)
    for i in range(20):
        w.submit(seen.append, i)
    w.close()
    assert seen == list(range(20))

    def fail(i):
        if i == 3:
            raise OSError("disk gone")
        seen.append(i)

    w = _Writer(background=True, depth=2)
    with pytest.raises(OSError, match="disk gone"):
        for i in range(50):
            w.submit(fail, i)
        w.close()
    w.close()  # closing again after the error is harmless


def test_image_transform_gives_bytes_and_model_input_equals_the_float_formula(shared_data):
    """The transform hands over the crop's bytes (HWC); ``model_input`` normalises them to exactly
    (x / 255 - mean) / std in float32, the numpy formula, for every byte value and any mean/std."""
    from PIL import Image

    from lightcrl.encoders.image import ImageTransform, stack_images

    img = Image.open(sorted((shared_data / "flickr8k" / "Images").glob("*.jpg"))[0]).convert("RGB")
    every_byte = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (2, 256, 3)).copy()
    for t in (ImageTransform(), ImageTransform(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))):
        u8 = np.asarray(img.resize((256, 256), Image.BILINEAR).crop((16, 16, 240, 240)))
        got = stack_images([t(img), t(img)])["pixels"]  # the transform's PIL crops, stacked
        assert got.dtype == torch.uint8 and got.shape == (2, 224, 224, 3)
        assert np.array_equal(got[0].numpy(), u8) and np.array_equal(got[1].numpy(), u8)
        for raw in (u8, every_byte):
            mean, std = np.asarray(t.mean, np.float32), np.asarray(t.std, np.float32)
            x = (raw.astype(np.float32) / 255.0 - mean) / std
            batch = stack_images([torch.from_numpy(raw.copy())])["pixels"]
            assert np.array_equal(t.model_input(batch)[0].numpy(), x.transpose(2, 0, 1))
        normalised = torch.randn(1, 3, 8, 8)  # ConVIRT's augmented batches arrive normalised: untouched
        assert t.model_input(normalised) is normalised


@needs_onnx
def test_audio_encoder_onnx_equals_eager(shared_data):
    pytest.importorskip("aisfx")
    clips = sorted((shared_data / "esc50").rglob("*.ogg"))[::500][:4]
    if len(clips) < 4:
        pytest.skip("ESC-50 not found")
    sr = 22050  # a 1 s tone too: one zero-padded block, so the batch has clips of 1 and 3 blocks
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(sr) / sr)).astype(np.float32)
    diff, cos = _compare("aisfx", [*clips, (tone, sr)])
    assert diff < TOKENS_ATOL and cos > MIN_COSINE
    assert get_encoder("aisfx", device="cpu").backend == "onnx"  # auto picks it on CPU


def test_image_crop_box_shortcut_gives_the_same_bytes(shared_data):
    """Resampling only the crop's box is used where it equals resize-then-crop (exact scales), never where
    it would differ (photo sizes); either way the bytes are those of the whole-image resize."""
    from PIL import Image

    from lightcrl.encoders.image import ImageTransform, _crop_box_is_exact

    assert _crop_box_is_exact(32, 32, 256, 224) and _crop_box_is_exact(64, 64, 256, 224)
    assert not _crop_box_is_exact(500, 375, 256, 224)
    t = ImageTransform()
    cifar = sorted((shared_data / "cifar10" / "test").rglob("*.jpg"))[::997][:10]
    flickr = sorted((shared_data / "flickr8k" / "Images").glob("*.jpg"))[:5]
    assert cifar and flickr
    for path in [*cifar, *flickr]:
        img = Image.open(path).convert("RGB")
        w, h = img.size
        s = 256 / min(w, h)
        nw, nh = max(224, round(w * s)), max(224, round(h * s))
        left, top = (nw - 224) // 2, (nh - 224) // 2
        whole = img.resize((nw, nh), Image.BILINEAR).crop((left, top, left + 224, top + 224))
        assert np.array_equal(np.asarray(t(img)), np.asarray(whole)), path


def test_bf16_backend_is_close_to_eager_and_its_own_store_identity():
    """bf16 autocast is not float error: the measured agreement (docs/benchmarks.md) is what is checked."""
    texts = ["a dog", "two children are playing football on a sandy beach near the sea", "x",
             "a man is slicing a tomato", "the stock market fell sharply on monday"]
    eager = get_encoder("minilm-l6", device="cpu", backend="eager")
    bf16 = get_encoder("minilm-l6", device="cpu", backend="bf16")
    assert bf16.backend == "bf16" and bf16.fingerprint() != eager.fingerprint()  # never the same store
    batch = eager.collate([eager.transform(x) for x in texts])
    a, b = eager.encode_batch(batch), bf16.encode_batch(batch)
    assert a.pooled.dtype == b.pooled.dtype == torch.float32 and torch.equal(a.mask, b.mask)
    cos = torch.nn.functional.cosine_similarity(a.pooled, b.pooled)
    assert float(cos.min()) > 0.9995  # measured >= 0.99993 on STS-B (MiniLM)
    assert float((a.pooled - b.pooled).abs().max()) > 0  # really computed in bf16 (not a no-op)


def test_backend_spec_per_modality_and_encoder():
    from lightcrl.encoders.backends import backend_for, parse_backend_spec

    assert parse_backend_spec("eager,text=bf16") == ("eager", {"text": "bf16"})
    assert backend_for("text=bf16", "minilm-l6", "text") == "bf16"
    assert backend_for("text=bf16", "efficientnet-lite0", "image") == "auto"
    assert backend_for("eager,minilm-l6=bf16", "minilm-l6@layer4", "text") == "bf16"  # the layer's base name
    assert backend_for("onnx, audio = eager", "aisfx", "audio") == "eager"
    assert get_encoder("toy-text", backend="eager,text=bf16").backend == "bf16"
    assert get_encoder("toy-image", backend="eager,text=bf16").backend == "eager"
    with pytest.raises(LightCRLError, match="unknown encoder backend 'bf17'"):
        get_encoder("toy-text", backend="text=bf17")
    with pytest.raises(LightCRLError, match="write KEY=BACKEND"):
        get_encoder("toy-text", backend="=bf16")
