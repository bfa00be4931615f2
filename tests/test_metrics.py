"""Metric functions on synthetic embeddings with known answers, plus STS loaders on the real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from lightcrl.app import plots
from lightcrl.metrics import finetune, geometry, linear_probe, retrieval, sts, zeroshot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster than two contending ones (and deterministic)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- zero-shot
def test_zeroshot_perfect_classifier():
    rng = np.random.default_rng(0)
    class_emb = _unit(rng, 10, 32)
    labels = rng.integers(0, 10, 500)
    images = 3.0 * class_emb[labels] + 0.01 * rng.normal(size=(500, 32))  # unnormalised on purpose
    r = zeroshot.evaluate(torch.tensor(images), torch.tensor(labels), class_emb, [f"c{i}" for i in range(10)])
    assert all(r[f"top{k}"] == 100.0 for k in range(1, 6))
    assert r["mean_per_class_recall"] == 100.0
    cm = np.array(r["confusion_matrix"])
    assert (cm == np.diag(np.bincount(labels, minlength=10))).all()
    assert set(r["per_class_accuracy"].values()) == {100.0}


def test_zeroshot_random_is_chance():
    rng = np.random.default_rng(1)
    r = zeroshot.evaluate(
        _unit(rng, 1000, 64), rng.integers(0, 10, 1000), _unit(rng, 10, 64), [str(i) for i in range(10)]
    )
    assert abs(r["top1"] - 10) < 4
    assert abs(r["top5"] - 50) < 8
    assert abs(r["mean_per_class_recall"] - 10) < 4
    assert r["top1"] <= r["top2"] <= r["top3"] <= r["top4"] <= r["top5"]


def test_zeroshot_hand_example():
    # classes = basis vectors, so an image's scores are its own coordinates.
    class_emb = np.eye(3, dtype=np.float32)
    images = np.array(
        [
            [0.9, 0.1, 0.0],  # true 0, pred 0
            [0.5, 0.4, 0.1],  # true 1, pred 0 (true at rank 2)
            [0.1, 0.2, 0.7],  # true 2, pred 2
            [0.2, 0.3, 0.1],
        ]
    )  # true 2, pred 1 (true at rank 3)
    r = zeroshot.evaluate(images, [0, 1, 2, 2], class_emb, ["a", "b", "c"], topk=(1, 2, 3, 5))
    assert r["top1"] == pytest.approx(50.0)
    assert r["top2"] == pytest.approx(75.0)
    assert r["top3"] == pytest.approx(100.0)
    assert "top5" not in r  # k > number of classes
    assert r["confusion_matrix"] == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]
    assert r["per_class_accuracy"] == {"a": 100.0, "b": 0.0, "c": 50.0}
    assert r["mean_per_class_recall"] == pytest.approx(50.0)


def test_zeroshot_ties_agree_with_argmax():
    r = zeroshot.evaluate(np.ones((4, 2)), [0, 1, 0, 1], np.ones((2, 2)), ["x", "y"], topk=(1, 2))
    assert r["top1"] == 50.0  # lower class index wins a tie, as argmax
    assert r["confusion_matrix"] == [[2, 0], [2, 0]]
    assert r["top2"] == 100.0


def test_zeroshot_rejects_bad_labels():
    with pytest.raises(ValueError):
        zeroshot.evaluate(np.ones((2, 2)), [0, 3], np.eye(2), ["x", "y"])


def test_build_classifier_is_normalised_mean_in_one_call():
    rng = np.random.default_rng(2)
    table: dict[str, np.ndarray] = {}
    calls: list[int] = []

    def encode_text(texts: list[str]) -> torch.Tensor:
        calls.append(len(texts))
        for t in texts:
            table.setdefault(t, rng.normal(size=8) * rng.uniform(0.5, 3))
        return torch.tensor(np.stack([table[t] for t in texts]))

    templates = ["a photo of a {c}.", "a drawing of a {c}.", "{c}"]
    w = zeroshot.build_classifier(encode_text, ["cat", "dog"], templates)
    assert calls == [6]
    assert w.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-6)
    for i, name in enumerate(["cat", "dog"]):
        e = np.stack([table[t.replace("{c}", name)] for t in templates])
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        m = e.mean(0)
        np.testing.assert_allclose(w[i], m / np.linalg.norm(m), atol=1e-5)
    # per-class prompt dicts (CLIP_benchmark style) with different counts per class
    w2 = zeroshot.build_classifier(encode_text, ["cat", "dog"], {"cat": ["cat"], "dog": ["dog", "{c}"]})
    np.testing.assert_allclose(w2[0], table["cat"] / np.linalg.norm(table["cat"]), atol=1e-5)


# ---------------------------------------------------------------------------------------------- retrieval
def test_retrieval_perfect_alignment():
    rng = np.random.default_rng(3)
    img = _unit(rng, 60, 32)
    t2i = np.repeat(np.arange(60), 5)
    r = retrieval.evaluate(img, img[t2i] + 1e-3 * rng.normal(size=(300, 32)), t2i)
    for k in (1, 5, 10):
        assert r[f"image_retrieval_recall@{k}"] == 100.0
        assert r[f"text_retrieval_recall@{k}"] == 100.0
    assert r["image_retrieval_median_rank"] == 1.0 and r["text_retrieval_median_rank"] == 1.0


def test_retrieval_random_is_chance():
    rng = np.random.default_rng(4)
    n = 1000
    r = retrieval.evaluate(_unit(rng, n, 64), _unit(rng, n, 64), rng.permutation(n))
    assert r["image_retrieval_recall@10"] < 3.0 and r["text_retrieval_recall@10"] < 3.0
    assert abs(r["image_retrieval_median_rank"] - n / 2) < 0.1 * n
    assert abs(r["text_retrieval_median_rank"] - n / 2) < 0.1 * n


def test_retrieval_collapsed_model_is_not_perfect():
    r = retrieval.evaluate(np.ones((100, 4)), np.ones((100, 4)), np.arange(100))
    assert r["image_retrieval_recall@1"] == pytest.approx(1.0)  # ties broken by index, not in our favour
    assert r["text_retrieval_recall@1"] == pytest.approx(1.0)


def _hand_example() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3 images (basis vectors e0..e2 in R^4), 2 captions each; score(caption, image k) = caption[k]."""
    s = np.array(
        [
            [0.9, 0.1, 0.2],  # c0 -> img0: img0 first                      rank 1
            [0.3, 0.5, 0.1],  # c1 -> img0: img1, img0                      rank 2
            [0.2, 0.4, 0.6],  # c2 -> img1: img2, img1                      rank 2
            [0.7, 0.1, 0.5],  # c3 -> img1: img0, img2, img1                rank 3
            [0.1, 0.3, 0.55],  # c4 -> img2: img2 first                      rank 1
            [0.6, 0.2, 0.05],
        ]
    )  # c5 -> img2: img0, img1, img2                rank 3
    txt = np.hstack([s, np.sqrt(1 - (s**2).sum(1, keepdims=True))])  # unit norm, scores unchanged
    img = np.eye(3, 4)
    return img, txt, np.array([0, 0, 1, 1, 2, 2])


