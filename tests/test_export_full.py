"""`lightcrl export --full`: frozen encoder + trained model in one ONNX graph per modality, and the README's
onnxruntime-only example run on it with torch and lightcrl unimportable.

The tiny quickstart run uses the real encoders (EfficientNet-Lite0, MiniLM-L6): the export traces both
(most of this file's time, ~25 s of CPU on a quiet machine).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_quickstart import shared_tiny_run

import lightcrl
from lightcrl.app.cli import main
from lightcrl.data.synthetic import Scene, render
from lightcrl.errors import LightCRLError
from lightcrl.export import MANIFEST, export_full

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "# onnx-only example"
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a purple circle"]

# Run first in the subprocess: any import of torch, lightcrl or transformers (which needs torch) fails.
BLOCKER = """
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "lightcrl", "transformers"):
            raise ImportError(f"{name} is blocked: the example must run without it")
        return None
sys.meta_path.insert(0, _Blocked())
"""


def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
    found = [b for b in blocks if b.startswith(MARKER)]
    assert len(found) == 1, f"README.md must hold one python block starting with {MARKER!r}"
    return found[0]


def run_blocked(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def tiny_run(tmp_path_factory, monkeypatch):
    run = shared_tiny_run(tmp_path_factory)
    monkeypatch.setenv("LIGHTCRL_CACHE", str(run.cache))
    return run


def test_readme_example_runs_the_full_export_without_torch(tiny_run, tmp_path, capsys):
    out = tmp_path / "onnx"
    code = main(["export", "--run", str(tiny_run.out), "--full", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    for mod in ("image", "text"):
        assert re.search(rf"{mod}: \S+{mod}\.onnx .*min cosine (0\.999\d*|1\.0+)", printed), printed
    spec = json.loads((out / MANIFEST).read_text())
    assert set(spec["modalities"]) == {"image", "text"} and spec["not_exported"] == {}
    for m in spec["modalities"].values():
        assert m["min_cosine"] >= 0.999 and m["max_abs_diff"] < 1e-3
    assert spec["modalities"]["image"]["preprocessing"]["crop"] == 224

    # tokenizers alone gives the ids lightcrl's collator gives (padding to the longest, truncation at 128)
    from tokenizers import Tokenizer

    from lightcrl.encoders import get_encoder

    texts = ["a dog", "two dogs play in the snow near a red house", " ".join(["word"] * 300)]
    ours = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json")).encode_batch(texts)
    ref_batch = get_encoder("minilm-l6", device="cpu").collate(texts)
    assert ref_batch["input_ids"].shape == (3, 128)
    np.testing.assert_array_equal(np.array([t.ids for t in ours]), ref_batch["input_ids"].numpy())
    np.testing.assert_array_equal(
        np.array([t.attention_mask for t in ours]), ref_batch["attention_mask"].numpy()
    )
    assert not list(tmp_path.glob(".onnx.*"))  # no partial folder left behind

    # A photo-like input: not square (the crop matters), JPEG, in a folder of its own.
    image = tmp_path / "query.jpg"
    render(Scene("red", "circle", "large", "middle"), 224, random.Random(3)).resize((300, 240)).save(image)

    blocked = run_blocked("import torch", cwd=tmp_path)
    assert blocked.returncode != 0 and "torch is blocked" in blocked.stderr  # the blocker works
    res = run_blocked(readme_example(), str(out), str(image), *CAPTIONS, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = [line.split("  ", 1) for line in res.stdout.strip().splitlines()]
    got = {caption: float(score) for score, caption in rows}
    assert sorted(got) == sorted(CAPTIONS)

    pipe = lightcrl.load(tiny_run.out, device="cpu")
    ref = (pipe.encode_image([image], progress=False) @ pipe.encode_text(CAPTIONS, progress=False).T)[0]
    for caption, score in zip(CAPTIONS, ref):
        assert got[caption] == pytest.approx(float(score), abs=1e-3), (caption, got, ref)
    printed_scores = [float(s) for s, _ in rows]
    assert printed_scores == sorted(printed_scores, reverse=True)  # ranked: the same order as PyTorch's
    assert rows[0][1] == CAPTIONS[int(np.argmax(ref))]


@pytest.fixture
def audio_run(tmp_path):
    """A run over aisfx (audio) and toy-text: neither exports from raw inputs (no weights needed)."""
    import toy_encoders  # noqa: F401  (registers toy-text)
    from safetensors.torch import save_file

    from lightcrl.model import create_model

    model = create_model({"width": 16, "heads": 2, "ffn_dim": 32}, {"audio": 512, "text": 12})
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "model.json").write_text(
        json.dumps(
            {
                "model_config": model.cfg.model_dump(),
                "input_dims": model.input_dims,
                "encoders": {"audio": "aisfx", "text": "toy-text"},
            }
        )
    )
    return tmp_path


def test_audio_is_refused_with_its_reason(audio_run, tmp_path):
    with pytest.raises(
        LightCRLError,
        match="cannot export audio end to end: encoder aisfx has no ONNX path from raw inputs: .*librosa",
    ):
        export_full(audio_run, tmp_path / "a", modalities=["audio"])
    with pytest.raises(
        LightCRLError, match="nothing to export end to end: encoder aisfx .*; encoder toy-text"
    ):
        export_full(audio_run, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_full_export_never_overwrites_another_folder(audio_run, tmp_path):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    with pytest.raises(LightCRLError, match="is not a full export"):
        export_full(audio_run, keep)
    with pytest.raises(LightCRLError, match="writes a folder"):
        export_full(audio_run, tmp_path / "model.onnx")
    assert (keep / "notes.txt").read_text() == "precious"
