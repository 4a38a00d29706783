"""LoopGuardConfig: every documented option, with its name and default, validated.

A wrong value raises ``ValueError`` naming the option and what it accepts, at construction time,
so a typo fails on deploy rather than silently switching monitoring off.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .events import BlockingEvent

DEFAULT_EXCLUDE_PATHS: frozenset[str] = frozenset({"/health", "/healthz", "/ready", "/metrics"})
LOG_FORMATS = ("text", "json")
ENFORCEMENT_MODES = ("log", "warn", "strict")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _check_number(
    name: str, value: object, low: float, high: float, *, integer: bool = False
) -> None:
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type:
        raise ValueError(f"{name} must be {kind} in [{low:g}, {high:g}], got {value!r}")
    assert isinstance(value, int | float)
    if math.isnan(value) or not low <= value <= high:
        raise ValueError(f"{name} must be {kind} in [{low:g}, {high:g}], got {value!r}")


@dataclass(frozen=True)
class LoopGuardConfig:
    """Configuration of the guard. Defaults are the documented ones."""

    enabled: bool = True
    monitor_interval_ms: float = 10
    threshold_multiplier: float = 5
    dev_mode: bool = False
    log_blocking_events: bool = True
    prometheus_enabled: bool = False
    exclude_paths: frozenset[str] = field(default_factory=lambda: DEFAULT_EXCLUDE_PATHS)
    adaptive_threshold: bool = False
    adaptive_window_size: int = 1000
    adaptive_percentile: float = 0.95
    adaptive_min_samples: int = 100
    adaptive_update_interval_ms: float = 1000
    fallback_threshold_ms: float = 50.0
    calibration_iterations: int = 10
    on_blocking: Callable[[BlockingEvent], Any] | None = None
    capture_stacks: bool = True
    hang_threshold_ms: float = 1000
    # Many short blocks of one request, each below the threshold: reported once they add up to
    # cumulative_blocking_threshold_ms within cumulative_window_ms.
    cumulative_blocking_enabled: bool = True
    cumulative_blocking_threshold_ms: float = 200
    cumulative_window_ms: float = 1000
    # None: prometheus_client's global REGISTRY.
    prometheus_registry: Any = None
    metrics_path: str | None = "/metrics"
    log_format: str = "text"
    # Log records per culprit (file + function) per minute; the rest are counted, not logged.
    log_rate_limit_per_minute: int = 10
    enforcement_mode: str = "log"
    otel_enabled: bool = False
    event_log_path: str | None = None
    dashboard_path: str | None = None
    # A secret: kept out of repr() so it never lands in a log line or a traceback.
    dashboard_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in (
            "enabled",
            "dev_mode",
            "log_blocking_events",
            "prometheus_enabled",
            "adaptive_threshold",
            "capture_stacks",
            "otel_enabled",
            "cumulative_blocking_enabled",
        ):
            _check_bool(name, getattr(self, name))
        _check_number("monitor_interval_ms", self.monitor_interval_ms, 1, 1000)
        _check_number("threshold_multiplier", self.threshold_multiplier, 1, 1000)
        _check_number(
            "adaptive_window_size", self.adaptive_window_size, 10, 1_000_000, integer=True
        )
        _check_number("adaptive_percentile", self.adaptive_percentile, 0.5, 0.99)
        _check_number(
            "adaptive_min_samples",
            self.adaptive_min_samples,
            1,
            self.adaptive_window_size,
            integer=True,
        )
        _check_number(
            "adaptive_update_interval_ms", self.adaptive_update_interval_ms, 10, 3_600_000
        )
        _check_number("fallback_threshold_ms", self.fallback_threshold_ms, 1, 3_600_000)
        _check_number(
            "calibration_iterations", self.calibration_iterations, 0, 10_000, integer=True
        )
        _check_number("hang_threshold_ms", self.hang_threshold_ms, 0, 3_600_000)
        _check_number("cumulative_window_ms", self.cumulative_window_ms, 10, 3_600_000)
        # More blocking than the window is long cannot happen within it.
        _check_number(
            "cumulative_blocking_threshold_ms",
            self.cumulative_blocking_threshold_ms,
            1,
            self.cumulative_window_ms,
        )
        if self.on_blocking is not None and not callable(self.on_blocking):
            raise ValueError(f"on_blocking must be a callable or None, got {self.on_blocking!r}")
        object.__setattr__(self, "exclude_paths", _paths("exclude_paths", self.exclude_paths))
        if self.prometheus_registry is not None and not callable(
            getattr(self.prometheus_registry, "register", None)
        ):
            raise ValueError(
                "prometheus_registry must be a prometheus_client CollectorRegistry or None, "
                f"got {self.prometheus_registry!r}"
            )
        object.__setattr__(
            self, "event_log_path", _file_path("event_log_path", self.event_log_path)
        )
        _check_dashboard(self.dashboard_path, self.dashboard_token)
        if self.metrics_path is not None and (
            not isinstance(self.metrics_path, str) or not self.metrics_path.startswith("/")
        ):
            raise ValueError(
                f"metrics_path must be a path starting with '/' or None, got {self.metrics_path!r}"
            )
        _check_choice("log_format", self.log_format, LOG_FORMATS)
        _check_number(
            "log_rate_limit_per_minute", self.log_rate_limit_per_minute, 0, 100_000, integer=True
        )
        _check_choice("enforcement_mode", self.enforcement_mode, ENFORCEMENT_MODES)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices or not isinstance(value, str):
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _paths(name: str, value: object) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a set of paths starting with '/', got {value!r}")
    paths = frozenset(value)
    for path in paths:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"{name} must be a set of paths starting with '/', got {path!r}")
    return paths


def _file_path(name: str, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str | os.PathLike):
        path = os.fspath(value)
        if isinstance(path, str) and path and "\0" not in path:
            return path
    raise ValueError(f"{name} must be None or a non-empty file path, got {value!r}")


# A URL path of plain segments: the dashboard is matched by exact comparison, so anything that a
# proxy or the ASGI server might normalise differently (dots, percent-escapes, query) is refused.
_DASHBOARD_PATH = re.compile(r"(/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)+")
# Long enough that guessing is hopeless; URL-safe so it survives a query string or a header as is.
_TOKEN = re.compile(r"[A-Za-z0-9._~-]{16,256}")


def _check_dashboard(path: object, token: object) -> None:
    if path is not None and not (isinstance(path, str) and _DASHBOARD_PATH.fullmatch(path)):
        raise ValueError(
            "dashboard_path must be None or a path like '/_loopguard' (segments of letters, "
            f"digits and ._~-, no trailing '/'), got {path!r}"
        )
    if token is None:
        return
    if not (isinstance(token, str) and _TOKEN.fullmatch(token)):
        # The value itself is a secret: never echo it into an error message or a log.
        raise ValueError(
            "dashboard_token must be None or 16 to 256 characters of A-Z a-z 0-9 . _ ~ - "
            "(secrets.token_urlsafe() makes one)"
        )
    if path is None:
        raise ValueError(
            "dashboard_token is set but dashboard_path is None: there is no dashboard to guard"
        )
