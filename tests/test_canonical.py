"""CSA's canonical coordinates joined to a trained model (``model.csa``): the part, the join, the trainer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_csa import _planted

from lightcrl.baselines.asif import encode_pooled
from lightcrl.baselines.csa import csa_model
from lightcrl.canonical import CanonicalConfig, CanonicalSpace, fit_cca, fit_pairs
from lightcrl.errors import LightCRLError
from lightcrl.model import create_model

DIMS = {"image": 40, "text": 24}


def test_canonical_part_is_csa_and_the_join_blends_similarities():
    img, txt = _planted(3000)
    fit = fit_cca(img, txt, reg=1e-2)
    space = CanonicalSpace(CanonicalConfig(dims=6, exponent=2.0, rank=6, init_mix=0.7), DIMS)
    space.set_fit(fit, "image")
    alone = csa_model(fit, dims=6, exponent=2.0)
    x, y = torch.from_numpy(img[:50]), torch.from_numpy(txt[:50])
    zi, zt = space.embed("image", x), space.embed("text", y)
    np.testing.assert_allclose(zi.numpy(), encode_pooled(alone, "image", img[:50]), atol=1e-5)
    np.testing.assert_allclose(zt.numpy(), encode_pooled(alone, "text", txt[:50]), atol=1e-5)
    # joined: every cosine is cos^2(theta) of the model's plus sin^2(theta) of CSA's
    model_i, model_t = F.normalize(torch.randn(50, 8), dim=-1), F.normalize(torch.randn(50, 8), dim=-1)
    ji, jt = space.join(model_i, zi), space.join(model_t, zt)
    np.testing.assert_allclose(ji.norm(dim=-1).numpy(), 1.0, atol=1e-6)
    expect = math.cos(0.7) ** 2 * (model_i @ model_t.T) + math.sin(0.7) ** 2 * (zi @ zt.T)
    torch.testing.assert_close(ji @ jt.T, expect, atol=1e-5, rtol=0)


def test_model_csa_needs_a_fit_and_a_trained_arch():
    with pytest.raises(LightCRLError, match="fitted on the training pairs"):
        create_model({"width": 32, "csa": {"dims": 4}}, DIMS)
    with pytest.raises(ValueError, match="arch 'csa' is CSA alone"):
        create_model({"arch": "csa", "width": 4, "heads": 1, "csa": {"dims": 4, "rank": 4}}, DIMS)
    model = create_model({"width": 32, "csa": {"dims": 4, "rank": 4}}, DIMS)
    assert model.embed_dim == 36
    assert model.parameter_counts()["csa"] == 0  # theta is fixed unless learn_mix
    space = CanonicalSpace(CanonicalConfig(rank=4), {"image": 40, "audio": 24})
    with pytest.raises(LightCRLError, match="cannot serve"):
        space.set_fit(fit_cca(*_planted(100), reg=1e-2), "image")


def test_trainer_fits_csa_on_the_training_pairs_and_run_reloads(tmp_path, pairs_csv):
    from test_train import toy_config

    import lightcrl
    from lightcrl.app.config import validate_config
    from lightcrl.app.train import Trainer
    from lightcrl.embed import EmbedOptions, cached_store

    cfg = toy_config(pairs_csv, **{"optim.epochs": 2, "loss": {"clip": 1.0}})
    cfg["model"]["csa"] = {"dims": 1000, "reg": 0.5, "init_mix": 1.2}
    trainer = Trainer(validate_config(cfg), tmp_path / "run")
    canonical, pairs = trainer.model.canonical, trainer.train_sets[0]
    fit = fit_pairs(pairs, 0.5)
    assert canonical.cfg.rank == fit.rank < 1000  # dims beyond the CCA's rank: the rank
    # fitted on every (image, caption) training pair, on the pooled features the model receives
    media = np.stack([pairs.frozen_pooled(pairs.media, [i])[0] for i in pairs.media_index])
    text = np.stack([pairs.frozen_pooled(pairs.text, [j])[0] for j in pairs.text_index])
    direct = fit_cca(media, text, 0.5)
    np.testing.assert_allclose(fit.rho, direct.rho, atol=1e-6)
    np.testing.assert_allclose(fit.a[:, :3], direct.a[:, :3], atol=1e-4)
    assert direct.rho[0] > 0.5  # the toy captions do describe their images
    before = {k: v.clone() for k, v in canonical.state_dict().items()}
    trainer.fit()
    for k, v in canonical.state_dict().items():  # nothing of the canonical part trains
        torch.testing.assert_close(v, before[k])

    run = lightcrl.load(tmp_path / "run")
    assert run.model.cfg.csa.rank == fit.rank
    store = cached_store("toy-image", pairs_csv, "all", EmbedOptions(num_workers=0))
    a = run.encode_store(store)
    assert a.shape == (len(store), 32 + fit.rank)
    with torch.no_grad():  # the same items straight through the model's forward, in one batch
        b = run.model.eval().encode("image", *store.batch(np.arange(len(store)))).numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)
    # the canonical part of the embedding is CSA of the same fit, scaled by sin(theta)
    pooled = pairs.frozen_pooled(store, np.arange(len(store)))
    alone = encode_pooled(csa_model(fit, dims=fit.rank, exponent=1.0), "image", pooled)
    np.testing.assert_allclose(a[:, 32:], math.sin(1.2) * alone, atol=1e-5)
