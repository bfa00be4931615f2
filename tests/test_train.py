"""Trainer on toy encoders and a tiny generated dataset: configs, resume, NaN, DDP equivalence."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightcrl.app.config import load_config, parse_overrides, validate_config
from lightcrl.app.train import Trainer, train
from lightcrl.app.train_data import epoch_schedule
from lightcrl.errors import LightCRLError


def toy_config(spec: str, **over) -> dict:
    cfg = {
        "name": "toy",
        "seed": 0,
        "progress": False,
        "tensorboard": False,
        "data": {
            "sources": [
                {
                    "spec": spec,
                    "split": "all",
                    "val_split": "all",
                    "media_encoder": "toy-image",
                    "text_encoder": "toy-text",
                }
            ],
            "num_workers": 0,
        },
        "model": {"width": 32, "depth": 1, "heads": 4, "ffn_dim": 64, "dropout": 0.0},
        "loss": {"lightcrl": 1.0},
        "optim": {"epochs": 3, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2},
    }
    for k, v in over.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg


def rows(run: Path, key: str) -> list[tuple[int, float]]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if key in r:
            out.append((r["step"], r[key]))
    return out


def test_invalid_config_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sources: [{spec: 'csv:x'}]\noptim:\n  lrr: 0.1\n")
    with pytest.raises(LightCRLError, match=r"optim\.lrr"):
        load_config(bad)
    with pytest.raises(LightCRLError, match=r"model"):
        validate_config({"data": {"sources": [{"spec": "csv:x"}]}, "model": {"fusion": "sum"}})
    with pytest.raises(LightCRLError, match=r"optim\.epochs"):
        load_config(None, ["optim.epochs=many"], base={"data": {"sources": [{"spec": "csv:x"}]}})


def test_overrides_nested_and_list_index():
    assert parse_overrides(["optim.lr=1e-3", "model.fusion=mul"]) == {
        "optim": {"lr": 1e-3},
        "model": {"fusion": "mul"},
    }
    cfg = load_config(None, ["data.sources.0.limit=10"], base={"data": {"sources": [{"spec": "csv:x"}]}})
    assert cfg.data.sources[0].limit == 10


def test_train_produces_a_loadable_run_that_learns(tmp_path, pairs_csv):
    run = tmp_path / "run"
    summary = train(validate_config(toy_config(pairs_csv, **{"optim.epochs": 6})), run)
    assert summary["epochs"] == 6
    for f in (
        "config.yaml",
        "model.safetensors",
        "model.json",
        "metrics.jsonl",
        "train_summary.json",
        "checkpoints/last.json",
        "checkpoints/best.json",
    ):
        assert (run / f).exists(), f
    val = rows(run, "val/mean_recall@1")
    assert val[0][0] == 0 and max(v for _, v in val[1:]) > val[0][1]  # better than untrained
    # the published model reproduces the trainer's validation embeddings
    import lightcrl
    from lightcrl.embed import EmbedOptions, cached_store

    model = lightcrl.load(run)
    store = cached_store("toy-image", pairs_csv, "all", EmbedOptions(num_workers=0))
    a = model.encode_store(store)
    with torch.no_grad():  # the same items straight through the model's forward, in one batch
        b = model.model.eval().encode("image", *store.batch(np.arange(len(store)))).numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert model.info["parameter_counts"]["total_trainable"] == sum(
        p.numel() for p in model.model.parameters() if p.requires_grad
    )


def test_resume_matches_uninterrupted_run(tmp_path, pairs_csv):
    cfg = validate_config(toy_config(pairs_csv, **{"model.dropout": 0.1}))
    full = tmp_path / "full"
    train(cfg, full)
    part = tmp_path / "part"
    train(cfg, part, stop_after_epoch=1)
    assert json.loads((part / "checkpoints" / "last.json").read_text())["step"] > 0
    train(cfg, part)  # a fresh process would do the same: everything comes from the checkpoint
    a, b = rows(full, "train/loss"), rows(part, "train/loss")
    assert [s for s, _ in a] == [s for s, _ in b]
    np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=0, atol=1e-6)
    va, vb = rows(full, "val/mean_recall@1"), rows(part, "val/mean_recall@1")
    assert va == vb


def test_changed_config_refuses_to_resume(tmp_path, pairs_csv):
    run = tmp_path / "run"
    train(validate_config(toy_config(pairs_csv, **{"optim.epochs": 1})), run)
    with pytest.raises(LightCRLError, match="another configuration"):
        train(validate_config(toy_config(pairs_csv, **{"model.width": 64, "optim.epochs": 2})), run)


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path, pairs_csv, monkeypatch):
    run = tmp_path / "run"
    cfg = validate_config(toy_config(pairs_csv, **{"optim.epochs": 3}))
    trainer = Trainer(cfg, run)
    real = trainer.loss_fn.forward
    steps_per_epoch = trainer.steps_per_epoch

    def poisoned(*a, **k):
        out = real(*a, **k)
        if trainer.state["step"] == steps_per_epoch + 1:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(trainer.loss_fn, "forward", poisoned)
    # poisoned: the 2nd step of epoch 2, i.e. the step metrics.jsonl would log as steps_per_epoch + 2
    with pytest.raises(LightCRLError, match=rf"epoch 2 step {steps_per_epoch + 2} "):
        trainer.fit()
    last = json.loads((run / "checkpoints" / "last.json").read_text())
    assert last["step"] == steps_per_epoch  # the good checkpoint from epoch 1 is kept
    assert (run / "model.safetensors").exists()


def test_only_trainable_parameters_get_gradients(tmp_path, pairs_csv):
    trainer = Trainer(validate_config(toy_config(pairs_csv)), tmp_path / "r")
    s = trainer.train_sets[0]
    batch = s.batch(np.arange(8), "cpu")
    for tokens, _ in batch.values():
        assert not tokens.requires_grad
    out = trainer.model(batch)
    trainer.loss_fn(out["image"], out["text"], out["logit_scale"])["loss"].backward()
    for name, p in trainer.model.named_parameters():
        assert p.grad is not None, name


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_with_global_batch(tmp_path, pairs_csv):
    cfg = toy_config(pairs_csv, **{"optim.epochs": 2})
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    script = Path(__file__).parent / "toy_train.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(cfg_path), str(tmp_path / "one")], check=True, env=env)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29533",
            str(script),
            str(cfg_path),
            str(tmp_path / "two"),
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    a, b = rows(tmp_path / "one", "train/loss"), rows(tmp_path / "two", "train/loss")
    assert len(a) == len(b) > 0
    np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=0, atol=1e-5)


def test_loss_zoo_with_simcse_views_and_nli_triplets(tmp_path, pairs_csv):
    nli = tmp_path / "nli.csv"
    nli.write_text(
        "sent0,sent1,hard_neg\n"
        + "".join(
            f"a {c} thing {i},the {c} object {i},no {c} at all {i}\n"
            for i in range(6)
            for c in ("red", "blue", "green")
        )
    )
    cfg = toy_config(pairs_csv, **{"optim.epochs": 1})
    cfg["data"]["nli"] = {"spec": f"simcse-csv:{nli}", "batch_size": 6}
    cfg["loss"] = {"clip": 1.0, "simcse": 0.5, "simcse_sup": 0.5, "cyclip": 0.1}
    cfg["model"]["dropout"] = 0.1
    train(validate_config(cfg), tmp_path / "run")
    last = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*last)
    for k in ("train/clip/loss", "train/simcse/loss", "train/simcse_sup/loss", "train/cyclip/loss"):
        assert k in keys, k


def test_lightcrl_frozen_targets_train(tmp_path, pairs_csv):
    cfg = toy_config(pairs_csv, **{"optim.epochs": 1})
    cfg["loss"] = {"lightcrl": {"weight": 1.0, "targets": "frozen"}}
    train(validate_config(cfg), tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    entropies = [r["train/lightcrl/target_entropy"] for r in rows if "train/lightcrl/target_entropy" in r]
    assert entropies and all(math.isfinite(e) for e in entropies)


def _nli_csv(tmp_path):
    nli = tmp_path / "nli.csv"
    nli.write_text("sent0,sent1,hard_neg\n" + "".join(
        f"a {c} thing {i},the {c} object {i},no {c} at all {i}\n" for i in range(6) for c in ("red", "blue")))
    return nli


@pytest.mark.parametrize("name", ["supsimcse", "simcse_sup@nli", "simcse@views"])
def test_the_trainer_asks_the_loss_what_it_needs(tmp_path, pairs_csv, name):
    """Registered aliases and tagged names get their data: the trainer never matches loss-name strings
    (``supsimcse`` used to get no NLI triplets and fail at the first step)."""
    cfg = toy_config(pairs_csv, **{"optim.epochs": 1})
    cfg["data"]["nli"] = {"spec": f"simcse-csv:{_nli_csv(tmp_path)}", "batch_size": 4}
    cfg["loss"] = {"clip": 1.0, name: 0.5}
    cfg["model"]["dropout"] = 0.1
    train(validate_config(cfg), tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    values = [r[f"train/{name}/loss"] for r in rows if f"train/{name}/loss" in r]
    assert values and all(math.isfinite(v) and v > 0 for v in values)


@pytest.mark.parametrize("name", ["simcse_sup", "supsimcse"])
def test_simcse_sup_without_nli_data_is_a_clear_error(tmp_path, pairs_csv, name):
    cfg = toy_config(pairs_csv)
    cfg["loss"] = {"clip": 1.0, name: 1.0}
    with pytest.raises(LightCRLError, match="data.nli"):
        Trainer(validate_config(cfg), tmp_path / "run")


def test_nli_triplets_from_official_files(shared_data):
    from lightcrl.data.nli import load_triplets

    snli = load_triplets(f"snli:{shared_data / 'nli' / 'snli_1.0'}", "dev")
    sick = load_triplets(f"sick-nli:{shared_data / 'nli' / 'sick2014' / 'SICK_train.txt'}")
    assert len(snli) > 400 and len(sick) > 100
    for a, p, n in snli[:50] + sick[:50]:
        assert a and p and n and p != n


def test_source_weight_scales_its_share_of_steps(tmp_path, pairs_csv):
    cfg = toy_config(pairs_csv)
    second = dict(cfg["data"]["sources"][0], weight=2.0)
    cfg["data"]["sources"].append(second)
    trainer = Trainer(validate_config(cfg), tmp_path / "r")
    sched = epoch_schedule(trainer.cfg, trainer.train_sets, epoch=0)
    counts = np.bincount([si for si, _ in sched], minlength=2)
    assert counts[1] == 2 * counts[0] and len(sched) == trainer.steps_per_epoch
    # evenly interleaved: the heavier source is not bunched at one end
    first_half = [si for si, _ in sched[: len(sched) // 2]]
    assert 0 in first_half and 1 in first_half


def test_resume_drops_a_torn_metrics_line(tmp_path, pairs_csv):
    cfg = validate_config(toy_config(pairs_csv, **{"optim.epochs": 2}))
    run = tmp_path / "run"
    train(cfg, run, stop_after_epoch=1)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "train/lo')  # killed mid-write
    train(cfg, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(x) for x in lines) and max(json.loads(x)["step"] for x in lines) < 99


def test_mid_epoch_checkpoint_resumes_bit_exact(tmp_path, pairs_csv, monkeypatch):
    """Killed after step 7 (5 steps an epoch, dropout on) with a checkpoint every 3 steps: the rerun goes on
    from step 6, in the middle of epoch 2, and ends bitwise where an uninterrupted run ends."""
    over = {"model.dropout": 0.1, "log_every": 1}
    full = tmp_path / "full"
    assert train(validate_config(toy_config(pairs_csv, **over)), full)["steps"] == 15
    cfg = validate_config(toy_config(pairs_csv, **over, **{"optim.checkpoint_every_steps": 3}))

    class Killed(Exception):
        pass

    real_step, steps_run, kill_after = Trainer.train_step, [], [7]

    def step(self, *a, **k):
        if self.state["step"] in kill_after:
            raise Killed
        steps_run.append(self.state["step"] + 1)
        return real_step(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_step", step)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(cfg, run)
    last = json.loads((run / "checkpoints" / "last.json").read_text())
    state = json.loads((run / "checkpoints" / last["folder"] / "state.json").read_text())
    assert (last["step"], state["epoch"], state["batch"]) == (6, 1, 1)  # step 1 of epoch 2 done
    # the interval is no part of the run's identity: the rerun may use another one
    steps_run.clear()
    kill_after.clear()
    train(validate_config(toy_config(pairs_csv, **over, **{"optim.checkpoint_every_steps": 4})), run)
    assert steps_run == list(range(7, 16))

    def log(r: Path) -> list[dict]:
        rows = [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]

    assert log(run) == log(full)
    for rel in (
        "model.safetensors",
        "checkpoints/last-00000015/model.safetensors",
        "checkpoints/last-00000015/trainer.safetensors",  # optimizer moments and the RNG state
    ):
        assert (run / rel).read_bytes() == (full / rel).read_bytes(), rel
    # epoch 2's timing row counts the steps before the kill too: all its 40 pairs, and the saved time
    rows_run = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epoch2 = next(r for r in rows_run if r["epoch"] == 2 and "time/epoch_s" in r)
    assert round(epoch2["time/pairs_per_s"] * epoch2["time/epoch_s"]) == 40
    assert epoch2["time/epoch_s"] >= state["epoch_time_s"] > 0


def test_early_stop_on_the_mean_of_several_metrics(tmp_path, pairs_csv):
    from lightcrl.app.config import EarlyStopConfig

    stop = EarlyStopConfig(metric=["val/image_retrieval_recall@1", "val/text_retrieval_recall@1"])
    assert stop.direction == "max" and stop.name.startswith("mean(")
    assert stop.value({"val/image_retrieval_recall@1": 10.0, "val/text_retrieval_recall@1": 20.0}) == 15.0
    assert stop.value({"val/image_retrieval_recall@1": 10.0}) is None
    with pytest.raises(ValueError, match="mixes lower-is-better and higher-is-better"):
        EarlyStopConfig(metric=["val/loss", "val/mean_recall@1"])
    with pytest.raises(ValueError, match="at least one metric"):
        EarlyStopConfig(metric=[])

    metrics = ["val/image_retrieval_recall@5", "val/text_retrieval_recall@1"]
    run = tmp_path / "run"
    cfg = toy_config(pairs_csv, **{"optim.epochs": 4, "early_stop": {"metric": metrics}})
    summary = train(validate_config(cfg), run)
    assert summary["metric"] == f"mean({', '.join(metrics)})"
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in logged if "val/selection" in r and r["epoch"] > 0]
    assert len(scored) == 4
    for r in scored:  # the logged selection value is the mean of its parts ...
        assert r["val/selection"] == pytest.approx(sum(r[m] for m in metrics) / 2)
    # ... and the published epoch is its first maximum, whatever each part alone would pick
    assert summary["best_epoch"] == max(scored, key=lambda r: (r["val/selection"], -r["epoch"]))["epoch"]
    assert summary["best"] == pytest.approx(max(r["val/selection"] for r in scored))

    with pytest.raises(LightCRLError, match="'val/zeroshot_top1' is not computed"):
        train(validate_config(toy_config(pairs_csv, **{
            "optim.epochs": 1, "early_stop": {"metric": ["val/mean_recall@1", "val/zeroshot_top1"]}})),
            tmp_path / "bad")


def test_each_epoch_logs_a_line_without_progress_bars(tmp_path, pairs_csv, caplog):
    """progress: false (the shipped configs) still tells the user how training goes, one line an epoch."""
    with caplog.at_level(logging.INFO, logger="lightcrl.app.train"):
        train(validate_config(toy_config(pairs_csv, **{"optim.epochs": 2})), tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1/2", "epoch 2/2"]
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epoch_rows = [r for r in logged if "time/epoch_s" in r]
    for line, r in zip(lines, epoch_rows):
        assert f"{r['time/epoch_s']:.1f} s" in line and "pairs/s" in line and "loss " in line
        assert f"val/mean_recall@1 {r['val/mean_recall@1']:.2f}" in line  # the selection metric
