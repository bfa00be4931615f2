"""Class-disjoint protocols: ESC-50's release layout, class groups, class selection, store cuts."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import COLORS
from PIL import Image

from lightcrl.app.protocols import class_disjoint_folds, fold_config, with_options
from lightcrl.data.datasets import class_groups, open_dataset, without_class_options
from lightcrl.embed import EmbedOptions, cached_store
from lightcrl.errors import LightCRLError

# The documented split of ESC-50's 50 classes (docs/audio.md): classgroups=5, groupseed=0.
ESC50_GROUPS = [
    [0, 1, 7, 12, 14, 27, 28, 36, 43, 47],
    [5, 11, 15, 20, 23, 33, 34, 38, 40, 49],
    [3, 4, 9, 10, 17, 21, 39, 41, 42, 46],
    [6, 8, 13, 18, 22, 29, 35, 37, 44, 45],
    [2, 16, 19, 24, 25, 26, 30, 31, 32, 48],
]


def test_class_groups_are_the_documented_partition():
    assert class_groups(50, 5, 0) == ESC50_GROUPS
    for n, g in [(50, 5), (10, 3), (7, 7)]:
        groups = class_groups(n, g, seed=1)
        assert sorted(c for grp in groups for c in grp) == list(range(n))
        assert max(map(len, groups)) - min(map(len, groups)) <= 1
    assert class_groups(50, 5, 1) != ESC50_GROUPS
    with pytest.raises(LightCRLError, match="classgroups"):
        class_groups(3, 4)


def _words(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z]+", text.lower())) + " "


def _mentions(text: str, name: str) -> bool:
    """``name`` as whole words in ``text`` ("rain" is not in "train")."""
    return _words(name) in _words(text)


@pytest.fixture(scope="module")
def esc50(shared_data):
    root = shared_data / "esc50"
    if not root.is_dir():
        pytest.skip("esc50 not in the shared data")
    return f"esc50:{root}"


def test_esc50_release_layout(esc50):
    ds = open_dataset(esc50, "all")
    assert len(ds) == 2000 and len(ds.classnames) == 50 and not ds.skipped
    assert ds.classnames[:2] == ["dog", "rooster"] and "drinking - sipping" in ds.classnames
    assert np.bincount([r.label for r in ds.media_records()]).tolist() == [40] * 50
    assert len(open_dataset(esc50, "fold5")) == 400
    only = open_dataset(with_options(esc50, esc10=1), "all")
    assert len(only) == 400 and len(only.classnames) == 10
    rest = open_dataset(with_options(esc50, esc10="exclude"), "all")
    assert len(rest) == 1600 and not set(rest.classnames) & set(only.classnames)
    with pytest.raises(LightCRLError, match="esc10"):
        open_dataset(with_options(esc50, esc10="maybe"), "all")


DESCRIPTIONS = "templates=esc50_descriptions_rich.json,esc50_descriptions_acoustic.json"


def _shipped_prompts() -> str:
    """The ``templates=`` option of the shipped zero-shot config: the splitter test follows what ships."""
    import re
    from pathlib import Path

    from lightcrl.app.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "audio_zeroshot_ridge.yaml")
    return "templates=" + re.search(r"templates=([^&]+)", cfg.data.sources[0].spec).group(1)


@pytest.mark.parametrize("name", ["esc50_descriptions_acoustic2.json", "esc50_descriptions_context.json"])
def test_nameless_descriptions_name_no_class(name):
    """The descriptions written without names name no ESC-50 class at all (whole words, plurals too), so
    no class selection has to drop any of them (the older acoustic file names a few: "water drops")."""
    import json
    from importlib.resources import files

    from lightcrl.data.datasets import names_in

    prompts = json.loads(files("lightcrl").joinpath("resources", "templates", name).read_text("utf-8"))
    assert len(prompts) == 54 and all(len(ps) == 7 for ps in prompts.values())
    assert [(c, p) for c, ps in prompts.items() for p in ps if names_in(p, list(prompts))] == []


@pytest.mark.parametrize("prompts", ["", "shipped"])
def test_class_disjoint_folds_never_show_a_test_class_in_training(esc50, prompts):
    """Real data: names, captions and clips of the test (and validation) classes stay out of training, with
    the class-name templates and with the shipped descriptions (some of which name other classes:
    "thunder and rain in a storm" must not train when "rain" is held out)."""
    folds = class_disjoint_folds(f"{esc50}?{_shipped_prompts()}" if prompts else esc50)
    assert len(folds) == 5
    tested = []
    for f in folds:
        train = open_dataset(f"labelcaptions:{f['train']}", "all")
        held = [open_dataset(f[k], "all") for k in ("test", "val")]
        captions = {t.text for t in train.text_records()}
        train_clips = {r.path for r in train.media_records()}
        assert len(train.classnames) == 30 and len(train) == 30 * 40
        for ds in held:
            assert len(ds.classnames) == 10 and len(ds) == 400
            assert not set(ds.classnames) & set(train.classnames)
            assert not {r.path for r in ds.media_records()} & train_clips
            for name in ds.classnames:
                assert not any(_mentions(c, name) for c in captions), name
        tested += held[0].classnames
    assert sorted(tested) == sorted(open_dataset(esc50, "all").classnames)  # each class tested once


def test_transfer_split_keeps_esc10_out_of_training(esc50, shared_data):
    """ESC-50 minus ESC-10: no ESC-10 clip and no ESC-10 class name (either release's) in training."""
    train = open_dataset(f"labelcaptions:{with_options(esc50, esc10='exclude')}", "all")
    esc10 = open_dataset(f"esc10:{shared_data / 'esc10'}", "all")
    esc10_in_50 = open_dataset(with_options(esc50, esc10=1), "all")
    clip_key = lambda r: r.path.rsplit("/", 1)[-1].rsplit(".", 1)[0]  # <fold>-<freesound id>-<take>
    assert {clip_key(r) for r in esc10.media_records()} == {clip_key(r) for r in esc10_in_50.media_records()}
    assert not {clip_key(r) for r in esc10.media_records()} & {clip_key(r) for r in train.media_records()}
    captions = {t.text for t in train.text_records()}
    for name in esc10.classnames + esc10_in_50.classnames:
        assert not any(_mentions(c, name) for c in captions), name


def test_class_selection_options(tmp_path):
    root = _colour_folders(tmp_path)
    spec = f"imagefolder:{root}"
    ds = open_dataset(f"{spec}?classes=Red|blue", "all")
    assert ds.classnames == ["blue", "red"] and sorted({r.label for r in ds.media_records()}) == [0, 1]
    assert ds.view_of == spec and ds.fingerprint() != open_dataset(spec, "all").fingerprint()
    ds = open_dataset(f"{spec}?exclude_classes=red&classgroups=2&classgroup=1", "all")
    assert set(ds.classnames) <= {"blue", "green", "yellow"} and "red" not in ds.classnames
    assert without_class_options(f"labelcaptions:{spec}?classgroup=1") == f"labelcaptions:{spec}"
    for bad, msg in [("classes=purple", "unknown class"), ("classgroups=2&classgroup=9", "groups are"),
                     ("classes=red&exclude_classes=red", "keeps no class"),
                     ("classgroups=2&classgroup=x", "integers")]:
        with pytest.raises(LightCRLError, match=msg):
            open_dataset(f"{spec}?{bad}", "all")


def _colour_folders(tmp_path, per_class: int = 3):
    root = tmp_path / "colours"
    for c, rgb in COLORS.items():
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), np.clip(np.array(rgb) + 5 * i, 0, 255), np.uint8)).save(
                root / c / f"{i}.png")
    return root


