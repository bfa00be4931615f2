"""`lightcrl` CLI with the toy encoders registered (for subprocess and torchrun tests)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import toy_encoders  # noqa: E402,F401

from lightcrl.app.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
