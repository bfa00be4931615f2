"""model.hubness: CSLS in retrieval against training embeddings kept with the model (lightcrl/hubness.py)."""

from __future__ import annotations

import numpy as np
import pytest

from lightcrl.hubness import bank_rows, csls_offsets
from lightcrl.metrics import retrieval


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_csls_offsets_match_a_hand_computation():
    gallery = _unit([[1, 0], [0.6, 0.8], [0, 1]])
    bank = _unit([[1, 0], [1, 0.1], [0, 1], [-1, 0]])
    got = csls_offsets(gallery, bank.astype(np.float32), k=2)
    want = []
    for g in gallery:
        cos = sorted((float(g @ b) for b in bank), reverse=True)
        want.append(-0.5 * (cos[0] + cos[1]) / 2)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.all(csls_offsets(gallery, bank[:0], k=2) == 0)  # an empty bank corrects nothing
    everything = -0.5 * (gallery @ bank.T).mean(1)
    np.testing.assert_allclose(csls_offsets(gallery, bank, k=99), everything, atol=1e-6)


def test_retrieval_offsets_demote_a_hub_and_zero_offsets_change_nothing():
    # captions e_0..e_4; image 0 is a hub (cosine 0.447 to every caption), image j >= 1 has cosine 0.4 to
    # its own caption j and 0 to the others: the hub takes captions 1-4
    n = 5
    text = np.eye(8)[:n]
    img = np.zeros((n, 8))
    img[0, :n] = 1 / np.sqrt(n)
    for j in range(1, n):
        img[j, j], img[j, 7] = 0.4, np.sqrt(1 - 0.4**2)
    pairs = np.arange(n)
    plain = retrieval.evaluate(img, text, pairs)
    assert plain["image_retrieval_recall@1"] == 20.0  # only the hub's own caption finds its image
    fixed = retrieval.evaluate(img, text, pairs, image_offsets=np.array([-0.1, 0, 0, 0, 0]))
    assert fixed["image_retrieval_recall@1"] == 100.0
    same = retrieval.evaluate(img, text, pairs, image_offsets=np.zeros(n), text_offsets=np.zeros(n))
    assert same == plain
    with pytest.raises(ValueError, match="image_offsets"):
        retrieval.evaluate(img, text, pairs, image_offsets=np.zeros(n + 1))


def test_bank_rows_are_a_seeded_sample_of_the_candidates():
    cand = np.array([7, 3, 3, 9, 1, 7, 20])
    assert bank_rows(cand, 10, 0).tolist() == [1, 3, 7, 9, 20]
    a, b = bank_rows(np.arange(1000), 50, 3), bank_rows(np.arange(1000), 50, 3)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 50 and np.all(np.diff(a) > 0)


