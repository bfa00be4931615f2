"""`lightcrl search` (incremental index + HTML gallery) and `lightcrl export` (ONNX) on the tiny run."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_quickstart import parse_html, shared_tiny_run

from lightcrl.app.cli import main
from lightcrl.app.evaluate import EvalTarget
from lightcrl.app.search import ImageIndex, search
from lightcrl.data.synthetic import Scene, render
from lightcrl.embed import EmbedOptions, cached_store
from lightcrl.export import export_onnx
from lightcrl.model import create_model

# Seen (trained) combinations that differ from the target in colour and shape.
FOLDER = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star")]


@pytest.fixture
def tiny_run(tmp_path_factory, monkeypatch):
    run = shared_tiny_run(tmp_path_factory)
    monkeypatch.setenv("LIGHTCRL_CACHE", str(run.cache))
    return run


def _draw(folder: Path, colour: str, shape: str, seed: int = 0) -> Path:
    path = folder / f"{colour}_{shape}.jpg"
    render(Scene(colour, shape, "large", "middle"), 224, random.Random(seed)).save(path)
    return path


@pytest.fixture
def shapes_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (c, s) in enumerate(FOLDER):
        _draw(folder, c, s, seed=i)
    return folder


def test_search_finds_the_matching_image(tiny_run, shapes_folder, tmp_path):
    out = tmp_path / "gallery.html"
    res = search(tiny_run.out, shapes_folder, "a red circle", top=3, out_html=out)
    assert res.hits[0].rel == "red_circle.jpg", [(h.rel, h.score) for h in res.hits]
    assert [h.rank for h in res.hits] == [1, 2, 3]
    assert res.hits[0].score >= res.hits[1].score >= res.hits[2].score
    page = parse_html(out.read_text(encoding="utf-8"))
    imgs = [a for t, a in page.tags if t == "img"]
    assert len(imgs) == 3 and all(a["src"].startswith("data:image/jpeg;base64,") for a in imgs)
    assert "red_circle.jpg" in " ".join(page.text)


def test_index_embeds_only_new_files(tiny_run, shapes_folder, monkeypatch):
    first = search(tiny_run.out, shapes_folder, "a blue square", top=1)
    assert (first.stats.embedded, first.stats.reused) == (len(FOLDER), 0)
    assert first.hits[0].rel == "blue_square.jpg"

    embedded: list[list[str]] = []
    original = ImageIndex._embed

    def spy(self, enc, paths, *args, **kwargs):
        embedded.append(list(paths))
        return original(self, enc, paths, *args, **kwargs)

    monkeypatch.setattr(ImageIndex, "_embed", spy)
    _draw(shapes_folder, "purple", "square", seed=9)
    (shapes_folder / "notes.txt").write_text("not an image")
    second = search(tiny_run.out, shapes_folder, "a blue square", top=2)
    assert embedded == [["purple_square.jpg"]]
    s = second.stats
    assert (s.embedded, s.reused, s.total) == (1, len(FOLDER), len(FOLDER) + 1)

    (shapes_folder / "green_triangle.jpg").unlink()
    third = search(tiny_run.out, shapes_folder, "a blue square", top=10)
    assert (third.stats.embedded, third.stats.removed) == (0, 1)
    assert len(embedded) == 1  # nothing new to embed: the encoder was not called again
    assert sorted(h.rel for h in third.hits) == sorted(
        ["red_circle.jpg", "blue_square.jpg", "yellow_star.jpg", "purple_square.jpg"])


def test_search_cli_prints_hits_and_writes_gallery(tiny_run, shapes_folder, tmp_path, capsys):
    out = tmp_path / "g.html"
    code = main(["search", "--run", str(tiny_run.out), "--images", str(shapes_folder), "--query",
                 "a yellow star", "--top", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "gallery:" in printed and out.is_file()
    assert printed.index("yellow_star.jpg") < printed.index("gallery:")


def test_search_counts_an_empty_image_as_unreadable(tiny_run, shapes_folder, capsys):
    (shapes_folder / "empty.jpg").write_bytes(b"")  # a copy that never finished, say
    (shapes_folder / "truncated.jpg").write_bytes((shapes_folder / "red_circle.jpg").read_bytes()[:100])
    res = search(tiny_run.out, shapes_folder, "a red circle", top=8)
    assert res.stats.skipped == 2 and res.n_images == len(FOLDER)
    assert {h.rel for h in res.hits} == {f"{c}_{s}.jpg" for c, s in FOLDER}
    args = ["--run", str(tiny_run.out), "--images", str(shapes_folder), "--query", "a red circle"]
    assert main(["search", *args]) == 0  # the printed line counts both (the index is reused)
    assert "2 unreadable" in capsys.readouterr().out


def test_onnx_export_matches_pytorch(tiny_run, tmp_path, capsys):
    import onnxruntime as ort

    code = main(["export", "--run", str(tiny_run.out), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "max abs diff" in printed
    paths = {m: tmp_path / f"m.{m}.onnx" for m in ("image", "text")}
    assert all(p.is_file() for p in paths.values())

    # On real cached features, the ONNX image graph gives what the evaluator computes.
    spec = f"flickr8k:{Path(tiny_run.summary['synthetic_data']) / 'shapes'}"
    target = EvalTarget.resolve(str(tiny_run.out))
    for mod, enc in (("image", "efficientnet-lite0"), ("text", "minilm-l6")):
        store = cached_store(enc, spec, "test", EmbedOptions(progress=False))
        tok, mask = store.batch(np.arange(6))
        sess = ort.InferenceSession(str(paths[mod]), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"tokens": tok.numpy(), "mask": mask.numpy()})[0]
        ref = target.embed(store)[:6]
        np.testing.assert_allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize("cfg", [
    {"fusion": "attention", "input": "pooled"},
    {"fusion": "concat", "pool": "cls", "norm_first": False, "depth": 2},
    {"arch": "two_tower"},
    {"fusion": "add", "anchors": {"k": 5, "p": 4.0, "dim": 8, "count": 12}},
    {"arch": "two_tower", "anchors": {"k": 5, "dim": 8, "count": 12, "join": "sum"}},
    {"fusion": "add", "anchors": {"k": 5, "count": 12}},
    {"fusion": "add", "csa": {"rank": 6}},
    {"fusion": "add", "hubness": {"k": 3, "bank": 8}},  # the bank is ranking-time data, not in the graph
    {"fusion": "add", "anchors": {"k": 5, "count": 12, "learn_mix": False, "text_mix": 0.5},  # text's angles
     "csa": {"rank": 6, "text_mix": 1.1}},
])
def test_onnx_export_model_variants(cfg):
    """Fusion / pooling / arch variants export with dynamic batch and token axes (text: cut at 8 tokens)."""
    cfg = dict(cfg)
    input_mode = cfg.pop("input", "tokens")
    model = create_model({"width": 32, "heads": 2, "ffn_dim": 64, **cfg}, {"image": 24, "text": 16})
    with tempfile.TemporaryDirectory() as d:
        run = Path(d)
        torch.nn.init.normal_(model.logit_scale)  # any weights: the check is ONNX vs PyTorch
        if model.anchors is not None:
            model.anchors.set_keys({m: torch.randn(12, d) for m, d in model.input_dims.items()})
        if model.canonical is not None:  # any maps: the part is buffers and a matmul
            for buf in model.canonical.buffers():
                buf.copy_(torch.randn_like(buf))
        if model.cfg.hubness is not None:
            model.set_hubness_bank({m: torch.randn(8, model.embed_dim) for m in model.input_dims})
        save_file(model.state_dict(), str(run / "model.safetensors"))
        (run / "model.json").write_text(json.dumps({
            "model_config": model.cfg.model_dump(), "input_dims": model.input_dims,
            "encoders": {"image": "efficientnet-lite0", "text": "minilm-l6"}, "input": input_mode,
            "max_text_tokens": 8}))
        done = export_onnx(run, modalities=["text", "image"] if model.text_modality else ["text"])
        assert [d.modality for d in done] == (["text", "image"] if model.text_modality else ["text"])
        assert all(d.max_abs_diff < 1e-4 and d.path.is_file() for d in done)
        assert json.loads((run / "export" / "export.json").read_text())["input"] == input_mode
