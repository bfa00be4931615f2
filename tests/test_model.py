"""LightCRLModel: config validation, masking, every fusion/pool, gradients, parameter counts, overfitting."""

from __future__ import annotations

import itertools
import math

import pydantic
import pytest
import torch
import torch.nn.functional as F

from lightcrl.losses import ClipLoss, SigLipLoss
from lightcrl.model import LightCRLModel, ModelConfig, create_model

DIMS = {"image": 24, "text": 16}
SMALL = {"width": 32, "heads": 4, "ffn_dim": 64, "dropout": 0.0}
FUSIONS = ["add", "mul", "concat", "attention", "none"]
VARIANTS = [{"fusion": f, "pool": p} for f, p in itertools.product(FUSIONS, ["mean", "cls"])] + [
    {"arch": "two_tower"}
]
VARIANT_IDS = [f"{v.get('fusion', '')}-{v.get('pool', 'two_tower')}".strip("-") for v in VARIANTS]


def _batch(b: int = 4, t: int = 6, seed: int = 0, dims: dict[str, int] = DIMS):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, d in dims.items():
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        lengths[0] = t  # one full row, others padded
        mask = torch.arange(t)[None, :] < lengths[:, None]
        out[m] = (torch.randn(b, t, d, generator=g), mask)
    return out


def _model(**overrides) -> LightCRLModel:
    torch.manual_seed(0)
    return create_model({**SMALL, **overrides}, DIMS)


def test_config_defaults_and_validation():
    cfg = ModelConfig()
    assert (cfg.arch, cfg.width, cfg.depth, cfg.heads, cfg.ffn_dim) == ("dfe", 256, 1, 4, 1024)
    assert (cfg.fusion, cfg.pool, cfg.proj_layers, cfg.proj_hidden) == ("add", "mean", 2, None)
    assert cfg.init_logit_scale == pytest.approx(math.log(1 / 0.07))
    assert cfg.max_logit_scale == pytest.approx(math.log(100))
    with pytest.raises(pydantic.ValidationError, match="widht"):
        ModelConfig(widht=128)
    with pytest.raises(pydantic.ValidationError, match="divisible by heads"):
        ModelConfig(width=30, heads=4)
    with pytest.raises(pydantic.ValidationError, match="fusion"):
        ModelConfig(fusion="sum")
    with pytest.raises(ValueError, match="input_dims"):
        create_model({}, {})
    with pytest.raises(ValueError, match="invalid modality name"):
        create_model({}, {"image.rgb": 8})


