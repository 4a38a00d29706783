"""What a blocking event tells the user. Built on the loop thread from the engine's plain data."""

from __future__ import annotations

from dataclasses import dataclass


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
    ``starved`` or ``unknown`` (docs/architecture.md says how each is decided). ``stack`` runs from
    the outermost frame to the innermost; ``culprit`` is the innermost frame of application code
    (not the standard library, not site-packages, not this package). ``victims`` counts the
    *other* requests in flight while the loop was blocked.
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
