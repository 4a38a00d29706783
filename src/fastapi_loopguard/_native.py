"""Loads the C++ engine, refusing interpreters it cannot watch safely."""

from __future__ import annotations

import sysconfig

if sysconfig.get_config_var("Py_GIL_DISABLED"):
    raise ImportError(
        "fastapi_loopguard does not support free-threaded Python (Py_GIL_DISABLED) yet: its "
        "sampler relies on the GIL to read the event-loop thread's frames safely."
    )

# Imported only after the check above, so a free-threaded interpreter never loads it.
import fastapi_loopguard._core as _core

__all__ = ["_core"]
