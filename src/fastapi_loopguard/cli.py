"""The ``loopguard`` command: ``demo``, ``run module:app``, ``report events.jsonl``, ``check``
(the CI gate), and the ops kit: ``grafana`` (a dashboard) and ``alerts`` (Prometheus rules).

``demo``, ``run`` and ``report``'s terminal summary need the ``[cli]`` extra (rich, uvicorn,
httpx, fastapi, uvloop); each subcommand imports what it needs only when it runs, so
``loopguard --help``, ``check``, ``grafana`` and ``alerts`` work with the bare package.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from .report.model import Report

_EXTRA_HINT = "install the command's dependencies with: pip install 'fastapi-loopguard[cli]'"


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be in (0, 3600], got {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be in [1, 1000], got {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {text}")
    return value


def _budget_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _budget_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _duration(text: str) -> str:
    from .ops.alerts import valid_duration

    if not valid_duration(text):
        raise argparse.ArgumentTypeError(f"not a Prometheus duration (30s, 5m, 1h): {text!r}")
    return text


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


# Output formats of `loopguard report`, with the file written when -o is not given.
_OUTPUTS = {
    "html": "loopguard-report.html",
    "collapsed": "loopguard-profile.collapsed",
    "speedscope": "loopguard-profile.speedscope.json",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopguard",
        description="Find the request and the line that blocked your event loop.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run a demo app with blocking culprits under real traffic, then report",
        description="Starts a demo FastAPI shop on 127.0.0.1 under uvicorn, drives concurrent "
        "traffic at it from another process, then prints the report and writes it as HTML.",
    )
    demo.add_argument("--duration", type=_positive, default=15.0, help="seconds of traffic")
    demo.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    demo.add_argument("--concurrency", type=_count, default=30, help="concurrent clients")
    demo.add_argument("--html", default="loopguard-report.html", help="where to write the report")

    run = commands.add_parser(
        "run",
        help="run an ASGI app under uvicorn with the guard installed",
        description="Like `uvicorn module:app`, with LoopGuardMiddleware around the app. "
        "Every option can also come from LOOPGUARD_<OPTION> environment variables "
        "(e.g. LOOPGUARD_DEV_MODE=1, LOOPGUARD_THRESHOLD_MS=100); flags win.",
    )
    run.add_argument("app", help="the app as module:attribute, e.g. main:app")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=_port, default=8000)
    run.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    run.add_argument("--workers", type=_count, default=1)
    run.add_argument(
        "--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info"
    )
    run.add_argument("--app-dir", default=".", help="directory to import the app from")
    run.add_argument("--factory", action="store_true", help="APP is a factory to call")
    run.add_argument("--root-path", default="")
    run.add_argument("--no-access-log", dest="access_log", action="store_false")
    run.add_argument("--threshold-ms", type=float, help="minimum block to report (ms)")
    run.add_argument("--dev-mode", action="store_true", default=None, help="X-Blocking-* headers")
    run.add_argument("--event-log", metavar="PATH", help="append every event as a JSON line")
    run.add_argument(
        "--dashboard",
        metavar="PATH",
        help="serve the live page at PATH, e.g. /_loopguard (loopback clients only, unless "
        "LOOPGUARD_DASHBOARD_TOKEN is set and given)",
    )
    run.add_argument(
        "--prometheus",
        action="store_true",
        default=None,
        help="Prometheus metrics at LOOPGUARD_METRICS_PATH (default /metrics); with --workers, "
        "aggregated through PROMETHEUS_MULTIPROC_DIR, or a temporary one removed at exit",
    )
    run.add_argument(
        "--enforcement-mode",
        choices=["log", "warn", "strict"],
        help="warn: headers and a record naming the culprit; strict: a 503 page instead",
    )
    run.add_argument(
        "--log-format", choices=["text", "json"], help="blocking records as text lines or JSON"
    )

    report = commands.add_parser(
        "report",
        help="build the HTML report (or a profile) from event logs",
        description="Reads event logs written with event_log_path (LOOPGUARD_EVENT_LOG_PATH) "
        "or pytest --loopguard-events, merged when there are several (a glob in quotes is "
        "expanded too), prints the summary and writes one self-contained HTML file, or the "
        "blocking profile as folded stacks (--format collapsed: flamegraph.pl, inferno, "
        "Pyroscope) or as a speedscope file (--format speedscope).",
    )
    report.add_argument("logs", nargs="+", metavar="LOG", help="event logs (JSON lines)")
    report.add_argument(
        "--format", choices=list(_OUTPUTS), default="html", help="what to write (default html)"
    )
    report.add_argument("-o", "--output", help="where to write it ('-': standard output)")
    report.add_argument("-q", "--quiet", action="store_true", help="no terminal summary")

    check = commands.add_parser(
        "check",
        help="CI gate: exit 1 when event logs exceed a budget or hold a new culprit",
        description="Exit status 0 within budget, 1 over it (each new culprit line listed "
        "with its fix), 2 when the input cannot be used. Without --baseline, --max-events or "
        "--max-ms-per-route, any blocking event fails. Culprits are keyed file:function, files "
        "relative to --root, so line edits do not make a known culprit new.",
    )
    check.add_argument("logs", nargs="+", metavar="LOG", help="event logs (JSON lines)")
    check.add_argument("--baseline", metavar="FILE", help="culprits to tolerate")
    check.add_argument(
        "--write-baseline",
        metavar="FILE",
        help="record the culprits of these logs as the baseline, and pass",
    )
    check.add_argument("--max-events", type=_budget_count, metavar="N")
    check.add_argument("--max-ms-per-route", type=_budget_ms, metavar="MS")
    check.add_argument(
        "--root", default=".", help="the checkout that baseline paths are relative to (default .)"
    )

    commands.add_parser(
        "grafana",
        help="print a Grafana dashboard (JSON) over the Prometheus metrics",
        description="Prints a dashboard to import into Grafana: loopguard grafana > dashboard.json",
    )
    alerts = commands.add_parser(
        "alerts",
        help="print Prometheus alert rules (YAML)",
        description="Prints alerting rules for Prometheus' rule_files: loopguard alerts > "
        "rules.yml (sustained blocking per route, a hang, dropped events).",
    )
    alerts.add_argument(
        "--window", type=_duration, default="5m", help="range of the rates (default 5m)"
    )
    alerts.add_argument(
        "--for",
        dest="for_",
        type=_duration,
        default="10m",
        help="how long a route must block before it alerts (default 10m)",
    )
    alerts.add_argument(
        "--blocked-ratio",
        type=_ratio,
        default=0.05,
        help="share of the time a route may block the loop (default 0.05)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo.driver import demo

            return demo(args.duration, args.loop, args.concurrency, args.html)
        if args.command == "run":
            return _run(args)
        if args.command == "check":
            return _check(args)
        if args.command == "grafana":
            from .ops.grafana import dashboard_json

            sys.stdout.write(dashboard_json())
            return 0
        if args.command == "alerts":
            from .ops.alerts import rules

            sys.stdout.write(rules(args.window, args.for_, args.blocked_ratio))
            return 0
        return _report(args)
    except ModuleNotFoundError as exc:
        if exc.name in ("rich", "uvicorn", "httpx", "fastapi", "uvloop"):
            print(
                f"loopguard {args.command}: {exc.name} is missing; {_EXTRA_HINT}", file=sys.stderr
            )
            return 2
        raise


def _run(args: argparse.Namespace) -> int:
    from .envconfig import EnvConfigError
    from .run import run

    flags = {
        "fallback_threshold_ms": (args.threshold_ms, "--threshold-ms"),
        "dev_mode": (args.dev_mode, "--dev-mode"),
        "event_log_path": (args.event_log, "--event-log"),
        "dashboard_path": (args.dashboard, "--dashboard"),
        "prometheus_enabled": (args.prometheus, "--prometheus"),
        "enforcement_mode": (args.enforcement_mode, "--enforcement-mode"),
        "log_format": (args.log_format, "--log-format"),
    }
    overrides: dict[str, tuple[Any, str]] = {k: v for k, v in flags.items() if v[0] is not None}
    try:
        return run(
            args.app,
            overrides,
            host=args.host,
            port=args.port,
            loop=args.loop,
            workers=args.workers,
            log_level=args.log_level,
            app_dir=args.app_dir,
            factory=args.factory,
            access_log=args.access_log,
            root_path=args.root_path,
        )
    except EnvConfigError as exc:
        print(f"loopguard run: error: {exc}", file=sys.stderr)
        return 2


def _load(command: str, patterns: list[str]) -> Report | None:
    """The merged report of the logs, or None after saying why they cannot be read."""
    from .report.loading import expand_paths, load_event_logs

    try:
        return load_event_logs(expand_paths(patterns))
    except OSError as exc:
        print(
            f"loopguard {command}: error: cannot read {exc.filename}: {exc.strerror}",
            file=sys.stderr,
        )
        return None


def _report(args: argparse.Namespace) -> int:
    from .report import render
    from .report.profile import collapsed, speedscope_json

    report = _load("report", args.logs)
    if report is None:
        return 2
    output = args.output or _OUTPUTS[args.format]
    if not args.quiet and output != "-":
        from rich.console import Console

        from .report.terminal import print_report

        print_report(Console(highlight=False), report)
    if args.format == "html":
        text = render(report)
    elif args.format == "collapsed":
        text = collapsed(report.events)
    else:
        text = speedscope_json(report)
    try:
        if output == "-":
            sys.stdout.write(text)
        else:
            with open(output, "w", encoding="utf-8") as f:
                f.write(text)
    except OSError as exc:
        print(f"loopguard report: error: cannot write {output}: {exc}", file=sys.stderr)
        return 2
    if output != "-":
        print(f"wrote {output}: {len(report.events)} events", file=sys.stderr)
    return 0


def _check(args: argparse.Namespace) -> int:
    from .check import UNUSABLE, BaselineError, check, read_baseline, write_baseline

    report = _load("check", args.logs)
    if report is None:
        return UNUSABLE
    if report.skipped:
        print(
            f"loopguard check: warning: {report.skipped} lines are not valid records; skipped",
            file=sys.stderr,
        )
        if not report.events and not report.stats:
            print("loopguard check: error: no valid record in the logs", file=sys.stderr)
            return UNUSABLE
    if args.write_baseline:
        try:
            count = write_baseline(args.write_baseline, report, args.root)
        except OSError as exc:
            print(
                f"loopguard check: error: cannot write {args.write_baseline}: {exc}",
                file=sys.stderr,
            )
            return UNUSABLE
        print(f"loopguard check: wrote {args.write_baseline}: {count} culprits")
        return 0
    baseline = None
    if args.baseline:
        try:
            baseline = read_baseline(args.baseline)
        except (OSError, BaselineError) as exc:
            print(f"loopguard check: error: baseline {args.baseline}: {exc}", file=sys.stderr)
            return UNUSABLE
    outcome = check(
        report,
        baseline=baseline,
        max_events=args.max_events,
        max_ms_per_route=args.max_ms_per_route,
        root=args.root,
    )
    print("\n".join(outcome.lines))
    return outcome.status
