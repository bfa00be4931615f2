"""Shared fixtures: one feature-store cache per test session, real-data location, tiny datasets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # toy_encoders

import toy_encoders  # noqa: E402,F401  (registers toy-image / toy-text)

from lightcrl.paths import data_root  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Every test shares one store cache, so real-data stores are extracted once per session."""
    old = os.environ.get("LIGHTCRL_CACHE")
    os.environ["LIGHTCRL_CACHE"] = str(tmp_path_factory.mktemp("lightcrl-cache"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield
    if old is None:
        os.environ.pop("LIGHTCRL_CACHE", None)
    else:
        os.environ["LIGHTCRL_CACHE"] = old


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_root()
    if not (root / "flickr8k").is_dir():
        pytest.skip(f"real data not found at {root}")
    return root


@pytest.fixture(scope="session")
def flickr_spec(shared_data) -> str:
    return f"flickr8k:{shared_data / 'flickr8k'}"


COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 30)}


def make_pairs_csv(root: Path, n: int = 40, seed: int = 0) -> str:
    """A tiny csv: pairs dataset of solid-colour images with captions naming the colour."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = ["filepath,title"]
    names = list(COLORS)
    for i in range(n):
        c = names[i % len(names)]
        rgb = np.clip(np.array(COLORS[c]) + rng.integers(-20, 20, 3), 0, 255).astype(np.uint8)
        Image.fromarray(np.tile(rgb, (16, 16, 1))).save(root / f"img{i:03d}.png")
        rows.append(f"img{i:03d}.png,a {c} square number {i % 7}")
        rows.append(f"img{i:03d}.png,something {c}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return f"csv:{root / 'pairs.csv'}"


@pytest.fixture
def pairs_csv(tmp_path) -> str:
    return make_pairs_csv(tmp_path / "pairs")