def test_selection_store_is_cut_from_the_whole_store(tmp_path, monkeypatch):
    """A class selection's store equals the rows of the whole dataset's store; nothing is re-extracted."""
    import lightcrl.embed as embed_mod

    spec = f"imagefolder:{_colour_folders(tmp_path)}"
    opts = EmbedOptions(progress=False, num_workers=0)
    whole = cached_store("toy-image", spec, "all", opts)
    whole_text = cached_store("toy-text", f"labelcaptions:{spec}", "all", opts)
    monkeypatch.setattr(embed_mod, "embed", lambda *a, **k: pytest.fail("re-extracted"))
    sub = cached_store("toy-image", f"{spec}?classes=green|yellow", "all", opts)
    assert sub.classnames == ["green", "yellow"] and len(sub) == 6
    assert sub.items.labels.tolist() == [0, 0, 0, 1, 1, 1]
    rows = [whole.index_of(i) for i in sub.items.ids]
    np.testing.assert_array_equal(sub.pooled(), whole.pooled(rows))
    np.testing.assert_array_equal(sub.tokens(range(6))[0], whole.tokens(rows)[0])
    text = cached_store("toy-text", f"labelcaptions:{spec}?classes=green|yellow", "all", opts)
    assert all("green" in t or "yellow" in t for t in text.items.texts)
    rows = [whole_text.index_of(i) for i in text.items.ids]
    np.testing.assert_array_equal(text.pooled(), whole_text.pooled(rows))


