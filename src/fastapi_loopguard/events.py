"""What a blocking event tells the user. Built on the loop thread from the engine's plain data."""

from __future__ import annotations

from dataclasses import dataclass

# Every kind an event can have, in the order reports show them: the engine's (classify.h, checked
# against it by the tests) and ``cumulative``. The report, the hints and the terminal read this.
KINDS = ("sleep", "io", "cpu", "lock", "gil", "native", "gc", "starved", "cumulative", "unknown")


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
    empty when no thread could be singled out.
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
