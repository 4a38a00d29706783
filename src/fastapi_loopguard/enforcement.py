"""Warn and strict modes: telling the developer, at the request itself, which line blocked.

``warn`` logs one prominent record per guilty request naming the culprit line and the fix.
``strict`` (development and CI) replaces the guilty request's response with a 503 page that
teaches the fix: HTML for browsers, JSON for everything else. The fix comes from ``hints``, for the
call that blocked when it is a known one, else for the kind. Everything shown is escaped: the
path comes from the client, the fix may quote the culprit line's source.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._text import escape
from .events import BlockingEvent, culprit_text
from .hints import hint_for_event

if TYPE_CHECKING:
    from .events import RequestInfo
    from .guard import LoopGuard

PENDING = "culprit pending (the event was not delivered in time; see the log)"


@dataclass(frozen=True)
class Blocking:
    """What one request's own code blocked so far, as headers, warnings and the page show it."""

    count: int
    total_ms: float
    events: list[BlockingEvent] = field(default_factory=list)

    @property
    def pending(self) -> bool:
        return len(self.events) < self.count


async def settled(
    guard: LoopGuard, info: RequestInfo, count: int, total_ms: float, timeout: float
) -> Blocking:
    """The blocks of a request that blocked, at response start, in the numbers its events and log
    lines give. ``count`` and ``total_ms`` are the live counters (``delay_of``), read first: a
    request that did not block (nearly all) has no reason to come here.

    The watchdog's live counters know of a block during the stall, but with its length as of the
    last sample; the event, with the final length, is delivered one watchdog tick after the loop
    came back. Reading the counters at response start gave a page saying 297.5 ms for a 300.4 ms
    event. So a request that blocked waits here (bounded, yielding to the loop) for its events,
    and everything shown is their count and sum; only if they do not all come in time are the
    counters shown, and the culprit marked pending.
    """
    events = await guard.wait_for_events(info, count, timeout)
    if len(events) >= count:
        return Blocking(len(events), sum(e.duration_ms for e in events), events)
    return Blocking(count, total_ms, events)


def _culprit(event: BlockingEvent) -> str:
    if event.culprit is not None:
        return escape(culprit_text(event), 400)
    return "<stack unavailable>"


def _blocks(events: list[BlockingEvent]) -> list[dict[str, Any]]:
    # Durations unrounded: each view formats them once, as it formats the total, so that a block
    # and the total never disagree through a second rounding.
    blocks = []
    for e in events:
        hint = hint_for_event(e)
        code, why = escape(hint.fix, 400), escape(hint.note, 400)
        blocks.append(
            {
                "kind": e.kind,
                "duration_ms": e.duration_ms,
                "culprit": _culprit(e),
                "fix": f"{code}  ({why})",  # the rewrite and why, on one line
                "fix_code": code,
                "fix_why": why,
                "call": hint.call,  # the blocking call recognised; None: a fix by its kind
            }
        )
    return blocks


def warning_text(info: RequestInfo, blocking: Blocking) -> str:
    """One prominent log record for a guilty request: every culprit line and its fix."""
    what = f"{escape(info.method or '?')} {escape(info.path or '?')}"
    lines = [
        f"!!! LOOPGUARD: {what} blocked the event loop {blocking.count} time(s), "
        f"{blocking.total_ms:.1f} ms in total (request_id={escape(info.request_id)})"
    ]
    for block in _blocks(blocking.events):
        lines.append(
            f"!!!   {block['duration_ms']:.1f} ms {block['kind']} at {block['culprit']}"
            f" -- fix: {block['fix']}"
        )
    if blocking.pending:
        lines.append(f"!!!   {PENDING}")
    # One record on one line: a log shipper must not split it, and no part is raw.
    return " | ".join(lines)


def teaching_response(info: RequestInfo, blocking: Blocking, accept: str) -> tuple[bytes, bytes]:
    """The strict-mode 503: (content type, body)."""
    blocks = _blocks(blocking.events)
    count, total_ms, pending = blocking.count, blocking.total_ms, blocking.pending
    if "text/html" in accept:
        return b"text/html; charset=utf-8", _html(info, blocks, count, total_ms, pending)
    for block in blocks:
        block["duration_ms"] = round(block["duration_ms"], 2)
    document = {
        "error": "event_loop_blocked",
        "detail": (
            "This request's own code blocked the event loop before its response started; "
            "loopguard strict mode replaced the response."
        ),
        "request_id": info.request_id,
        "method": escape(info.method or "?"),
        "path": escape(info.path or "?"),
        "count": count,
        "total_ms": round(total_ms, 2),
        "blocks": blocks,
    }
    if pending:
        document["pending"] = PENDING
    return b"application/json", json.dumps(document, ensure_ascii=True).encode("ascii")


def _html(
    info: RequestInfo, blocks: list[dict[str, Any]], count: int, total_ms: float, pending: bool
) -> bytes:
    e = html.escape
    items = "".join(
        f"<li><p><strong>{e(b['kind'])}</strong>, {b['duration_ms']:.1f} ms at "
        f"<code>{e(b['culprit'])}</code></p><p>How to fix: <code>{e(b['fix_code'])}</code> "
        f"({e(b['fix_why'])})</p></li>"
        for b in blocks
    )
    if pending:
        items += f"<li><p>{e(PENDING)}</p></li>"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>503 - event loop blocked</title>
<style>body{{font-family:sans-serif;max-width:50em;margin:2em auto;line-height:1.4}}
code{{background:#f3f3f3;padding:0 .2em}}li{{margin-bottom:1em}}</style></head>
<body><h1>This request blocked the event loop</h1>
<p><code>{e(escape(info.method or "?"))} {e(escape(info.path or "?"))}</code> ran blocking code
on the event loop {count} time(s), {total_ms:.1f} ms in total, before its response started.
While it did, every other request served by this process was frozen.</p>
<ol>{items}</ol>
<p>fastapi-loopguard is in <code>enforcement_mode="strict"</code>, which replaces such responses
with this page. Request id: <code>{e(info.request_id)}</code>.</p></body></html>
"""
    return page.encode("utf-8")