def test_protocol_fold_trains_with_zero_shot_validation(tmp_path):
    """One class-disjoint fold end to end: validation zero-shot on held-out classes picks the epoch."""
    from lightcrl.app.config import validate_config
    from lightcrl.app.train import train

    spec = f"imagefolder:{_colour_folders(tmp_path, per_class=4)}"
    base = validate_config({
        "data": {"sources": [{"spec": spec, "media_encoder": "toy-image", "text_encoder": "toy-text",
                              "captions": "templates"}]},
        "model": {"width": 16, "depth": 1, "heads": 2},
        "optim": {"epochs": 2, "batch_size": 8, "warmup_steps": 1},
        "progress": False, "tensorboard": False,
    })
    folds = class_disjoint_folds(spec, groups=4)
    cfg = fold_config(base, 0, folds[0]["train"], folds[0]["val"])
    assert cfg.early_stop.metric == "val/zeroshot_top1"
    # a selection over several metrics that includes the fold's zero-shot is kept; any other is replaced
    both = ["val/zeroshot_top1", "val/mean_recall@1"]
    keep = validate_config({**base.model_dump(mode="json"), "early_stop": {"metric": both}})
    assert fold_config(keep, 0, folds[0]["train"], folds[0]["val"]).early_stop.metric == both
    other = validate_config({**base.model_dump(mode="json"), "early_stop": {"metric": ["val/mean_recall@1"]}})
    assert fold_config(other, 0, folds[0]["train"], folds[0]["val"]).early_stop.metric == "val/zeroshot_top1"
    summary = train(cfg, tmp_path / "run")
    assert summary["metric"] == "val/zeroshot_top1" and 0 <= summary["best"] <= 100
    with pytest.raises(LightCRLError, match="captions: templates"):
        fold_config(base.model_copy(update={"data": base.data.model_copy(update={"sources": [
            base.data.sources[0].model_copy(update={"captions": "dataset"})]})}), 0, spec, None)


def test_templates_option_many_templates_and_class_descriptions(shared_data, tmp_path):
    spec = f"esc10:{shared_data / 'esc10'}"
    plain = open_dataset(f"labelcaptions:{spec}", "fold5")
    many = open_dataset(f"labelcaptions:{spec}?templates=audio_templates_many.txt", "fold5")
    assert len(many.templates) == 20 and len(many.text_records()) == 20 * len(many)
    assert many.fingerprint() != plain.fingerprint() and many.view_of == f"labelcaptions:{spec}"
    desc = open_dataset(f"labelcaptions:{spec}?templates=esc50_descriptions.json&classes=dog bark", "fold5")
    assert desc.classnames == ["dog bark"] and "a dog barking." in {t.text for t in desc.text_records()}
    assert set(desc.templates) == {"dog bark"}
    (tmp_path / "bad.txt").write_text("no slot here\n")
    (tmp_path / "few.json").write_text('{"dog bark": ["woof"]}')
    for option, msg in [(tmp_path / "bad.txt", "slot"), (tmp_path / "few.json", "no prompts for class"),
                        ("nothing.txt", "not found")]:
        with pytest.raises(LightCRLError, match=msg):
            open_dataset(f"{spec}?templates={option}", "fold5")