def test_retrieval_multi_caption_by_hand():
    img, txt, t2i = _hand_example()
    r = retrieval.evaluate(img, txt, t2i, ks=(1, 2, 5))
    # text -> image ranks: [1, 2, 2, 3, 1, 3]
    assert r["image_retrieval_recall@1"] == pytest.approx(100 * 2 / 6)
    assert r["image_retrieval_recall@2"] == pytest.approx(100 * 4 / 6)
    assert r["image_retrieval_recall@5"] == pytest.approx(100.0)
    assert r["image_retrieval_median_rank"] == 2.0
    assert r["image_retrieval_mean_rank"] == pytest.approx(2.0)
    # image -> captions (first correct caption):
    #   img0 column .9 .3 .2 .7 .1 .6   -> c0 first                       rank 1
    #   img1 column .1 .5 .4 .1 .3 .2   -> c1 (img0's) then c2 (its own)  rank 2
    #   img2 column .2 .1 .6 .5 .55 .05 -> c2 (img1's) then c4 (its own)  rank 2
    assert r["text_retrieval_recall@1"] == pytest.approx(100 / 3)
    assert r["text_retrieval_recall@2"] == pytest.approx(100.0)
    assert r["text_retrieval_median_rank"] == 2.0
    assert r["text_retrieval_mean_rank"] == pytest.approx(5 / 3)


def test_retrieval_chunking_does_not_change_results():
    rng = np.random.default_rng(5)
    img, txt = _unit(rng, 53, 16), _unit(rng, 159, 16)
    t2i = rng.integers(0, 53, 159)
    a = retrieval.evaluate(img, txt, t2i, chunk=7)
    b = retrieval.evaluate(img, txt, t2i)
    assert a == b
    assert a["n_images_without_captions"] == int((np.bincount(t2i, minlength=53) == 0).sum())


