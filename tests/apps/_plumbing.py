"""The routes through which the tests read what a test app's guard saw.

Events are collected by ``on_blocking=events.append`` and served as dicts at ``/_events``; the
guard's own counters at ``/_stats``. Each app lists these paths in its ``exclude_paths``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import FastAPI

from fastapi_loopguard import BlockingEvent
from testkit.asgi import add_stats_route, find_middleware

__all__ = ["add_event_routes", "add_stats_route", "find_middleware"]


def add_event_routes(app: FastAPI, events: list[BlockingEvent], *, clear: bool = False) -> None:
    """``GET /_events``: ``events`` as dicts, oldest first; with ``clear``, also
    ``DELETE /_events``, which empties it."""

    @app.get("/_events")
    async def get_events() -> list[dict[str, Any]]:
        return [dataclasses.asdict(e) for e in events]

    if clear:

        @app.delete("/_events")
        async def clear_events() -> dict[str, bool]:
            events.clear()
            return {"ok": True}
