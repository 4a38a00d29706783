"""Reaching into an ASGI app without a server: a request's scope, the guard's middleware.

Nothing here imports the framework or the guard at import time: benchmarks/instr.py imports this
module in its parent process too, and in its child it decides itself when those imports happen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from fastapi_loopguard import LoopGuardMiddleware


def http_scope(path: str, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    """A new HTTP scope for a GET of ``path``, as a server builds one per request (Starlette
    writes into it, so never share one between requests)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "query_string": b"",
        "root_path": "",
        "headers": headers or [],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
    }


def find_middleware(app: Any) -> LoopGuardMiddleware | None:
    """The LoopGuardMiddleware instance in ``app``'s middleware stack, or None: for a bare app,
    and before Starlette built the stack (at the lifespan's or the first request's call)."""
    from fastapi_loopguard import LoopGuardMiddleware

    stack: Any = app.middleware_stack
    while stack is not None and not isinstance(stack, LoopGuardMiddleware):
        stack = getattr(stack, "app", None)
    return stack


def add_stats_route(app: FastAPI) -> None:
    """``GET /_stats``: the guard's ``stats()``, or ``{}`` while there is no guard to ask."""

    @app.get("/_stats")
    async def stats() -> dict[str, Any]:
        middleware = find_middleware(app)
        return middleware.guard.stats() if middleware is not None else {}