def test_prompts_that_name_a_left_out_class_are_dropped(esc50):
    from lightcrl.data.datasets import names_in, without_names

    assert names_in("thunder and rain in a storm.", ["rain", "train", "thunderstorm"]) == ["rain"]
    assert names_in("two dogs barking", ["dog", "cat"]) == ["dog"] and not names_in("a train", ["rain"])
    assert names_in("a car horn honking", ["car horn", "engine"]) == ["car horn"]
    kept = without_names({"storm": ["thunder.", "thunder and rain."]}, ["rain"], "spec")
    assert kept == {"storm": ["thunder."]}
    with pytest.raises(LightCRLError, match="names a class left out"):
        without_names({"storm": ["rain and thunder."]}, ["rain"], "spec")
    # on real data: with "rain" held out, thunderstorm keeps only its prompts that do not say "rain"
    whole = open_dataset(f"{esc50}?{DESCRIPTIONS}", "all").templates
    cut = open_dataset(f"{esc50}?{DESCRIPTIONS}&exclude_classes=rain", "all").templates
    assert "rain" not in cut and any(names_in(p, ["rain"]) for p in whole["thunderstorm"])
    assert cut["thunderstorm"] == [p for p in whole["thunderstorm"] if not names_in(p, ["rain"])]
    assert cut["dog"] == whole["dog"]  # nothing of "dog" names rain


def test_several_templates_files_join_per_class(shared_data):
    from lightcrl.data.datasets import read_templates

    spec = f"labelcaptions:esc50:{shared_data / 'esc50'}"
    names = open_dataset(spec, "all").classnames
    rich = read_templates("esc50_descriptions_rich.json", names)
    acoustic = read_templates("esc50_descriptions_acoustic.json", names)
    both = open_dataset(f"{spec}?templates=esc50_descriptions_rich.json,esc50_descriptions_acoustic.json",
                        "all")
    assert both.templates == {c: rich[c] + acoustic[c] for c in names}
    labels = [r.label for r in both.media_records()]
    assert len(both.text_records()) == sum(len(both.templates[names[y]]) for y in labels)
    # every class has the 5 original descriptions first, then the new ones (no class left short)
    desc = read_templates("esc50_descriptions.json", names)
    assert all(rich[c][:5] == desc[c] and len(rich[c]) >= 13 and len(acoustic[c]) == 7 for c in names)
    mixed = read_templates("esc50_descriptions_acoustic.json,audio_templates.txt", names)
    assert mixed["dog"][:7] == acoustic["dog"] and mixed["dog"][7] == "the sound of a dog."


def test_three_modalities_config_is_a_transfer_protocol(esc50, shared_data):
    """The committed config trains on ESC-50 without ESC-10 and validates on classes it never trains on."""
    from pathlib import Path

    from lightcrl.app.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "three_modalities.yaml")
    src = cfg.data.sources[1]
    fix = lambda spec: spec.replace("../shared/data", str(shared_data))
    train = open_dataset(f"labelcaptions:{fix(src.spec)}", src.split)
    val = open_dataset(fix(src.val_spec), src.val_split)
    esc10 = open_dataset(f"esc10:{shared_data / 'esc10'}", "all")
    assert len(train.classnames) == 32 and len(val.classnames) == 8
    assert not set(val.classnames) & set(train.classnames)
    key = lambda r: r.path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    assert not {key(r) for r in esc10.media_records()} & {key(r) for r in train.media_records()}
    captions = {t.text for t in train.text_records()}
    for name in esc10.classnames + open_dataset(with_options(esc50, esc10=1), "all").classnames:
        assert not any(_mentions(c, name) for c in captions), name
    assert "val/esc501/zeroshot_top1" in cfg.early_stop.metrics  # validation on the held-out classes
    # the protocols keep that selection (the Flickr8k source validates on a holdout, not a val_split)
    folds = class_disjoint_folds(fix(src.spec.split("&exclude_classgroup")[0]))
    fold = fold_config(cfg, 1, folds[0]["train"], folds[0]["val"])
    assert fold.early_stop.metric == cfg.early_stop.metric


