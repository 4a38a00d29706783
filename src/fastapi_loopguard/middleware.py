"""LoopGuardMiddleware: a pure ASGI middleware (no BaseHTTPMiddleware, no extra task per request).

Per request it does three cheap things: tags the request's Context with a token the native
watchdog can read, adds dev-mode headers at ``http.response.start`` (and, in warn or strict
mode, names the culprit or replaces the response), and removes the tag at the end. Every guard
call is failsafe: if the guard breaks, the request is served without it. With Prometheus on, it
also answers ``metrics_path`` itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from types import CoroutineType
from typing import TYPE_CHECKING, Any

from . import _native, enforcement
from .config import LoopGuardConfig
from .events import RequestInfo
from .guard import LoopGuard
from .loops import UnsupportedLoop

if TYPE_CHECKING:
    from .report.live import Dashboard

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

if TYPE_CHECKING:
    from .exporters.otel import OTelExporter
    from .exporters.prometheus import PrometheusExporter

logger = logging.getLogger("fastapi_loopguard")
# Said once per process: an app on trio (anyio's other backend) is served, just not watched.
_unsupported_said = False


def _say_unsupported(error: UnsupportedLoop) -> None:
    global _unsupported_said
    if not _unsupported_said:
        _unsupported_said = True
        logger.warning("%s", error)


class LoopGuardMiddleware:
    """Detects event-loop blocking and attributes it to the request whose code caused it."""

    def __init__(self, app: ASGIApp, config: LoopGuardConfig | None = None) -> None:
        self.app = app
        self.config = config if config is not None else LoopGuardConfig()
        # Without its engine the guard can only get in the way: say so once, loudly, and pass
        # every request straight through.
        self._core = _native.load()
        self._available = self._core is not None
        if not self._available and self.config.enabled:
            logger.error("%s", _native.load_error())
        self.guard = LoopGuard(self.config)
        self._warned = False
        # How long a response start waits for its request's events (enforcement.settled). Bounded:
        # the watchdog hands an event over one tick after the loop came back. Strict and warn mode
        # must name the culprit, and may wait for it; dev headers alone wait a few ticks at most,
        # then show the live counters.
        interval = self.config.monitor_interval_ms / 1000
        naming = self.config.enforcement_mode != "log"
        self._settle_timeout = max(0.5, 10 * interval) if naming else 3 * interval
        self._prometheus: PrometheusExporter | None = None
        if self.config.prometheus_enabled:
            from .exporters.prometheus import PrometheusExporter

            self._prometheus = next(
                e for e in self.guard.exporters if isinstance(e, PrometheusExporter)
            )
        self._otel: OTelExporter | None = None
        if self.config.otel_enabled:
            from .exporters.otel import OTelExporter

            self._otel = next(e for e in self.guard.exporters if isinstance(e, OTelExporter))
        self._metrics_path = self.config.metrics_path if self._prometheus is not None else None
        self._headers = self.config.dev_mode or self.config.enforcement_mode != "log"
        self._dashboard: Dashboard | None = None
        if self.config.dashboard_path is not None:
            # Imported only when asked for: the page renderer is not needed otherwise.
            from .report.live import Dashboard

            self._dashboard = Dashboard(self.guard, self.config)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if not self.config.enabled or not self._available:
            await self.app(scope, receive, send)
        elif (
            kind == "http"
            and self._dashboard is not None
            and await self._dashboard.handle(scope, receive, send)
        ):
            return  # the live page, never tracked itself
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        elif kind == "http" and scope.get("path") == self._metrics_path:
            await self._serve_metrics(scope, send)
        elif kind in ("http", "websocket") and scope.get("path") not in self.config.exclude_paths:
            await self._tracked(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _failed(self, what: str) -> None:
        # Logged once with its traceback, then silently: a broken guard must not flood the log.
        if not self._warned:
            self._warned = True
            logger.exception("fastapi_loopguard: %s failed; serving without the guard", what)

    async def _tracked(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            method = "WEBSOCKET" if scope["type"] == "websocket" else scope.get("method", "?")
            info, var_token = self.guard.begin(
                # The incoming X-Request-ID when harmless, else a new id (http_headers.h).
                self._core.request_id(scope.get("headers")),
                method,
                scope.get("path"),
                dict_scope(scope),
            )
        except UnsupportedLoop as error:
            _say_unsupported(error)
            await self.app(scope, receive, send)
            return
        except Exception:
            self._failed("starting to track a request")
            await self.app(scope, receive, send)
            return
        try:
            if scope["type"] == "http":
                if self._otel is not None:
                    send = self._traced_send(info, send)
                if self._headers:
                    send = self._checked_send(scope, info, send)
            call = self.app(scope, receive, send)
            # A native coroutine (the exact type, not the ABC: checked on every request).
            if self.config.cumulative_blocking_enabled and type(call) is CoroutineType:
                await self.guard.timed(call, info)
            else:
                await call
        finally:
            try:
                self.guard.end(info, var_token)
            except Exception:
                self._failed("finishing a request")

    def _checked_send(self, scope: Scope, info: RequestInfo, send: Send) -> Send:
        replaced = False

        async def checked_send(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return  # strict mode answered already: the app's own response goes nowhere
            if message["type"] == "http.response.start":
                body = None
                try:
                    # The live counters, in one crossing: all a request that did not block needs.
                    count, total_ms, wait_ms = self.guard.delay_of(info)
                    if count:  # a request that blocked: its events are waited for
                        blocking = await enforcement.settled(
                            self.guard, info, count, total_ms, self._settle_timeout
                        )
                        count, total_ms = blocking.count, blocking.total_ms
                        replacement = self._enforce(scope, info, blocking)
                        if replacement is not None:
                            message, body = replacement
                    message = self._with_headers(message, info, count, total_ms, wait_ms)
                except Exception:
                    self._failed("checking the response start")
                if body is not None:
                    replaced = True
                    await send(message)
                    await send({"type": "http.response.body", "body": body})
                    return
            await send(message)

        return checked_send

    def _traced_send(self, info: RequestInfo, send: Send) -> Send:
        otel = self._otel
        assert otel is not None

        async def traced_send(message: Message) -> None:
            # Before the message goes out: the span of the instrumentation around us may end
            # as soon as it has (FastAPI's does), and the request's delay belongs on it.
            if message["type"] == "http.response.body" and not message.get("more_body"):
                try:
                    _, block_ms, wait_ms = self.guard.delay_of(info)
                    otel.annotate(info, wait_ms, block_ms)
                except Exception:
                    self._failed("tracing the response end")
            await send(message)

        return traced_send

    def _enforce(
        self, scope: Scope, info: RequestInfo, blocking: enforcement.Blocking
    ) -> tuple[Message, bytes] | None:
        """In warn/strict mode, for a request that blocked: the warning, or the 503 to send."""
        mode = self.config.enforcement_mode
        if mode == "log" or not blocking.count:
            return None
        if mode == "warn":
            logger.warning(enforcement.warning_text(info, blocking))
            return None
        accept = _header(scope, b"accept") or ""
        content_type, body = enforcement.teaching_response(info, blocking, accept)
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        return {"type": "http.response.start", "status": 503, "headers": headers}, body

    def _with_headers(
        self, message: Message, info: RequestInfo, count: int, total_ms: float, wait_ms: float
    ) -> Message:
        # The same numbers as the events and the page (enforcement.settled): the block this
        # request caused usually ended in this very loop iteration, and its event is waited for.
        # In dev mode a Server-Timing header too, which browsers' devtools show next to the
        # request: the time it was frozen by others' blocks, and the time its own code blocked
        # the loop. A header of its own, so an app's Server-Timing is left as it is (the values
        # list up). The list is built natively: every such response pays for it (see
        # http_headers.h).
        headers = self._core.with_guard_headers(
            message.get("headers"),
            info.request_id,
            count,
            total_ms,
            wait_ms if self.config.dev_mode else None,
        )
        return {**message, "headers": headers}

    async def _serve_metrics(self, scope: Scope, send: Send) -> None:
        assert self._prometheus is not None
        body, content_type = self._prometheus.render(_header(scope, b"accept"))
        headers = [(b"content-type", content_type.encode("latin-1"))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        startup: tuple[RequestInfo, Any] | None = None
        shutdown: tuple[RequestInfo, Any] | None = None

        async def receive_and_start() -> Message:
            nonlocal startup, shutdown
            message = await receive()
            if message["type"] == "lifespan.startup":
                # The app's startup code runs next, in this task: labelled, so its blocks name
                # it rather than "(no active request)".
                try:
                    startup = self.guard.begin("lifespan.startup")
                except UnsupportedLoop as error:
                    _say_unsupported(error)
                except Exception:
                    self._failed("starting the engine")
            elif message["type"] == "lifespan.shutdown" and self.guard.running:
                # The app's shutdown code runs next, in this task: tracked like a request, so
                # the watchdog is awake for it (an idle server is looked at once a second only)
                # and its blocks are named.
                try:
                    shutdown = self.guard.begin("lifespan.shutdown")
                except Exception:
                    self._failed("tracking the lifespan shutdown")
            return message

        async def send_and_stop(message: Message) -> None:
            nonlocal startup
            if startup is not None and message["type"].startswith("lifespan.startup."):
                try:
                    self.guard.end(*startup)
                except Exception:  # completed from another Context: the label just ends
                    self._failed("finishing the lifespan startup")
                startup = None
            await send(message)
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                if shutdown is not None:
                    try:
                        self.guard.end(*shutdown)
                    except Exception:  # completed from another Context: still stop below
                        self._failed("finishing the lifespan shutdown")
                try:
                    self.guard.stop()
                except Exception:
                    self._failed("stopping the engine")

        await self.app(scope, receive_and_start, send_and_stop)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return str(value.decode("latin-1"))
    return None


def dict_scope(scope: Scope) -> dict[str, Any] | None:
    return scope if isinstance(scope, dict) else None
