"""The event log: every blocking event appended to a file as one JSON line.

``LoopGuardConfig(event_log_path=...)`` turns it on; ``loopguard report`` turns such a file into
the HTML report. Records are JSON objects with a ``type``:

- ``event``: the fields of one ``BlockingEvent`` (``stack`` and ``culprit`` as objects with
  ``filename``, ``lineno`` and ``function``), plus ``pid``, ``host`` and ``worker`` (see
  ``workers.py``), so logs of several workers and hosts can be merged;
- ``request``: a request (not labelled work) that ended after waiting or blocking:
  ``request_id``, ``method``, ``path``, ``route``, ``wait_ms`` (how long blocks that others
  caused froze it), ``block_ms`` and ``blocks`` (what its own code did), ``time``, and ``pid``,
  ``host``, ``worker``. Requests that neither waited nor blocked are not written (one write per
  request would be a cost on every request), so a report's percentiles of these are over the
  delayed requests only;
- ``stats``: ``LoopGuard.stats()`` when a guard stops (loop-lag percentiles, counters), plus
  ``pid``, ``host``, ``worker``, ``time`` and ``event_log_lost`` (events this process could not
  write).

Why one unbuffered ``write(2)`` per record, on the loop thread: events come after stalls, a few a
second at most, and a write of a couple of KiB to the page cache costs microseconds, which is
nothing next to the stall it records. A buffer would lose exactly the events one wants most when
the process is killed after a bad stall. The file is opened with ``O_APPEND``, so the workers of a
multi-process server can share one log: each record lands whole at the end of the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from .events import BlockingEvent
from .workers import identity

if TYPE_CHECKING:
    from .events import RequestInfo

logger = logging.getLogger("fastapi_loopguard")


class EventLog:
    """Appends records to one file. Never raises: a failing disk must not break the app."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.written = 0
        self.lost = 0
        self._fd: int | None = None
        self._failing = False

    def write_event(self, event: BlockingEvent) -> None:
        """The guard's listener: one ``event`` record."""
        self._append({"type": "event", **identity().fields(), **dataclasses.asdict(event)}, True)

    def write_request(
        self, info: RequestInfo, wait_ms: float, block_ms: float, blocks: int
    ) -> None:
        """One ``request`` record, for a request that ended after waiting or blocking."""
        record = {
            "type": "request",
            **identity().fields(),
            "request_id": info.request_id,
            "method": info.method,
            "path": info.path,
            "route": info.route,
            "wait_ms": wait_ms,
            "block_ms": block_ms,
            "blocks": blocks,
            "time": time.time(),
        }
        self._append(record, False)

    def write_stats(self, stats: dict[str, float | int]) -> None:
        """One ``stats`` record; called when the guard stops, then the file is closed."""
        record = {"type": "stats", **identity().fields(), "time": time.time(), **stats}
        record["event_log_lost"] = self.lost
        self._append(record, False)
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    def _append(self, record: dict[str, Any], is_event: bool) -> None:
        try:
            # ensure_ascii: request paths may hold any character; the log stays plain ASCII.
            data = (json.dumps(record, ensure_ascii=True, default=str) + "\n").encode("ascii")
            if self._fd is None:
                self._fd = os.open(
                    self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644
                )
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except Exception as exc:
            if is_event:
                self.lost += 1
            # Said once per failing streak, with the reason; the count of lost events goes to
            # the stats record and to the log line when writing works again.
            if not self._failing:
                self._failing = True
                logger.error(
                    "fastapi_loopguard: cannot write the event log %r (%s); events are counted "
                    "as lost until it works again",
                    self.path,
                    exc,
                )
            self.close()  # reopen next time: the file may have been moved or the disk freed
            return
        if is_event:
            self.written += 1
        if self._failing:
            self._failing = False
            logger.warning(
                "fastapi_loopguard: the event log %r works again; %d events were lost",
                self.path,
                self.lost,
            )
