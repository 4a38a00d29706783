"""``loopguard run module:app``: an unmodified ASGI app under uvicorn, with the guard around it.

The parent process validates the configuration (flags over ``LOOPGUARD_*`` variables), writes the
flags back into the environment, and starts uvicorn on the import string of ``guarded_app``, a
factory. Each worker, including the only one when ``--workers`` is 1, imports the user's app and
wraps it there. The environment is the one channel that reaches spawned workers, which is why
the flags travel through it; an import string is what uvicorn needs for more than one worker.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import sys
from typing import Any

from .envconfig import EnvConfigError, config_from_env, to_environ, variable_of
from .middleware import ASGIApp, LoopGuardMiddleware

APP_VARIABLE = "LOOPGUARD_RUN_APP"
FACTORY_VARIABLE = "LOOPGUARD_RUN_FACTORY"
FACTORY = "fastapi_loopguard.run:guarded_app"


def guarded_app() -> ASGIApp:
    """The user's app (``$LOOPGUARD_RUN_APP``) in LoopGuardMiddleware, configured from the env."""
    from uvicorn.importer import ImportFromStringError, import_from_string

    target = os.environ.get(APP_VARIABLE)
    if not target:
        raise RuntimeError(f"{APP_VARIABLE} is not set; start this with `loopguard run module:app`")
    try:
        app = import_from_string(target)
    except ImportFromStringError as exc:
        # What uvicorn says for `uvicorn module:app`; without this, a factory's error is a
        # traceback through uvicorn's internals.
        logging.getLogger("uvicorn.error").error("Error loading ASGI app. %s", exc)
        sys.exit(1)
    if os.environ.get(FACTORY_VARIABLE) == "1":
        app = app()
    config, _ = config_from_env(os.environ)
    return LoopGuardMiddleware(app, config)


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, plus the guard's logger on the same handler, so reports read alike."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["fastapi_loopguard"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    return config


def run(
    app: str,
    overrides: dict[str, tuple[Any, str]],
    *,
    host: str,
    port: int,
    loop: str,
    workers: int,
    log_level: str,
    app_dir: str,
    factory: bool,
    access_log: bool,
    root_path: str,
) -> int:
    import uvicorn

    config, warnings = config_from_env(os.environ, overrides)
    for warning in warnings:
        print(f"loopguard: warning: {warning}", file=sys.stderr)
    if config.event_log_path is not None:
        # Fail now, with the reason, rather than in every worker at the first event.
        try:
            with open(config.event_log_path, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise EnvConfigError(
                f"cannot write the event log {config.event_log_path}: {exc.strerror}"
            ) from None
    for option, (value, _) in overrides.items():
        os.environ[variable_of(option)] = to_environ(option, value)
    os.environ[APP_VARIABLE] = app
    os.environ[FACTORY_VARIABLE] = "1" if factory else "0"
    sys.path.insert(0, os.path.abspath(app_dir))  # as uvicorn does for `uvicorn module:app`
    module = app.partition(":")[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:  # checked without importing it: the workers import the app, not this process
        raise EnvConfigError(f"cannot find the module {module!r} of {app!r} (from {app_dir!r})")
    print(f"loopguard: guarding {app}: {describe(config, host, port, workers)}", file=sys.stderr)
    uvicorn.run(
        FACTORY,
        factory=True,
        host=host,
        port=port,
        loop=loop,
        workers=workers,
        log_level=log_level,
        log_config=log_config(log_level),
        access_log=access_log,
        root_path=root_path,
    )
    return 0


def describe(config: Any, host: str, port: int, workers: int) -> str:
    parts = [
        f"threshold max({config.threshold_multiplier:g} x baseline, "
        f"{config.fallback_threshold_ms:g} ms)",
        f"dev mode {'on' if config.dev_mode else 'off'}",
    ]
    if config.event_log_path:
        parts.append(f"event log {os.path.abspath(config.event_log_path)}")
    if config.dashboard_path:
        shown = "[::1]" if host == "::" else ("127.0.0.1" if host == "0.0.0.0" else host)
        who = "loopback or token" if config.dashboard_token else "loopback only"
        parts.append(f"live page http://{shown}:{port}{config.dashboard_path}/ ({who})")
        if workers > 1:
            parts.append("each worker serves its own live page")
    return "; ".join(parts)
