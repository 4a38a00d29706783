"""Log records for blocking events: the original text line, or one JSON object per event.

One endpoint that blocks on every request would otherwise write a line per request, so records
are rate-limited per source (the culprit's file and function): at most ``per_minute`` records per
source in any 60 s window; the others are counted, and the next record of that source says how
many were suppressed. Nothing is lost silently: counts still pending when the guard stops, or
when a source is evicted from the bounded table, are logged as a summary line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from .._text import MAX_PATH_CHARS, escape
from ..events import format_event
from ..hints import hint_for_event
from ..workers import identity
from .base import Exporter

if TYPE_CHECKING:
    from ..events import BlockingEvent, RequestInfo

logger = logging.getLogger("fastapi_loopguard")

WINDOW_S = 60.0
# Sources tracked at once; the least recently seen is evicted (with its summary) beyond this.
MAX_SOURCES = 1024


@dataclasses.dataclass
class _Source:
    window_start: float
    logged: int = 0
    suppressed: int = 0
    suppressed_since: float = 0.0


def source_of(event: BlockingEvent) -> str:
    """What "the same problem" means for dedup: the culprit's file and function."""
    if event.culprit is not None:
        return f"{event.culprit.filename}:{event.culprit.function}"
    return f"{event.kind} during {event.route or event.path or event.request_id or '-'}"


def event_fields(event: BlockingEvent) -> dict[str, Any]:
    """Every field of the event, as JSON-ready values, with untrusted text bounded in length.

    JSON's own escaping takes care of control characters; the path (client-chosen, never with
    its query string) is cut like in the text line so one request cannot flood the log.
    """
    fields = dataclasses.asdict(event)
    if event.path is not None and len(event.path) > MAX_PATH_CHARS:
        fields["path"] = event.path[:MAX_PATH_CHARS] + f"...(+{len(event.path) - MAX_PATH_CHARS})"
    return fields


class LoggingExporter(Exporter):
    """Writes one WARNING record per event to the ``fastapi_loopguard`` logger."""

    def __init__(self, log_format: str = "text", per_minute: int = 10) -> None:
        self.log_format = log_format
        self.per_minute = per_minute
        self._sources: OrderedDict[str, _Source] = OrderedDict()

    def export(self, event: BlockingEvent, info: RequestInfo | None) -> None:
        suppressed = self._admit(source_of(event), time.monotonic())
        if suppressed is None:
            return
        # The fix, read from the culprit's source after the stall (its cost: see hints/).
        hint = hint_for_event(event).fix
        if self.log_format == "json":
            # The process too: workers of one server log to one stream, like the event log.
            fields = {
                "message": "event loop blocked",
                **identity().fields(),
                **event_fields(event),
                "hint": hint,
            }
            if suppressed[0]:
                fields["suppressed"] = suppressed[0]
                fields["suppressed_in_s"] = suppressed[1]
            # ensure_ascii: every control and non-ASCII character leaves as a \u escape.
            text = json.dumps(fields, ensure_ascii=True, default=str)
        else:
            # The hint is the last of the line's "[...]" fields.
            text = format_event(event)
            field = f" hint={escape(hint, 400)}"
            text = text[:-1] + field + "]" if text.endswith("]") else text + field
            if suppressed[0]:
                text += f" (+{suppressed[0]} similar suppressed in the last {suppressed[1]} s)"
        logger.warning(text, extra={"loopguard": event})

    def _admit(self, key: str, now: float) -> tuple[int, int] | None:
        """None if this record is suppressed; else (count suppressed before it, over seconds)."""
        if self.per_minute == 0:
            return 0, 0
        source = self._sources.get(key)
        if source is None:
            source = self._sources[key] = _Source(now)
            if len(self._sources) > MAX_SOURCES:
                self._summarize(*self._sources.popitem(last=False), now)
        else:
            self._sources.move_to_end(key)
        if now - source.window_start >= WINDOW_S:
            source.window_start = now
            source.logged = 0
        if source.logged >= self.per_minute:
            if source.suppressed == 0:
                source.suppressed_since = now
            source.suppressed += 1
            return None
        source.logged += 1
        pending = (source.suppressed, round(now - source.suppressed_since))
        source.suppressed = 0
        return pending

    def _summarize(self, key: str, source: _Source, now: float) -> None:
        if source.suppressed:
            logger.warning(
                "fastapi_loopguard: %d similar blocking events from %s suppressed in the last %d s",
                source.suppressed,
                escape(key, 400),
                round(now - source.suppressed_since),
            )
            source.suppressed = 0

    def flush(self) -> None:
        now = time.monotonic()
        for key, source in self._sources.items():
            self._summarize(key, source, now)
