"""The experiment grid on toy encoders and generated data: table, skip on rerun, --only, shipped configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import COLORS, REPO, make_pairs_csv
from PIL import Image

from lightcrl.app.cli import main
from lightcrl.app.config import validate_config
from lightcrl.app.experiment import ExperimentResult, load_experiment, run_experiment, set_path
from lightcrl.errors import LightCRLError


def _classes(root: Path, per_class: int = 4) -> str:
    """An imagefolder of solid-colour squares, train/ and test/ splits, one class per colour."""
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c, rgb in COLORS.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                px = np.clip(np.array(rgb) + rng.integers(-20, 20, 3), 0, 255).astype(np.uint8)
                Image.fromarray(np.tile(px, (8, 8, 1))).save(root / split / c / f"{i}.png")
    return f"imagefolder:{root}"


def _sts(root: Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    pairs = [
        ("a red square", "a red box", 4.5),
        ("a blue square", "green grass", 0.5),
        ("a yellow thing", "something yellow", 4.0),
        ("red", "blue", 1.0),
        ("a green square", "green", 3.5),
    ]
    lines = [f"g\tf\t2020\t{i}\t{s}\t{a}\t{b}" for i, (a, b, s) in enumerate(pairs)]
    (root / "sts-test.csv").write_text("\n".join(lines) + "\n")
    return f"stsb:{root}"


def _write_toy_experiment(tmp_path: Path) -> Path:
    pairs = make_pairs_csv(tmp_path / "pairs", n=24)
    classes = _classes(tmp_path / "classes")
    exp = {
        "name": "toy",
        "base": {
            "name": "toy", "seed": 0, "progress": False, "tensorboard": False,
            "data": {"sources": [{"spec": pairs, "split": "all", "media_encoder": "toy-image",
                                  "text_encoder": "toy-text"}], "num_workers": 0},
            "model": {"width": 16, "depth": 1, "heads": 2, "ffn_dim": 32, "dropout": 0.0},
            "loss": {"lightcrl": 1.0},
            "optim": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "warmup_steps": 1},
        },
        "axes": {"fusion": {"key": "model.fusion", "values": ["add"]},
                 "loss": {"values": {"lightcrl": None, "clip": {"loss": {"clip": 1.0}}}}},
        "baselines": [{"kind": "asif", "k": 10, "p": 4},
                      {"kind": "raw", "image_encoder": "toy-image", "text_encoder": "toy-text"}],
        "evals": [
            {"name": "zs", "task": "zeroshot", "data": classes, "split": "test",
             "options": {"templates": ["a {c} square"]}},
            {"name": "ret", "task": "retrieval", "data": pairs, "split": "all", "limit": 16},
            {"name": "probe", "task": "linear_probe", "data": classes, "split": "test",
             "options": {"probe_mode": "sgd", "epochs": 3}},
            {"name": "ft", "task": "finetune", "data": classes, "split": "test", "options": {"epochs": 1},
             "cells": ["*-clip"]},
            {"name": "sts", "task": "sts", "data": _sts(tmp_path / "sts"), "split": "test"},
            {"name": "geo", "task": "geometry", "data": pairs, "split": "all", "metrics": ["alignment"]},
        ],
    }
    exp["notes"] = "toy_notes.md"
    (tmp_path / "toy_notes.md").write_text("## Reading\n\nThe toy grid's reading.\n")
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> tuple[Path, Path, ExperimentResult]:
    """One full run of the toy grid, shared by the tests of this module (training is the slow part)."""
    tmp_path = tmp_path_factory.mktemp("experiment")
    path = _write_toy_experiment(tmp_path)
    res = run_experiment(
        path,
        out=tmp_path / "out",
        results_md=tmp_path / "docs" / "results.md",
        command="lightcrl experiment toy.yaml",
    )
    return tmp_path, path, res


def test_grid_runs_writes_table_and_skips_finished_cells(toy_run):
    tmp_path, toy_experiment, res = toy_run
    out = tmp_path / "out"
    assert res.failed == {}
    assert res.ran == ["dfe-add-lightcrl", "dfe-add-clip", "asif", "raw"]
    rows = {r["cell"]: r for r in res.rows}
    assert set(rows) == set(res.ran) and all(r["status"] == "done" for r in rows.values())
    grid = rows["dfe-add-clip"]
    assert grid["fusion"] == "add" and grid["loss"] == "clip" and grid["kind"] == "train"
    assert grid["trainable_params"] > 0 and grid["train_time_s"] > 0
    for col in (
        "zs/top1",
        "zs/top4",
        "ret/t2i_R@1",
        "ret/i2t_R@10",
        "probe/top1",
        "ft/top1",
        "sts/spearman",
        "geo/alignment",
    ):
        assert isinstance(grid[col], float), col
    assert "zs/top5" in grid and grid["zs/top5"] is None  # 4 classes: no top-5
    assert rows["asif"]["ft/top1"] == "n/a" and rows["asif"]["trainable_params"] == 0
    assert rows["dfe-add-lightcrl"]["ft/top1"] == "n/a"  # not among the eval's cells
    assert isinstance(rows["asif"]["ret/t2i_R@1"], float)
    # the raw encoders: probe and STS only (no shared space), no trainable parameters
    raw = rows["raw"]
    assert isinstance(raw["probe/top1"], float) and isinstance(raw["sts/spearman"], float)
    assert raw["zs/top1"] == "n/a" and raw["ret/t2i_R@1"] == "n/a" and raw["trainable_params"] == 0

    md = (tmp_path / "docs" / "results.md").read_text()
    assert md.splitlines()[0] == "# Results: toy" and "lightcrl experiment toy.yaml" in md.split("|")[0]
    assert "| dfe-add-lightcrl |" in md and "n/a" in md
    assert md.index("The toy grid's reading.") < md.index("## Evaluations")  # the notes follow the table
    assert (out / "results.csv").read_text().startswith("cell,kind,fusion,loss,trainable_params")
    assert res.plots and all(p.exists() for p in res.plots)
    copies = sorted((tmp_path / "docs" / "results_plots").glob("*.png"))  # the copy carries its plots
    assert [p.name for p in copies] == sorted(p.name for p in res.plots)
    assert f"](results_plots/{copies[0].name})" in md and "../out/plots" not in md

    # a rerun skips every finished cell without touching its results
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/results/*.json")}
    again = run_experiment(toy_experiment, out=out)
    assert again.ran == [] and again.skipped == res.ran
    assert stamp == {p: p.stat().st_mtime_ns for p in out.glob("cells/*/results/*.json")}

    # a changed evaluation reruns that evaluation only, not the training
    raw = yaml.safe_load(toy_experiment.read_text())
    raw["evals"][1]["limit"] = 12
    toy_experiment.write_text(yaml.safe_dump(raw, sort_keys=False))
    summary = out / "cells" / "dfe-add-clip" / "train_summary.json"
    before = summary.stat().st_mtime_ns
    third = run_experiment(toy_experiment, out=out, only=["dfe-add-clip"])
    assert third.ran == ["dfe-add-clip"] and summary.stat().st_mtime_ns == before
    assert (
        stamp[out / "cells" / "dfe-add-clip" / "results" / "zs.json"]
        == (out / "cells" / "dfe-add-clip" / "results" / "zs.json").stat().st_mtime_ns
    )
    assert {r["cell"]: r["status"] for r in third.rows}["dfe-add-lightcrl"] == "partial"

    # a new optional setting left unset (None) keeps finished cells finished; a real change is reported
    from lightcrl.app.experiment import Cell, cell_status

    exp = load_experiment(toy_experiment)
    cell = next(c for c in exp.cells if c.name == "dfe-add-clip")
    padded = Cell(cell.name, cell.kind, dict(cell.spec, some_new_option=None))
    assert padded.spec_hash == cell.spec_hash and cell_status(exp, padded, out) == "done"
    changed = Cell(cell.name, cell.kind, dict(cell.spec, seed=cell.spec.get("seed", 0) + 1))
    assert cell_status(exp, changed, out) == "changed"


def test_only_selects_cells_and_cli(tmp_path, toy_run, capsys):
    raw = yaml.safe_load(toy_run[1].read_text())
    raw["evals"] = [e for e in raw["evals"] if e["name"] == "ret"]
    raw.pop("notes")
    toy_experiment = tmp_path / "only.yaml"
    toy_experiment.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    res = run_experiment(toy_experiment, out=out, only=["*-clip"])
    assert res.ran == ["dfe-add-clip"] and [r["cell"] for r in res.rows] == ["dfe-add-clip"]
    with pytest.raises(LightCRLError, match="matches no cell"):
        run_experiment(toy_experiment, out=out, only=["nothing*"])
    assert main(["experiment", str(toy_experiment), "--out", str(out), "--only", "asif"]) == 0
    assert "| asif |" in capsys.readouterr().out
    assert main(["experiment", str(toy_experiment), "--out", str(out), "--list"]) == 0
    listing = capsys.readouterr().out
    assert "dfe-add-lightcrl" in listing and "todo" in listing and "asif" in listing


@pytest.mark.parametrize("name,n_cells", [("offline_smoke", 3), ("offline", 46), ("paper", 20)])
def test_shipped_experiment_configs_validate(name, n_cells):
    exp = load_experiment(REPO / "configs" / "experiments" / f"{name}.yaml")
    assert len(exp.cells) == n_cells
    kinds = {c.kind for c in exp.cells}
    assert "asif" in kinds and "train" in kinds
    if name != "offline_smoke":
        fusions = {c.labels.get("fusion") for c in exp.cells if c.labels}
        losses = {c.labels.get("loss") for c in exp.cells if c.labels}
        assert fusions == {"add", "mul", "concat", "attention"}
        assert losses == {"lightcrl", "clip", "cyclip", "clip+simcse"}
        assert exp.cell("dfe-mul-clip+simcse").spec["loss"] == {"clip": 1.0, "simcse": 1.0}
        assert exp.cell("two_tower-clip").spec["model"]["arch"] == "two_tower"
        tasks = {e.task for e in exp.cfg.evals}
        assert tasks == {"zeroshot", "retrieval", "linear_probe", "finetune", "sts", "geometry"}
    if name == "offline":
        convirt = exp.cell("convirt").spec
        assert (convirt["data"]["limit"], convirt["epochs"], convirt["unfreeze_image"]) == (500, 1, 1)
        assert exp.cell("asif").spec["split"] == "train"
        # the quality push changes one thing of dfe-add-clip; selection reads a TRAIN-split zero-shot
        assert exp.cell("push-linear-proj").spec["model"]["proj_layers"] == 1
        assert exp.cell("push-linear-proj").spec["loss"] == {"clip": 1.0}
        val = next(e for e in exp.cfg.evals if e.name == "zs-cifar10-val")
        assert val.split == "train"
        # anchor cells, and the baseline they are measured against with the same anchors and centring
        assert exp.cell("push-anchors").spec["model"]["anchors"]["k"] == 200
        assert exp.cell("offline-best").spec["model"]["anchors"] is not None
        asif_c = exp.cell("asif-centered").spec
        assert asif_c["pairs"] == "mean_caption" and asif_c["tune"]["center"] == [False, True]
        # the keep-* cells (issue 14) are valid training configs
        assert exp.cell("keep-structure").spec["loss"]["structure"]["levels"] == 2
        for cell in exp.cells:
            if cell.name.startswith("keep-"):
                validate_config(cell.spec)
        assert exp.cell("csa").kind == "csa" and exp.cell("csa").spec["tune"]["reg"]
        unpaired = exp.cell("keep-structure-unpaired").spec["loss"]["structure"]["unpaired"]
        assert {u["modality"] for u in unpaired} == {"text"}


def test_methods_experiment_validates_on_training_data_only():
    exp = load_experiment(REPO / "configs" / "experiments" / "methods.yaml")
    assert len(exp.cells) == 11
    for cell in exp.cells:
        if cell.kind != "train":  # training-free: fitted without the held-out items, scored on them
            assert cell.spec["holdout"] == 0.1 and cell.spec["split"] == "train"
            continue
        cfg = validate_config(cell.spec)
        assert cfg.data.sources[0].holdout == 0.1 and cfg.data.sources[0].val_split is None
    assert [(e.task, e.split) for e in exp.cfg.evals] == [("zeroshot", "train")]
    seeds = load_experiment(REPO / "configs" / "experiments" / "methods_seeds.yaml")
    assert {c.labels["seed"] for c in seeds.cells} == {"0", "1", "2"}
    assert all(c.spec["seed"] == int(c.labels["seed"]) for c in seeds.cells)
    assert {(e.task, e.split) for e in seeds.cfg.evals} == {("zeroshot", "train")}


def test_overrides_replace_nodes_and_bad_configs(tmp_path):
    raw = {"loss": {"lightcrl": 1.0}, "data": {"sources": [{"spec": "a", "limit": 3}]}}
    assert set_path(raw, "loss", {"clip": 1.0})["loss"] == {"clip": 1.0}
    assert set_path(raw, "data.sources.0.limit", 5)["data"]["sources"][0] == {"spec": "a", "limit": 5}
    assert raw["data"]["sources"][0]["limit"] == 3  # the input is never modified
    base = {"data": {"sources": [{"spec": "csv:x"}]}}
    with pytest.raises(LightCRLError, match=r"(?s)cell dfe-sum.*model\.fusion"):
        load_experiment({"base": base, "axes": {"f": {"key": "model.fusion", "values": ["sum"]}}})
    with pytest.raises(LightCRLError, match="needs `key`"):
        load_experiment({"base": base, "axes": {"f": {"values": ["add"]}}})
    with pytest.raises(LightCRLError, match=r"evals\.0\.task"):
        load_experiment({"base": base, "evals": [{"name": "x", "task": "nope", "data": "d"}]})
    with pytest.raises(LightCRLError, match="duplicate cell"):
        load_experiment({"base": base, "baselines": [{"kind": "asif"}, {"kind": "asif"}]})
    # a train cell may start from another training config (e.g. the selected offline_best.yaml)
    (tmp_path / "best.yaml").write_text("data: {sources: [{spec: 'csv:y'}]}\nmodel: {fusion: mul}\n")
    best = {"kind": "train", "name": "best", "config": "best.yaml", "set": {"model.depth": 2}}
    exp = load_experiment({"base": base, "baselines": [best]}, root=tmp_path)
    spec = exp.cell("best").spec
    assert spec["data"]["sources"][0]["spec"] == "csv:y" and spec["model"]["fusion"] == "mul"
    assert spec["model"]["depth"] == 2
    with pytest.raises(LightCRLError, match="notes file not found"):
        load_experiment({"base": base, "notes": "nope.md"}, root=tmp_path)
    with pytest.raises(LightCRLError, match="config file not found"):
        missing = {"kind": "train", "name": "b", "config": "nope.yaml"}
        load_experiment({"base": base, "baselines": [missing]}, root=tmp_path)


def test_seed_summary_gives_mean_and_half_range_per_cell():
    from lightcrl.app.experiment import seed_summary

    rows = [{"cell": f"v-clip-s{s}", "kind": "train", "seed": str(s), "trainable_params": 10,
             "zs/top1": v, "status": "done"} for s, v in ((0, 30.0), (1, 34.0), (2, 32.0))]
    rows.append({"cell": "asif", "kind": "asif", "seed": "", "trainable_params": 0, "zs/top1": 40.0,
                 "status": "done"})
    rows.append({"cell": "v-clip-s3", "kind": "train", "seed": "3", "trainable_params": 10, "zs/top1": None,
                 "status": "partial"})  # not finished: left out
    (row,) = seed_summary(rows)  # cells run once (no seed) are not summarised
    assert row["cell"] == "v-clip" and row["seeds"] == 3
    assert row["zs/top1"] == "32.00 ± 2.00" and row["trainable_params"] == 10


def test_encoder_pair_grids_change_only_the_encoders():
    """Issue 15's table: 4 encoder pairs of one method; the val twin reads training data only."""
    pairs = {("efficientnet-lite0", "minilm-l6"), ("efficientnet-lite0", "mpnet-base"),
             ("efficientnet-lite2", "minilm-l6"), ("efficientnet-lite2", "mpnet-base")}
    exp = load_experiment(REPO / "configs" / "experiments" / "encoder_pairs.yaml")
    specs = [validate_config(c.spec) for c in exp.cells if c.kind == "train"]
    asif = {(c.spec["media_encoder"], c.spec["text_encoder"]) for c in exp.cells if c.kind == "asif"}
    assert asif == pairs and exp.cell("asif-lite0-minilm").spec["k"] == 200
    assert {(s.data.sources[0].media_encoder, s.data.sources[0].text_encoder) for s in specs} == pairs
    ref = specs[0].model_dump(mode="json")
    for s in specs:
        d = s.model_dump(mode="json")
        assert (d["model"], d["loss"], d["optim"]) == (ref["model"], ref["loss"], ref["optim"])
        assert d["model"]["anchors"] is not None
    # every pair for seeds 0, 1, 2 (the `seed` axis), named like the validation twin's cells
    assert len(specs) == 12 and {s.seed for s in specs} == {0, 1, 2}
    assert all(c.spec["seed"] == int(c.labels["seed"][1:]) for c in exp.cells if c.kind == "train")
    # the pair is chosen on a TRAIN split only; the test sets are the same seeded sample for every pair
    assert [e.name for e in exp.cfg.evals if e.split == "train"] == ["zs-cifar10-val"]
    assert {e.limit for e in exp.cfg.evals if e.task == "zeroshot"} == {2000}
    val = load_experiment(REPO / "configs" / "experiments" / "encoder_pairs_val.yaml")
    assert len(val.cells) == 12
    for cell in val.cells:
        assert validate_config(cell.spec).data.sources[0].holdout == 0.1
    # the four tasks of issue 14's mean, each on a training-side split (session 7 added Tiny and STS-B)
    assert [(e.name, e.task, e.split) for e in val.cfg.evals] == [
        ("zs-cifar10-val", "zeroshot", "train"), ("zs-tiny-val", "zeroshot", "train"),
        ("stsb-val", "sts", "train")]


