"""The run directory (file names, kinds, load_pipeline) and the task table."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_train import toy_config

import lightcrl
from lightcrl.app.config import validate_config
from lightcrl.app.evaluate import TASKS, EvalRequest, EvalTarget, run_eval
from lightcrl.app.tasks import metric_direction
from lightcrl.app.train import train
from lightcrl.errors import LightCRLError
from lightcrl.rundir import KINDS, RunDir, load_pipeline


def test_not_a_run_and_a_missing_folder_are_clear_errors(tmp_path):
    with pytest.raises(LightCRLError, match="not found"):
        RunDir(tmp_path / "nope").info()
    with pytest.raises(LightCRLError, match="not a lightcrl run"):
        lightcrl.load(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"kind": "mystery"}))
    with pytest.raises(LightCRLError, match="unknown run kind 'mystery'"):
        load_pipeline(tmp_path)


def test_metrics_rows_survive_a_torn_line(tmp_path):
    run = RunDir(tmp_path)
    run.append_metrics({"step": 1, "a": 1.0})
    run.append_metrics({"step": 2, "a": 2.0})
    with open(run.metrics, "a") as f:
        f.write('{"step": 3, "a"')  # killed mid-write
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
    run.truncate_metrics(1)
    assert [r["step"] for r in run.read_metrics()] == [1]


def test_raw_runs_have_no_pipeline_and_untrained_applies_only_to_trained_runs(tmp_path):
    RunDir(tmp_path).write_info({"kind": "raw", "encoders": {"image": "toy-image", "text": "toy-text"}})
    assert load_pipeline(tmp_path) is None
    target = EvalTarget.from_run_dir(tmp_path)
    assert target.kind == "raw" and target.run_kind == "raw" and target.encoders["text"] == "toy-text"
    with pytest.raises(LightCRLError, match="untrained"):
        load_pipeline(tmp_path, untrained=True)
    with pytest.raises(LightCRLError, match="no shared space"):
        lightcrl.load(tmp_path)


def test_every_kind_of_run_loads_through_one_dispatch(tmp_path, pairs_csv):
    """A trained run, an ASIF run and a raw run: load_pipeline picks by model.json's kind, and the task
    table says which tasks apply (finetune: trained models only)."""
    from lightcrl.baselines.asif import build_pipeline, save_run

    trained = tmp_path / "trained"
    train(validate_config(toy_config(pairs_csv, **{"optim.epochs": 1})), trained)
    assert RunDir(trained).kind() == "lightcrl"
    asif = tmp_path / "asif"
    save_run(build_pipeline({"data": pairs_csv, "split": "all", "media_encoder": "toy-image",
                             "text_encoder": "toy-text", "k": 8, "p": 4.0}), asif)
    assert RunDir(asif).kind() == "asif"
    texts = ["a red square", "a blue circle"]
    for run in (trained, asif):
        emb = lightcrl.load(run).encode_text(texts, progress=False)
        assert emb.shape[0] == 2 and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    target = EvalTarget.from_run_dir(asif)
    assert target.identity["kind"] == "asif" and target.identity["trainable_params"] == 0
    with pytest.raises(LightCRLError, match="finetune does not apply to a asif run"):
        run_eval(target, EvalRequest("finetune", pairs_csv, "all", output=tmp_path / "ft.json"))
    r = run_eval(target, EvalRequest("retrieval", pairs_csv, "all", output=tmp_path / "r.json"))
    assert r["metrics"][TASKS["retrieval"].headline] > 0


def test_task_table_is_consistent():
    assert set(TASKS) == {"zeroshot", "retrieval", "linear_probe", "finetune", "geometry", "sts"}
    for task in TASKS.values():
        assert task.headline in task.printed, task.name
        assert task.run_kinds <= set(KINDS), task.name
        assert callable(task.run) and task.description
        # the declared direction agrees with the name-based rule wherever that rule knows the metric
        d = metric_direction(task.headline)
        assert d == 0 or (d > 0) == task.higher_is_better, task.name


def test_metric_direction_drives_early_stopping():
    from lightcrl.app.config import EarlyStopConfig

    assert EarlyStopConfig(metric="val/loss").direction == "min"
    assert EarlyStopConfig(metric="val/mean_recall@1").direction == "max"
    assert EarlyStopConfig(metric="val/loss", mode="max").direction == "max"


def test_unknown_task_in_an_experiment_is_refused_when_loading():
    from lightcrl.app.experiment import EvalSpec

    with pytest.raises(ValueError, match="unknown task 'zero_shot'"):
        EvalSpec(name="x", task="zero_shot", data="csv:x")
