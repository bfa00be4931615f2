"""Entry point for torchrun tests: train the toy config given as JSON (argv[1]) into argv[2]."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import toy_encoders  # noqa: E402,F401

from lightcrl.app.config import validate_config  # noqa: E402
from lightcrl.app.train import train  # noqa: E402

if __name__ == "__main__":
    cfg = validate_config(json.loads(Path(sys.argv[1]).read_text()))
    train(cfg, sys.argv[2])
