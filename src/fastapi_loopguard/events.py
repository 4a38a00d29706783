"""What a blocking event tells the user. Built on the loop thread from the engine's plain data.

Everything downstream of the engine reads this module and nothing upstream of it: the event, the
request it belongs to, the one list of kinds, the conversion from the engine's event, and the
original log line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._text import escape

if TYPE_CHECKING:
    from ._core import Event as NativeEvent

_NS_PER_MS = 1_000_000

# Every kind an event can have, in the order reports show them, with what it means in a few
# words: the engine's (classify.h, checked against it by the tests) and ``cumulative``. The
# report, its legend, the hints and the terminal read this.
KIND_MEANINGS = {
    "sleep": "time.sleep and friends",
    "io": "blocking reads, writes, connects",
    "cpu": "Python or native work",
    "lock": "a threading lock",
    "gil": "waiting for the GIL another thread holds",
    "native": "native code holding the GIL",
    "gc": "a garbage collection",
    "starved": "the OS did not schedule the loop thread",
    "cumulative": "many short steps of one request that added up",
    "unknown": "the evidence fits no other kind",
}
KINDS = tuple(KIND_MEANINGS)


@dataclass(frozen=True)
class Frame:
    """One Python frame of the loop thread, sampled while the loop was blocked."""

    filename: str
    lineno: int
    function: str

    def __str__(self) -> str:
        return f"{self.filename}:{self.lineno} in {self.function}"


@dataclass(frozen=True)
class BlockingEvent:
    """One stretch of blocking caused by one culprit.

    ``kind`` is one of ``sleep``, ``io``, ``cpu``, ``lock``, ``gil``, ``native``, ``gc``,
    ``starved`` or ``unknown`` (docs/architecture.md says how each is decided), or
    ``cumulative``: many steps of one request, each shorter than the threshold, that together
    reached ``cumulative_blocking_threshold_ms`` within ``cumulative_window_ms``; its
    ``duration_ms`` is their sum, ``samples`` their count, ``cpu_ms`` the part of it measured on
    the thread's CPU clock (steps after the request became suspect), and its
    stack shows where the request waited right after the last of them. ``stack`` runs from
    the outermost frame to the innermost; ``culprit`` is the innermost frame of application code
    (not the standard library, not site-packages, not this package, never the entry point such
    as the ``loopguard`` console script). When the stack holds no application code at all, the
    culprit is the innermost library frame instead and ``culprit_is_library`` is true.
    ``victims`` counts the *other* requests in flight while the loop was blocked; ``queued`` the
    client connections the kernel held for the server meanwhile, unread: accepted by the kernel
    but not yet by the server, or a new request on a kept-alive connection (TCP only, read from
    /proc on Linux; None when unknown). No request table can see those. ``task`` names
    what ran outside requests (the task's name and its coroutine, or ``(callback)``), and
    ``task_created_by`` who created that task, as far as its Context tells: the request
    (``GET /submit request_id=...``) or labelled unit (``lifespan.startup``) it was started in.
    For a ``lock`` wait, ``holder_stack`` (outermost frame first, like ``stack``) is the Python
    stack of the thread most likely holding what the loop waited for, read in the same sample:
    the owner of the pthread mutex it waited on, when glibc records one and the loop's own stack
    names nothing (then ``stack`` is that thread's too); otherwise the only other thread running
    application code, or failing any the only other thread running Python at all.
    ``holder_thread`` is its kernel thread id and ``holder_culprit`` its culprit line. They are
    empty when no thread could be singled out. For a ``gc`` wait, ``holder_thread`` is the
    thread that ran the collection when it was not the loop's (the loop waited for the GIL it
    held meanwhile), with no stack: a collection runs no Python.
    """

    duration_ms: float
    kind: str
    request_id: str | None
    method: str | None
    path: str | None
    route: str | None
    stack: tuple[Frame, ...]
    culprit: Frame | None
    cpu_ms: float
    victims: int
    started_at: float
    samples: int = 0
    stack_missing: bool = False
    hang: bool = False
    # Outside requests, what ran: "name (coroutine)" for an asyncio task, "(callback)" for a plain
    # callback; None inside a request (the request names it) or when no stack was taken.
    task: str | None = None
    culprit_is_library: bool = False
    task_created_by: str | None = None
    queued: int | None = None
    holder_thread: int | None = None
    holder_stack: tuple[Frame, ...] = ()
    holder_culprit: Frame | None = None


def culprit_text(event: BlockingEvent) -> str:
    """The culprit as log lines and pages show it, saying so when it is library code."""
    if event.culprit is None:
        return "<stack unavailable>" if event.stack_missing else "<no culprit>"
    return f"{event.culprit} (library code)" if event.culprit_is_library else str(event.culprit)


@dataclass(slots=True)
class RequestInfo:
    """What we know of one tracked request (or labelled unit of work)."""

    token: int
    request_id: str
    method: str | None
    path: str | None
    scope: dict[str, Any] | None = field(default=None, repr=False)
    # The request's trace span, taken at its start by the OpenTelemetry exporter: its events are
    # delivered after the stall, when that span is no longer current (or has ended).
    trace_span: Any = field(default=None, repr=False)
    # Events drained while the request was in flight (strict/warn modes show their culprits).
    events: list[BlockingEvent] | None = field(default=None, repr=False)
    # The route template, kept once the scope is let go (see release_scope).
    _route: str | None = field(default=None, repr=False)

    @property
    def route(self) -> str | None:
        if self.scope is None:
            return self._route
        route = self.scope.get("route")
        template = getattr(route, "path", None)
        return template if isinstance(template, str) else None

    def release_scope(self) -> None:
        """Keeps the route template and lets the scope go. Finished requests are kept for a
        while (an event drained after its request ended still names it), and a scope holds the
        whole request: thousands of them would cost tens of megabytes."""
        self._route = self.route
        self.scope = None


def from_native(
    raw: NativeEvent, info: RequestInfo | None, now_ns: int, wall: float, created_by: str | None
) -> BlockingEvent:
    """The engine's event as the user sees it; ``info`` is its request (None outside requests),
    ``now_ns``/``wall`` the engine's clock and the wall clock read together, ``created_by`` who
    created the task that ran outside requests (see ``LoopGuard``)."""
    frames = [Frame(f.filename, f.line, f.function) for f in raw.stack]
    culprit = frames[raw.culprit] if 0 <= raw.culprit < len(frames) else None
    held = [Frame(f.filename, f.line, f.function) for f in raw.holder_stack]
    holder = held[raw.holder_culprit] if 0 <= raw.holder_culprit < len(held) else None
    return BlockingEvent(
        duration_ms=raw.duration_ns / _NS_PER_MS,
        kind=raw.kind,
        request_id=info.request_id if info else None,
        method=info.method if info else None,
        path=info.path if info else None,
        route=info.route if info else None,
        stack=tuple(reversed(frames)),
        culprit=culprit,
        culprit_is_library=raw.culprit_is_library,
        cpu_ms=raw.cpu_ns / _NS_PER_MS,
        victims=raw.victims,
        queued=raw.queued if raw.queued >= 0 else None,
        started_at=wall - (now_ns - raw.start_ns) / 1e9,
        samples=raw.samples,
        stack_missing=raw.stack_missing,
        hang=raw.hang,
        task=(raw.task or None) if info is None else None,
        task_created_by=created_by if info is None else None,
        holder_thread=raw.holder_thread or None,
        holder_stack=tuple(reversed(held)),
        holder_culprit=holder,
    )


def format_event(event: BlockingEvent) -> str:
    """The original log line, then the details; every untrusted part escaped."""
    if event.method is not None or event.path is not None:
        head = (
            f"Event loop blocked for {event.duration_ms:.2f}ms during "
            f"{escape(event.method or '?')} {escape(event.path or '?')}"
        )
    elif event.request_id is not None:
        head = f"Event loop blocked for {event.duration_ms:.2f}ms during {escape(event.request_id)}"
    else:
        head = f"Event loop blocked for {event.duration_ms:.2f}ms (no active request)"
    details = [f"kind={event.kind}"]
    if event.task is not None:
        if event.task_created_by is not None:
            details.insert(0, f"created_by={escape(event.task_created_by, 300)}")
        details.insert(0, f"task={escape(event.task, 200)}")
    if event.route is not None:
        details.insert(0, f"route={escape(event.route)}")
    if event.hang:
        details.append("hang=true")
    if event.culprit is not None:
        details.append(f"culprit={escape(culprit_text(event), 400)}")
    elif event.stack_missing:
        details.append("culprit=<stack unavailable>")
    if event.holder_culprit is not None:
        details.append(f"holder={escape(str(event.holder_culprit), 400)}")
    if event.holder_thread is not None:
        details.append(f"holder_thread={event.holder_thread}")
    details.append(f"victims={event.victims}")
    if event.queued:
        details.append(f"queued={event.queued}")
    if event.request_id is not None and event.method is not None:
        details.append(f"request_id={escape(event.request_id)}")
    return f"{head} [{' '.join(details)}]"