def test_offline_best_large_is_offline_best_with_the_chosen_pair():
    """The shipped large config is the default method with the validation grids' winning encoders (the pair,
    then Lite0 joined to Lite2 on the image side), no more."""
    from lightcrl.app.config import load_config

    best = load_config(REPO / "configs" / "offline_best.yaml").model_dump(mode="json")
    large = load_config(REPO / "configs" / "offline_best_large.yaml").model_dump(mode="json")
    src_best, src_large = best["data"].pop("sources"), large["data"].pop("sources")
    chosen = ("efficientnet-lite2+efficientnet-lite0", "mpnet-base")
    assert (src_large[0]["media_encoder"], src_large[0]["text_encoder"]) == chosen
    for key in ("media_encoder", "text_encoder"):
        src_best[0].pop(key), src_large[0].pop(key)
    assert src_best == src_large
    best.pop("name"), large.pop("name")
    # text's own angles (session 12) were chosen on the default pair's validation runs only
    assert best["model"]["csa"]["text_mix"] is not None and large["model"]["csa"]["text_mix"] is None
    symmetric = {**best, "model": {**best["model"], "anchors": {**best["model"]["anchors"], "text_mix": None},
                                   "csa": {**best["model"]["csa"], "text_mix": None}}}
    assert symmetric == large
    best = symmetric  # what the earlier grids chose
    # what was chosen is what ships: the pair grid scored the method before the CSA part (session 7),
    # the CSA grid chose the part on the default pair, and large_val checked it on this pair
    val = load_experiment(REPO / "configs" / "experiments" / "encoder_pairs_val.yaml")
    cell = validate_config(val.cell("val-lite2-mpnet-s0").spec).model_dump(mode="json")
    assert cell["model"]["csa"] is None and large["model"]["csa"] is not None
    views = {"csa": large["model"]["csa"], "anchors": large["model"]["anchors"],  # session 8 retuned them
             "hubness": large["model"]["hubness"]}  # session 11 added it
    parts = ("model", "loss", "optim")
    assert [{**cell["model"], **views}, cell["loss"], cell["optim"]] == [large[k] for k in parts]
    chosen_csa = load_experiment(REPO / "configs" / "experiments" / "csa_join_val.yaml")
    for exp, name, shipped in ((chosen_csa, "cj-ob-a0.9+csa0.9-s0", best),
                               (load_experiment(REPO / "configs" / "experiments" / "large_val.yaml"),
                                "val-large-ob-a0.9+csa0.9-s0", large)):
        cell = validate_config(exp.cell(name).spec).model_dump(mode="json")
        # these grids predate the hubness correction (large_val keeps measuring what it measured)
        assert [cell[k] for k in ("loss", "optim")] == [shipped[k] for k in ("loss", "optim")], name
        assert cell["model"] == {**shipped["model"], "hubness": None}, name
        assert cell["data"]["sources"][0]["holdout"] == 0.1 and {e.split for e in exp.cfg.evals} == {"train"}
    # session 10's join: joined_val's winning cell is the shipped config, its reference Lite2 alone
    joined = load_experiment(REPO / "configs" / "experiments" / "joined_val.yaml")
    assert {e.split for e in joined.cfg.evals} == {"train"}
    for name, media, hub in (("jv-joined-tokens+hub-s0", chosen[0], large["model"]["hubness"]),
                             ("jv-joined-tokens-s0", chosen[0], None),
                             ("jv-large-s0", "efficientnet-lite2", None)):
        cell = validate_config(joined.cell(name).spec).model_dump(mode="json")
        source = cell["data"]["sources"][0]
        assert (source["media_encoder"], source["text_encoder"], source["holdout"]) == (media, chosen[1], 0.1)
        assert [cell[k] for k in ("loss", "optim")] == [large[k] for k in ("loss", "optim")]
        assert cell["model"] == {**large["model"], "hubness": hub}, name
        assert cell["data"]["input"] == large["data"]["input"] == "tokens"
    # the grid's reference cell is offline_best as it was before the CSA part
    ob = validate_config(chosen_csa.cell("cj-ob-s0").spec).model_dump(mode="json")
    assert ob["model"] == {**best["model"], "csa": None, "hubness": None,
                           "anchors": {**best["model"]["anchors"], "init_mix": 1.1}}
    # its reporting grid compares it with the baselines on the SAME larger features, on dev/test only
    grid = load_experiment(REPO / "configs" / "experiments" / "generalisation_large.yaml")
    assert len(grid.cells) == 15 and {e.split for e in grid.cfg.evals} == {"dev", "test"}
    for c in grid.cells:
        spec = validate_config(c.spec).data.sources[0].model_dump() if c.kind == "train" else c.spec
        assert (spec["media_encoder"], spec["text_encoder"]) == chosen, c.name
    # baseline cells without the anchor view (plain DFE, two-tower) are without the CSA view too
    for exp in (grid, load_experiment(REPO / "configs" / "experiments" / "generalisation.yaml")):
        for c in exp.cells:
            if c.kind == "train":
                model = validate_config(c.spec).model_dump(mode="json")["model"]
                assert (model["anchors"] is None) == (model["csa"] is None), c.name
    # ... and its validation twin reads training-side splits only, on the same pair, with the same holdout
    twin = load_experiment(REPO / "configs" / "experiments" / "large_val.yaml")
    assert {e.split for e in twin.cfg.evals} == {"train"} and len(twin.cells) == 27
    for c in twin.cells:
        spec = validate_config(c.spec).data.sources[0].model_dump() if c.kind == "train" else c.spec
        assert (spec["media_encoder"], spec["text_encoder"]) == chosen and spec["holdout"] == 0.1, c.name


