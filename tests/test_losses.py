"""Losses vs hand-written numpy loops on small examples, the combiner, and DDP gathering (2 gloo ranks)."""

from __future__ import annotations

import math
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightcrl import distributed
from lightcrl.losses import (
    LOSSES,
    ClipLoss,
    CombinedLoss,
    ConVIRTLoss,
    CyClipLoss,
    LightCRLLoss,
    SigLipLoss,
    SimCSELoss,
    SupSimCSELoss,
    build_loss,
)
from lightcrl.model import create_model

SCALE = 2.5  # a small scale keeps the 3x3 softmaxes far from one-hot, so every entry matters


def _unit_rows(rng: np.random.Generator, n: int = 3, d: int = 4) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def ab() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return _unit_rows(rng), _unit_rows(rng)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def _dot(u: np.ndarray, v: np.ndarray) -> float:
    return float(sum(u[k] * v[k] for k in range(len(u))))


def _cos(u: np.ndarray, v: np.ndarray) -> float:
    return _dot(u, v) / math.sqrt(_dot(u, u) * _dot(v, v))


def _ce_rows(logits: list[list[float]], targets: list[list[float]]) -> float:
    """Mean over rows of -sum_j t_ij log softmax_j(logits_i)."""
    total = 0.0
    for row, trow in zip(logits, targets, strict=True):
        lse = math.log(sum(math.exp(v) for v in row))
        total -= sum(t * (v - lse) for v, t in zip(row, trow, strict=True))
    return total / len(logits)


def _eye(n: int) -> list[list[float]]:
    return [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]


def _transpose(m: list[list[float]]) -> list[list[float]]:
    return [list(col) for col in zip(*m, strict=True)]


def _ref_clip(a: np.ndarray, b: np.ndarray, s: float) -> float:
    n = len(a)
    logits = [[s * _dot(a[i], b[j]) for j in range(n)] for i in range(n)]
    return (_ce_rows(logits, _eye(n)) + _ce_rows(_transpose(logits), _eye(n))) / 2


def test_clip_loss_matches_hand_computation(ab):
    a, b = ab
    out = ClipLoss()(_t(a), _t(b), SCALE)
    assert set(out) == {"loss", "a_to_b", "b_to_a"}
    assert out["loss"].item() == pytest.approx(_ref_clip(a, b, SCALE), rel=1e-10)
    # A constant logit bias cannot change a softmax loss.
    biased = ClipLoss()(_t(a), _t(b), SCALE, torch.tensor(-3.0))["loss"]
    assert biased.item() == pytest.approx(out["loss"].item())


def test_lightcrl_loss_matches_hand_computation(ab):
    a, b = ab
    n = len(a)
    sim = [[(_dot(a[i], a[j]) + _dot(b[i], b[j])) / 2 for j in range(n)] for i in range(n)]
    targets = []
    for i in range(n):
        z = sum(math.exp(SCALE * sim[i][k]) for k in range(n))
        targets.append([math.exp(SCALE * sim[i][j]) / z for j in range(n)])
    logits = [[SCALE * _dot(a[i], b[j]) for j in range(n)] for i in range(n)]
    # sim is symmetric, so the b->a targets (row-softmax of sim^T) are the same matrix.
    expected = (_ce_rows(logits, targets) + _ce_rows(_transpose(logits), targets)) / 2
    out = LightCRLLoss()(_t(a), _t(b), SCALE)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-10)
    entropy = -sum(t * math.log(t) for row in targets for t in row) / n
    assert out["target_entropy"].item() == pytest.approx(entropy, rel=1e-10)
    # The soft targets make it differ from plain CLIP here.
    assert abs(out["loss"].item() - _ref_clip(a, b, SCALE)) > 1e-3


def test_lightcrl_equals_clip_when_inmodal_similarities_are_identity():
    # Orthonormal rows in both modalities: a a^T = b b^T = I, so the targets are one-hot at a large scale,
    # while the cross-modal similarities a b^T are arbitrary.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a = np.eye(5)[:4]
    b = a @ q
    for scale in (50.0, 100.0):
        soft = LightCRLLoss()(_t(a), _t(b), scale)["loss"].item()
        hard = ClipLoss()(_t(a), _t(b), scale)["loss"].item()
        assert soft == pytest.approx(hard, rel=1e-9, abs=1e-12)