def test_trainer_keeps_a_bank_of_training_items_matching_the_saved_weights(tmp_path, pairs_csv):
    """A run with model.hubness saves, with its weights, the embeddings of training items only (a holdout
    never enters the bank); loaded, the model corrects retrieval, and the eval differs from plain cosine."""
    from test_train import toy_config

    import lightcrl
    from lightcrl.app.config import validate_config
    from lightcrl.app.train import train
    from lightcrl.app.train_data import build_pairsets
    from lightcrl.embed import EmbedOptions, cached_store

    cfg = toy_config(pairs_csv, **{"optim.epochs": 2})
    cfg["data"]["sources"][0].update(val_split=None, holdout=0.25)
    cfg["model"]["hubness"] = {"k": 3, "bank": 12}
    cfg = validate_config(cfg)
    train(cfg, tmp_path / "run")
    pipe = lightcrl.load(tmp_path / "run", device="cpu")
    model = pipe.model
    (train_set,), (val_set,) = build_pairsets(cfg, "train"), build_pairsets(cfg, "val")
    media = cached_store("toy-image", pairs_csv, "all", EmbedOptions(seed=0, device="cpu"))
    text = cached_store("toy-text", pairs_csv, "all", EmbedOptions(seed=0, device="cpu"))
    # the bank: 12 of the 30 training images and 12 of their 60 captions, as the saved weights embed them
    hub_img, hub_txt = model.hub_image.float().numpy(), model.hub_text.float().numpy()
    assert hub_img.shape == (12, model.embed_dim) and hub_txt.shape == (12, model.embed_dim)
    img_rows = bank_rows(train_set.media_index, 12, 0)
    txt_rows = bank_rows(train_set.text_index, 12, 0)
    assert not set(img_rows.tolist()) & set(val_set.media_index.tolist())
    want_img = pipe.encode_store(media, indices=img_rows)
    want_txt = pipe.encode_store(text, indices=txt_rows)
    np.testing.assert_allclose(hub_img, want_img[bank_rows(np.arange(12), 12, 0)], atol=2e-3)
    np.testing.assert_allclose(hub_txt, want_txt, atol=2e-3)
    # retrieval through the model: offsets = csls_offsets against the bank of the query modality
    gallery = pipe.encode_store(media)
    np.testing.assert_allclose(model.retrieval_offsets(gallery, "text"), csls_offsets(gallery, hub_txt, 3),
                               atol=1e-6)
    assert model.retrieval_offsets(gallery, "image") is not None
    # the validation rows of the run used the correction: recompute val retrieval both ways
    import json

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in rows if "val/image_retrieval_recall@1" in r][-1]
    vm = np.unique(val_set.media_index)
    v_media = pipe.encode_store(media, indices=vm)
    v_text = pipe.encode_store(text, indices=val_set.text_index)
    pair_media = np.searchsorted(vm, val_set.media_index)
    corrected = retrieval.evaluate(v_media, v_text, pair_media,
                                   image_offsets=model.retrieval_offsets(v_media, "text"),
                                   text_offsets=model.retrieval_offsets(v_text, "image"))
    assert last_val["val/image_retrieval_recall@1"] == pytest.approx(corrected["image_retrieval_recall@1"])
    assert last_val["val/text_retrieval_recall@1"] == pytest.approx(corrected["text_retrieval_recall@1"])
    # lightcrl eval --task retrieval applies the same correction
    from lightcrl.app.evaluate import EvalRequest, EvalTarget, task_retrieval

    target = EvalTarget.from_run_dir(tmp_path / "run", device="cpu")
    got, _ = task_retrieval(target, EvalRequest(task="retrieval", data=pairs_csv, split="all"), tmp_path)
    gm, gt = pipe.encode_store(media), pipe.encode_store(text)
    want = retrieval.evaluate(gm, gt, np.searchsorted(media.items.ids, text.items.groups),
                              image_offsets=model.retrieval_offsets(gm, "text"),
                              text_offsets=model.retrieval_offsets(gt, "image"))
    plain = retrieval.evaluate(gm, gt, np.searchsorted(media.items.ids, text.items.groups))
    assert got["image_retrieval_recall@1"] == want["image_retrieval_recall@1"]
    assert got["text_retrieval_recall@1"] == want["text_retrieval_recall@1"]
    assert got["image_retrieval_mean_rank"] != plain["image_retrieval_mean_rank"]  # the correction acted
    assert got["uncorrected/image_retrieval_recall@1"] == plain["image_retrieval_recall@1"]


def test_training_free_baselines_take_the_same_correction():
    """ASIF and CSA with hubness: the bank is a seeded sample of the pairs they were built from, embedded by
    the model itself; without it they are unchanged."""
    from lightcrl.baselines.asif import asif_model, encode_pooled, fill_hubness_bank
    from lightcrl.baselines.csa import csa_model, fit_cca

    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(40, 6)).astype(np.float32), rng.normal(size=(40, 5)).astype(np.float32)
    plain = asif_model({"image": img, "text": txt}, k=5, p=2.0)
    assert plain.cfg.hubness is None and plain.retrieval_offsets(np.eye(40, 40)[:3], "text") is None
    model = asif_model({"image": img, "text": txt}, k=5, p=2.0, hubness={"k": 4, "bank": 16})
    rows = bank_rows(np.arange(40), 16, 0)
    want = encode_pooled(model, "text", txt[rows])
    np.testing.assert_allclose(model.hub_text.float().numpy(), want, atol=2e-3)
    gallery = encode_pooled(model, "image", img[:7])
    np.testing.assert_allclose(model.retrieval_offsets(gallery, "text"),
                               csls_offsets(gallery, model.hub_text.float().numpy(), 4), atol=1e-6)
    csa = csa_model(fit_cca(img, txt, 1e-2), ("image", "text"), 3, 1.0, {"k": 4, "bank": 16})
    fill_hubness_bank(csa, {"image": img, "text": txt})
    want = encode_pooled(csa, "image", img[rows])
    np.testing.assert_allclose(csa.hub_image.float().numpy(), want, atol=2e-3)
    # all_pairs lists an image once per caption: each enters the bank once, the captions as they are
    pairs_img, pairs_txt = np.repeat(img, 3, axis=0), rng.normal(size=(120, 5)).astype(np.float32)
    csa = csa_model(fit_cca(pairs_img, pairs_txt, 1e-2), ("image", "text"), 3, 1.0, {"k": 4, "bank": 16})
    fill_hubness_bank(csa, {"image": pairs_img, "text": pairs_txt})
    np.testing.assert_allclose(csa.hub_image.float().numpy(), encode_pooled(csa, "image", img[rows]),
                               atol=2e-3)
    np.testing.assert_allclose(csa.hub_text.float().numpy(),
                               encode_pooled(csa, "text", pairs_txt[bank_rows(np.arange(120), 16, 0)]),
                               atol=2e-3)


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory):
    """A toy run with model.hubness, trained on 40 coloured squares."""
    from conftest import make_pairs_csv
    from test_train import toy_config

    from lightcrl.app.config import validate_config
    from lightcrl.app.train import train

    root = tmp_path_factory.mktemp("hubsearch")
    spec = make_pairs_csv(root / "pairs", n=40)
    cfg = toy_config(spec, **{"optim.epochs": 4})
    cfg["model"]["hubness"] = {"k": 3, "bank": 16}
    train(validate_config(cfg), root / "run")
    return {"root": root, "spec": spec, "run": root / "run", "images": root / "pairs"}


