"""STRUCTURE with unpaired items: they join their modality's walk only, and only training data is accepted."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_methods import _ref_structure
from test_train import toy_config

from lightcrl.errors import LightCRLError
from lightcrl.losses import StructureLoss, build_loss


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def test_unpaired_items_join_their_sides_walk_only():
    rng = np.random.default_rng(0)
    fa, fb, a, b = (rng.normal(size=s) for s in ((4, 6), (4, 3), (4, 5), (4, 5)))
    fu, zu = rng.normal(size=(3, 3)), rng.normal(size=(3, 5))  # three unpaired texts (side b)
    src = [{"spec": "sick-nli:/x/SICK_train.txt", "modality": "text", "per_batch": 3}]
    loss = StructureLoss(gather=False, tau=0.5, levels=2, unpaired=src)
    zu_t = _t(zu).requires_grad_(True)
    out = loss(_t(a), _t(b), frozen=(_t(fa), _t(fb)), unpaired=(None, (_t(fu), zu_t)))
    # side a: the batch alone; side b: the batch and the unpaired items as one neighbourhood
    assert float(out["js_a"]) == pytest.approx(_ref_structure(fa, a, 0.5, 2), rel=1e-5)
    ref_b = _ref_structure(np.vstack([fb, fu]), np.vstack([b, zu]), 0.5, 2)
    assert float(out["js_b"]) == pytest.approx(ref_b, rel=1e-5)
    assert abs(ref_b - _ref_structure(fb, b, 0.5, 2)) > 1e-3  # they do change the term
    out["loss"].backward()
    assert zu_t.grad is not None and zu_t.grad.abs().sum() > 0  # the unpaired items are trained through it
    # through the combined loss: the trainer is told to prepare them; no contrastive term sees them
    spec = {"clip": 1.0, "structure": {"tau": 0.5, "levels": 2, "unpaired": src}}
    combined = build_loss(spec, gather=False)
    assert combined.required_inputs() == {"pair", "frozen", "unpaired"}
    an, bn = (torch.nn.functional.normalize(_t(x), dim=-1) for x in (a, b))
    terms = combined(an, bn, 2.0, frozen=(_t(fa), _t(fb)), unpaired=(None, (_t(fu), _t(zu))))
    clip_only = build_loss({"clip": 1.0}, gather=False)(an, bn, 2.0)["clip/loss"]
    assert float(terms["clip/loss"]) == pytest.approx(float(clip_only))
    with pytest.raises(ValueError, match="unpaired"):
        combined(an, bn, 2.0, frozen=(_t(fa), _t(fb)))


@pytest.mark.parametrize("entry, match", [
    ({"spec": "stsb:/d/STSBenchmark", "split": "test", "modality": "text"}, "not a training split"),
    ({"spec": "flickr8k:/d/flickr8k", "split": "dev", "modality": "image"}, "not a training split"),
    ({"spec": "sick-nli:/d/SICK_trial.txt", "modality": "text"}, "evaluation split"),
    ({"spec": "sick-nli:/d/SICK_train.txt", "modality": "text", "per_batch": 1}, "per_batch"),
])
def test_unpaired_sources_from_evaluation_data_are_refused(entry, match):
    with pytest.raises(ValueError, match=match):
        build_loss({"clip": 1.0, "structure": {"unpaired": [entry]}}, gather=False)


def test_trainer_draws_unpaired_items_from_training_data_only(tmp_path, pairs_csv):
    from conftest import make_pairs_csv

    from lightcrl.app.config import validate_config
    from lightcrl.app.train import Trainer

    sick = tmp_path / "SICK_train.txt"
    sick.write_text("pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n" + "".join(
        f"{i}\ta {c} thing number {i}\tsomething {c}\t4.0\tENTAILMENT\n"
        f"{i}b\ta {c} thing number {i}\tnothing {c} at all\t1.0\tCONTRADICTION\n"
        for i, c in enumerate(["red", "green", "blue", "black", "white", "yellow"] * 3)))
    cfg = toy_config(pairs_csv, **{"optim.epochs": 1})
    cfg["data"]["sources"][0].update(val_split=None, holdout=0.25)
    unpaired = [{"spec": pairs_csv, "split": "all", "modality": "image", "per_batch": 6},
                {"spec": f"sick-nli:{sick}", "modality": "text", "per_batch": 5}]
    cfg["loss"] = {"clip": 1.0, "structure": {"tau": 0.1, "levels": 2, "unpaired": unpaired}}
    trainer = Trainer(validate_config(cfg), tmp_path / "run")
    held_out = set(np.unique(trainer.val_sets[0].media_index).tolist())
    drawn = trainer.unpaired.rows[0]  # the training images only: the held-out ones stay unseen
    assert len(drawn) == 30 and not held_out & set(drawn.tolist())
    step = trainer.unpaired.inputs(3)
    assert [(m, t.shape[0]) for m, t, _ in step] == [("image", 6), ("text", 5)]
    assert all(torch.equal(x, y) for (_, x, _), (_, y, _) in zip(step, trainer.unpaired.inputs(3)))
    trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(math.isfinite(r.get("train/structure/loss", math.nan)) for r in rows)
    # another dataset's "all" split is not something this run trains on: refused
    other = make_pairs_csv(tmp_path / "other", n=8)
    cfg["loss"]["structure"]["unpaired"] = [{"spec": other, "split": "all", "modality": "image"}]
    with pytest.raises(LightCRLError, match="not a training split"):
        Trainer(validate_config(cfg), tmp_path / "run3")
