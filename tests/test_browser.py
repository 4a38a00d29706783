"""The report page and the live page in a real browser: Debian's chromium, headless.

Checks that the charts have drawn content, that the stylesheet was accepted by the page's own
Content-Security-Policy, that nothing hostile ran, that the console is clean, that nothing was
fetched from the network, and that a phone-width screen needs no sideways scrolling. Screenshots
go to artifacts/ (gitignored) for people and CI to look at.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fastapi_loopguard.report import load_event_log, render

from .cdp import Page, chromium
from .conftest import ROOT, culprit_line
from .test_cli import block_with_bystanders, loopguard_run

ARTIFACTS = ROOT / "artifacts"
PWN = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'

COUNT_CHARTS = """(() => {
  const q = (s) => [...document.querySelectorAll(s)];
  const drawn = (els) =>
    els.filter((e) => { const b = e.getBBox(); return b.width > 0 && b.height > 0; }).length;
  return {
    timeline: drawn(q("svg.timeline rect.k")),
    routes: q("#lg-routes .row").length,
    routeBars: drawn(q("#lg-routes svg.hbar rect.k")),
    lagBars: drawn(q("#lg-lag svg.hbar rect")),
    histogram: drawn(q("svg.histogram rect.k")),
    culprits: q("tbody.culprit").length,
    snippets: q("pre.src span.hit").length,
    events: q("details.event").length,
    svgs: q("svg").length,
    scripts: document.scripts.length,
    pwned: window.pwned === undefined ? null : window.pwned,
    sleepFill: getComputedStyle(document.querySelector("rect.k-sleep") || document.body).fill,
  };
})()"""

PHONE_FITS = "document.documentElement.scrollWidth <= window.innerWidth"


def _event(t: float, ms: float, kind: str, route: str, culprit: dict[str, Any] | None) -> str:
    return json.dumps(
        {
            "type": "event",
            "duration_ms": ms,
            "kind": kind,
            "request_id": f"r{t}",
            "method": "GET",
            "path": route,
            "route": route,
            "stack": [culprit] if culprit else [],
            "culprit": culprit,
            "cpu_ms": ms / 3,
            "victims": int(ms / 20),
            "started_at": t,
            "samples": 5,
        }
    )


def _write_log(path: Path) -> int:
    here = ROOT / "tests" / "apps" / "plain.py"
    sleep = {"filename": str(here), "lineno": culprit_line(here, "sleep"), "function": "sleep"}
    cpu = {"filename": str(here), "lineno": culprit_line(here, "cpu"), "function": "cpu"}
    hostile = {"filename": f"/srv/{PWN}.py", "lineno": 3, "function": PWN}
    t0 = time.time() - 20
    lines = []
    kinds = [("sleep", "/sleep/{ms}", sleep), ("cpu", "/cpu", cpu), ("io", "/prices", sleep)]
    kinds += [("lock", "/orders", cpu), ("gil", "/export", None), ("cpu", f"/x/{PWN}", hostile)]
    for i in range(30):
        kind, route, culprit = kinds[i % len(kinds)]
        lines.append(_event(t0 + i * 0.4, 60 + (i * 37) % 300, kind, route, culprit))
    stats = {
        "type": "stats",
        "pid": 1,
        "threshold_ms": 50.0,
        "lag_count": 5000,
        "lag_p50_ms": 0.08,
        "lag_p90_ms": 3.1,
        "lag_p99_ms": 220.0,
        "lag_max_ms": 340.0,
        "stalls": 30,
    }
    # The victims' delay: requests that waited for those blocks, and the ones that blocked.
    delays = [("/prices", 120.0, 0.0), ("/sleep/{ms}", 0.0, 210.0), (f"/x/{PWN}", 80.0, 95.0)]
    delays.append(("/orders", 15.0, 0.0))
    requests = [
        {"type": "request", "method": "GET", "route": route, "wait_ms": wait, "block_ms": block}
        for route, wait, block in delays
    ]
    path.write_text("\n".join([*lines, *map(json.dumps, requests), json.dumps(stats)]) + "\n")
    return len(lines)


def _assert_clean(page: Page, allowed_prefix: str) -> None:
    assert page.errors() == []
    urls = page.requested_urls()
    assert urls, "the browser reported no requests at all"
    assert all(url.startswith(allowed_prefix) for url in urls), urls


def test_static_report_in_chromium(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    count = _write_log(log)
    ARTIFACTS.mkdir(exist_ok=True)
    page_file = ARTIFACTS / "report.html"
    page_file.write_text(render(load_event_log(str(log))), "utf-8")
    with chromium(tmp_path / "profile") as page:
        page.set_width(1280)
        page.navigate(page_file.as_uri())
        charts = page.evaluate(COUNT_CHARTS)
        assert charts["timeline"] == count
        assert charts["routes"] == 6 and charts["routeBars"] >= 6
        assert charts["lagBars"] == 4
        assert charts["histogram"] >= 3
        assert charts["culprits"] == 3 and charts["snippets"] >= 2
        assert charts["events"] == count
        assert charts["scripts"] == 0 and charts["pwned"] is None
        assert charts["sleepFill"] == "rgb(0, 114, 178)"  # the stylesheet passed the CSP
        assert page.evaluate("document.querySelectorAll('table.delay tbody tr').length") == 4
        page.screenshot(ARTIFACTS / "report-1280.png")
        page.set_width(390, mobile=True)
        assert page.evaluate(PHONE_FITS)
        page.screenshot(ARTIFACTS / "report-phone.png", max_height=2400)
        _assert_clean(page, page_file.as_uri())


def test_live_page_in_chromium(loop_name: str, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    args = ["tests.apps.plain:app", "--dashboard", "/_loopguard", "--event-log", str(events)]
    with (
        loopguard_run(tmp_path, loop_name, *args) as server,
        chromium(tmp_path / "profile") as page,
    ):
        page.set_width(1280)
        page.navigate(server.url + "/_loopguard/")
        assert page.evaluate(COUNT_CHARTS)["timeline"] == 0
        assert "No blocking events yet." in page.evaluate("document.body.innerText")
        block_with_bystanders(server.url, "/sleep/250")
        block_with_bystanders(server.url, "/cpu")
        # The page polls data.json every 2 s and draws what arrived, without a reload.
        page.wait_for("document.querySelectorAll('svg.timeline rect.k').length >= 2", 15)
        page.wait_for("document.querySelectorAll('details.event').length >= 2", 5)
        charts = page.evaluate(COUNT_CHARTS)
        assert charts["routes"] >= 2 and charts["routeBars"] >= 2
        assert charts["lagBars"] == 4
        assert charts["culprits"] >= 2 and charts["snippets"] >= 2
        assert charts["scripts"] == 2  # the page's config and its one script
        text = page.evaluate("document.body.innerText")
        assert "GET /sleep/{ms}" in text and "GET /cpu" in text and "plain.py" in text
        assert page.evaluate("document.getElementById('lg-status').textContent").startswith(
            "live, updated"
        )
        page.screenshot(ARTIFACTS / f"live-{loop_name}-1280.png")
        page.set_width(390, mobile=True)
        assert page.evaluate(PHONE_FITS)
        _assert_clean(page, server.url + "/_loopguard/")
