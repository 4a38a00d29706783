"""Which event loop runs the calling code: the guard watches asyncio and uvloop only."""

from __future__ import annotations

import asyncio
import sys


def running_asyncio_loop() -> asyncio.AbstractEventLoop:
    """The running asyncio (or uvloop) loop, or UnsupportedLoop naming what runs instead."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise UnsupportedLoop(async_library()) from None


def async_library() -> str:
    """What runs this code when it is not asyncio: trio under anyio, for instance.

    Asked of trio itself, and only when it is already imported (nothing is imported for this):
    sniffio, which anyio used for the same question, is no longer always installed.
    """
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_trio_token()
            return "trio"
        except Exception:  # not inside trio's run
            pass
    return "no asyncio event loop"


class UnsupportedLoop(RuntimeError):
    """Raised by ``LoopGuard.start`` off an asyncio loop: the engine watches asyncio and uvloop."""

    def __init__(self, library: str) -> None:
        super().__init__(
            f"fastapi_loopguard watches asyncio and uvloop loops; this app runs on {library}, "
            "so it is served unguarded"
        )
        self.library = library
