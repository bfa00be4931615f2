"""Where lightcrl keeps things: the store cache and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the implicit feature-store cache: ``$LIGHTCRL_CACHE`` or ``~/.cache/lightcrl``."""
    root = os.environ.get("LIGHTCRL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lightcrl")
    return Path(root)


def data_root() -> Path:
    """Real datasets for tests and benchmarks: ``$LIGHTCRL_DATA`` or ``../shared/data`` beside the repo."""
    env = os.environ.get("LIGHTCRL_DATA")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    return (repo.parent / "shared" / "data").resolve()
