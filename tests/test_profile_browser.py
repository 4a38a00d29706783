"""The flame graph in a real browser (Debian's chromium, headless), driven by real input events.

A mouse over a frame, a click, and a tap at phone width each show the frame's file:line and
blocked time in the graph's details bar (CSS only: the page runs no script). At phone width the
narrow drawing is shown, its labels are readable, and nothing scrolls sideways. The live page
draws the graph as events arrive, on both loops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi_loopguard.report import load_event_log, render

from .cdp import Page, chromium
from .test_browser import ARTIFACTS, PHONE_FITS, _assert_clean, _write_log
from .test_cli import block_with_bystanders, loopguard_run

# The details bar of the frame under the pointer or in focus, and the drawing it belongs to.
SHOWN_TIP = """(() => {
  const tips = [...document.querySelectorAll('svg.flame .fg-tip')]
    .filter((t) => getComputedStyle(t).visibility === 'visible');
  return tips.map((t) => ({
    text: t.textContent,
    svg: t.closest('svg').getAttribute('class'),
  }));
})()"""


def _frame_center(page: Page, svg: str, index: int) -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate(
        f"""(() => {{
      const node = document.querySelectorAll('svg.{svg} .fg-n')[{index}];
      node.scrollIntoView({{block: 'center'}});
      const box = node.querySelector('rect').getBoundingClientRect();
      return {{x: box.x + box.width / 2, y: box.y + box.height / 2,
               title: node.querySelector('title').textContent}};
    }})()"""
    )
    return result


def _mouse(page: Page, kind: str, x: float, y: float) -> None:
    page.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)


def test_flame_graph_hover_click_and_tap(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    _write_log(log)
    ARTIFACTS.mkdir(exist_ok=True)
    page_file = ARTIFACTS / "report-profile.html"
    page_file.write_text(render(load_event_log(str(log))), "utf-8")
    with chromium(tmp_path / "profile") as page:
        # Headless windows never have focus; a user's window has, and :focus needs it.
        page.call("Emulation.setFocusEmulationEnabled", enabled=True)
        page.set_width(1280)
        page.navigate(page_file.as_uri())
        drawn = page.evaluate(
            "[...document.querySelectorAll('svg.fg-wide .fg-n rect.k')]"
            ".filter((r) => r.getBBox().width > 0).length"
        )
        assert drawn >= 4
        assert page.evaluate(SHOWN_TIP) == []
        frame = _frame_center(page, "fg-wide", 2)
        _mouse(page, "mouseMoved", frame["x"], frame["y"])
        [tip] = page.evaluate(SHOWN_TIP)
        assert "fg-wide" in tip["svg"] and " ms (" in tip["text"] and "events" in tip["text"]
        # A click keeps it after the pointer has gone.
        _mouse(page, "mousePressed", frame["x"], frame["y"])
        _mouse(page, "mouseReleased", frame["x"], frame["y"])
        _mouse(page, "mouseMoved", 2, 2)
        [tip] = page.evaluate(SHOWN_TIP)
        assert tip["text"].split(":")[0] in frame["title"]
        leaf = page.evaluate(
            "[...document.querySelectorAll('svg.fg-wide .fg-n title')]"
            ".map((t) => t.textContent).filter((t) => t.includes('plain.py:')).length"
        )
        assert leaf >= 2  # the culprit lines, with their file:line
        _assert_clean(page, page_file.as_uri())

        page.set_width(390, mobile=True)
        page.call("Emulation.setTouchEmulationEnabled", enabled=True, maxTouchPoints=1)
        assert page.evaluate(PHONE_FITS)
        shown = page.evaluate(
            "[...document.querySelectorAll('svg.flame')].map((s) => getComputedStyle(s).display)"
        )
        assert shown == ["none", "block"]  # the narrow drawing, sized for the phone
        label_px = page.evaluate(
            "Math.min(...[...document.querySelectorAll('svg.fg-narrow text.fg-l')]"
            ".map((t) => t.getBoundingClientRect().height))"
        )
        assert label_px >= 9  # CSS pixels: readable, not a scaled-down desktop drawing
        frame = _frame_center(page, "fg-narrow", 3)
        point = {"x": frame["x"], "y": frame["y"]}
        page.call("Input.dispatchTouchEvent", type="touchStart", touchPoints=[point])
        page.call("Input.dispatchTouchEvent", type="touchEnd", touchPoints=[])
        [tip] = page.evaluate(SHOWN_TIP)
        assert "fg-narrow" in tip["svg"] and " ms (" in tip["text"]
        page.screenshot(ARTIFACTS / "report-profile-phone.png", max_height=6000)


def test_live_page_draws_the_profile(loop_name: str, tmp_path: Path) -> None:
    args = ["tests.apps.plain:app", "--dashboard", "/_loopguard"]
    with (
        loopguard_run(tmp_path, loop_name, *args) as server,
        chromium(tmp_path / "profile") as page,
    ):
        page.set_width(1280)
        page.navigate(server.url + "/_loopguard/")
        assert "No blocking events yet." in page.evaluate(
            "document.getElementById('lg-profile').innerText"
        )
        block_with_bystanders(server.url, "/sleep/250")
        page.wait_for(
            "[...document.querySelectorAll('#lg-profile svg.fg-wide .fg-n title')]"
            ".filter((t) => t.textContent.includes('plain.py:')).length >= 1",
            15,
        )
        fixes = page.evaluate("document.getElementById('lg-culprits').innerText")
        assert "await asyncio.sleep(ms / 1000)" in fixes
        _assert_clean(page, server.url + "/_loopguard/")
