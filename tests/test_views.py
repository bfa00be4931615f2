"""Text angles of the joined views (``text_mix``, lightcrl/views.py): text-text similarity moves, every
cross-modal cosine is a constant times the symmetric one, and training is unchanged."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lightcrl.model import create_model
from lightcrl.views import split_angles


def test_split_angles_keep_the_product_of_the_two_sides():
    thetas = [torch.tensor(0.9), torch.tensor(0.7)]
    text, media, kappa = split_angles(thetas, [None, None])  # nothing asked: the symmetric joins
    assert [float(t) for t in text] == pytest.approx([0.9, 0.7]) and float(kappa) == pytest.approx(1.0)
    text, media, kappa = split_angles(thetas, [0.5, 1.2])
    assert [float(t) for t in text] == pytest.approx([0.5, 1.2])
    # inner join: tan t tan m = tan^2 theta; its cross-modal factor k1 = sin t sin m / sin^2 theta
    t1, m1 = float(text[0]), float(media[0])
    assert math.tan(t1) * math.tan(m1) == pytest.approx(math.tan(0.9) ** 2)
    k1 = math.sin(t1) * math.sin(m1) / math.sin(0.9) ** 2
    assert k1 == pytest.approx(math.cos(t1) * math.cos(m1) / math.cos(0.9) ** 2)
    # outer join: the weights of all three views multiply to kappa times the symmetric ones
    t2, m2 = float(text[1]), float(media[1])
    sym = [math.cos(0.7) ** 2 * math.cos(0.9) ** 2, math.cos(0.7) ** 2 * math.sin(0.9) ** 2,
           math.sin(0.7) ** 2]
    got = [math.cos(t2) * math.cos(m2) * math.cos(t1) * math.cos(m1),
           math.cos(t2) * math.cos(m2) * math.sin(t1) * math.sin(m1), math.sin(t2) * math.sin(m2)]
    np.testing.assert_allclose(np.array(got) / np.array(sym), float(kappa), rtol=1e-6)
    assert 0 < float(kappa) < 1


def test_text_mix_needs_two_modalities_and_a_concatenated_join():
    with pytest.raises(ValueError, match="text and one other modality"):
        create_model({"width": 32, "csa": {"dims": 4, "rank": 4, "text_mix": 1.0}},
                     {"image": 40, "text": 24, "audio": 10})
    with pytest.raises(ValueError, match="join: concat"):
        create_model({"width": 32, "anchors": {"count": 5, "join": "sum", "text_mix": 1.0}},
                     {"image": 40, "text": 24})
    model = create_model({"width": 32, "csa": {"dims": 4, "rank": 4, "text_mix": 1.0}},
                         {"image": 40, "text": 24})
    assert model.text_modality == "text"


def test_text_angles_move_text_similarity_only(tmp_path, pairs_csv):
    """Two runs, with and without text angles: the same losses step by step, image-text cosines a
    constant kappa apart (the same retrieval), text-text cosines reweighted as the angles say."""
    from test_train import toy_config

    import lightcrl
    from lightcrl.app.config import validate_config
    from lightcrl.app.evaluate import EvalRequest, EvalTarget, task_retrieval
    from lightcrl.app.train import train
    from lightcrl.embed import EmbedOptions, cached_store

    runs = {}
    for name, text_mix in (("sym", (None, None)), ("split", (0.5, 1.2))):
        cfg = toy_config(pairs_csv, **{"optim.epochs": 2, "loss": {"clip": 1.0}})
        cfg["log_every"] = 1
        cfg["model"]["anchors"] = {"k": 5, "init_mix": 0.9, "learn_mix": False, "text_mix": text_mix[0]}
        cfg["model"]["csa"] = {"dims": 6, "reg": 0.5, "init_mix": 0.7, "text_mix": text_mix[1]}
        train(validate_config(cfg), tmp_path / name)
        runs[name] = lightcrl.load(tmp_path / name, device="cpu")

    def losses(name):
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["train/loss"] for r in rows if "train/loss" in r]

    assert len(losses("sym")) > 4
    np.testing.assert_allclose(losses("split"), losses("sym"), rtol=1e-4, atol=1e-5)
    media = cached_store("toy-image", pairs_csv, "all", EmbedOptions(seed=0, device="cpu"))
    text = cached_store("toy-text", pairs_csv, "all", EmbedOptions(seed=0, device="cpu"))
    emb = {name: (p.encode_store(media), p.encode_store(text)) for name, p in runs.items()}
    kappa = float(runs["split"].model.view_angles("text")[1])
    assert kappa < 0.95
    (si, st), (pi, pt) = emb["sym"], emb["split"]
    np.testing.assert_allclose(pi @ pt.T, kappa * (si @ st.T), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(pt, axis=1), 1.0, atol=1e-5)
    # text-text: the views' cosines weighted by the text angles (parts recovered from the symmetric run)
    w = 32
    n_anchor = runs["sym"].model.anchors.dim
    cut = [0, w, w + n_anchor, st.shape[1]]
    sym_w = [math.cos(0.7) * math.cos(0.9), math.cos(0.7) * math.sin(0.9), math.sin(0.7)]
    txt_w = [math.cos(1.2) * math.cos(0.5), math.cos(1.2) * math.sin(0.5), math.sin(1.2)]
    parts = [st[:, cut[i]:cut[i + 1]] / sym_w[i] for i in range(3)]
    want = sum(txt_w[i] ** 2 * parts[i] @ parts[i].T for i in range(3))
    np.testing.assert_allclose(pt @ pt.T, want, atol=2e-5)
    assert np.abs(pt @ pt.T - st @ st.T).max() > 0.05
    # the retrieval eval ranks the same (a constant factor, and the run's logit scale makes up for it)
    got = {}
    for name in runs:
        target = EvalTarget.from_run_dir(tmp_path / name, device="cpu")
        request = EvalRequest(task="retrieval", data=pairs_csv, split="all")
        got[name], _ = task_retrieval(target, request, tmp_path)
    for key in ("image_retrieval_recall@1", "text_retrieval_recall@1", "image_retrieval_mean_rank"):
        assert got["split"][key] == got["sym"][key]
    assert float(runs["split"].model.get_logit_scale().detach()) == pytest.approx(
        float(runs["sym"].model.get_logit_scale().detach()) / kappa, rel=1e-4)
