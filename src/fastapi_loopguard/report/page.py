"""The report page: one self-contained HTML file, for ``loopguard report`` and the live page.

No network: the stylesheet is inline, the charts are inline SVG (``charts.py``), and a
Content-Security-Policy in the page itself forbids loading anything, so a report opened from a
mail attachment or an air-gapped machine looks the same. The static page has no script at all;
the live page adds one small script, allowed by its hash, that polls ``data.json`` and swaps in
sections rendered by this same module.

All text that came from requests, logs or source files goes through ``charts.esc`` (control
characters made visible, then ``html.escape``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from .. import __version__
from ..events import KIND_MEANINGS
from .assets import CSS, LIVE_JS, content_security_policy
from .charts import esc
from .model import Report
from .profile import Node
from .sections import MAX_LISTED_EVENTS, delay, event_html, sections, utc


def _json_for_script(value: object) -> str:
    # Inside <script>, "</" would end the element: escape the characters HTML cares about.
    text = json.dumps(value)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(
    report: Report,
    *,
    title: str = "fastapi-loopguard report",
    now: float | None = None,
    live: dict[str, object] | None = None,
    events_html: Sequence[str] | None = None,
    tree: Node | None = None,
) -> str:
    """The whole page. ``live`` (seq, interval_ms) makes it poll for updates; ``events_html``
    are the events' entries already rendered, oldest first (the live page keeps them)."""
    parts = sections(report, now, tree=tree)
    if events_html is None:
        events_html = [event_html(e) for e in report.events[-MAX_LISTED_EVENTS:]]
    events_list = "".join(reversed(events_html[-MAX_LISTED_EVENTS:]))
    origin = f"Source: {report.source}. " if report.source else ""
    generated = f"{origin}Made {utc(time.time(), True)} by fastapi-loopguard {__version__}."
    status = script = ""
    if live is not None:
        status = '<span id="lg-status" class="live">live</span>'
        config = {**live, "max_events": MAX_LISTED_EVENTS}
        script = (
            f'<script id="lg-config" type="application/json">{_json_for_script(config)}</script>'
            f"<script>{LIVE_JS}</script>"
        )
    return (
        "<!DOCTYPE html>"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" '
        f'content="{esc(content_security_policy(live is not None))}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        '<link rel="icon" href="data:,">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"<header><h1>{esc(title)}{status}</h1><p>{esc(generated)}</p></header>"
        f'<section id="lg-summary">{parts["lg-summary"]}</section>'
        f'<section id="lg-timeline">{parts["lg-timeline"]}</section>'
        f'<section id="lg-routes">{parts["lg-routes"]}</section>'
        f'<section id="lg-delay">{delay(report)}</section>'
        f'<section id="lg-workers">{parts["lg-workers"]}</section>'
        f'<section id="lg-lag">{parts["lg-lag"]}</section>'
        f'<section id="lg-durations">{parts["lg-durations"]}</section>'
        f'<section id="lg-culprits">{parts["lg-culprits"]}</section>'
        f'<section id="lg-profile">{parts["lg-profile"]}</section>'
        f'<section id="lg-events"><div id="lg-events-head">{parts["lg-events-head"]}</div>'
        f'<div id="lg-events-list">{events_list}</div></section>'
        f"<footer>Kinds: {esc(_kinds_legend())}.</footer>"
        f"</main>{script}</body></html>"
    )


def _kinds_legend() -> str:
    return ", ".join(f"{kind} ({meaning})" for kind, meaning in KIND_MEANINGS.items())
