"""CSA (canonical correlation + weighted similarity): planted correlations, retrieval, tuning, runs."""

from __future__ import annotations

import numpy as np
import pytest

from lightcrl.baselines.asif import encode_pooled
from lightcrl.baselines.csa import build_pipeline, csa_model, fit_cca, save_run, tune
from lightcrl.errors import LightCRLError
from lightcrl.metrics import retrieval

PLANTED = np.array([0.95, 0.8, 0.6, 0.3])


def _planted(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """image = Qx [s; noise], text = Qy [rho * s + sqrt(1 - rho^2) e; noise]: four shared latent directions
    with correlations PLANTED, the rest independent noise, both rotated at random."""
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n, 4))
    u = np.hstack([s, rng.standard_normal((n, 36))])
    v = np.hstack([PLANTED * s + np.sqrt(1 - PLANTED**2) * rng.standard_normal((n, 4)),
                   rng.standard_normal((n, 20))])
    qx = np.linalg.qr(np.random.default_rng(11).standard_normal((40, 40)))[0]
    qy = np.linalg.qr(np.random.default_rng(12).standard_normal((24, 24)))[0]
    return (u @ qx).astype(np.float32), (v @ qy).astype(np.float32)


def _mean_r1(model, img: np.ndarray, txt: np.ndarray) -> float:
    r = retrieval.evaluate(encode_pooled(model, "image", img), encode_pooled(model, "text", txt),
                           np.arange(len(img)))
    return (r["image_retrieval_recall@1"] + r["text_retrieval_recall@1"]) / 2


def test_cca_recovers_the_planted_correlations():
    img, txt = _planted(20000)
    fit = fit_cca(img, txt, reg=1e-4)
    assert fit.rank == 24
    np.testing.assert_allclose(fit.rho[:4], PLANTED, atol=0.04)
    assert fit.rho[4] < 0.1  # beyond the planted directions: noise only
    # the canonical coordinates are the planted pairs: correlated as planted, unit variance, uncorrelated
    model = csa_model(fit, dims=4, exponent=0.0)
    x = (img / np.linalg.norm(img, axis=1, keepdims=True) - fit.mean_x) @ fit.a[:, :4]
    y = (txt / np.linalg.norm(txt, axis=1, keepdims=True) - fit.mean_y) @ fit.b[:, :4]
    corr = [np.corrcoef(x[:, i], y[:, i])[0, 1] for i in range(4)]
    np.testing.assert_allclose(corr, fit.rho[:4], atol=1e-3)
    assert model.parameter_counts()["total_trainable"] == 0  # nothing trained


def test_csa_retrieves_held_out_pairs_and_weighting_helps():
    img, txt = _planted(3000)
    fit = fit_cca(img[:2500], txt[:2500], reg=1e-3)
    held = slice(2500, 2600)
    top = _mean_r1(csa_model(fit, dims=4, exponent=1.0), img[held], txt[held])
    assert top > 10  # chance: 1 %
    # all 24 canonical dims unweighted let the noise dimensions vote as much as the shared ones
    assert _mean_r1(csa_model(fit, dims=24, exponent=0.0), img[held], txt[held]) < top
    # the same features with the pairing destroyed carry no cross-modal information
    shuffled = np.random.default_rng(3).permutation(2500)
    control = csa_model(fit_cca(img[:2500], txt[:2500][shuffled], reg=1e-3), dims=4, exponent=1.0)
    assert _mean_r1(control, img[held], txt[held]) < 6
    with pytest.raises(LightCRLError, match="dims"):
        csa_model(fit, dims=25)
    with pytest.raises(LightCRLError, match="reg"):
        fit_cca(img, txt, reg=0.0)


def test_csa_tune_chooses_on_training_pairs_by_media_item():
    img, txt = _planted(800)
    groups = np.repeat(np.arange(400), 2)  # two "captions" per media item
    res = tune(img, txt, dims=[4, 24, 99], exponents=[0.0, 2.0], regs=[1e-3], val_fraction=0.25,
               groups=groups)
    assert len(res["grid"]) == 4  # dims 99 > rank 24: skipped
    assert res["n_val"] == 100  # one pair per held-out media item
    assert res["val_mean_recall@1"] == max(g["val_mean_recall@1"] for g in res["grid"])
    # the unweighted full-rank similarity (noise dims voting as much as shared ones) is never the choice
    assert (res["dims"], res["exponent"]) != (24, 0.0)
    unweighted = next(g for g in res["grid"] if (g["dims"], g["exponent"]) == (24, 0.0))
    assert res["val_mean_recall@1"] > unweighted["val_mean_recall@1"]


def test_csa_pipeline_run_round_trip_and_experiment_cell(tmp_path, pairs_csv):
    import lightcrl
    from lightcrl.app.experiment import _build_training_free, best_val_metrics, load_experiment
    from lightcrl.rundir import RunDir

    spec = {"data": pairs_csv, "split": "all", "limit": None, "seed": 0, "media_encoder": "toy-image",
            "text_encoder": "toy-text", "pairs": "all_pairs", "dims": 4, "exponent": 1.0, "reg": 1e-2}
    pipe = build_pipeline(spec)
    assert pipe.info["kind"] == "csa" and pipe.info["csa"]["dims"] == 4
    save_run(pipe, tmp_path / "run")
    assert RunDir(tmp_path / "run").kind() == "csa"
    again = lightcrl.load(tmp_path / "run")  # a run like any other: the maps travel with the weights
    texts = ["a red square", "something blue"]
    np.testing.assert_allclose(pipe.encode_text(texts), again.encode_text(texts), atol=1e-6)
    assert again.encode_text(texts).shape == (2, 4)

    # as an experiment cell: the base source's holdout is honoured and scored like a trained cell's
    base = {"name": "b", "progress": False, "tensorboard": False,
            "data": {"sources": [{"spec": pairs_csv, "split": "all", "holdout": 0.25,
                                  "media_encoder": "toy-image", "text_encoder": "toy-text"}]}}
    exp = load_experiment({"base": base, "seeds": [0, 1], "val_metrics": ["val/mean_recall@1"],
                           "baselines": [{"kind": "csa", "dims": 4, "tune": {"dims": [2, 4], "exponent": [1],
                                                                           "reg": [1e-2]}}]})
    assert [c.name for c in exp.cells] == ["dfe-s0", "csa-s0", "dfe-s1", "csa-s1"]
    cell = exp.cell("csa-s1")
    assert cell.spec["holdout"] == 0.25 and cell.spec["seed"] == 1
    _build_training_free(cell, tmp_path / "cell", "cpu")
    val = best_val_metrics(cell, tmp_path / "cell", ["val/mean_recall@1"])
    assert isinstance(val["val/mean_recall@1"], float)
    n_fit = RunDir(tmp_path / "cell").read_train_summary()["n_pairs"]
    full = build_pipeline(dict(cell.spec, holdout=None, tune=None)).info["n_pairs"]
    assert 0 < n_fit < full  # the held-out items are not in the fit


def test_csa_needs_two_pairs():
    with pytest.raises(LightCRLError, match="at least 2 pairs"):
        fit_cca(np.ones((1, 3)), np.ones((1, 2)))
