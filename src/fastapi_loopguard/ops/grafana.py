"""``loopguard grafana``: a Grafana dashboard over the package's Prometheus metrics.

Import the JSON in Grafana (Dashboards, New, Import); it asks nothing: the data source is a
dashboard variable, and ``job`` and ``instance`` variables filter every panel. Panels: how much
of the time the loop was blocked, by route and by kind; the top culprits (``module:function``);
loop-lag and block-duration percentiles; the requests frozen, and how long (the victims' delay
per route); events per worker and per instance; the threshold; hangs and dropped events.

Every expression is built here, in one list, so the tests run each one against a real
Prometheus scraping a real app (tests/test_ops.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

UID = "fastapi-loopguard"
SELECTOR = '{job=~"$job", instance=~"$instance"}'
RATE = "$__rate_interval"
RANGE = "$__range"
_DS = {"type": "prometheus", "uid": "${datasource}"}


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    targets: tuple[Target, ...]
    unit: str = "short"
    kind: str = "timeseries"  # or "stat", "bargauge"
    width: int = 12
    height: int = 8
    options: dict[str, Any] = field(default_factory=dict)


def _q(metric: str) -> str:
    return f"{metric}{SELECTOR}"


PANELS: tuple[Panel, ...] = (
    Panel(
        "Loop blocked",
        "Share of the time the event loop was blocked, all routes and workers together.",
        (Target(f"sum(rate({_q('loopguard_blocking_duration_seconds_sum')}[{RATE}]))"),),
        unit="percentunit",
        kind="stat",
        width=6,
        height=4,
    ),
    Panel(
        "Blocking events",
        "Blocking events per second.",
        (Target(f"sum(rate({_q('loopguard_blocking_events_total')}[{RATE}]))"),),
        unit="ops",
        kind="stat",
        width=6,
        height=4,
    ),
    Panel(
        "Hangs",
        "Stalls longer than hang_threshold_ms in the time range.",
        (Target(f"sum(increase({_q('loopguard_hangs_total')}[{RANGE}]))", instant=True),),
        kind="stat",
        width=6,
        height=4,
    ),
    Panel(
        "Events dropped",
        "Events the engine could not hand over (its queue was full) in the time range.",
        (Target(f"sum(increase({_q('loopguard_events_dropped_total')}[{RANGE}]))", instant=True),),
        kind="stat",
        width=6,
        height=4,
    ),
    Panel(
        "Blocked time by route",
        "Share of the time each route's own code blocked the loop.",
        (
            Target(
                "sum by (method, route) "
                f"(rate({_q('loopguard_blocking_duration_seconds_sum')}[{RATE}]))",
                "{{method}} {{route}}",
            ),
        ),
        unit="percentunit",
    ),
    Panel(
        "Blocking events by kind",
        "Events per second by kind: sleep, io, cpu, lock, gil, native, gc, starved, cumulative.",
        (
            Target(
                f"sum by (kind) (rate({_q('loopguard_blocking_events_total')}[{RATE}]))",
                "{{kind}}",
            ),
        ),
        unit="ops",
    ),
    Panel(
        "Top culprits",
        "Blocked loop time in the time range by culprit (module:function) and kind.",
        (
            Target(
                "topk(10, sum by (culprit, kind) "
                f"(increase({_q('loopguard_culprit_blocked_seconds_total')}[{RANGE}])))",
                "{{culprit}} ({{kind}})",
                instant=True,
            ),
        ),
        unit="s",
        kind="bargauge",
        options={"displayMode": "basic", "orientation": "horizontal", "showUnfilled": True},
    ),
    Panel(
        "Loop lag",
        "How late loop iterations started: percentiles of the engine's loop-lag histogram.",
        tuple(
            Target(
                f"histogram_quantile({q}, sum by (le) "
                f"(rate({_q('loopguard_loop_lag_seconds_bucket')}[{RATE}])))",
                f"p{round(q * 100)}",
            )
            for q in (0.5, 0.9, 0.99)
        ),
        unit="s",
    ),
    Panel(
        "Block duration p99 by route",
        "99th percentile of how long one blocking event held the loop, per route.",
        (
            Target(
                "histogram_quantile(0.99, sum by (le, method, route) "
                f"(rate({_q('loopguard_blocking_duration_seconds_bucket')}[{RATE}])))",
                "{{method}} {{route}}",
            ),
        ),
        unit="s",
    ),
    Panel(
        "Requests frozen",
        "Victims: requests in flight, and so frozen, while another one blocked the loop, per "
        "second.",
        (Target(f"sum(rate({_q('loopguard_requests_delayed_total')}[{RATE}]))", "frozen"),),
        unit="reqps",
    ),
    Panel(
        "Victims' delay p99 by route",
        "99th percentile of how long a request was frozen by blocks that other requests (or "
        "code outside requests) caused, per route, over every request.",
        (
            Target(
                "histogram_quantile(0.99, sum by (le, route) "
                f"(rate({_q('loopguard_request_wait_seconds_bucket')}[{RATE}])))",
                "{{route}}",
            ),
        ),
        unit="s",
    ),
    Panel(
        "Blocking events per worker",
        "Events per second by instance and worker (its index when the server gives one, else "
        "its pid).",
        (
            Target(
                "sum by (instance, worker) "
                f"(rate({_q('loopguard_worker_blocking_events_total')}[{RATE}]))",
                "{{instance}} worker {{worker}}",
            ),
        ),
        unit="ops",
    ),
    Panel(
        "Threshold",
        "Lag above which the loop counts as blocked, per live worker.",
        (Target(_q("loopguard_threshold_seconds"), "{{instance}} {{pid}}"),),
        unit="s",
    ),
    Panel(
        "Saturation",
        "Share of the time the loop was busy with many short callbacks rather than one culprit.",
        (Target(f"sum(rate({_q('loopguard_loop_saturation_seconds_total')}[{RATE}]))"),),
        unit="percentunit",
    ),
)

VARIABLES = (
    ("job", "label_values(loopguard_loop_lag_seconds_count, job)"),
    ("instance", 'label_values(loopguard_loop_lag_seconds_count{job=~"$job"}, instance)'),
)


def _panel(panel: Panel, number: int, x: int, y: int) -> dict[str, Any]:
    targets = [
        {
            "refId": chr(ord("A") + i),
            "datasource": _DS,
            "expr": t.expr,
            "legendFormat": t.legend or "__auto",
            "instant": t.instant,
            "range": not t.instant,
        }
        for i, t in enumerate(panel.targets)
    ]
    options = panel.options or (
        {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
        if panel.kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"]}}
    )
    return {
        "id": number,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": _DS,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": options,
        "targets": targets,
    }


def dashboard() -> dict[str, Any]:
    panels = []
    x = y = row_height = 0
    for number, panel in enumerate(PANELS, 1):
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        panels.append(_panel(panel, number, x, y))
        x += panel.width
        row_height = max(row_height, panel.height)
    variables: list[dict[str, Any]] = [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "hide": 0,
            "refresh": 1,
            "current": {},
        }
    ]
    for name, query in VARIABLES:
        variables.append(
            {
                "name": name,
                "type": "query",
                "datasource": _DS,
                "definition": query,
                "query": {"query": query, "refId": name},
                "includeAll": True,
                "multi": True,
                "allValue": ".*",
                "refresh": 2,
                "current": {},
                "hide": 0,
            }
        )
    return {
        "uid": UID,
        "title": "fastapi-loopguard",
        "description": "Event-loop blocking by route, kind, culprit and worker (fastapi-loopguard)",
        "tags": ["fastapi-loopguard", "asyncio", "python"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "timepicker": {},
        "annotations": {"list": []},
        "templating": {"list": variables},
        "panels": panels,
    }


def expressions() -> list[str]:
    """Every PromQL expression of the dashboard, as written (with its variables)."""
    return [t.expr for p in PANELS for t in p.targets]


def dashboard_json() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"
