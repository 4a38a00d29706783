"""Reports of blocking events: an HTML page (static or live) and a terminal summary.

``load_event_log(path)`` reads an event log, ``from_events(...)`` wraps events in memory, and
``render(report)`` returns the self-contained page. The terminal renderer lives in
``report.terminal`` and needs the ``[cli]`` extra (rich).
"""

from .loading import from_events, load_event_log
from .model import Report
from .page import render

__all__ = ["Report", "from_events", "load_event_log", "render"]