def test_lightcrl_frozen_targets_come_from_the_frozen_features_and_resist_collapse(ab):
    a, b = ab
    n = len(a)
    rng = np.random.default_rng(3)
    fa, fb = rng.normal(size=(n, 7)), rng.normal(size=(n, 5))
    na = fa / np.linalg.norm(fa, axis=1, keepdims=True)
    nb = fb / np.linalg.norm(fb, axis=1, keepdims=True)
    sim = (na @ na.T + nb @ nb.T) / 2
    targets = np.exp(SCALE * sim) / np.exp(SCALE * sim).sum(1, keepdims=True)
    logits = SCALE * np.asarray(a) @ np.asarray(b).T
    lsm_rows = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    lsm_cols = logits.T - np.log(np.exp(logits.T).sum(1, keepdims=True))
    expected = (-(targets * lsm_rows).sum(1).mean() - (targets * lsm_cols).sum(1).mean()) / 2
    loss = LightCRLLoss(targets="frozen")
    out = loss(_t(a), _t(b), SCALE, frozen=(_t(fa), _t(fb)))
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)  # frozen features are read as float32
    # Collapse (every embedding the same) is the floor of the paper's version (targets follow the
    # embeddings and become uniform, entropy log n), but not of the frozen-target version.
    same = _t(np.tile(np.asarray(a)[:1], (n, 1)))
    paper = LightCRLLoss()(same, same, SCALE)
    assert paper["target_entropy"].item() == pytest.approx(math.log(n))
    assert paper["loss"].item() == pytest.approx(math.log(n))
    # Cross-entropy's floor is the targets' entropy: the paper's version sits on it when collapsed,
    # the frozen-target version stays well above it.
    assert paper["loss"].item() - paper["target_entropy"].item() == pytest.approx(0.0, abs=1e-9)
    collapsed = loss(same, same, SCALE, frozen=(_t(fa), _t(fb)))
    assert collapsed["loss"].item() == pytest.approx(math.log(n))
    assert collapsed["loss"].item() - collapsed["target_entropy"].item() > 0.1
    with pytest.raises(ValueError, match="frozen"):
        loss(_t(a), _t(b), SCALE)
    with pytest.raises(ValueError, match="targets"):
        LightCRLLoss(targets="own")
    combined = build_loss({"lightcrl": {"weight": 1.0, "targets": "frozen"}})
    assert combined.wants_frozen() and not build_loss({"lightcrl": 1.0}).wants_frozen()
    assert combined(_t(a), _t(b), SCALE, frozen=(_t(fa), _t(fb)))["loss"].item() == pytest.approx(expected)


def test_lightcrl_target_gradient_choice(ab):
    a, b = ab
    grads = {}
    for detach in (True, False):
        x, y = _t(a).requires_grad_(), _t(b).requires_grad_()
        LightCRLLoss(detach_targets=detach)(x, y, SCALE)["loss"].backward()
        grads[detach] = x.grad.clone()
    # Detached targets: the gradient is that of a cross-entropy against constant targets.
    x = _t(a).requires_grad_()
    with torch.no_grad():
        t = torch.softmax(SCALE * (_t(a) @ _t(a).T + _t(b) @ _t(b).T) / 2, dim=-1)
    logits = SCALE * x @ _t(b).T
    ((F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t)) / 2).backward()
    assert torch.allclose(grads[True], x.grad)
    assert not torch.allclose(grads[True], grads[False])


def test_cyclip_loss_matches_hand_computation(ab):
    a, b = ab
    n = len(a)
    inmodal = sum((_dot(a[i], a[j]) - _dot(b[i], b[j])) ** 2 for i in range(n) for j in range(n)) / n
    cross = sum((_dot(a[i], b[j]) - _dot(a[j], b[i])) ** 2 for i in range(n) for j in range(n)) / n
    out = CyClipLoss()(_t(a), _t(b), SCALE)
    assert out["clip"].item() == pytest.approx(_ref_clip(a, b, SCALE), rel=1e-10)
    assert out["inmodal_cyclic"].item() == pytest.approx(inmodal, rel=1e-10)
    assert out["crossmodal_cyclic"].item() == pytest.approx(cross, rel=1e-10)
    expected = _ref_clip(a, b, SCALE) + 0.25 * inmodal + 0.25 * cross
    assert out["loss"].item() == pytest.approx(expected, rel=1e-10)
    out = CyClipLoss(lambda_inmodal=1.0, lambda_crossmodal=0.0)(_t(a), _t(b), SCALE)
    assert out["loss"].item() == pytest.approx(_ref_clip(a, b, SCALE) + inmodal, rel=1e-10)


