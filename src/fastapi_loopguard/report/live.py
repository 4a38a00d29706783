"""The live page: the report page, served by the middleware with the guard's own events.

Off unless ``dashboard_path`` is set. ``<path>/`` serves the page and ``<path>/data.json`` what
has changed since the page's last poll. Only loopback clients may see either, unless
``dashboard_token`` is set and the client sends it (``?token=`` or ``X-LoopGuard-Token``). A
refused request is not answered here at all: it goes on to the app, exactly as if there were no
dashboard, so nothing tells an outsider that one exists.

Rendering runs on the loop thread, like any handler, so it is kept small: each event's entry is
rendered once, when the event arrives, and so is its stack's share of the blocking profile (the
call tree is kept up to date as events come and go, instead of being rebuilt from all of them);
the charts and tables drawn from events are redrawn only when one has arrived; a poll with
nothing new costs only the statistics (well under a millisecond). Polls happen every two
seconds, and only while someone has the page open.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from ..config import LoopGuardConfig
from ..events import BlockingEvent
from ..guard import LoopGuard
from ..workers import identity
from .assets import content_security_policy
from .loading import normalize_event, normalize_stats
from .model import Event, Report
from .page import render
from .profile import Node
from .sections import EVENT_SECTIONS, MAX_LISTED_EVENTS, STATS_SECTIONS, event_html, sections

logger = logging.getLogger("fastapi_loopguard")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

POLL_INTERVAL_MS = 2000
_KEPT = 1000
TOKEN_HEADER = b"x-loopguard-token"


def is_loopback(scope: Scope) -> bool:
    client = scope.get("client")
    if not client:
        return False  # a Unix socket or an unknown peer: not provably local
    try:
        address = ipaddress.ip_address(str(client[0]))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class Dashboard:
    """Keeps the guard's recent events and answers the page and its data requests."""

    def __init__(self, guard: LoopGuard, config: LoopGuardConfig) -> None:
        assert config.dashboard_path is not None
        self.guard = guard
        self.path = config.dashboard_path
        self._token = config.dashboard_token.encode("ascii") if config.dashboard_token else None
        # (seq, event, its rendered entry), oldest first.
        self._events: deque[tuple[int, Event, str]] = deque(maxlen=_KEPT)
        self._seq = 0
        self._drawn: tuple[int, dict[str, str]] = (-1, {})  # event sections, as of a seq
        self._tree = Node(None)  # the call tree of the events kept
        guard.add_listener(self._on_event)

    def _on_event(self, event: BlockingEvent) -> None:
        normal = normalize_event({**dataclasses.asdict(event), **identity().fields()})
        if normal is not None:
            self._seq += 1
            if len(self._events) == self._events.maxlen:
                self._tree.add(self._events[0][1], sign=-1)  # about to drop out of the deque
            self._events.append((self._seq, normal, event_html(normal)))
            self._tree.add(normal)

    def target(self, path: str) -> str | None:
        if path in (self.path, self.path + "/"):
            return "page"
        if path == self.path + "/data.json":
            return "data"
        return None

    def allowed(self, scope: Scope) -> bool:
        if is_loopback(scope):
            return True
        if self._token is None:
            return False
        given = [v for k, v in scope.get("headers") or () if k == TOKEN_HEADER]
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given += [t.encode("latin-1", "replace") for t in query.get("token", [])]
        # Compare every candidate, in constant time each, so timing tells nothing.
        ok = False
        for candidate in given:
            ok |= hmac.compare_digest(candidate, self._token)
        return ok

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Serves the request if it is the dashboard's and the client may see it."""
        target = self.target(scope.get("path", ""))
        if target is None or not self.allowed(scope):
            return False
        if scope.get("method") != "GET":
            await _respond(send, 405, b"text/plain", b"Method Not Allowed", [(b"allow", b"GET")])
            return True
        try:
            if target == "page":
                status, ctype, body = 200, b"text/html; charset=utf-8", self.page().encode()
            else:
                since = _int(parse_qs(scope.get("query_string", b"").decode("latin-1")), "since")
                body = json.dumps(self.data(since)).encode()
                status, ctype = 200, b"application/json"
        except Exception:
            logger.exception("fastapi_loopguard: rendering the dashboard failed")
            status, ctype, body = 500, b"text/plain", b"dashboard error (see the server log)"
        await _respond(send, status, ctype, body)
        return True

    def report(self) -> Report:
        stats = self.guard.stats()
        normal = normalize_stats({**stats, **identity().fields()}) if stats else None
        return Report(
            events=[e for _, e, _ in self._events],
            stats=[normal] if normal is not None else [],
            source=f"live, process {os.getpid()}",
        )

    def page(self) -> str:
        return render(
            self.report(),
            title="fastapi-loopguard live",
            now=time.time(),
            live={"seq": self._seq, "interval_ms": POLL_INTERVAL_MS},
            events_html=[html for _, _, html in self._events],
            tree=self._tree,
        )

    def data(self, since: int) -> dict[str, Any]:
        """Sections to replace, and the entries of events the page has not seen, oldest first."""
        report = self.report()
        reset = since > self._seq  # the server restarted under an open page
        parts = sections(report, ids=STATS_SECTIONS)
        if reset or since < self._seq:
            if self._drawn[0] != self._seq:
                self._drawn = (
                    self._seq,
                    sections(report, time.time(), EVENT_SECTIONS, tree=self._tree),
                )
            parts.update(self._drawn[1])
        fresh = [html for seq, _, html in self._events if reset or seq > since]
        return {
            "seq": self._seq,
            "reset": reset,
            "sections": parts,
            "events": fresh[-MAX_LISTED_EVENTS:],
        }


def _int(query: dict[str, list[str]], name: str) -> int:
    try:
        return max(0, int(query.get(name, ["0"])[0]))
    except ValueError:
        return 0


async def _respond(
    send: Send,
    status: int,
    content_type: bytes,
    body: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (
            b"content-security-policy",
            (content_security_policy(live=True) + "; frame-ancestors 'none'").encode(),
        ),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
