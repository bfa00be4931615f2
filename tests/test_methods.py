"""Methods that keep what the frozen encoders know: STRUCTURE, multi-positive InfoNCE, FuseMix, gated and
locked heads, multi-caption batches — each against a hand computation or the method it reduces to."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightcrl.losses import ClipLoss, MultiPositiveClipLoss, StructureLoss, build_loss


def _softmax_no_self(sim: np.ndarray, tau: float) -> np.ndarray:
    """Row softmax of sim / tau over j != i, written out with loops."""
    n = len(sim)
    out = np.zeros((n, n))
    for i in range(n):
        z = sum(math.exp(sim[i, j] / tau) for j in range(n) if j != i)
        for j in range(n):
            out[i, j] = 0.0 if i == j else math.exp(sim[i, j] / tau) / z
    return out


def _centred_cos(x: np.ndarray) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    x = x - x.mean(axis=0)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return np.array([[float(np.dot(u, v)) for v in x] for u in x])


def _js(p: np.ndarray, q: np.ndarray) -> float:
    total = 0.0
    for pr, qr in zip(p, q, strict=True):
        for pv, qv in zip(pr, qr, strict=True):
            m = (pv + qv) / 2
            total += 0.5 * (pv * math.log(pv / m) if pv > 0 else 0.0)
            total += 0.5 * (qv * math.log(qv / m) if qv > 0 else 0.0)
    return total / len(p)


def _ref_structure(frozen: np.ndarray, aligned: np.ndarray, tau: float, levels: int) -> float:
    p, q = _softmax_no_self(_centred_cos(frozen), tau), _softmax_no_self(_centred_cos(aligned), tau)
    num = sum(_js(np.linalg.matrix_power(p, level), np.linalg.matrix_power(q, level)) / level
              for level in range(1, levels + 1))
    return num / sum(1 / level for level in range(1, levels + 1))


def test_structure_matches_hand_computation_on_four_items():
    rng = np.random.default_rng(0)
    fa, fb = rng.normal(size=(4, 6)), rng.normal(size=(4, 3))
    a, b = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    for levels in (1, 3):
        loss = StructureLoss(gather=False, tau=0.5, levels=levels)
        out = loss(t(a), t(b), frozen=(t(fa), t(fb)))
        ref_a, ref_b = _ref_structure(fa, a, 0.5, levels), _ref_structure(fb, b, 0.5, levels)
        assert float(out["js_a"]) == pytest.approx(ref_a, rel=1e-5)
        assert float(out["js_b"]) == pytest.approx(ref_b, rel=1e-5)
        assert float(out["loss"]) == pytest.approx((ref_a + ref_b) / 2, rel=1e-5)
        assert ref_a > 1e-3  # the check above is not vacuous


def test_structure_zero_for_identical_geometry_and_diagonal_excluded():
    rng = np.random.default_rng(1)
    f = torch.tensor(rng.normal(size=(4, 6)), dtype=torch.float64)
    loss = StructureLoss(gather=False, tau=0.1, levels=2)
    # identical inputs/outputs, and a scaled rotation of them: the same cosine geometry
    rot, _ = torch.linalg.qr(torch.tensor(rng.normal(size=(6, 6))))
    for aligned in (f, 3.0 * f @ rot):
        assert float(loss(aligned, aligned, frozen=(f, f))["loss"]) == pytest.approx(0.0, abs=1e-6)
    # the diagonal: probability 0, whatever the self-similarity (which is the largest, 1/tau)
    from lightcrl.losses import neighbour_distribution

    p = neighbour_distribution(f, 0.1)
    assert torch.all(p.diagonal() == 0) and torch.allclose(p.sum(dim=1), torch.ones(4, dtype=p.dtype))
    # gradients reach the aligned side only
    a = f.clone().requires_grad_(True)
    frozen = torch.tensor(rng.normal(size=(4, 6)), dtype=torch.float64, requires_grad=True)
    loss(a, a, frozen=(frozen, frozen))["loss"].backward()
    assert a.grad is not None and a.grad.abs().sum() > 0 and frozen.grad is None


def test_structure_ramp_and_combined_spec():
    rng = np.random.default_rng(2)
    a, b = (torch.nn.functional.normalize(torch.tensor(rng.normal(size=(4, 5))), dim=-1) for _ in range(2))
    fa, fb = torch.tensor(rng.normal(size=(4, 6))), torch.tensor(rng.normal(size=(4, 3)))
    combined = build_loss({"clip": 1.0, "structure": {"weight": 2.0, "tau": 0.5, "levels": 2,
                                                      "warmup_steps": 4}}, gather=False)
    assert combined.required_inputs() == {"pair", "frozen"}
    full = combined(a, b, 2.0, frozen=(fa, fb), step=10)
    half = combined(a, b, 2.0, frozen=(fa, fb), step=1)  # (1 + 1) / 4 of the way in
    js = StructureLoss(gather=False, tau=0.5, levels=2)(a, b, frozen=(fa, fb))["loss"]
    clip = ClipLoss(gather=False)(a, b, 2.0)["loss"]
    assert float(full["loss"]) == pytest.approx(float(clip + 2.0 * js), rel=1e-6)
    assert float(half["loss"]) == pytest.approx(float(clip + 2.0 * 0.5 * js), rel=1e-6)
    with pytest.raises(ValueError, match="frozen"):
        combined(a, b, 2.0)


def test_multipositive_equals_clip_with_one_caption_per_image_and_counts_every_caption():
    rng = np.random.default_rng(3)
    a, b = (torch.nn.functional.normalize(torch.tensor(rng.normal(size=(5, 4))), dim=-1) for _ in range(2))
    clip = ClipLoss(gather=False)(a, b, 3.0)["loss"]
    multi = MultiPositiveClipLoss(gather=False)
    assert float(multi(a, b, 3.0, groups=torch.arange(5) * 7)["loss"]) == pytest.approx(float(clip), rel=1e-9)
    assert float(multi(a, b, 3.0)["loss"]) == pytest.approx(float(clip), rel=1e-9)
    # rows 0 and 1 show the same image with two captions: each row's loss averages over both positives
    groups = torch.tensor([0, 0, 1, 2, 3])
    logits = (3.0 * a @ b.T).numpy()
    pos = [[0, 1], [0, 1], [2], [3], [4]]

    def direction(lg):
        total = 0.0
        for i in range(5):
            lse = math.log(sum(math.exp(v) for v in lg[i]))
            total += -sum(lg[i][j] - lse for j in pos[i]) / len(pos[i])
        return total / 5

    ref = (direction(logits) + direction(logits.T)) / 2
    out = multi(a, b, 3.0, groups=groups)
    assert float(out["loss"]) == pytest.approx(ref, rel=1e-9)
    assert float(out["positives"]) == pytest.approx(7 / 5)
    combined = build_loss({"multipos": 1.0}, gather=False)
    assert combined.required_inputs() == {"pair", "groups"}
    assert float(combined(a, b, 3.0, groups=groups)["loss"]) == pytest.approx(ref, rel=1e-9)


# -- heads that start from the frozen features ---------------------------------------------------------
def _inputs(rng, n=3, t=4, d=8):
    tokens = torch.tensor(rng.normal(size=(n, t, d)), dtype=torch.float32)
    mask = torch.ones(n, t, dtype=torch.bool)
    mask[1, 2:] = False
    return tokens, mask


@pytest.mark.parametrize("arch", ["dfe", "two_tower"])
def test_gated_head_starts_as_the_normalised_frozen_feature(arch):
    from lightcrl.features import masked_mean
    from lightcrl.model import create_model

    rng = np.random.default_rng(4)
    cfg = {"arch": arch, "width": 8, "heads": 2, "ffn_dim": 16, "head": "gated"}
    model = create_model(cfg, {"image": 8, "text": 6}).eval()
    tokens, mask = _inputs(rng)
    frozen = torch.nn.functional.normalize(masked_mean(tokens, mask), dim=-1)
    # widths agree: the embedding IS the normalised frozen feature, whatever the (random) head computes
    assert torch.allclose(model.encode("image", tokens, mask), frozen, atol=1e-6)
    # widths differ (6 -> 8): a fixed isometry, so the frozen cosines are kept exactly
    t_tokens, t_mask = _inputs(rng, d=6)
    emb = model.encode("text", t_tokens, t_mask)
    t_frozen = torch.nn.functional.normalize(masked_mean(t_tokens, t_mask), dim=-1)
    assert torch.allclose(emb @ emb.T, t_frozen @ t_frozen.T, atol=1e-5)
    assert model.parameter_counts()["gate"] == 16
    # the gate opens under training: one step moves the embedding away from the frozen feature
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    (model.encode("image", tokens, mask) @ torch.randn(8)).sum().backward()
    assert model.gates["image"].grad.abs().sum() > 0
    opt.step()
    assert not torch.allclose(model.eval().encode("image", tokens, mask), frozen, atol=1e-4)


def test_locked_modality_has_no_head_and_a_fixed_projection():
    from lightcrl.features import masked_mean
    from lightcrl.model import create_model

    rng = np.random.default_rng(5)
    cfg = {"arch": "dfe", "width": 4, "heads": 2, "ffn_dim": 16, "locked": ["image"]}
    model = create_model(cfg, {"image": 8, "text": 6})
    assert "image" not in model.projections and "image" not in model.contexts
    tokens, mask = _inputs(rng)
    w = model.base_map_image
    assert torch.allclose(w @ w.T, torch.eye(4), atol=1e-6)  # orthonormal rows: a projection 8 -> 4
    expected = torch.nn.functional.normalize(
        torch.nn.functional.normalize(masked_mean(tokens, mask), dim=-1) @ w.T, dim=-1)
    assert torch.allclose(model.train().encode("image", tokens, mask), expected, atol=1e-6)
    # the map is part of the weights and deterministic: a second model (any RNG state) builds the same
    torch.manual_seed(123)
    again = create_model(cfg, {"image": 8, "text": 6})
    assert torch.equal(again.base_map_image, w) and "base_map_image" in model.state_dict()
    with pytest.raises(ValueError, match="locked"):
        create_model({**cfg, "locked": ["audio"]}, {"image": 8, "text": 6})


def test_plain_model_init_is_unchanged_by_the_new_options():
    from lightcrl.model import create_model

    torch.manual_seed(0)
    plain = create_model({"arch": "dfe", "width": 8, "heads": 2, "ffn_dim": 16}, {"image": 8, "text": 6})
    torch.manual_seed(0)
    gated = create_model({"arch": "dfe", "width": 8, "heads": 2, "ffn_dim": 16, "head": "gated"},
                         {"image": 8, "text": 6})
    ps, gs = plain.state_dict(), gated.state_dict()
    assert all(torch.equal(ps[k], gs[k]) for k in ps)  # the same head, plus the gate and the base maps


# -- FuseMix and multi-caption batches ---------------------------------------------------------------------
def test_fusemix_with_lambda_one_is_no_mixup_and_shares_lambda_across_modalities():
    from lightcrl.features import masked_mean
    from lightcrl.mixing import fusemix, mixed_groups, sample_fusemix

    rng = np.random.default_rng(6)
    image = _inputs(rng, n=4, t=3, d=5)
    text = (torch.tensor(rng.normal(size=(4, 6, 2)), dtype=torch.float32),
            torch.tensor([[1, 1, 0, 0, 0, 0], [1] * 6, [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]).bool())
    batch = {"image": image, "text": text}
    perm = torch.tensor([2, 0, 3, 1])
    same = fusemix(batch, torch.ones(4), perm)
    for m in batch:
        clean = batch[m][0].masked_fill(~batch[m][1].unsqueeze(-1), 0.0)
        assert torch.equal(same[m][0], clean) and torch.equal(same[m][1], batch[m][1])
    # one token per item (pooled inputs): exactly lam x_i + (1 - lam) x_perm(i), the same lam in both
    lam = torch.tensor([0.25, 0.5, 0.9, 0.0])
    pooled = {m: (masked_mean(*batch[m]).unsqueeze(1), torch.ones(4, 1, dtype=torch.bool)) for m in batch}
    mixed = fusemix(pooled, lam, perm)
    for m in batch:
        x = pooled[m][0][:, 0]
        assert torch.allclose(mixed[m][0][:, 0], lam[:, None] * x + (1 - lam[:, None]) * x[perm])
    # token masks: real where a contributing item is real
    assert mixed["text"][1].all() and fusemix(batch, lam, perm)["text"][1][3].tolist() == text[1][1].tolist()
    groups = mixed_groups(torch.tensor([5, 5, 7, 8]), torch.tensor([10, 11, 12, 13]), lam, perm)
    assert groups.tolist() == [-11, -12, -13, 5]  # lam 0: row 3 is its partner (row 1, item 5)
    torch.manual_seed(0)
    lam, perm = sample_fusemix(1000, 1.0)
    assert 0 <= float(lam.min()) and float(lam.max()) <= 1 and abs(float(lam.mean()) - 0.5) < 0.05
    assert sorted(perm.tolist()) == list(range(1000))


def test_multi_caption_epochs_put_several_captions_of_each_image_side_by_side():
    from lightcrl.pairs import PairSet

    # 5 media items with 1..5 captions each
    media_index = np.repeat(np.arange(5), [1, 2, 3, 4, 5])
    ps = PairSet("toy", None, None, media_index, np.arange(len(media_index)))
    pairs = ps.epoch_pairs(0, 1, "multi_caption", per_media=3)
    assert len(pairs) == ps.epoch_size("multi_caption", 3) == 1 + 2 + 3 + 3 + 3 == len(set(pairs.tolist()))
    items = media_index[pairs]
    runs = [int(items[0])] + [int(b) for a, b in zip(items[:-1], items[1:], strict=True) if a != b]
    assert sorted(runs) == list(range(5))  # every item once, its captions contiguous
    assert np.array_equal(pairs, ps.epoch_pairs(0, 1, "multi_caption", per_media=3))
    assert not np.array_equal(pairs, ps.epoch_pairs(0, 2, "multi_caption", per_media=3))
    assert ps.epoch_size("random_caption") == 5 and ps.epoch_size("all_pairs") == 15


def test_trainer_runs_every_new_option_together(tmp_path, pairs_csv):
    import json

    from test_train import toy_config

    from lightcrl.app.config import validate_config
    from lightcrl.app.train import train

    cfg = toy_config(pairs_csv, **{"optim.epochs": 1})
    cfg["data"].update(pairs="multi_caption", captions_per_media=2, fusemix={"alpha": 1.0})
    cfg["model"].update(head="gated")
    cfg["loss"] = {"multipos": 1.0, "structure": {"weight": 1.0, "tau": 0.1, "levels": 2, "warmup_steps": 4}}
    train(validate_config(cfg), tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/structure/loss" in r]
    assert train_rows and all(math.isfinite(r["train/loss"]) for r in train_rows)
    assert all(0 < r["train/structure/ramp"] <= 1 for r in train_rows)
    locked = toy_config(pairs_csv, **{"optim.epochs": 1})
    locked["model"].update(arch="two_tower", locked=["image"])
    locked["loss"] = {"clip": 1.0}
    train(validate_config(locked), tmp_path / "lit")
    info = json.loads((tmp_path / "lit" / "model.json").read_text())
    assert "projection/image" not in info["parameter_counts"]


def test_holdout_validates_on_training_media_never_trained_on(tmp_path, pairs_csv):
    from test_train import toy_config

    from lightcrl.app.config import validate_config
    from lightcrl.app.train_data import build_pairsets

    cfg = toy_config(pairs_csv)
    cfg["data"]["sources"][0].update(val_split=None, holdout=0.25)
    cfg = validate_config(cfg)
    (train_set,), (val_set,) = build_pairsets(cfg, "train"), build_pairsets(cfg, "val")
    train_media, val_media = set(train_set.media_index.tolist()), set(val_set.media_index.tolist())
    assert not train_media & val_media and len(val_media) == 10 and len(train_media) == 30
    assert len(train_set) + len(val_set) == 80  # every caption goes with its image
    assert train_set.media.dir == val_set.media.dir  # the same cached store: nothing is extracted twice