def test_esc50_flat_layout_matches_the_release_layout(esc50, shared_data, tmp_path):
    """The GitHub layout (audio/*.wav + meta/esc50.csv), built from real clips: same classes, folds, flags."""
    import csv
    import os

    root = shared_data / "esc50"
    rows = list(csv.DictReader(open(root / "meta" / "esc50.csv")))
    keep = [r for r in rows if r["target"] in ("0", "1", "14")][::8]  # dog, rooster, chirping birds
    (tmp_path / "audio").mkdir()
    (tmp_path / "meta").mkdir()
    number = lambda d: int(d.split(" - ", 1)[0])  # NNN: category * 100 + index, 101..510 = targets 0..49
    dirs = [d for d in os.listdir(root) if d[:1].isdigit()]
    folder = {(number(d) // 100 - 1) * 10 + number(d) % 100 - 1: d for d in dirs}
    for r in keep:
        src = next((root / folder[int(r["target"])]).glob(f"{r['fold']}-{r['src_file']}-{r['take']}.*"))
        os.symlink(src, tmp_path / "audio" / r["filename"])
    with open(tmp_path / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)
    flat = open_dataset(f"esc50:{tmp_path}", "all")
    assert flat.classnames == ["dog", "rooster", "chirping birds"] and len(flat) == len(keep)
    assert len(open_dataset(f"esc50:{tmp_path}?esc10=1", "all").classnames) == 2
    assert open_dataset(f"esc50:{tmp_path}?esc10=exclude", "all").classnames == ["chirping birds"]


def test_transfer_refuses_a_test_set_that_overlaps_training(esc50, shared_data):
    """Real data: ESC-10 against all of ESC-50 is refused (shared clips), against ESC-50 minus ESC-10 it is
    not; the split the protocol derives from the committed config's spec is the config's own split."""
    from lightcrl.app.protocols import check_transfer, transfer_split

    esc10 = f"esc10:{shared_data / 'esc10'}"
    with pytest.raises(LightCRLError, match=r"shares 400 clip\(s\).*training.*esc10=exclude"):
        check_transfer(esc50, esc10)
    with pytest.raises(LightCRLError, match="class name.*validation"):  # same names: ESC-10 inside ESC-50
        check_transfer(with_options(esc50, esc10="exclude"), with_options(esc50, esc10=1),
                       val_spec=with_options(esc50, classes="dog"))
    split = transfer_split(with_options(esc50, esc10="exclude", exclude_classgroup=3))
    assert split == {"train": with_options(esc50, esc10="exclude", exclude_classgroup=0),
                     "val": with_options(esc50, esc10="exclude", classgroup=0)}
    check_transfer(split["train"], esc10, split["val"])  # no overlap: passes


def test_protocol_command_runs_folds_per_seed(tmp_path, capsys):
    """`lightcrl protocol`: one run per (fold, seed), protocol.json with the seeds, clear errors."""
    import json

    import yaml

    from lightcrl.app.cli import main

    spec = f"imagefolder:{_colour_folders(tmp_path, per_class=4)}"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"sources": [{"spec": spec, "media_encoder": "toy-image", "text_encoder": "toy-text",
                              "captions": "templates"}]},
        "model": {"width": 16, "depth": 1, "heads": 2},
        "optim": {"epochs": 1, "batch_size": 8, "warmup_steps": 1},
        "progress": False, "tensorboard": False,
    }))
    out = tmp_path / "proto"
    args = ["protocol", "class-disjoint", "--config", str(cfg), "--out", str(out), "--groups", "4"]
    assert main([*args, "--fold", "1", "--seed", "3", "--seed", "4"]) == 0
    res = json.loads((out / "protocol.json").read_text())
    assert [(r["fold"], r["seed"]) for r in res["folds"]] == [(1, 3), (1, 4)] and res["seeds"] == [3, 4]
    assert (out / "fold1-s3" / "train_summary.json").is_file() and (out / "fold1-s4").is_dir()
    tops = [r["top1"] for r in res["folds"]]
    assert res["top1_mean"] == pytest.approx(sum(tops) / 2) and res["folds"][0]["n_classes"] == 1
    assert "class-disjoint: top1" in capsys.readouterr().out
    assert main(["protocol", "zero-shot", "--config", str(cfg), "--out", str(out)]) == 2
    assert main(["protocol", "transfer", "--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown protocol 'zero-shot'" in err and "needs a test dataset" in err


def test_ridge_arch_fits_in_closed_form_and_validation_picks_the_penalty(tmp_path):
    """arch ridge: each "epoch" is the closed-form fit with one penalty of model.ridge.lams; the published
    model is the validation-chosen one and equals an independent numpy ridge on the same stores."""
    import lightcrl
    from lightcrl.api import encode_store
    from lightcrl.app.config import validate_config
    from lightcrl.app.train import Trainer
    from lightcrl.model import ModelConfig

    spec = f"imagefolder:{_colour_folders(tmp_path, per_class=4)}"
    lams = [0.01, 1.0, 100.0]
    base = validate_config({
        "data": {"sources": [{"spec": spec, "media_encoder": "toy-image", "text_encoder": "toy-text",
                              "captions": "templates"}]},
        "model": {"arch": "ridge", "ridge": {"lams": lams, "center": True, "csls": 2}},
        "progress": False, "tensorboard": False,
    })
    folds = class_disjoint_folds(spec, groups=4)
    cfg = fold_config(base, 0, folds[0]["train"], folds[0]["val"])
    trainer = Trainer(cfg, tmp_path / "run")
    summary = trainer.fit()
    assert summary["epochs"] == 3 and summary["metric"] == "val/zeroshot_top1"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["ridge/lam"] for r in rows if "ridge/lam" in r] == lams
    lam = lams[summary["best_epoch"] - 1]
    assert summary["best"] == max(r["val/zeroshot_top1"] for r in rows if "ridge/lam" in r)

    s = trainer.train_sets[0]
    rows_m, inv = np.unique(s.media_index, return_inverse=True)
    X = s.media.pooled(rows_m).astype(np.float64)
    t = s.text.pooled(s.text_index).astype(np.float64)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    T = np.zeros((len(rows_m), t.shape[1]))
    np.add.at(T, inv, t)
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    centre = T.mean(0)
    T = (T - centre) / np.linalg.norm(T - centre, axis=1, keepdims=True)
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Z = (X - mu) / sd
    W = np.linalg.solve(Z.T @ Z + lam * len(Z) * np.eye(Z.shape[1]), Z.T @ T)
    want = Z @ W
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    pipe = lightcrl.load(tmp_path / "run", device="cpu")
    got = encode_store(pipe.model, s.adapter, s.media, torch.device("cpu"), indices=rows_m)
    np.testing.assert_allclose(got, want, atol=2e-3)  # float16 stores, float32 buffers
    assert pipe.model.embed_dim == t.shape[1]  # the text encoder's own space
    # csls: each class's offset is minus half its mean cosine to its 2 nearest mapped training items
    classes = np.random.default_rng(0).normal(size=(3, t.shape[1]))
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    expected = -0.5 * np.sort(want @ classes.T, axis=0)[-2:].mean(0)
    np.testing.assert_allclose(pipe.model.zeroshot_bias(classes, s.media_modality), expected, atol=2e-3)
    assert pipe.model.zeroshot_bias(classes, "text") is None
    text = encode_store(pipe.model, s.adapter, s.text, torch.device("cpu"), indices=s.text_index[:3])
    want_t = t[:3] - centre
    np.testing.assert_allclose(text, want_t / np.linalg.norm(want_t, axis=1, keepdims=True), atol=2e-3)
    with pytest.raises(ValueError, match="arch 'ridge' only"):
        ModelConfig(ridge={"lams": [1.0]})
