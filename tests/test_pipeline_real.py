"""Integration on real data: train the smoke config, evaluate every task, build the report."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lightcrl.app.config import load_config
from lightcrl.app.evaluate import EvalRequest, EvalTarget, run_eval
from lightcrl.app.train import train

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(shared_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("smoke") / "run"
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        [f"data.sources.0.spec=flickr8k:{shared_data / 'flickr8k'}", "progress=false"],
    )
    train(cfg, run)
    return run


def _metric_rows(run: Path, key: str):
    return [
        json.loads(x)[key] for x in (run / "metrics.jsonl").read_text().splitlines() if key in json.loads(x)
    ]


def test_validation_retrieval_improves_over_untrained(run_dir):
    r1 = _metric_rows(run_dir, "val/mean_recall@1")
    assert len(r1) >= 2
    untrained, best = r1[0], max(r1[1:])
    assert best > untrained + 3, r1  # 100 val images: chance R@1 is 1%


def test_every_task_on_real_data(run_dir, shared_data):
    cifar = f"imagefolder:{shared_data / 'cifar10'}"
    flickr = f"flickr8k:{shared_data / 'flickr8k'}"
    trained = EvalTarget.resolve(str(run_dir))
    untrained = EvalTarget.resolve(str(run_dir), untrained=True)

    ret = run_eval(trained, EvalRequest("retrieval", flickr, "dev", limit=100))["metrics"]
    # same items and model as the trainer's best validation: the evaluator reproduces its numbers
    best = max(_metric_rows(run_dir, "val/mean_recall@1"))
    assert (ret["image_retrieval_recall@1"] + ret["text_retrieval_recall@1"]) / 2 == pytest.approx(
        best, abs=1e-6
    )
    for k in (1, 5, 10):
        assert 0 <= ret[f"image_retrieval_recall@{k}"] <= 100

    zs = run_eval(trained, EvalRequest("zeroshot", cifar, "test", limit=200))
    m = zs["metrics"]
    assert {"top1", "top2", "top3", "top4", "top5"} <= m.keys() and m["n_templates"] == 18
    assert m["top1"] <= m["top5"] and m["chance"] == 10.0
    assert (run_dir / zs["plots"][0]).exists()
    zs0 = run_eval(untrained, EvalRequest("zeroshot", cifar, "test", limit=200))
    assert zs0["model"]["kind"] == "untrained" and "untrained-" in Path(zs0["output"]).name

    probe = run_eval(
        trained, EvalRequest("linear_probe", cifar, "test", limit=200, options={"train_limit": 300})
    )["metrics"]
    assert probe["top1"] > 20 and probe["raw_encoder/top1"] > 20  # 10 classes: chance is 10
    ft = run_eval(
        trained, EvalRequest("finetune", cifar, "test", limit=200, options={"train_limit": 300, "epochs": 2})
    )["metrics"]
    assert {"acc@epoch2", "top1", "frozen_dfe_head_only/top1", "linear_probe/top1"} <= ft.keys()
    assert ft["trainable_params"] > ft["frozen_dfe_head_only/trainable_params"]

    geo = run_eval(trained, EvalRequest("geometry", flickr, "dev", limit=100))["metrics"]
    assert geo["matched_cosine_mean"] > geo["unmatched_cosine_mean"]

    sts = run_eval(
        trained, EvalRequest("sts", f"stsb:{shared_data / 'sts' / 'STSBenchmark'}", "dev", limit=100)
    )["metrics"]
    assert sts["raw_encoder/spearman"] > 50 and -100 <= sts["dfe/spearman"] <= 100

    raw = EvalTarget.resolve("raw")
    raw_probe = run_eval(
        raw,
        EvalRequest(
            "linear_probe",
            cifar,
            "test",
            limit=200,
            output=run_dir / "results" / "raw-probe.json",
            options={"train_limit": 300},
        ),
    )["metrics"]
    assert raw_probe["top1"] == pytest.approx(probe["raw_encoder/top1"])


def test_report_names_every_results_file(run_dir):
    from lightcrl.app.cli import main

    assert main(["report", str(run_dir)]) == 0
    html = (run_dir / "report.html").read_text()
    HTMLParser().feed(html)
    results = sorted((run_dir / "results").glob("*.json"))
    assert len(results) >= 7
    for f in results:
        assert f.name in html, f.name


def test_cli_eval_writes_results_json(run_dir, shared_data, tmp_path, capsys):
    from lightcrl.app.cli import main

    out = tmp_path / "r.json"
    code = main(
        [
            "eval",
            "--run",
            str(run_dir),
            "--task",
            "retrieval",
            "--data",
            f"flickr8k:{shared_data / 'flickr8k'}",
            "--split",
            "dev",
            "--limit",
            "100",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    res = json.loads(out.read_text())
    assert res["task"] == "retrieval" and res["split"] == "dev" and res["model"]["kind"] == "run"
    assert "image_retrieval_recall@1" in capsys.readouterr().out
    assert main(["eval", "--run", str(tmp_path / "nope"), "--task", "retrieval", "--data", "x:y"]) == 2


def test_anchor_model_on_real_data(shared_data, tmp_path):
    """Anchor coordinates on the smoke subset: the anchors are the training pairs, the anchor part of the
    embedding is the centred ASIF baseline's vector, and zero-shot works through the saved run."""
    import numpy as np

    import lightcrl
    from lightcrl.baselines.asif import build_pipeline
    from lightcrl.embed import EmbedOptions, cached_store

    flickr = f"flickr8k:{shared_data / 'flickr8k'}"
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        [f"data.sources.0.spec={flickr}", "progress=false", "tensorboard=false", "loss={clip: 1.0}",
         "optim.epochs=2", "model.anchors={k: 50, p: 4.0}"],
    )
    run = tmp_path / "run"
    train(cfg, run)
    pipe = lightcrl.load(run)
    anchors = pipe.model.anchors
    assert anchors.cfg.count == 300 and pipe.model.embed_dim == 256 + 300

    asif = build_pipeline({"data": flickr, "split": "train", "limit": 300, "seed": 0,
                           "media_encoder": "efficientnet-lite0", "text_encoder": "minilm-l6",
                           "pairs": "mean_caption", "k": 50, "p": 4.0, "center": True})
    dev = cached_store("efficientnet-lite0", flickr, "dev", EmbedOptions(limit=100))
    ours = pipe.encode_store(dev)[:, 256:] / np.sin(anchors.mix.item())
    ref = asif.encode_store(dev)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99, cos.min()  # same anchors, same centring (fp16 store rounding aside)

    cifar = f"imagefolder:{shared_data / 'cifar10'}"
    zs = run_eval(EvalTarget.resolve(str(run)), EvalRequest("zeroshot", cifar, "test", limit=200))["metrics"]
    assert zs["top1"] > 20, zs["top1"]  # 10 classes; 300 anchor pairs