def test_methods_on_offline_best_grid_starts_from_the_shipped_config():
    """ob_methods_val.yaml (session 9) measures issue 14's methods on top of offline_best as shipped: its
    reference cell is that config with a tenth held out, it reads training-side splits only, and the
    unpaired sentences of its STRUCTURE cells are never a split it validates on."""
    from lightcrl.app.config import load_config

    best = load_config(REPO / "configs" / "offline_best.yaml").model_dump(mode="json")
    exp = load_experiment(REPO / "configs" / "experiments" / "ob_methods_val.yaml")
    assert {e.split for e in exp.cfg.evals} == {"train"} and len(exp.cells) == 45  # 15 cells x 3 seeds
    # session 10's joined-image cell with session 11's hubness correction and session 12's text angles is
    # what offline_best ships
    joined = validate_config(exp.cell("om-ob-joined+hub+textmix-s0").spec).model_dump(mode="json")
    assert joined["data"]["sources"][0]["media_encoder"] == best["data"]["sources"][0]["media_encoder"] == (
        "efficientnet-lite0+efficientnet-lite2")
    assert [joined[k] for k in ("model", "loss", "optim")] == [best[k] for k in ("model", "loss", "optim")]
    assert best["model"]["hubness"] == {"k": 10, "bank": 2048}
    assert (best["model"]["anchors"]["text_mix"], best["model"]["csa"]["text_mix"]) == (0.7, 1.0)
    symmetric = {**best["model"], "anchors": {**best["model"]["anchors"], "text_mix": None},
                 "csa": {**best["model"]["csa"], "text_mix": None}}
    assert validate_config(exp.cell("om-ob-joined+hub-s0").spec).model_dump(mode="json")["model"] == symmetric
    plain_best = {**symmetric, "hubness": None}
    assert validate_config(exp.cell("om-ob-joined-s0").spec).model_dump(mode="json")["model"] == plain_best
    ref = validate_config(exp.cell("om-ob-s0").spec).model_dump(mode="json")
    assert [ref[k] for k in ("model", "loss", "optim")] == [plain_best, best["loss"], best["optim"]]
    assert ref["data"]["pairs"] == best["data"]["pairs"] and ref["data"]["sources"][0]["holdout"] == 0.1
    evaluated = {(e.data, e.split) for e in exp.cfg.evals}
    for c in exp.cells:
        cfg = validate_config(c.spec).model_dump(mode="json")
        assert cfg["data"]["sources"][0]["holdout"] == 0.1, c.name
        structure = cfg["loss"].get("structure") or {}
        for source in structure.get("unpaired", []) if isinstance(structure, dict) else []:
            assert "SICK_train" in source["spec"], c.name
            assert all(not source["spec"].startswith(d.split(":")[0] + ":") for d, _ in evaluated), c.name
