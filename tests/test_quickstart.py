"""Quickstart end to end on a tiny synthetic dataset; the run it trains is shared with the other tests.

One reduced quickstart (a few hundred rendered images, a narrow DFE, a few epochs) is built once per
session by :func:`shared_tiny_run`; test_search_export.py uses the same run.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import make_pairs_csv

import lightcrl
from lightcrl.app import quickstart as quickstart_module
from lightcrl.app.evaluate import EvalTarget
from lightcrl.app.quickstart import QuickstartOptions, quickstart
from lightcrl.data.datasets import open_dataset
from lightcrl.data.synthetic import HELD_OUT, SyntheticSpec, generate
from lightcrl.embed import EmbedOptions, cached_store
from lightcrl.errors import LightCRLError

TINY_SPEC = dict(n_train=160, n_dev=0, n_test=24, zeroshot_per_class=4, seen_per_class=0,
                 captions_per_image=2)
TINY_MODEL = {"width": 64, "heads": 2, "ffn_dim": 128}


@dataclass
class TinyRun:
    out: Path  # the run directory (quickstart OUT)
    cache: Path  # its LIGHTCRL_CACHE
    summary: dict


_SHARED: dict[str, TinyRun] = {}


def shared_tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """Build (once per session) a reduced quickstart run in its own cache."""
    if "run" not in _SHARED:
        root = tmp_path_factory.mktemp("tiny-quickstart")
        cache = root / "cache"
        old = os.environ.get("LIGHTCRL_CACHE")
        os.environ["LIGHTCRL_CACHE"] = str(cache)
        try:
            opts = QuickstartOptions(out=root / "run", synthetic=SyntheticSpec(**TINY_SPEC), epochs=12,
                                     batch_size=32, lr=2e-3, model=TINY_MODEL, progress=False,
                                     untrained_baseline=False)
            summary = quickstart(opts)
        finally:
            if old is None:
                os.environ.pop("LIGHTCRL_CACHE", None)
            else:
                os.environ["LIGHTCRL_CACHE"] = old
        _SHARED["run"] = TinyRun(root / "run", cache, summary)
    return _SHARED["run"]


@pytest.fixture
def tiny_run(tmp_path_factory, monkeypatch) -> TinyRun:
    run = shared_tiny_run(tmp_path_factory)
    monkeypatch.setenv("LIGHTCRL_CACHE", str(run.cache))
    return run


def test_summary_has_headline_numbers(tiny_run):
    s = json.loads((tiny_run.out / "summary.json").read_text())
    for key in ("zeroshot_top1", "chance", "wall_time_s", "timings_s", "retrieval", "held_out"):
        assert key in s, key
    assert s["chance"] == pytest.approx(100 / len(HELD_OUT))
    assert 0.0 <= s["zeroshot_top1"] <= 100.0
    # Even the tiny run composes colour and shape words it never saw together (24 images, 6 classes).
    assert s["zeroshot_top1"] > s["chance"] + 15
    assert s["zeroshot"]["shapes-unseen"]["n"] == TINY_SPEC["zeroshot_per_class"] * len(HELD_OUT)
    assert set(s["retrieval"]["shapes-test"]) >= {"image_retrieval_recall@1", "text_retrieval_recall@1"}
    assert (tiny_run.out / "report.html").is_file()
    assert s["report"] == str((tiny_run.out / "report.html").resolve())


def test_held_out_combos_never_in_training(tiny_run):
    data = Path(tiny_run.summary["synthetic_data"])
    captions = (data / "shapes" / "captions.txt").read_text().lower()
    for colour, shape in HELD_OUT:
        assert f"{colour} {shape}" not in captions
        assert (data / "shapes-zeroshot" / "test" / f"{colour}_{shape}").is_dir()


def test_synthetic_generation_is_reused(tmp_path):
    spec = SyntheticSpec(n_train=3, n_dev=1, n_test=1, zeroshot_per_class=1, seen_per_class=1)
    first = generate(tmp_path, spec)
    mtime = (tmp_path / "shapes" / "captions.txt").stat().st_mtime_ns
    again = generate(tmp_path, spec)
    assert again.reused and not first.reused
    assert (tmp_path / "shapes" / "captions.txt").stat().st_mtime_ns == mtime  # features stay cached


def test_api_round_trip_matches_evaluator(tiny_run):
    """lightcrl.load -> encode raw files/captions == what the evaluator embeds from the feature stores."""
    spec = f"flickr8k:{Path(tiny_run.summary['synthetic_data']) / 'shapes'}"
    opts = EmbedOptions(progress=False)
    media = cached_store("efficientnet-lite0", spec, "test", opts)  # cache hits: nothing re-embedded
    texts = cached_store("minilm-l6", spec, "test", opts)
    target = EvalTarget.resolve(str(tiny_run.out))
    ev_img, ev_txt = target.embed(media)[:5], target.embed(texts)[:6]

    model = lightcrl.load(tiny_run.out)
    root = Path(spec.split(":", 1)[1])
    api_img = model.encode_image([root / i for i in media.items.ids[:5]], progress=False)
    api_txt = model.encode_text(texts.items.texts[:6], progress=False)
    # The stores hold float16 tokens; fresh encodes are float32: equal up to that rounding.
    np.testing.assert_allclose(api_img, ev_img, atol=1e-2)
    np.testing.assert_allclose(api_txt, ev_txt, atol=1e-2)
    assert (np.sum(api_img * ev_img, 1) > 0.999).all() and (np.sum(api_txt * ev_txt, 1) > 0.999).all()


def test_classify_warns_nothing_and_names_a_missing_image(tiny_run, tmp_path):
    model = lightcrl.load(tiny_run.out)
    folder = Path(tiny_run.summary["synthetic_data"]) / "shapes-zeroshot" / "test"
    images = sorted(p for p in folder.rglob("*") if p.is_file())[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probs = model.classify(images, ["red circle", "blue square"])
    assert probs.shape == (2, 2) and np.allclose(probs.sum(1), 1.0)
    missing = tmp_path / "gone.jpg"
    with pytest.raises(LightCRLError, match=re.escape(str(missing))):  # a SkipItem: one line in the CLI
        model.classify([missing], ["red circle", "blue square"])


def test_classify_fills_templates_like_zero_shot_evaluation(tiny_run):
    """One template rule for the API and the evaluator: "{c}" and "{}" slots; no slot is a clear error
    (the API used str.format and the evaluator "{c}" before)."""
    from lightcrl.metrics import zeroshot

    model = lightcrl.load(tiny_run.out)
    names = ["red circle", "blue square"]
    a = model.class_embeddings(names, ["a {c} shape", "one {c}"])
    b = model.class_embeddings(names, ["a {} shape", "one {}"])
    ref = zeroshot.build_classifier(lambda x: model.encode_text(x, progress=False), names,
                                    ["a {c} shape", "one {c}"])
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, ref, atol=1e-6)
    with pytest.raises(LightCRLError, match="slot"):
        model.class_embeddings(names, ["a photo of {0}"])


class _Checker(HTMLParser):
    """Checks that every non-void element is closed in order; collects the text."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.text: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse_html(text: str) -> _Checker:
    c = _Checker()
    c.feed(text)
    c.close()
    assert not c.errors, c.errors[:3]
    assert not c.stack, f"unclosed: {c.stack}"
    return c