def test_default_parameter_count():
    model = create_model(ModelConfig(), {"image": 1280, "text": 384})
    counts = model.parameter_counts()
    assert counts == {
        "projection/image": 396_800,  # LN(1280) + 1280x256 + 256x256 + LN(256)
        "projection/text": 165_632,
        "context": 512,
        "g3": 65_792,
        "fusion": 0,
        "cls": 0,
        "dfe": 790_272,  # one pre-LN layer (attention + 256->1024->256 FFN) and the final LayerNorm
        "gate": 0,
        "logit_scale": 1,
        "logit_bias": 0,
        "anchors": 0,
        "csa": 0,
        "total_trainable": 1_419_009,
    }
    assert counts["total_trainable"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_parameter_parts_sum_to_total(variant):
    counts = _model(**variant, logit_bias=-10.0).parameter_counts()
    assert sum(v for k, v in counts.items() if k != "total_trainable") == counts["total_trainable"]


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_forward_backward_every_variant(variant):
    model = _model(**variant, dropout=0.1).train()
    out = model(_batch())
    assert set(out) == {"image", "text", "logit_scale"}
    for m in DIMS:
        assert out[m].shape == (4, 32)
        assert torch.allclose(out[m].norm(dim=-1), torch.ones(4), atol=1e-5)
    loss = ClipLoss()(out["image"], out["text"], out["logit_scale"])["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_padding_never_changes_the_embedding(variant):
    model = _model(**variant).eval()
    tokens, mask = _batch()["text"]
    with torch.no_grad():
        ref = model.encode("text", tokens, mask)
        # 1) other values at padded positions, including non-finite ones
        noisy = torch.where(mask[..., None], tokens, torch.randn_like(tokens) * 100)
        noisy[~mask] = noisy[~mask].index_fill(0, torch.tensor([0]), float("nan"))
        assert torch.allclose(model.encode("text", noisy, mask), ref, atol=1e-5)
        # 2) each row alone, truncated to its real tokens (no padding at all)
        for i in range(tokens.shape[0]):
            n = int(mask[i].sum())
            alone = model.encode("text", tokens[i : i + 1, :n], mask[i : i + 1, :n])
            assert torch.allclose(alone[0], ref[i], atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_fully_masked_rows_are_finite(variant):
    model = _model(**variant).train()
    tokens, mask = _batch()["image"]
    mask[1] = False
    emb = model.encode("image", tokens, mask)
    assert torch.isfinite(emb).all()
    emb.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_masked_mean_pooling_of_two_tower_is_the_mean_of_real_tokens():
    model = _model(arch="two_tower").eval()
    tokens, mask = _batch()["image"]
    with torch.no_grad():
        expected = torch.stack([tokens[i, mask[i]].mean(0) for i in range(len(tokens))])
        expected = F.normalize(model.projections["image"](expected), dim=-1)
        assert torch.allclose(model.encode("image", tokens, mask), expected, atol=1e-6)


def test_grads_reach_every_parameter_and_no_input():
    model = _model(logit_bias=-10.0, init_logit_scale=math.log(10)).train()
    batch = _batch()
    out = model(batch)
    assert set(out) == {"image", "text", "logit_scale", "logit_bias"}
    loss = ClipLoss()(out["image"], out["text"], out["logit_scale"])["loss"]
    loss = loss + SigLipLoss()(out["image"], out["text"], out["logit_scale"], out["logit_bias"])["loss"]
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    for tokens, _ in batch.values():
        assert not tokens.requires_grad and tokens.grad is None


def test_three_modalities_and_pooled_inputs():
    dims = {"image": 24, "text": 16, "audio": 12}
    torch.manual_seed(0)
    model = create_model(SMALL, dims)
    batch = _batch(dims=dims)
    out = model(batch)
    assert {m: out[m].shape for m in dims} == {m: (4, 32) for m in dims}
    assert set(model.contexts.keys()) == set(dims)
    assert model.parameter_counts()["context"] == 3 * 32
    # A pooled feature is a one-token sequence: [B, D] and [B, 1, D] give the same embedding.
    model.eval()
    pooled = torch.randn(4, 12)
    with torch.no_grad():
        as_sequence = model.encode("audio", pooled[:, None])
        assert torch.allclose(model.encode("audio", pooled), as_sequence, atol=1e-6)
    # Half-precision caches are accepted.
    tokens, mask = batch["audio"]
    with torch.no_grad():
        assert model.encode("audio", tokens.half(), mask).dtype == torch.float32


def test_input_errors():
    model = _model()
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        model.encode("audio", torch.randn(2, 3, 24))
    with pytest.raises(ValueError, match=r"text: expected tokens \[B, T, 16\]"):
        model.encode("text", torch.randn(2, 3, 24))
    with pytest.raises(ValueError, match="mask"):
        model.encode("text", torch.randn(2, 3, 16), torch.ones(2, 4, dtype=torch.bool))


def test_logit_scale_handling():
    model = _model()
    assert model.get_logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.get_logit_scale().item() == pytest.approx(100.0, rel=1e-5)  # clamped on use
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    frozen = _model(learn_logit_scale=False)
    assert frozen.parameter_counts()["logit_scale"] == 0
    assert not frozen.logit_scale.requires_grad


def test_projection_head_variants():
    one = _model(proj_layers=1, input_norm=False)
    assert one.parameter_counts()["projection/text"] == 16 * 32 + 32 + 2 * 32
    wide = _model(proj_hidden=64, proj_layers=3)
    assert wide.parameter_counts()["projection/text"] == 2 * 16 + (16 * 64 + 64) + (64 * 64 + 64) + (
        64 * 32 + 32
    ) + 2 * 32
    post_norm = _model(norm_first=False)
    assert post_norm.dfe.norm is None
    assert torch.isfinite(post_norm(_batch())["text"]).all()


@pytest.fixture
def one_thread():
    # A width-32 model gains nothing from intra-op threads; one thread keeps the timing stable on busy CPUs.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_overfits_random_pairs(one_thread):
    torch.manual_seed(0)
    n = 32
    g = torch.Generator().manual_seed(1)
    batch = {"image": (torch.randn(n, 8, 24, generator=g), torch.ones(n, 8, dtype=torch.bool)),
             "text": _batch(b=n, t=6, seed=2)["text"]}
    model = create_model({**SMALL, "dropout": 0.1}, DIMS)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    loss_fn = ClipLoss()
    for _ in range(60):  # R@1 reaches 1.0 after ~20 steps; 3x margin
        out = model(batch)
        loss = loss_fn(out["image"], out["text"], out["logit_scale"])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.clamp_logit_scale_()
    model.eval()
    with torch.no_grad():
        out = model(batch)
    recall_at_1 = (out["image"] @ out["text"].T).argmax(dim=1).eq(torch.arange(n)).float().mean().item()
    assert recall_at_1 == 1.0


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_unpadded_shortcut_is_bit_identical_in_training(variant, monkeypatch):
    """A batch without padding skips the masked_fill and the attention mask on the CPU: the embeddings,
    gradients and dropout draws must be exactly those of the masked path."""
    import lightcrl.model as model_mod

    tokens = torch.randn(4, 6, DIMS["image"], generator=torch.Generator().manual_seed(3))
    mask = torch.ones(4, 6, dtype=torch.bool)
    runs = []
    for force_mask in (False, True):
        if force_mask:
            monkeypatch.setattr(model_mod, "_may_pad", lambda m: True)
        model = _model(**variant, dropout=0.1).train()
        torch.manual_seed(1)
        emb = model.encode("image", tokens, mask)
        emb.pow(2).sum().backward()
        runs.append((emb.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
