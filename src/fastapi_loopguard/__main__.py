"""``python -m fastapi_loopguard``: the ``loopguard`` command, for when scripts are not on PATH."""

import sys

from .cli import main

sys.exit(main())