def test_report_is_valid_html_naming_every_results_file(tiny_run):
    page = parse_html((tiny_run.out / "report.html").read_text(encoding="utf-8"))
    text = " ".join(page.text)
    results = sorted((tiny_run.out / "results").glob("*.json"))
    assert {p.name for p in results} == set(tiny_run.summary["results"])
    for p in results:
        assert p.name in text
    images = [a for t, a in page.tags if t == "img"]
    assert images and all(a["src"].startswith("data:image/") for a in images)  # self-contained


def test_quickstart_on_a_missing_folder_says_it_is_missing(tmp_path):
    with pytest.raises(LightCRLError, match="flickr8k dataset folder not found"):
        quickstart(QuickstartOptions(out=tmp_path / "run", data=f"flickr8k:{tmp_path}/nope", progress=False))


def test_quickstart_on_a_csv_file_evaluates_on_held_out_images(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTCRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(quickstart_module, "IMAGE_ENCODER", "toy-image")  # tiny, registered by conftest
    monkeypatch.setattr(quickstart_module, "TEXT_ENCODER", "toy-text")
    spec = make_pairs_csv(tmp_path / "pairs", n=20)  # 20 images, 2 captions each
    s = quickstart(QuickstartOptions(out=tmp_path / "run", data=spec, epochs=2, batch_size=8,
                                     model=TINY_MODEL, progress=False, threads=1))
    assert s["data"] == spec
    assert list(s["retrieval"]) == ["pairs-csv-held-out"]
    assert s["retrieval"]["pairs-csv-held-out"]["image_retrieval_recall@1"] is not None
    # 20% of the images held out of training, and evaluated on
    folder = next((tmp_path / "cache" / "quickstart").iterdir())
    train, test = (open_dataset(f"csv:{folder / name}") for name in ("train.csv", "test.csv"))
    train_ids, test_ids = {r.id for r in train.media_records()}, {r.id for r in test.media_records()}
    assert (len(train_ids), len(test_ids)) == (16, 4) and not train_ids & test_ids
    assert s["stores"] == {"toy-image:train-csv:all": 16, "toy-text:train-csv:all": 32,
                           "toy-image:test-csv:all": 4, "toy-text:test-csv:all": 8}
    assert any("held out" in n for n in s["notes"])


def test_quickstart_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LightCRLError, match="not a quickstart output"):
        quickstart(QuickstartOptions(out=tmp_path, progress=False))


def _screenshot_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "screenshot.py"
    mod_spec = importlib.util.spec_from_file_location("screenshot", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def test_screenshots_with_chromium(request, tmp_path):
    mod = _screenshot_script()
    browser = mod.find_browser()
    if browser is None:
        why = "no Chromium: run scripts/install_chromium.sh as root (scripts/setup.sh does), or set $CHROMIUM"
        if os.environ.get("CI", "").lower() in ("true", "1"):  # CI must run it, not skip it quietly
            pytest.fail(f"{why} (CI=true)")
        pytest.skip(why)
    tiny_run = request.getfixturevalue("tiny_run")  # after the check: a skip costs no training
    png = tmp_path / "report.png"
    mod.screenshot(browser, tiny_run.out / "report.html", png, size="1280,900")
    assert png.stat().st_size > 1000
