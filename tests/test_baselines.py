"""Baselines: ASIF on synthetic anchors, ConVIRT's loss, augmentation, a ConVIRT training step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

# -- ASIF --------------------------------------------------------------------------------------------------
from test_anchors import asif_reference  # noqa: E402  (ASIF in plain numpy, the paper's definition)

from lightcrl.augment import ConVIRTAugment, random_resized_crop
from lightcrl.baselines.asif import asif_model, build_pipeline, encode_pooled, save_run, tune
from lightcrl.errors import LightCRLError
from lightcrl.losses import ConVIRTLoss
from lightcrl.metrics import retrieval


def _linked(n: int, seed: int = 0, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Pairs from a shared low-dimensional latent: image = zA, text = image W + noise (a fixed linear map)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 6)).astype(np.float32)
    img = z @ np.random.default_rng(1).standard_normal((6, 64)).astype(np.float32)
    txt = img @ np.random.default_rng(2).standard_normal((64, 48)).astype(np.float32)
    return img, txt + noise * txt.std() * rng.standard_normal(txt.shape).astype(np.float32)


def _mean_r1(model, img: np.ndarray, txt: np.ndarray) -> float:
    a, b = encode_pooled(model, "image", img), encode_pooled(model, "text", txt)
    r = retrieval.evaluate(a, b, np.arange(len(img)))
    return (r["image_retrieval_recall@1"] + r["text_retrieval_recall@1"]) / 2


def test_asif_recovers_held_out_pairs_and_shuffled_anchors_are_chance():
    img, txt = _linked(600)
    anchors, held = slice(0, 500), slice(500, 600)
    model = asif_model({"image": img[anchors], "text": txt[anchors]}, k=50, p=8)
    assert model.parameter_counts()["total_trainable"] == 0  # ASIF: the anchor space alone, nothing trained
    rel = encode_pooled(model, "image", img[held])
    assert rel.shape == (100, 500)
    assert ((rel > 0).sum(1) <= 50).all()  # sparsified to the top k
    np.testing.assert_allclose(np.linalg.norm(rel, axis=1), 1.0, atol=1e-5)
    assert _mean_r1(model, img[held], txt[held]) > 95
    # the same features with the anchor pairing destroyed carry no cross-modal information
    shuffled = np.random.default_rng(3).permutation(500)
    control = asif_model({"image": img[anchors], "text": txt[anchors][shuffled]}, k=50, p=8)
    assert _mean_r1(control, img[held], txt[held]) < 10  # chance: 1%


def test_asif_k_larger_than_anchors_and_bad_inputs():
    img, txt = _linked(30)
    model = asif_model({"image": img[:20], "text": txt[:20]})  # default k=800 > 20 anchors: all kept
    assert encode_pooled(model, "text", txt[20:]).shape == (10, 20)
    with pytest.raises(LightCRLError, match="equal count"):
        asif_model({"image": img[:20], "text": txt[:19]})
    with pytest.raises(LightCRLError, match="dim"):
        encode_pooled(model, "image", txt[20:])
    with pytest.raises(LightCRLError, match="no audio anchors"):
        encode_pooled(model, "audio", img)


def test_asif_tune_chooses_on_training_pairs():
    img, txt = _linked(300)
    res = tune(img, txt, ks=[5, 100], ps=[1, 8], val_fraction=0.2)
    assert (res["k"], res["p"]) in {(5, 1.0), (5, 8.0), (100, 1.0), (100, 8.0)}
    assert len(res["grid"]) == 4 and res["n_val"] == 60
    assert res["val_mean_recall@1"] == max(g["val_mean_recall@1"] for g in res["grid"])


def test_asif_tune_can_choose_centring():
    img, txt = _linked(300)
    res = tune(img + 3.0, txt, ks=[20], ps=[4], center=[False, True], val_fraction=0.2)
    assert len(res["grid"]) == 2 and {g["center"] for g in res["grid"]} == {False, True}
    # an offset shared by every image flattens the cosines: centring wins on the held-out pairs
    assert res["center"] is True


def test_asif_mean_caption_anchors(tmp_path, pairs_csv):
    from lightcrl.baselines.asif import anchor_features
    from lightcrl.embed import EmbedOptions, cached_store

    media = cached_store("toy-image", pairs_csv, "all", EmbedOptions(num_workers=0))
    text = cached_store("toy-text", pairs_csv, "all", EmbedOptions(num_workers=0))
    m, t = anchor_features(media, text, "mean_caption")
    assert len(m) == len(t) == len(media)
    groups = np.asarray(text.items.groups)
    for i in (0, 7):
        caps = text.pooled(np.flatnonzero(groups == media.items.ids[i]))
        caps = caps / np.linalg.norm(caps, axis=1, keepdims=True)
        np.testing.assert_allclose(t[i], caps.sum(0), atol=1e-5)
        np.testing.assert_allclose(m[i], media.pooled(np.array([i]))[0], atol=1e-6)


def test_asif_pipeline_from_toy_stores(tmp_path, pairs_csv):
    spec = {"data": pairs_csv, "split": "all", "limit": None, "seed": 0, "media_encoder": "toy-image",
            "text_encoder": "toy-text", "pairs": "random_caption", "k": 10, "p": 4.0, "center": True}
    pipe = build_pipeline(spec)
    assert pipe.info["n_anchors"] == 40 and pipe.info["kind"] == "asif"
    save_run(pipe, tmp_path)
    import lightcrl

    again = lightcrl.load(tmp_path)  # a run like any other: the anchor keys travel with the weights
    texts = ["a red square", "something blue"]
    np.testing.assert_allclose(pipe.encode_text(texts), again.encode_text(texts), atol=1e-6)
    # what ASIF computes for a caption: its relative vector against the anchor captions
    from lightcrl.baselines.asif import anchor_features
    from lightcrl.embed import EmbedOptions, cached_store

    opts = EmbedOptions(num_workers=0)
    _, t_feat = anchor_features(cached_store("toy-image", pairs_csv, "all", opts),
                                cached_store("toy-text", pairs_csv, "all", opts), "random_caption", 0)
    text_store = cached_store("toy-text", pairs_csv, "all", opts)
    ref = asif_reference(t_feat, text_store.pooled(np.arange(5)), k=10, p=4.0, center=True)
    ours = again.encode_store(text_store, indices=np.arange(5))
    # toy captions repeat, so the 10th and 11th anchor can tie: compare where the two agree on the support
    same_support = ((ours > 0) == (ref > 0)).all(1)
    assert same_support.sum() >= 3
    np.testing.assert_allclose(ours[same_support], ref[same_support], atol=1e-5)
    assert pipe.encode_text(texts).shape == (2, 40)


# -- ConVIRT loss ------------------------------------------------------------------------------------------
def test_convirt_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 8)), rng.standard_normal((5, 8))
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    tau, lam = 0.1, 0.75
    v2u = u2v = 0.0
    for i in range(5):  # ConVIRT eq. 2 and 3, one positive per row/column
        sims_row = [an[i] @ bn[k] / tau for k in range(5)]
        sims_col = [bn[i] @ an[k] / tau for k in range(5)]
        v2u += -(sims_row[i] - np.log(np.sum(np.exp(sims_row))))
        u2v += -(sims_col[i] - np.log(np.sum(np.exp(sims_col))))
    expected = (lam * v2u + (1 - lam) * u2v) / 5
    out = ConVIRTLoss(gather=False)(torch.tensor(a), torch.tensor(b))  # unnormalised inputs: it normalises
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-6)


# -- augmentation ------------------------------------------------------------------------------------------
def _image(w: int = 40, h: int = 30) -> Image.Image:
    x = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(x)


def test_augment_shapes_and_seeded_determinism():
    aug = ConVIRTAugment(size=24, saturation=0.4, hue=0.1)
    img = _image()
    a = aug(img, np.random.default_rng(7))
    assert a.shape == (3, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, aug(img, np.random.default_rng(7)))
    assert not torch.equal(a, aug(img, np.random.default_rng(8)))
    # normalisation: mean/std 0.5 maps [0, 1] onto [-1, 1]
    assert a.min() >= -1 - 1e-6 and a.max() <= 1 + 1e-6


def test_augment_identity_settings_and_crop_fallback():
    img = _image(20, 20)
    same = ConVIRTAugment(size=20, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, brightness=0.0,
                          contrast=0.0)
    out = same.pil(img, np.random.default_rng(0))
    assert np.array_equal(np.asarray(out), np.asarray(img))
    flipped = ConVIRTAugment(size=20, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0, brightness=0.0,
                             contrast=0.0).pil(img, np.random.default_rng(0))
    assert np.array_equal(np.asarray(flipped), np.asarray(img)[:, ::-1])
    # an impossible aspect ratio falls back to a central crop, like torchvision
    tall = random_resized_crop(_image(10, 40), 8, (1.0, 1.0), (2.0, 3.0), np.random.default_rng(0))
    assert tall.size == (8, 8)


# -- ConVIRT training --------------------------------------------------------------------------------------
def test_convirt_step_updates_only_unfrozen_layers(tmp_path):
    from lightcrl.app.train_convirt import train_step
    from lightcrl.baselines.convirt import (
        ConVIRTModel,
        ConVIRTPipeline,
        load_config,
        trainable_parameter_names,
    )

    cfg = load_config({"data": {"spec": "csv:unused", "split": "all"}, "image_size": 48, "proj_dim": 16,
                       "proj_hidden": 32, "lr": 1e-2, "progress": False})
    model = ConVIRTModel(cfg)
    img_train = {n for n, p in model.image.backbone.named_parameters() if p.requires_grad}
    txt_train = {n for n, p in model.text.backbone.named_parameters() if p.requires_grad}
    assert img_train and all(n.startswith(("_blocks.15.", "_conv_head.", "_bn1.")) for n in img_train)
    assert any(n.startswith("_conv_head.") for n in img_train)
    assert not any(n.startswith("_fc.") for n in img_train)  # unused classifier: dropped after the probe
    assert txt_train and all(n.startswith("encoder.layer.5.") for n in txt_train)
    assert trainable_parameter_names(model.text.backbone, "all") == {n for n, _ in
                                                                     model.text.backbone.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}

    rng = np.random.default_rng(0)
    rows = [(model.augment(_image(32 + 8 * i, 32), rng), f"a photo number {i}") for i in range(4)]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    model.train()
    losses = train_step(model, rows, ConVIRTLoss(gather=False), opt, torch.device("cpu"))
    assert np.isfinite(losses["train/loss"])

    trained = set(model.trained_state())
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    params = {n for n, _ in model.named_parameters()}
    assert changed & params == {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trained  # no frozen parameter and no frozen batch-norm statistic moved
    assert "image.backbone._blocks.15._bn1.running_mean" in changed  # trained BN layers do adapt
    assert "image.backbone._blocks.14._bn1.running_mean" not in changed

    # a saved run reloads the trained tensors on top of the pretrained ones
    from safetensors.torch import save_file

    save_file(model.trained_state(), str(tmp_path / "convirt.safetensors"))
    (tmp_path / "model.json").write_text(
        '{"kind": "convirt", "config": ' + cfg.model_dump_json() + '}')
    pipe = ConVIRTPipeline.from_run(tmp_path, device="cpu")
    for k, v in pipe.model.state_dict().items():
        assert torch.equal(v, after[k]), k
    emb = pipe.encode_text(["a dog", "a cat"])
    assert emb.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_convirt_run_trains_resumes_and_evaluates(tmp_path):
    from conftest import make_pairs_csv

    from lightcrl.app.evaluate import EvalRequest, EvalTarget, run_eval
    from lightcrl.app.train_convirt import train_convirt
    from lightcrl.baselines.convirt import ConVIRTPipeline, load_config

    spec = make_pairs_csv(tmp_path / "pairs", n=8)
    cfg = load_config({"data": {"spec": spec, "split": "all"}, "image_size": 48, "batch_size": 4,
                       "proj_dim": 16, "proj_hidden": 32, "progress": False})
    run = tmp_path / "run"
    summary = train_convirt(cfg, run)
    assert summary["steps"] == 2 and summary["n_train"] == 8 and summary["train_time_s"] > 0
    assert (run / "model.json").exists() and (run / "convirt.safetensors").exists()
    stamp = (run / "convirt.safetensors").stat().st_mtime_ns
    assert train_convirt(cfg, run) == summary  # finished: nothing is trained again
    assert (run / "convirt.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(LightCRLError, match="another configuration"):
        train_convirt(load_config(dict(cfg.model_dump(), lr=1.0)), run)

    pipe = ConVIRTPipeline.from_run(run)
    target = EvalTarget("run", pipe, pipe.encoder_names, {"kind": "convirt"}, run)
    res = run_eval(target, EvalRequest("retrieval", spec, "all", output=run / "results" / "ret.json"))
    assert res["metrics"]["n_images"] == 8 and res["metrics"]["n_texts"] == 16
    assert 0 <= res["metrics"]["image_retrieval_recall@1"] <= 100


def test_convirt_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    """Killed during epoch 2, a run resumes from its epoch-1 checkpoint (safetensors + JSON, no pickle)
    and ends with exactly the weights, optimizer state and summary of a run that was never interrupted."""
    from conftest import make_pairs_csv
    from safetensors.torch import load_file

    import lightcrl.app.train_convirt as tc
    from lightcrl.baselines.convirt import load_config
    from lightcrl.checkpoint import checkpoint_folder, load_checkpoint

    spec = make_pairs_csv(tmp_path / "pairs", n=8)
    cfg = load_config({"data": {"spec": spec, "split": "all"}, "image_size": 48, "batch_size": 4, "epochs": 2,
                       "proj_dim": 16, "proj_hidden": 32, "progress": False})
    whole = tc.train_convirt(cfg, tmp_path / "whole")

    class Killed(Exception):
        pass

    real_step, calls = tc.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the first step of epoch 2
            raise Killed
        return real_step(*args, **kwargs)

    monkeypatch.setattr(tc, "train_step", step)
    run = tmp_path / "resumed"
    with pytest.raises(Killed):
        tc.train_convirt(cfg, run)
    ck = load_checkpoint(checkpoint_folder(run, "last"))
    assert (ck["state"]["epoch"], ck["state"]["step"]) == (1, 2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last-00000002", "last.json"]
    assert sorted(p.name for p in (run / "checkpoints" / "last-00000002").iterdir()) == [
        "model.safetensors", "state.json", "trainer.safetensors"]  # nothing pickled
    with pytest.raises(LightCRLError, match="checkpoint of another configuration"):
        tc.train_convirt(load_config(dict(cfg.model_dump(), lr=1.0)), run)

    calls.clear()
    monkeypatch.setattr(tc, "train_step", lambda *a, **k: (calls.append(1), real_step(*a, **k))[1])
    resumed = tc.train_convirt(cfg, run)
    assert len(calls) == 2  # only epoch 2 was trained again
    drop = ("train_time_s",)
    assert {k: v for k, v in resumed.items() if k not in drop} == {
        k: v for k, v in whole.items() if k not in drop}
    a = load_file(str(tmp_path / "whole" / "convirt.safetensors"))
    b = load_file(str(run / "convirt.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (load_checkpoint(checkpoint_folder(r, "last")) for r in (tmp_path / "whole", run))
    assert ca["state"]["optimizer"] == cb["state"]["optimizer"]
    optim = [k for k in ca["trainer"] if k.startswith("optim.")]
    assert optim and all(torch.equal(ca["trainer"][k], cb["trainer"][k]) for k in optim)
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