def test_search_indexes_rank_as_the_retrieval_eval(hub_run):
    """`lightcrl index` keeps each item's offset per OTHER query modality; every structure (exact, HNSW,
    IVF-PQ), sharded indexes and the server rank by cosine + offset; same-modality queries and queries
    without a modality stay plain cosine."""
    import lightcrl
    from lightcrl.app.index import SearchIndex, ShardedIndex, build_index
    from lightcrl.app.serve import SearchService

    root, run = hub_run["root"], hub_run["run"]
    pipe = lightcrl.load(run, device="cpu")
    build_index(run, hub_run["spec"], root / "exact", progress=False)
    index = SearchIndex(root / "exact")
    emb = np.load(root / "exact" / "embeddings.npy")
    assert index.hubness_modalities == ["text"]  # an image gallery: text queries are corrected
    np.testing.assert_allclose(index.offsets("text"), pipe.model.retrieval_offsets(emb, "text"), atol=1e-6)
    assert index.offsets("image") is None and np.ptp(index.offsets("text")) > 0
    q = pipe.encode_text(["a blue square"], progress=False)[0]
    want_scores = emb @ q + index.offsets("text")
    want = np.lexsort((np.arange(40), -want_scores))[:5]
    ids, scores = index.search(q, 5, "text")
    assert ids.tolist() == want.tolist()
    np.testing.assert_allclose(scores, want_scores[want], atol=1e-5)
    plain = np.lexsort((np.arange(40), -(emb @ q)))[:5]
    assert index.search(q, 5)[0].tolist() == plain.tolist()  # no query modality: the cosine
    assert index.search(pipe.encode_image([hub_run["images"] / "img000.png"])[0], 1, "image")[1][0] == \
        pytest.approx(1.0, abs=1e-4)  # image -> images: plain cosine, the image itself first
    # the approximate structures re-score with the same offsets; a crafted offset moves the plain top item
    # out of the top 5 in every structure
    hnsw, ivf = root / "hnsw", root / "ivf"
    build_index(run, hub_run["spec"], hnsw, progress=False, structure="hnsw")
    build_index(run, hub_run["spec"], ivf, progress=False, exact_max=0, memory_mb=0)
    for d in (root / "exact", hnsw, ivf):
        assert SearchIndex(d).search(q, 5, "text")[0].tolist() == want.tolist(), d.name
        crafted = np.load(d / "hubness.npy")
        crafted[want[0], 0] = -10.0
        np.save(d / "hubness.npy", crafted)
        got = SearchIndex(d).search(q, 5, "text")[0].tolist()
        assert want[0] not in got and got[:4] == want[1:].tolist(), d.name
    # sharded: each part's offsets, merged by corrected score
    sharded = ShardedIndex([root / "exact", hnsw])
    got = sharded.search(q, 4, "text")[0]
    assert [int(i) % 40 for i in got] == [int(want[1])] * 2 + [int(want[2])] * 2 and set(got // 40) == {0, 1}
    # the server reports and applies the correction for text queries
    service = SearchService(root / "exact", device="cpu")
    answer = service.search_text("a blue square", 5)
    assert answer["corrected"] is True and service.describe()["hubness_corrected"] == ["text"]
    fresh = SearchIndex(root / "exact")  # with the crafted offsets
    assert [r["id"] for r in answer["results"]] == fresh.search(q, 5, "text")[0].tolist()
    # a caption index: image queries are corrected against the image bank
    build_index(run, hub_run["spec"], root / "captions", progress=False, modality="text")
    cap = SearchIndex(root / "captions")
    cap_emb = np.load(root / "captions" / "embeddings.npy")
    assert cap.hubness_modalities == ["image"]
    want_cap = pipe.model.retrieval_offsets(cap_emb, "image")
    np.testing.assert_allclose(cap.offsets("image"), want_cap, atol=1e-6)


def test_folder_search_ranks_as_the_retrieval_eval(hub_run):
    """`lightcrl search` over a folder: cosine + each image's offset for text queries."""
    import lightcrl
    from lightcrl.app.search import search

    pipe = lightcrl.load(hub_run["run"], device="cpu")
    res = search(hub_run["run"], hub_run["images"], "something green", top=40)
    paths = sorted(hub_run["images"].glob("*.png"))
    emb = pipe.encode_image(paths)
    q = pipe.encode_text(["something green"], progress=False)[0]
    scores = emb @ q + pipe.model.retrieval_offsets(emb, "text")
    got = {h.rel: h.score for h in res.hits}
    np.testing.assert_allclose([got[p.name] for p in paths], scores, atol=1e-4)
    assert any("hubness" in n for n in res.notes)
