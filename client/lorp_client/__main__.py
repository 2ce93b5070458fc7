"""``python -m lorp_client submit ...``: the ``lorp jobs`` commands."""

import sys

from lorp_client.cli import main

sys.exit(main())
