"""The units a guard attributes blocks to, by the engine's token: requests and labelled work.

In flight, and for a while after they end: an event is delivered after its stall, often after
the request it names has finished. The lifespan startup is kept for the life of the app, since
the tasks it started (queue workers) still say it created them long after it left the recent.
"""

from __future__ import annotations

from collections import OrderedDict

from .events import RequestInfo

# Finished units kept so that an event drained after its request ended still names it.
RECENT = 4096


class Units:
    def __init__(self) -> None:
        self.inflight: dict[int, RequestInfo] = {}
        self._recent: OrderedDict[int, RequestInfo] = OrderedDict()
        self._startup: RequestInfo | None = None

    def finish(self, info: RequestInfo) -> None:
        """``info`` has ended: kept among the recent, without its scope."""
        self.inflight.pop(info.token, None)
        info.release_scope()
        self._recent[info.token] = info
        if len(self._recent) > RECENT:
            self._recent.popitem(last=False)
        if info.method is None and info.request_id == "lifespan.startup":
            self._startup = info

    def find(self, token: int) -> RequestInfo | None:
        """The unit of ``token``, in flight or recently ended."""
        return self.inflight.get(token) or self._recent.get(token)

    def created_by(self, origin: int) -> str | None:
        """The unit a task outside requests inherited its Context from: the one that created it."""
        if not origin:
            return None
        unit = self.find(origin)
        if unit is None and self._startup is not None and self._startup.token == origin:
            unit = self._startup
        if unit is None:
            return None
        if unit.method is None:
            return unit.request_id  # a label: lifespan.startup, or the name given to label()
        return f"{unit.method} {unit.path or '?'} request_id={unit.request_id}"
