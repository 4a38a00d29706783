"""Loads the C++ engine, refusing interpreters it cannot watch safely.

A missing or broken extension (a wheel built for another Python, a truncated install) does not
make ``import fastapi_loopguard`` fail: an app that merely added the middleware must still
start and serve. ``_core`` is then None and ``LOAD_ERROR`` says why; the middleware logs it once
and stays out of the way, and ``LoopGuard.start`` raises it for direct users.
"""

from __future__ import annotations

import sysconfig
from typing import Any

if sysconfig.get_config_var("Py_GIL_DISABLED"):
    raise ImportError(
        "fastapi_loopguard does not support free-threaded Python (Py_GIL_DISABLED) yet: its "
        "sampler relies on the GIL to read the event-loop thread's frames safely."
    )

_core: Any
LOAD_ERROR: str | None = None

# Imported only after the check above, so a free-threaded interpreter never loads it.
try:
    import fastapi_loopguard._core as _core
except ImportError as error:
    _core = None
    LOAD_ERROR = (
        f"fastapi_loopguard's native engine could not be loaded ({error}); the event loop is "
        "NOT being watched. Reinstall the package for this interpreter: "
        "pip install --force-reinstall fastapi-loopguard"
    )

__all__ = ["LOAD_ERROR", "_core"]
