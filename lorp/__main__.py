"""``python -m lorp``: the engine's command line."""

import sys

from lorp.cli import main

sys.exit(main())
