"""Anchor coordinates (ASIF's relative representation learned next to the DFE): maths, leave-one-out,
the model and the trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightcrl.anchors import AnchorConfig, AnchorSpace
from lightcrl.errors import LightCRLError
from lightcrl.model import create_model

DIMS = {"image": 24, "text": 16}


def asif_reference(anchors: np.ndarray, query: np.ndarray, k: int, p: float, center: bool) -> np.ndarray:
    """ASIF as the paper describes it, in plain float64 numpy: an independent check of the anchor space."""
    a, q = anchors.astype(np.float64), query.astype(np.float64)
    if center:
        a, q = a - anchors.mean(0), q - anchors.mean(0)
    sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (a / np.linalg.norm(a, axis=1, keepdims=True)).T
    out = np.zeros_like(sims)
    for i, row in enumerate(sims):
        top = np.argsort(-row)[:k]
        out[i, top] = np.clip(row[top], 0, None) ** p
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _space(n: int = 30, k: int = 5, p: float = 3.0, dim: int = 8, seed: int = 0, center: bool = True):
    rng = np.random.default_rng(seed)
    # offset features, like post-ReLU CNN features: centring changes the neighbours
    keys = {m: rng.standard_normal((n, d)).astype(np.float32) + 2.0 for m, d in DIMS.items()}
    torch.manual_seed(seed)
    space = AnchorSpace(AnchorConfig(k=k, p=p, dim=dim, count=n, center=center), DIMS, width=32)
    space.set_keys(keys)
    return space, keys


@pytest.mark.parametrize("center", [True, False])
def test_coordinates_are_asifs_relative_representation(center):
    space, keys = _space(center=center)
    q = np.random.default_rng(1).standard_normal((7, 24)).astype(np.float32) + 2.0
    weights, ids = space.coordinates("image", torch.from_numpy(q))
    dense = torch.zeros(7, 30).scatter_(1, ids, weights)
    np.testing.assert_allclose(dense.numpy(), asif_reference(keys["image"], q, 5, 3.0, center), atol=1e-5)


def test_leave_one_out_drops_only_the_items_own_anchor():
    space, keys = _space()
    q = torch.from_numpy(keys["text"][[3, 5]])
    _, ids = space.coordinates("text", q)
    assert ids[:, 0].tolist() == [3, 5]  # an anchor's own key is its nearest anchor
    _, ids = space.coordinates("text", q, exclude=torch.tensor([3, -1]))
    assert 3 not in ids[0].tolist()
    assert ids[1, 0].item() == 5  # -1 = nothing left out


def test_model_with_anchors_joins_both_spaces_and_trains_table_and_mix():
    cfg = {"width": 32, "heads": 4, "ffn_dim": 64, "dropout": 0.0,
           "anchors": {"k": 4, "p": 2.0, "dim": 8, "count": 10}}
    torch.manual_seed(0)
    model = create_model(cfg, DIMS)
    model.anchors.set_keys({m: np.random.default_rng(2).standard_normal((10, d)) for m, d in DIMS.items()})
    assert model.embed_dim == 40
    batch = {m: (torch.randn(4, 5, d), torch.ones(4, 5, dtype=torch.bool)) for m, d in DIMS.items()}
    out = model(batch, exclude=torch.tensor([0, -1, 2, -1]))
    assert out["image"].shape == (4, 40)
    torch.testing.assert_close(out["text"].norm(dim=-1), torch.ones(4))
    (out["image"] @ out["text"].T).trace().backward()
    assert model.anchors.table.grad.abs().sum() > 0 and model.anchors.mix.grad.abs() > 0
    names = {n for n, _ in model.named_parameters()}
    assert "anchors.keys_image" not in names  # frozen keys are buffers, saved with the weights
    assert "anchors.keys_image" in model.state_dict()
    counts = model.parameter_counts()
    assert counts["anchors"] == 10 * 8 + 1
    assert sum(v for k, v in counts.items() if k != "total_trainable") == counts["total_trainable"]


def test_default_anchor_part_is_asifs_vector_and_only_theta_learns_there():
    rng = np.random.default_rng(3)
    keys = {m: rng.standard_normal((10, d)).astype(np.float32) + 1.0 for m, d in DIMS.items()}
    torch.manual_seed(0)
    model = create_model({"width": 32, "heads": 4, "ffn_dim": 64, "anchors": {"k": 4, "p": 2.0, "count": 10}},
                         DIMS)
    model.anchors.set_keys(keys)
    assert model.embed_dim == 32 + 10 and model.anchors.table is None
    assert model.parameter_counts()["anchors"] == 1  # theta
    x = torch.randn(3, 5, 24) + 1.0
    z = model.encode("image", x)
    asif = asif_reference(keys["image"], x.mean(1).numpy(), 4, 2.0, center=True)
    np.testing.assert_allclose(z[:, 32:].detach().numpy() / np.sin(model.anchors.mix.item()), asif, atol=1e-5)


def test_sum_join_maps_the_dfe_to_the_anchor_width():
    cfg = {"width": 32, "heads": 4, "ffn_dim": 64, "dropout": 0.0,
           "anchors": {"k": 4, "dim": 8, "count": 10, "join": "sum"}}
    torch.manual_seed(0)
    model = create_model(cfg, DIMS)
    model.anchors.set_keys({m: np.random.default_rng(2).standard_normal((10, d)) for m, d in DIMS.items()})
    assert model.embed_dim == 8
    z = model.encode("image", torch.randn(3, 5, 24))
    assert z.shape == (3, 8)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    z.sum().backward()
    assert model.anchors.out.weight.grad.abs().sum() > 0
    assert model.projections["image"].net[0].weight.grad.abs().sum() > 0


def test_anchors_without_data_is_a_clear_error():
    with pytest.raises(LightCRLError, match="built from the training pairs"):
        create_model({"width": 32, "anchors": {"k": 4}}, DIMS)


def test_trainer_leaves_each_pair_out_of_its_anchors_and_run_reloads(tmp_path, pairs_csv, monkeypatch):
    from test_train import toy_config

    import lightcrl
    from lightcrl.app.config import validate_config
    from lightcrl.app.train import Trainer
    from lightcrl.embed import EmbedOptions, cached_store

    cfg = toy_config(pairs_csv, **{"optim.epochs": 2, "loss": {"clip": 1.0}})
    cfg["model"]["anchors"] = {"k": 8, "p": 2.0}
    trainer = Trainer(validate_config(cfg), tmp_path / "run")
    anchors = trainer.model.anchors
    assert anchors.cfg.count == trainer.train_sets[0].n_media()
    calls = []
    real = anchors.coordinates

    def spy(modality, key, exclude=None):
        if anchors.training:
            calls.append(exclude)
            # the anchor left out is the item itself (media), or its media item's captions (text)
            if modality == "image":
                centred = F.normalize(key - anchors.mean_image, dim=-1)
                torch.testing.assert_close(centred, anchors.keys("image")[exclude])
        return real(modality, key, exclude)

    monkeypatch.setattr(anchors, "coordinates", spy)
    trainer.fit()
    assert calls and all(e is not None and bool((e >= 0).all()) for e in calls)

    run = lightcrl.load(tmp_path / "run")
    assert run.model.cfg.anchors.count == anchors.cfg.count
    store = cached_store("toy-image", pairs_csv, "all", EmbedOptions(num_workers=0))
    a = run.encode_store(store)
    assert a.shape == (len(store), 32 + anchors.cfg.count)
    with torch.no_grad():  # the same items straight through the model's forward, in one batch
        b = run.model.eval().encode("image", *store.batch(np.arange(len(store)))).numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)
    # the anchor keys travel with the weights: loading needs no training data
    torch.testing.assert_close(run.model.anchors.keys("image"), anchors.keys("image"))
