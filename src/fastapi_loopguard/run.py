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
import shutil
import sys
import tempfile
from typing import Any

from .envconfig import EnvConfigError, config_from_env, to_environ, variable_of
from .middleware import ASGIApp, LoopGuardMiddleware

APP_VARIABLE = "LOOPGUARD_RUN_APP"
FACTORY_VARIABLE = "LOOPGUARD_RUN_FACTORY"
FACTORY = "fastapi_loopguard.run:guarded_app"
MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


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


def log_config(level: str, workers: int = 1) -> dict[str, Any]:
    """uvicorn's logging, plus the guard's logger on the same handler, so reports read alike.

    With several workers every line says which process wrote it, or the records of two workers
    cannot be told apart (nor matched with the event log's ``pid``).
    """
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["fastapi_loopguard"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    if workers > 1:
        for formatter in config["formatters"].values():
            formatter["fmt"] = formatter["fmt"].replace(
                "%(levelprefix)s ", "%(levelprefix)s [pid %(process)d] ", 1
            )
    return config


def prometheus_dir(config: Any, workers: int) -> tuple[str | None, bool]:
    """The multiprocess directory the workers share, and whether this process made it.

    With several workers each has its own metrics, and a scrape reaches whichever accepted the
    connection: without prometheus_client's multiprocess mode the numbers flip from scrape to
    scrape. An empty temporary directory is made when none is given, and removed at exit.
    """
    if not config.prometheus_enabled:
        return None, False
    if importlib.util.find_spec("prometheus_client") is None:
        raise EnvConfigError(
            "Prometheus metrics need prometheus-client: pip install 'fastapi-loopguard[prometheus]'"
        )
    if workers == 1:
        return None, False
    given = os.environ.get(MULTIPROC_VARIABLE)
    if given:
        if not (os.path.isdir(given) and os.access(given, os.W_OK | os.X_OK)):
            raise EnvConfigError(f"{MULTIPROC_VARIABLE}={given} is not a writable directory")
        return given, False
    return tempfile.mkdtemp(prefix="loopguard-prometheus-"), True


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
    metrics_dir, made = prometheus_dir(config, workers)
    if metrics_dir is not None:
        os.environ[MULTIPROC_VARIABLE] = metrics_dir  # read by every worker at its start
    summary = describe(config, host, port, workers, metrics_dir, made)
    print(f"loopguard: guarding {app}: {summary}", file=sys.stderr)
    try:
        uvicorn.run(
            FACTORY,
            factory=True,
            host=host,
            port=port,
            loop=loop,
            workers=workers,
            log_level=log_level,
            log_config=log_config(log_level, workers),
            access_log=access_log,
            root_path=root_path,
        )
    finally:
        if made and metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def describe(
    config: Any,
    host: str,
    port: int,
    workers: int,
    metrics_dir: str | None = None,
    made: bool = False,
) -> str:
    """The banner: the threshold, and every output that is on and where to find it."""
    shown = "[::1]" if host == "::" else ("127.0.0.1" if host == "0.0.0.0" else host)
    parts = [
        f"threshold max({config.threshold_multiplier:g} x baseline, "
        f"{config.fallback_threshold_ms:g} ms)",
        f"dev mode {'on' if config.dev_mode else 'off'}",
        f"enforcement {config.enforcement_mode}",
        f"{config.log_format} logs" if config.log_blocking_events else "no logs",
    ]
    if config.prometheus_enabled:
        if config.metrics_path:
            where = f"metrics http://{shown}:{port}{config.metrics_path}"
        else:
            where = "metrics registered, not served (no metrics path)"
        if metrics_dir is not None:
            kept = ", removed at exit" if made else ""
            where += f" (all {workers} workers, through {metrics_dir}{kept})"
        parts.append(where)
    if config.event_log_path:
        parts.append(f"event log {os.path.abspath(config.event_log_path)}")
    if config.dashboard_path:
        who = "loopback or token" if config.dashboard_token else "loopback only"
        parts.append(f"live page http://{shown}:{port}{config.dashboard_path}/ ({who})")
        if workers > 1:
            parts.append("each worker serves its own live page")
    return "; ".join(parts)