def test_siglip_loss_matches_hand_computation(ab):
    a, b = ab
    n, bias = len(a), -1.5
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total -= math.log(1.0 / (1.0 + math.exp(-z * (SCALE * _dot(a[i], b[j]) + bias))))
    out = SigLipLoss()(_t(a), _t(b), SCALE, torch.tensor(bias, dtype=torch.float64))
    assert out["loss"].item() == pytest.approx(total / n, rel=1e-10)
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(_t(a), _t(b), SCALE)


def test_convirt_loss_matches_hand_computation(ab):
    a, b = ab
    a_raw = a * np.array([[2.0], [0.5], [3.0]])  # cosine similarity: the scale of the inputs must not matter
    n, tau, lam = len(a), 0.1, 0.75
    sims = [[_cos(a_raw[i], b[j]) / tau for j in range(n)] for i in range(n)]
    v2u = _ce_rows(sims, _eye(n))
    u2v = _ce_rows(_transpose(sims), _eye(n))
    out = ConVIRTLoss()(_t(a_raw), _t(b))
    assert out["a_to_b"].item() == pytest.approx(v2u, rel=1e-10)
    assert out["b_to_a"].item() == pytest.approx(u2v, rel=1e-10)
    assert out["loss"].item() == pytest.approx(lam * v2u + (1 - lam) * u2v, rel=1e-10)
    # temperature=None falls back to the model's logit scale.
    assert ConVIRTLoss(temperature=None)(_t(a), _t(b), 10.0)["loss"].item() == pytest.approx(
        0.75 * v2u + 0.25 * u2v, rel=1e-10
    )


def test_simcse_losses_match_hand_computation(ab):
    a, b = ab
    rng = np.random.default_rng(2)
    neg = _unit_rows(rng) * 4.0
    n, tau = len(a), 0.05
    sims = [[_cos(a[i], b[j]) / tau for j in range(n)] for i in range(n)]
    assert SimCSELoss()(_t(a), _t(b))["loss"].item() == pytest.approx(_ce_rows(sims, _eye(n)), rel=1e-10)
    cands = list(b) + list(neg)
    sims = [[_cos(a[i], c) / tau for c in cands] for i in range(n)]
    onehot = [[1.0 if j == i else 0.0 for j in range(2 * n)] for i in range(n)]
    out = SupSimCSELoss()(_t(a), _t(b), _t(neg))
    assert out["loss"].item() == pytest.approx(_ce_rows(sims, onehot), rel=1e-10)
    assert SimCSELoss(temperature=0.1)(_t(a), _t(b))["loss"].item() != pytest.approx(
        SimCSELoss()(_t(a), _t(b))["loss"].item()
    )


def test_build_loss_combines_weighted_prefixed_terms(ab):
    a, b = ab
    rng = np.random.default_rng(3)
    v1, v2 = _t(_unit_rows(rng)), _t(_unit_rows(rng))
    combo = build_loss({"lightcrl": 1.0, "simcse": {"weight": 0.5, "temperature": 0.05}, "cyclip": 2})
    assert isinstance(combo, CombinedLoss)
    assert combo.required_inputs() == {"pair", "text_views"}
    out = combo(_t(a), _t(b), SCALE, text_views=(v1, v2))
    light = LightCRLLoss()(_t(a), _t(b), SCALE)["loss"]
    simcse = SimCSELoss()(v1, v2)["loss"]
    cyclip = CyClipLoss()(_t(a), _t(b), SCALE)
    assert out["lightcrl/loss"].item() == pytest.approx(light.item())
    assert out["simcse/loss"].item() == pytest.approx(simcse.item())
    assert out["cyclip/inmodal_cyclic"].item() == pytest.approx(cyclip["inmodal_cyclic"].item())
    assert out["loss"].item() == pytest.approx(light.item() + 0.5 * simcse.item() + 2 * cyclip["loss"].item())
    # Tagged keys let one loss appear twice with different options.
    two = build_loss({"simcse@a": 1.0, "simcse@b": {"temperature": 0.1}})
    out = two(text_views=(v1, v2))
    assert {"simcse@a/loss", "simcse@b/loss", "loss"} <= set(out)


