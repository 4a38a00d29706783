"""``python -m fastapi_loopguard.demo``: the same as ``loopguard demo``."""

import sys

from ..cli import main

sys.exit(main(["demo", *sys.argv[1:]]))
