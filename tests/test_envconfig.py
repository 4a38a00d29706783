"""LOOPGUARD_* environment variables and command-line overrides -> LoopGuardConfig."""

from __future__ import annotations

import dataclasses

import pytest

from fastapi_loopguard import LoopGuardConfig
from fastapi_loopguard.envconfig import (
    EnvConfigError,
    config_from_env,
    option_types,
    to_environ,
    variable_of,
)


def test_every_option_but_the_callback_has_a_variable() -> None:
    names = {f.name for f in dataclasses.fields(LoopGuardConfig)}
    assert set(option_types()) == names - {"on_blocking", "prometheus_registry"}
    # Every annotation is one the parser knows: a new option cannot be silently unsettable.
    for option, annotation in option_types().items():
        assert annotation in ("bool", "int", "float", "frozenset[str]", "str", "str | None"), option


def test_empty_environment_gives_the_defaults() -> None:
    config, warnings = config_from_env({"PATH": "/bin", "HOME": "/root"})
    assert config == LoopGuardConfig()
    assert warnings == []


def test_variables_of_each_type() -> None:
    env = {
        "LOOPGUARD_DEV_MODE": "yes",
        "LOOPGUARD_CAPTURE_STACKS": "off",
        "LOOPGUARD_THRESHOLD_MS": "120.5",
        "LOOPGUARD_THRESHOLD_MULTIPLIER": "8",
        "LOOPGUARD_CALIBRATION_ITERATIONS": "0",
        "LOOPGUARD_EXCLUDE_PATHS": "/health, /metrics,,/_internal",
        "LOOPGUARD_EVENT_LOG_PATH": "/tmp/events.jsonl",
        "LOOPGUARD_DASHBOARD_PATH": "/_loopguard",
        "LOOPGUARD_DASHBOARD_TOKEN": "tok-0123456789abcdef",
    }
    config, warnings = config_from_env(env)
    assert warnings == []
    assert config.dev_mode is True
    assert config.capture_stacks is False
    assert config.fallback_threshold_ms == 120.5
    assert config.threshold_multiplier == 8.0
    assert config.calibration_iterations == 0
    assert config.exclude_paths == frozenset({"/health", "/metrics", "/_internal"})
    assert config.event_log_path == "/tmp/events.jsonl"
    assert config.dashboard_path == "/_loopguard"
    assert config.dashboard_token == "tok-0123456789abcdef"


def test_empty_string_variable_means_unset() -> None:
    config, _ = config_from_env({"LOOPGUARD_EVENT_LOG_PATH": ""})
    assert config.event_log_path is None


def test_long_name_works_too_but_not_together_with_the_alias() -> None:
    config, _ = config_from_env({"LOOPGUARD_FALLBACK_THRESHOLD_MS": "75"})
    assert config.fallback_threshold_ms == 75
    with pytest.raises(EnvConfigError, match="both set fallback_threshold_ms"):
        config_from_env({"LOOPGUARD_FALLBACK_THRESHOLD_MS": "75", "LOOPGUARD_THRESHOLD_MS": "80"})


def test_flags_win_over_variables() -> None:
    config, _ = config_from_env(
        {"LOOPGUARD_DEV_MODE": "0", "LOOPGUARD_THRESHOLD_MS": "80"},
        {"dev_mode": (True, "--dev-mode")},
    )
    assert config.dev_mode is True
    assert config.fallback_threshold_ms == 80


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("LOOPGUARD_DEV_MODE", "maybe", "LOOPGUARD_DEV_MODE must be one of 1/0"),
        ("LOOPGUARD_THRESHOLD_MS", "fast", "LOOPGUARD_THRESHOLD_MS must be a number"),
        (
            "LOOPGUARD_ADAPTIVE_WINDOW_SIZE",
            "1e3",
            "LOOPGUARD_ADAPTIVE_WINDOW_SIZE must be an integer",
        ),
        # Parsed fine, refused by LoopGuardConfig: the message names the variable and the option.
        (
            "LOOPGUARD_THRESHOLD_MS",
            "0",
            "LOOPGUARD_THRESHOLD_MS: fallback_threshold_ms must be a number in [1, 3.6e+06]",
        ),
        ("LOOPGUARD_THRESHOLD_MS", "nan", "LOOPGUARD_THRESHOLD_MS: fallback_threshold_ms"),
        ("LOOPGUARD_EXCLUDE_PATHS", "health", "LOOPGUARD_EXCLUDE_PATHS: exclude_paths must be"),
        ("LOOPGUARD_DASHBOARD_PATH", "/a/../b", "LOOPGUARD_DASHBOARD_PATH: dashboard_path must"),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str, expected: str) -> None:
    with pytest.raises(EnvConfigError) as info:
        config_from_env({variable: value})
    assert str(info.value).startswith(expected), str(info.value)


def test_bad_flag_value_names_the_flag() -> None:
    with pytest.raises(EnvConfigError, match=r"^--threshold-ms: fallback_threshold_ms must be"):
        config_from_env({}, {"fallback_threshold_ms": (-5.0, "--threshold-ms")})


def test_token_errors_never_echo_the_token() -> None:
    env = {"LOOPGUARD_DASHBOARD_PATH": "/_lg", "LOOPGUARD_DASHBOARD_TOKEN": "sec ret value here!"}
    with pytest.raises(EnvConfigError) as info:
        config_from_env(env)
    assert str(info.value).startswith("LOOPGUARD_DASHBOARD_TOKEN: dashboard_token must be")
    assert "sec ret" not in str(info.value)


def test_unknown_loopguard_variables_are_warned_about() -> None:
    _, warnings = config_from_env({"LOOPGUARD_DEVMODE": "1", "LOOPGUARD_RUN_APP": "main:app"})
    assert warnings == ["LOOPGUARD_DEVMODE is not a fastapi-loopguard setting; ignored"]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("dev_mode", True),
        ("dev_mode", False),
        ("fallback_threshold_ms", 12.5),
        ("exclude_paths", frozenset({"/a", "/b"})),
        ("dashboard_path", "/_lg"),
    ],
)
def test_overrides_survive_the_trip_through_the_environment(option: str, value: object) -> None:
    # `loopguard run` hands flags to its workers this way.
    env = {variable_of(option): to_environ(option, value)}
    config, _ = config_from_env(env)
    assert getattr(config, option) == value
