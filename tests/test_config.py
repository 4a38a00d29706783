"""LoopGuardConfig: the seed's names and defaults, and a clear ValueError for every bad value."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from fastapi_loopguard import LoopGuardConfig

SEED_DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "monitor_interval_ms": 10,
    "threshold_multiplier": 5,
    "dev_mode": False,
    "log_blocking_events": True,
    "prometheus_enabled": False,
    "exclude_paths": {"/health", "/healthz", "/ready", "/metrics"},
    "adaptive_threshold": False,
    "adaptive_window_size": 1000,
    "adaptive_percentile": 0.95,
    "adaptive_min_samples": 100,
    "adaptive_update_interval_ms": 1000,
    "fallback_threshold_ms": 50.0,
    "calibration_iterations": 10,
    "on_blocking": None,
    "capture_stacks": True,
}


# Options this package adds beyond the seed's tables.
ADDED_DEFAULTS: dict[str, Any] = {
    "hang_threshold_ms": 1000,
    "prometheus_registry": None,
    "metrics_path": "/metrics",
    "log_format": "text",
    "log_rate_limit_per_minute": 10,
    "enforcement_mode": "log",
    "otel_enabled": False,
    "event_log_path": None,
    "dashboard_path": None,
    "dashboard_token": None,
    "cumulative_blocking_enabled": True,
    "cumulative_blocking_threshold_ms": 200,
    "cumulative_window_ms": 1000,
}


def test_every_seed_option_with_its_default() -> None:
    config = LoopGuardConfig()
    for name, default in {**SEED_DEFAULTS, **ADDED_DEFAULTS}.items():
        assert getattr(config, name) == default, name
    assert {f.name for f in dataclasses.fields(LoopGuardConfig)} == set(SEED_DEFAULTS) | set(
        ADDED_DEFAULTS
    )


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoopGuardConfig().dev_mode = True  # type: ignore[misc]


def test_seed_examples_construct() -> None:
    LoopGuardConfig(
        adaptive_threshold=True,
        adaptive_window_size=2000,
        adaptive_percentile=0.99,
        fallback_threshold_ms=100.0,
    )
    LoopGuardConfig(threshold_multiplier=8)


def test_prometheus_enabled_constructs_without_warning() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = LoopGuardConfig(dev_mode=True, prometheus_enabled=True)
    assert config.prometheus_enabled is True


def test_new_options_accept_their_values() -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    config = LoopGuardConfig(
        prometheus_registry=registry,
        metrics_path=None,
        log_format="json",
        log_rate_limit_per_minute=0,
        enforcement_mode="strict",
        otel_enabled=True,
    )
    assert config.prometheus_registry is registry
    assert config.metrics_path is None
    for mode in ("log", "warn", "strict"):
        assert LoopGuardConfig(enforcement_mode=mode).enforcement_mode == mode


BOOLS = [
    "enabled",
    "dev_mode",
    "log_blocking_events",
    "adaptive_threshold",
    "capture_stacks",
    "otel_enabled",
    "cumulative_blocking_enabled",
]

# option -> (values that must be refused, text the message must contain)
BAD: dict[str, tuple[list[Any], str]] = {
    "monitor_interval_ms": ([0, -1, 1001, float("nan"), "10", None, True], "[1, 1000]"),
    "threshold_multiplier": ([0.5, 0, -5, 1001, "5", None], "[1, 1000]"),
    "adaptive_window_size": ([9, 0, 10.5, "1000", 2_000_000], "[10, 1e+06]"),
    "adaptive_percentile": ([0.49, 0.995, 1, 0, -0.5, "0.9", None], "[0.5, 0.99]"),
    "adaptive_min_samples": ([0, -1, 1001, 2.5], "[1, 1000]"),
    "adaptive_update_interval_ms": ([0, 9, -1, "1s"], "[10, 3.6e+06]"),
    "fallback_threshold_ms": ([0, 0.5, -10, float("inf"), "50"], "[1, 3.6e+06]"),
    "calibration_iterations": ([-1, 1.5, 10_001, "10"], "[0, 10000]"),
    "hang_threshold_ms": ([-1, 3_600_001, "1s", None], "[0, 3.6e+06]"),
    "cumulative_window_ms": ([0, 9, 3_600_001, "1s", None], "[10, 3.6e+06]"),
    "cumulative_blocking_threshold_ms": ([0, -5, 1001, "200", None], "[1, 1000]"),
    "exclude_paths": (["/health", {"health"}, {1}, 5, None], "paths starting with '/'"),
    "on_blocking": ([5, "print"], "callable"),
    "prometheus_registry": (["REGISTRY", 5, object()], "CollectorRegistry or None"),
    "metrics_path": (["metrics", "", 5, b"/metrics"], "path starting with '/' or None"),
    "log_format": (["JSON", "xml", None, 1], "'text', 'json'"),
    "log_rate_limit_per_minute": ([-1, 1.5, 100_001, "10", None], "[0, 100000]"),
    "enforcement_mode": (["STRICT", "block", None, True, ["log"]], "'log', 'warn', 'strict'"),
    "event_log_path": (["", 5, b"events.jsonl", "a\0b"], "non-empty file path"),
    "dashboard_path": (
        ["", "/", "_loopguard", "/x/", "/../x", "/a/./b", "/a b", "/a?x=1", "/%2e", 5],
        "a path like '/_loopguard'",
    ),
}


@pytest.mark.parametrize("name", BOOLS)
@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_bool_options_refuse_non_bools(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be True or False"):
        LoopGuardConfig(**{name: value})


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [(name, value, allowed) for name, (values, allowed) in BAD.items() for value in values],
)
def test_bad_values_name_the_option_and_the_range(name: str, value: Any, allowed: str) -> None:
    with pytest.raises(ValueError) as info:
        LoopGuardConfig(**{name: value})
    message = str(info.value)
    assert message.startswith(name), message
    assert allowed in message, message


def test_min_samples_bounded_by_window() -> None:
    LoopGuardConfig(adaptive_window_size=50, adaptive_min_samples=50)
    with pytest.raises(ValueError, match="adaptive_min_samples"):
        LoopGuardConfig(adaptive_window_size=50, adaptive_min_samples=51)


def test_cumulative_threshold_bounded_by_its_window() -> None:
    config = LoopGuardConfig(cumulative_window_ms=5000, cumulative_blocking_threshold_ms=5000)
    assert config.cumulative_blocking_threshold_ms == 5000
    with pytest.raises(ValueError, match=r"^cumulative_blocking_threshold_ms .*\[1, 500\]"):
        LoopGuardConfig(cumulative_window_ms=500, cumulative_blocking_threshold_ms=501)


def test_exclude_paths_accepts_any_iterable_and_is_frozen() -> None:
    config = LoopGuardConfig(exclude_paths=["/a", "/b"])
    assert config.exclude_paths == frozenset({"/a", "/b"})
    assert isinstance(config.exclude_paths, frozenset)


def test_paths_accept_pathlike_and_are_stored_as_str(tmp_path: Any) -> None:
    config = LoopGuardConfig(event_log_path=tmp_path / "events.jsonl")
    assert config.event_log_path == str(tmp_path / "events.jsonl")
    assert LoopGuardConfig(dashboard_path="/ops/_loopguard").dashboard_path == "/ops/_loopguard"


@pytest.mark.parametrize(
    "token", ["short", "x" * 15, "with space" * 3, "t\u00f6ken" * 4, 12345678901234567]
)
def test_bad_dashboard_token_is_refused_without_echoing_it(token: Any) -> None:
    with pytest.raises(ValueError) as info:
        LoopGuardConfig(dashboard_path="/_loopguard", dashboard_token=token)
    message = str(info.value)
    assert message.startswith("dashboard_token must be"), message
    assert str(token) not in message


def test_dashboard_token_needs_a_dashboard_and_stays_out_of_repr() -> None:
    with pytest.raises(ValueError, match=r"^dashboard_token is set but dashboard_path is None"):
        LoopGuardConfig(dashboard_token="s3cret-token-0123456789")
    config = LoopGuardConfig(dashboard_path="/_lg", dashboard_token="s3cret-token-0123456789")
    assert "s3cret" not in repr(config)