# ---------------------------------------------------------------------------------------------- linear probe
def _blobs(rng: np.random.Generator, n: int, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, len(centers), n)
    return centers[y] + rng.normal(size=(n, centers.shape[1])), y


@pytest.mark.parametrize("mode", ["logreg", "sgd"])
def test_linear_probe_separable(mode: str):
    rng = np.random.default_rng(6)
    centers = 4 * rng.normal(size=(10, 32))
    xtr, ytr = _blobs(rng, 600, centers)
    xte, yte = _blobs(rng, 300, centers)
    r = linear_probe.evaluate(xtr, ytr, xte, yte, mode=mode, cs=(1e-3, 1e-1, 10.0), epochs=40, eval_every=20)
    assert r["top1"] >= 98.0 and r["top5"] >= 99.0
    if mode == "sgd":
        assert set(r) >= {"acc@epoch20", "acc@epoch40"} and r["top1"] == r["acc@epoch40"]
    else:
        assert r["n_val"] == 120 and r["C"] in (1e-3, 1e-1, 10.0)


@pytest.mark.parametrize("mode", ["logreg", "sgd"])
def test_linear_probe_cannot_learn_from_test_labels(mode: str):
    """Train labels carry no signal; test labels are a function of the test features. Only a probe that
    used test labels could score above chance."""
    rng = np.random.default_rng(7)
    xtr, xte = rng.normal(size=(500, 20)), rng.normal(size=(500, 20))
    ytr = rng.integers(0, 5, 500)
    yte = xte[:, :5].argmax(1)
    r = linear_probe.evaluate(xtr, ytr, xte, yte, mode=mode, cs=(1e-2, 1.0, 100.0), epochs=20)
    assert r["top1"] < 30  # chance is 20; the features alone would give ~100 with the test labels


def test_linear_probe_c_selection_ignores_test_set():
    rng = np.random.default_rng(8)
    centers = 0.6 * rng.normal(size=(5, 16))
    xtr, ytr = _blobs(rng, 400, centers)
    xte, yte = _blobs(rng, 200, centers)
    cs = (1e-3, 1e-2, 1e-1, 1.0)
    a = linear_probe.evaluate(xtr, ytr, xte, yte, cs=cs)
    b = linear_probe.evaluate(xtr, ytr, xte, rng.permutation(yte), cs=cs)
    c = linear_probe.evaluate(xtr, ytr, rng.normal(size=xte.shape), yte, cs=cs)
    assert a["C"] == b["C"] == c["C"]
    assert a["val_top1_by_C"] == b["val_top1_by_C"] == c["val_top1_by_C"]


def test_linear_probe_rejects_unknown_mode():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError):
        linear_probe.evaluate(x, [0, 1, 0, 1], x, [0, 1, 0, 1], mode="svm")