def test_build_loss_errors(ab):
    a, b = ab
    with pytest.raises(ValueError, match="unknown loss 'clp'"):
        build_loss({"clp": 1.0})
    with pytest.raises(ValueError, match="temprature"):
        build_loss({"simcse": {"temprature": 0.1}})
    with pytest.raises(ValueError, match="weight"):
        build_loss({"clip": "one"})
    with pytest.raises(ValueError, match="empty"):
        build_loss({})
    with pytest.raises(ValueError, match="'simcse' needs text_views"):
        build_loss({"clip": 1.0, "simcse": 1.0})(_t(a), _t(b), SCALE)
    with pytest.raises(ValueError, match="'simcse_sup' needs nli"):
        build_loss({"simcse_sup": 1.0})(_t(a), _t(b), SCALE)
    with pytest.raises(ValueError, match="'clip' needs paired embeddings"):
        build_loss({"clip": 1.0})(text_views=(_t(a), _t(b)))
    with pytest.raises(ValueError, match="'clip' needs logit_scale"):
        build_loss({"clip": 1.0})(_t(a), _t(b))
    with pytest.raises(ValueError, match="'siglip' needs logit_bias"):
        build_loss({"siglip": 1.0})(_t(a), _t(b), SCALE)
    build_loss({"convirt": 1.0})(_t(a), _t(b))  # fixed temperature: no logit_scale needed
    assert {"clip", "lightcrl", "cyclip", "siglip", "convirt", "simcse", "simcse_sup"} <= set(LOSSES)


def test_gather_is_a_no_op_without_process_group(ab, monkeypatch):
    a, b = ab
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.init_distributed(backend="gloo") == (0, 1, 0, torch.device("cpu"))
    assert not distributed.is_distributed()
    assert distributed.world_size() == 1 and distributed.rank() == 0
    x = _t(a)
    assert distributed.all_gather_with_grad(x) is x
    assert ClipLoss(gather=True)(x, _t(b), SCALE)["loss"].item() == pytest.approx(_ref_clip(a, b, SCALE))


# ---------------------------------------------------------------- two gloo ranks

_SPEC = {"clip": 1.0, "lightcrl": 0.5, "cyclip": 1.0, "siglip": 1.0, "convirt": 0.3, "simcse": 0.2}
_DIMS = {"image": 12, "text": 10}
_CFG = {"width": 16, "heads": 2, "ffn_dim": 32, "dropout": 0.0, "logit_bias": -2.0, "init_logit_scale": 1.0}
_GLOBAL_BATCH = 8


def _global_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    out = {}
    for m, d in _DIMS.items():
        tokens = torch.randn(_GLOBAL_BATCH, 5, d, generator=g)
        mask = torch.rand(_GLOBAL_BATCH, 5, generator=g) > 0.3
        mask[:, 0] = True
        out[m] = (tokens, mask)
    return out


def _loss_and_grads(model, loss_fn, data) -> tuple[float, dict[str, torch.Tensor]]:
    out = model(data)
    views = (out["text"], out["image"])  # any two views exercise the text_views path
    terms = loss_fn(out["image"], out["text"], out["logit_scale"], out["logit_bias"], text_views=views)
    terms["loss"].backward()
    return terms["loss"].item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _dist_worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    r, w, local, device = distributed.init_distributed(backend="gloo")
    try:
        assert (r, w, local, device.type) == (rank, world, rank, "cpu")
        assert distributed.is_distributed() and distributed.world_size() == world
        torch.manual_seed(0)
        model = create_model(_CFG, _DIMS)
        shard = slice(rank * _GLOBAL_BATCH // world, (rank + 1) * _GLOBAL_BATCH // world)
        local_data = {m: (t[shard], k[shard]) for m, (t, k) in _global_data().items()}
        loss, grads = _loss_and_grads(model, build_loss(_SPEC), local_data)
        # Average parameter gradients over ranks, as DDP does (constructing DDP itself costs ~2 s here).
        for g in grads.values():
            torch.distributed.all_reduce(g)
            g /= world
        torch.save({"loss": loss, "grads": grads}, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        distributed.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_gathered_loss_and_grads_match_single_process(tmp_path):
    world = 2
    ctx = torch.multiprocessing.spawn(
        _dist_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=False
    )
    deadline = time.monotonic() + 60  # a mismatched collective would otherwise hang for gloo's 30 min
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed workers did not finish within 60 s")
    torch.manual_seed(0)
    model = create_model(_CFG, _DIMS)
    ref_loss, ref_grads = _loss_and_grads(model, build_loss(_SPEC), _global_data())
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["loss"] == pytest.approx(ref_loss, rel=1e-5)
        for name, g in ref_grads.items():
            assert torch.allclose(got["grads"][name], g, rtol=1e-4, atol=1e-6), name
