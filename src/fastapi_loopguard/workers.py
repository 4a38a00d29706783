"""Which worker of which host an event came from: for reports that merge several processes' logs.

Every event record carries ``pid``, ``host`` (``socket.gethostname()``) and ``worker``, the
worker's index when one is known:

- ``LOOPGUARD_WORKER`` in the environment, for servers that can set one per worker (gunicorn's
  ``post_fork`` hook, a systemd template unit, a container's replica index);
- otherwise, in a process started by ``multiprocessing`` (uvicorn ``--workers``, and so
  ``loopguard run --workers``), its ordinal among its parent's children, the ``N`` of its
  documented ``SpawnProcess-N`` name;
- otherwise ``None`` (a single process; gunicorn without the hook): the pid tells them apart.

A pid alone is not enough to merge logs: two hosts reuse pids, and a restarted worker gets a new
one. Read once per process (a fork re-reads it), since the hostname costs a system call.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import socket
from dataclasses import dataclass

WORKER_VARIABLE = "LOOPGUARD_WORKER"
_MAX = 64  # characters kept of a worker name or hostname: they go into logs and labels


@dataclass(frozen=True)
class Identity:
    pid: int
    host: str
    worker: str | None

    def fields(self) -> dict[str, int | str | None]:
        """The record fields: ``pid``, ``host``, ``worker``."""
        return {"pid": self.pid, "host": self.host, "worker": self.worker}

    @property
    def label(self) -> str:
        """A metric label value: the worker index, else the pid."""
        return self.worker if self.worker is not None else str(self.pid)


_cached: Identity | None = None


def identity() -> Identity:
    global _cached
    pid = os.getpid()
    if _cached is None or _cached.pid != pid:
        _cached = Identity(pid, socket.gethostname()[:_MAX], _worker())
    return _cached


def _worker() -> str | None:
    value = os.environ.get(WORKER_VARIABLE, "").strip()
    if value:
        return value[:_MAX]
    if multiprocessing.parent_process() is None:
        return None
    match = re.search(r"-(\d+(?::\d+)*)$", multiprocessing.current_process().name)
    return match.group(1) if match else None