# ---------------------------------------------------------------------------------------------- fine-tuning
class _ToyEncoder(torch.nn.Module):
    """Masked mean of tokens -> linear -> L2 normalise. Token dim 0 (the label signal) starts unused."""

    def __init__(self, d_in: int = 6, d_out: int = 4):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out)
        with torch.no_grad():
            self.proj.weight[:, 0] = 0.0

    def encode(self, modality: str, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assert modality == "image"
        m = mask.unsqueeze(-1).float()
        pooled = (tokens * m).sum(1) / m.sum(1).clamp_min(1)
        return torch.nn.functional.normalize(self.proj(pooled), dim=-1)


class _ToySource:
    def __init__(self, n: int, seed: int):
        g = np.random.default_rng(seed)
        self.labels = g.integers(0, 2, n)
        self.tokens = g.normal(size=(n, 5, 6)).astype(np.float32)
        self.tokens[:, :, 0] += np.where(self.labels == 1, 2.0, -2.0)[:, None]
        self.lengths = g.integers(1, 6, n)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        mask = np.arange(5)[None, :] < self.lengths[indices][:, None]
        return torch.from_numpy(self.tokens[indices]), torch.from_numpy(mask)


def test_finetune_unfrozen_encoder_learns_what_the_frozen_one_cannot():
    torch.manual_seed(0)
    model = _ToyEncoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, test = _ToySource(256, 0), _ToySource(128, 1)
    assert isinstance(train, finetune.FeatureSource)
    kw = dict(num_classes=2, epochs=30, eval_every=10, lr=1e-2, batch_size=64)
    tuned = finetune.evaluate(model, "image", train, test, **kw)
    frozen = finetune.evaluate(model, "image", train, test, freeze_encoder=True, **kw)
    assert tuned["top1"] >= 95.0
    assert frozen["top1"] <= 70.0  # the frozen encoder throws the label signal away
    assert set(tuned) >= {"acc@epoch10", "acc@epoch20", "acc@epoch30"}
    assert tuned["trainable_params"] == 6 * 4 + 4 + 4 * 2 + 2
    assert frozen["trainable_params"] == 4 * 2 + 2 and frozen["freeze_encoder"] is True
    for k, v in model.state_dict().items():  # caller's model untouched
        assert torch.equal(v, before[k])
    assert finetune.evaluate(model, "image", train, test, **kw) == tuned  # seeded


# ---------------------------------------------------------------------------------------------- geometry
def test_geometry_identical_pairs():
    rng = np.random.default_rng(9)
    a = _unit(rng, 300, 16)
    r = geometry.evaluate(a, a.copy())
    assert r["alignment"] == pytest.approx(0.0, abs=1e-6)
    assert r["modality_gap"] == pytest.approx(0.0, abs=1e-6)
    assert r["matched_cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert r["matched_cosine_std"] == pytest.approx(0.0, abs=1e-3)
    assert r["uniformity_a"] == pytest.approx(r["uniformity_b"])
    assert abs(r["unmatched_cosine_mean"]) < 0.02


def test_geometry_matches_brute_force():
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=(40, 5)) + 1.0, rng.normal(size=(40, 5))
    r = geometry.evaluate(a, b)
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    sim = an @ bn.T
    off = sim[~np.eye(40, dtype=bool)]
    assert r["unmatched_cosine_mean"] == pytest.approx(off.mean(), abs=1e-5)
    assert r["unmatched_cosine_std"] == pytest.approx(off.std(), abs=1e-5)
    assert r["alignment"] == pytest.approx(((an - bn) ** 2).sum(1).mean(), abs=1e-5)
    assert r["modality_gap"] == pytest.approx(np.linalg.norm(an.mean(0) - bn.mean(0)), abs=1e-5)
    iu = np.triu_indices(40, 1)
    d2 = ((an[:, None] - an[None]) ** 2).sum(-1)[iu]
    assert r["uniformity_a"] == pytest.approx(np.log(np.exp(-2 * d2).mean()), abs=1e-5)
    assert r["modality_gap"] > 0.3


def test_uniformity_matches_pairwise_distances_in_high_dimension():
    """The Gram-matrix uniformity equals the pairwise-distance definition (torch.pdist), also for wide
    embeddings (ASIF's anchor coordinates have thousands of dimensions), duplicate points and a subsample."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 3000)).astype(np.float32)
    x[7] = x[3]  # a coincident pair: distance 0
    for t in (2.0, 0.5):
        xn = torch.from_numpy(geometry.l2_normalize(x)).double()
        ref = torch.logsumexp(-t * torch.pdist(xn).pow(2), 0) - np.log(60 * 59 / 2)
        assert geometry.uniformity(x, t=t) == pytest.approx(float(ref), abs=1e-9)
    idx = np.sort(np.random.default_rng(0).choice(60, size=20, replace=False))
    sub = torch.from_numpy(geometry.l2_normalize(x)[idx]).double()
    ref = torch.logsumexp(-2 * torch.pdist(sub).pow(2), 0) - np.log(20 * 19 / 2)
    assert geometry.uniformity(x, max_points=20, seed=0) == pytest.approx(float(ref), abs=1e-9)


def test_geometry_plot(tmp_path: Path):
    rng = np.random.default_rng(11)
    a = _unit(rng, 200, 8)
    plots.cosine_histogram(a, a + 0.3 * rng.normal(size=a.shape), tmp_path / "cos.png")
    assert (tmp_path / "cos.png").read_bytes().startswith(PNG_MAGIC)


# ---------------------------------------------------------------------------------------------- plots
@pytest.mark.parametrize("n", [10, 200])
def test_confusion_matrix_plot(tmp_path: Path, n: int):
    rng = np.random.default_rng(n)
    cm = rng.integers(0, 5, (n, n)) + np.diag(rng.integers(20, 50, n))
    plots.confusion_matrix(cm, [f"class {i}" for i in range(n)], tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes().startswith(PNG_MAGIC)


def test_training_curves_plot(tmp_path: Path):
    rows = [{"step": s, "epoch": s // 10, "train/loss": 2.0 / (s + 1)} for s in range(50)]
    rows += [
        {"step": s, "val/loss": 1.5 / (s + 1), "val/image_retrieval_recall@1": s / 2} for s in (10, 30, 49)
    ]
    names = plots.training_curves(rows, tmp_path / "curves.png")
    assert names == ["loss", "image_retrieval_recall@1"]
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_MAGIC)
    plots.bar_table({"model a": 50.0, "model b": 61.5}, tmp_path / "bars.png", title="top1")
    assert (tmp_path / "bars.png").read_bytes().startswith(PNG_MAGIC)


# ---------------------------------------------------------------------------------------------- STS
def test_sts_evaluate_and_all_setting():
    rng = np.random.default_rng(12)
    gold = rng.uniform(0, 5, 50)
    angle = gold / 5 * (np.pi / 2)  # cosine decreasing in angle -> monotone in -gold
    e1 = np.tile([1.0, 0.0], (50, 1))
    e2 = np.stack([np.cos(angle), np.sin(angle)], 1)
    r = sts.evaluate(e1, e2, -gold)
    assert r["spearman"] == pytest.approx(100.0) and r["n"] == 50
    assert sts.evaluate(e1, e2, gold)["spearman"] == pytest.approx(-100.0)

    subsets = {"x": (e1[:20], e2[:20], -gold[:20]), "y": (e1[20:], rng.normal(size=(30, 2)), gold[20:])}
    m = sts.evaluate_many(subsets)
    assert m["x/spearman"] == pytest.approx(100.0) and m["y/n"] == 30
    direct = sts.evaluate(
        np.vstack([e1[:20], e1[20:]]),
        np.vstack([e2[:20], subsets["y"][1]]),
        np.concatenate([-gold[:20], gold[20:]]),
    )
    assert m["all/spearman"] == pytest.approx(direct["spearman"])
    assert m["wmean/spearman"] == pytest.approx((20 * m["x/spearman"] + 30 * m["y/spearman"]) / 50)


def test_sts_evaluate_sets_headline_per_set_and_mean():
    rng = np.random.default_rng(3)
    gold = rng.uniform(0, 5, 60)
    e1, e2 = rng.normal(size=(60, 8)), rng.normal(size=(60, 8))
    e2[:, 0] += gold  # some signal, different per subset
    e1[:, 0] += 1.0
    year = {"a": (e1[:25], e2[:25], gold[:25]), "b": (e1[25:45], e2[25:45], gold[25:45])}
    bench = {"test": (e1[45:], e2[45:], gold[45:])}
    m = sts.evaluate_sets({"STS12": year, "STSBenchmark": bench})
    many, one = sts.evaluate_many(year), sts.evaluate(*bench["test"])
    assert m["STS12/spearman"] == pytest.approx(many["all/spearman"])  # the concatenation, not the mean
    assert m["STS12/mean/spearman"] == pytest.approx(many["mean/spearman"]) and "STS12/all/spearman" not in m
    assert m["STSBenchmark/spearman"] == pytest.approx(one["spearman"])
    assert m["spearman"] == pytest.approx((many["all/spearman"] + one["spearman"]) / 2) and m["n"] == 60
    alone = sts.evaluate_sets({"STS12": year})  # one set: no prefix, its headline is "spearman"
    assert alone["spearman"] == pytest.approx(many["all/spearman"]) and alone["n"] == 45


def test_retrieval_by_class_by_hand():
    # 4 media items of classes [0, 0, 1, 1]; 2 queries (class 0, class 1) on a line
    media = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    queries = np.array([[1.0, 0.0], [0.0, 1.0]])
    out = retrieval.evaluate_by_class(media, queries, [0, 0, 1, 1], [0, 1], ks=(1, 2, 3))
    # query 0 ranks items 0 (.. 1.0), 1 (0.8), 3 (0.6), 2 (0): relevant 1,1,0,0 -> AP 1
    # query 1 ranks items 2 (1.0), 3 (0.8), 1 (0.6), 0 (0): relevant 1,1,0,0 -> AP 1
    assert out["class_precision@1"] == 100.0 and out["class_precision@2"] == 100.0
    assert out["class_precision@3"] == pytest.approx(200 / 3) and out["class_map"] == 100.0
    # swap the classes of the queries: relevant items come last -> AP = (1/3 + 2/4) / 2
    out = retrieval.evaluate_by_class(media, queries, [0, 0, 1, 1], [1, 0], ks=(1,))
    assert out["class_precision@1"] == 0.0 and out["class_map"] == pytest.approx((1 / 3 + 2 / 4) / 2 * 100)
    with pytest.raises(ValueError, match="no media item"):
        retrieval.evaluate_by_class(media, queries, [0, 0, 1, 1], [0, 2])
