import sys

from lightcrl.app.cli import main

sys.exit(main())
