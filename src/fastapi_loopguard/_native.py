"""Loads the C++ engine, refusing interpreters it cannot watch safely.

A missing or broken extension (a wheel built for another Python, a truncated install) does not
make ``import fastapi_loopguard`` fail: an app that merely added the middleware must still
start and serve. ``load()`` then returns None and ``load_error()`` says why; the middleware
logs it once and stays out of the way, and ``LoopGuard.start`` raises it for direct users.

The extension is loaded on first use (a middleware built, a guard started), not when the package
is imported: the pytest plugin imports the package in every pytest session, and a session that
never asks for a guard must not pay for the engine (nor, in an editable install, for the rebuild
check that loading it triggers).
"""

from __future__ import annotations

import functools
import sysconfig
from typing import Any

if sysconfig.get_config_var("Py_GIL_DISABLED"):
    raise ImportError(
        "fastapi_loopguard does not support free-threaded Python (Py_GIL_DISABLED) yet: its "
        "sampler relies on the GIL to read the event-loop thread's frames safely."
    )


@functools.cache
def _load() -> tuple[Any, str | None]:
    # Only ever reached after the check above, so a free-threaded interpreter never loads it.
    try:
        import fastapi_loopguard._core as core
    except ImportError as error:
        return None, (
            f"fastapi_loopguard's native engine could not be loaded ({error}); the event loop "
            "is NOT being watched. Reinstall the package for this interpreter: "
            "pip install --force-reinstall fastapi-loopguard"
        )
    return core, None


def load() -> Any:
    """The extension module, loaded once; None if it cannot be (``load_error()`` says why)."""
    return _load()[0]


def load_error() -> str | None:
    """Why the extension could not be loaded, or None if it was (loads it if need be)."""
    return _load()[1]


__all__ = ["load", "load_error"]
