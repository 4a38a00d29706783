"""``loopguard alerts``: Prometheus alerting rules over the package's metrics.

- ``LoopGuardRouteBlocking``: a route's own code blocked the loop more than ``blocked_ratio`` of
  the time (default 5%), over ``window``, for ``for_`` (default 10 minutes): sustained blocking,
  not one slow request.
- ``LoopGuardHang``: a stall outlived ``hang_threshold_ms``; fires at once.
- ``LoopGuardEventsDropped``: the engine dropped events (its hand-off queue was full), so the
  other numbers undercount; fires at once.

Written as YAML by hand (no YAML library at run time): every scalar that holds PromQL or
template text is a JSON string, which is also a valid YAML double-quoted scalar. Checked by
``promtool check rules`` and loaded into a real Prometheus in tests/test_ops.py.
"""

from __future__ import annotations

import json
import re

_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def valid_duration(text: str) -> bool:
    """A Prometheus duration: ``30s``, ``5m``, ``1h30m``."""
    return _DURATION.match(text) is not None


def rules(window: str = "5m", for_: str = "10m", blocked_ratio: float = 0.05) -> str:
    if not (valid_duration(window) and valid_duration(for_)):
        raise ValueError(f"not Prometheus durations: {window!r}, {for_!r}")
    if not 0 < blocked_ratio <= 1:
        raise ValueError(f"blocked_ratio must be in (0, 1], got {blocked_ratio}")
    alerts = [
        {
            "alert": "LoopGuardRouteBlocking",
            "expr": "sum by (job, instance, method, route) "
            f"(rate(loopguard_blocking_duration_seconds_sum[{window}])) > {blocked_ratio:g}",
            "for": for_,
            "severity": "warning",
            "summary": "{{ $labels.method }} {{ $labels.route }} blocks the event loop "
            "{{ $value | humanizePercentage }} of the time on {{ $labels.instance }}",
            "description": "Synchronous code in this route holds the event loop, and every "
            "other request of the worker waits meanwhile. `loopguard report` on the event log, "
            "or the logs' culprit= and hint= fields, name the line and the fix.",
        },
        {
            "alert": "LoopGuardHang",
            "expr": f"sum by (job, instance) (increase(loopguard_hangs_total[{window}])) > 0",
            "for": "0s",
            "severity": "critical",
            "summary": "The event loop of {{ $labels.instance }} hung (a stall past "
            "hang_threshold_ms)",
            "description": "A stall outlived hang_threshold_ms (default 1 s); the worker's "
            "stderr has a line naming the request and the culprit while it lasted.",
        },
        {
            "alert": "LoopGuardEventsDropped",
            "expr": "sum by (job, instance) "
            f"(increase(loopguard_events_dropped_total[{window}])) > 0",
            "for": "0s",
            "severity": "warning",
            "summary": "fastapi-loopguard dropped blocking events on {{ $labels.instance }}",
            "description": "The engine's hand-off queue was full, so blocking events went "
            "unreported and the other loopguard metrics undercount.",
        },
    ]
    out = ["groups:", "  - name: fastapi-loopguard", "    rules:"]
    for a in alerts:
        out += [
            f"      - alert: {a['alert']}",
            f"        expr: {json.dumps(a['expr'])}",
            f"        for: {a['for']}",
            "        labels:",
            f"          severity: {a['severity']}",
            "        annotations:",
            f"          summary: {json.dumps(a['summary'])}",
            f"          description: {json.dumps(a['description'])}",
        ]
    return "\n".join(out) + "\n"
