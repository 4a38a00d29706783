"""LoopGuardConfig from ``LOOPGUARD_*`` environment variables (and command-line overrides).

Every option but ``on_blocking`` and ``prometheus_registry`` has a variable named after it:
``LOOPGUARD_DEV_MODE``, ``LOOPGUARD_EVENT_LOG_PATH``, ``LOOPGUARD_EXCLUDE_PATHS``
(comma-separated), ... plus the short
``LOOPGUARD_THRESHOLD_MS`` for ``fallback_threshold_ms``. A value that does not parse, or that
LoopGuardConfig refuses, raises ``EnvConfigError`` naming the variable (or flag) it came from.
Token values are never repeated in an error message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .config import LoopGuardConfig

PREFIX = "LOOPGUARD_"
# Short names people reach for first; each maps to an option.
ALIASES = {"LOOPGUARD_THRESHOLD_MS": "fallback_threshold_ms"}
# Variables `loopguard run` uses to hand the app to its workers, and the worker index a server
# may set for the event log (workers.py); not options.
RUN_VARIABLES = frozenset({"LOOPGUARD_RUN_APP", "LOOPGUARD_RUN_FACTORY", "LOOPGUARD_WORKER"})
_SECRET = frozenset({"dashboard_token"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class EnvConfigError(ValueError):
    """A configuration value from the environment or the command line is wrong."""


def option_types() -> dict[str, str]:
    """Option name -> the type its variable is parsed as, for every settable option."""
    types: dict[str, str] = {}
    for f in dataclasses.fields(LoopGuardConfig):
        annotation = str(f.type)
        if annotation.startswith("Callable") or f.name == "prometheus_registry":
            continue  # on_blocking and the registry are objects, set in code, not configuration
        types[f.name] = annotation
    return types


def variable_of(option: str) -> str:
    return PREFIX + option.upper()


def _parse(variable: str, option: str, annotation: str, text: str) -> Any:
    shown = "<hidden>" if option in _SECRET else repr(text)
    value = text.strip()
    if annotation == "bool":
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise EnvConfigError(
            f"{variable} must be one of 1/0, true/false, yes/no, on/off, got {shown}"
        )
    if annotation in ("int", "float"):
        try:
            return int(value) if annotation == "int" else float(value)
        except ValueError:
            kind = "an integer" if annotation == "int" else "a number"
            raise EnvConfigError(f"{variable} must be {kind}, got {shown}") from None
    if annotation == "frozenset[str]":
        return frozenset(p.strip() for p in value.split(",") if p.strip())
    if annotation == "str | None":
        return value or None  # an empty variable means "not set", as for unset ones
    if annotation == "str":
        return value  # log_format, enforcement_mode: LoopGuardConfig checks the choice
    raise EnvConfigError(f"{variable}: option {option} cannot be set from the environment")


def config_from_env(
    environ: Mapping[str, str], overrides: Mapping[str, tuple[Any, str]] | None = None
) -> tuple[LoopGuardConfig, list[str]]:
    """The config the environment describes, and warnings (unknown ``LOOPGUARD_*`` names).

    ``overrides`` maps an option to (value, where it came from, e.g. "--dev-mode"); they win over
    the environment, like command-line flags over variables.
    """
    types = option_types()
    by_variable = {variable_of(name): name for name in types} | ALIASES
    values: dict[str, tuple[Any, str]] = {}
    warnings = []
    for variable in sorted(environ):
        if not variable.startswith(PREFIX) or variable in RUN_VARIABLES:
            continue
        option = by_variable.get(variable)
        if option is None:
            warnings.append(f"{variable} is not a fastapi-loopguard setting; ignored")
            continue
        if option in values:
            raise EnvConfigError(f"{variable} and {values[option][1]} both set {option}")
        values[option] = (_parse(variable, option, types[option], environ[variable]), variable)
    values.update(overrides or {})
    try:
        config = LoopGuardConfig(**{name: value for name, (value, _) in values.items()})
    except ValueError as exc:
        message = str(exc)
        source = next(
            (src for name, (_, src) in values.items() if message.startswith(name + " ")), ""
        )
        raise EnvConfigError(f"{source}: {message}" if source else message) from None
    return config, warnings


def to_environ(option: str, value: Any) -> str:
    """How an override is written back into the environment for worker processes."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, frozenset):
        return ",".join(sorted(value))
    return str(value)
