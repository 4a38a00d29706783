"""The live page's access rules and data, driven in-process through the middleware.

Only loopback is reachable in the tests, so other clients are simulated with an ASGI scope
carrying their address; the live page against a real server is in test_browser.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest

from fastapi_loopguard import LoopGuardConfig, LoopGuardMiddleware
from fastapi_loopguard.report.live import Dashboard
from fastapi_loopguard.report.sections import SECTION_IDS, STATS_SECTIONS

from .asgi import call, http_scope
from .test_guard import run

TOKEN = "tok_0123456789-abcdef"
HOSTILE = "/evil/<script>alert(1)</script>\r\n\x1b[2J"


async def app(scope: Any, receive: Any, send: Any) -> None:
    """The guarded app: blocks on /block..., answers 404 of its own everywhere else."""
    if scope["path"].startswith(("/block", "/evil")):
        time.sleep(0.12)
        status, body = 200, b"blocked"
    else:
        status, body = 404, b"app: not found"
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": body})


def scope(path: str, client: str | None = "127.0.0.1", **extra: Any) -> dict[str, Any]:
    result = http_scope(path)
    result["client"] = (client, 50000) if client is not None else None
    if "?" in path:
        result["path"], query = path.split("?", 1)
        result["query_string"] = query.encode()
    result.update(extra)
    return result


def response(sent: list[dict[str, Any]]) -> tuple[int, dict[str, str], bytes]:
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], headers, body


def serve(
    loop_name: str, config: LoopGuardConfig, scopes: list[dict[str, Any]]
) -> list[tuple[int, dict[str, str], bytes]]:
    async def main() -> list[tuple[int, dict[str, str], bytes]]:
        middleware = LoopGuardMiddleware(app, config)
        results = []
        for s in scopes:
            results.append(response(await call(middleware, s)))
            if s["path"].startswith(("/block", "/evil")):
                await asyncio.sleep(0.1)  # let the event be delivered
        middleware.guard.stop()
        return results

    return list(run(loop_name, main))


def dashboard(**options: Any) -> LoopGuardConfig:
    return LoopGuardConfig(dashboard_path="/_loopguard", log_blocking_events=False, **options)


def is_page(result: tuple[int, dict[str, str], bytes]) -> bool:
    status, headers, body = result
    return (
        status == 200
        and headers["content-type"] == "text/html; charset=utf-8"
        and b'id="lg-config"' in body
    )


def is_refused(result: tuple[int, dict[str, str], bytes]) -> bool:
    # Refused requests reach the app as if there were no dashboard: nothing of ours leaks.
    status, headers, body = result
    return (status, body) == (404, b"app: not found") and "content-security-policy" not in headers


@pytest.mark.parametrize("client", ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"])
def test_loopback_clients_see_the_page(loop_name: str, client: str) -> None:
    results = serve(
        loop_name,
        dashboard(dev_mode=True),
        [scope("/_loopguard/", client), scope("/_loopguard", client)],
    )
    for result in results:
        assert is_page(result)
        headers = result[1]
        assert headers["cache-control"] == "no-store"
        assert headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "x-request-id" not in headers  # the dashboard itself is never tracked


@pytest.mark.parametrize("client", ["203.0.113.5", "10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1"])
def test_other_clients_are_refused_without_a_token(loop_name: str, client: str) -> None:
    results = serve(
        loop_name,
        dashboard(),
        [scope("/_loopguard/", client), scope("/_loopguard/data.json", client)],
    )
    assert all(is_refused(r) for r in results)


def test_unknown_or_unix_socket_peers_are_refused(loop_name: str) -> None:
    results = serve(
        loop_name, dashboard(), [scope("/_loopguard/", None), scope("/_loopguard/", "localhost")]
    )
    assert all(is_refused(r) for r in results)


def test_token_lets_other_clients_in(loop_name: str) -> None:
    remote = "203.0.113.5"
    results = serve(
        loop_name,
        dashboard(dashboard_token=TOKEN),
        [
            scope(f"/_loopguard/?token={TOKEN}", remote),
            scope("/_loopguard/", remote, headers=[(b"x-loopguard-token", TOKEN.encode())]),
            scope(
                "/_loopguard/data.json", remote, headers=[(b"x-loopguard-token", TOKEN.encode())]
            ),
            scope("/_loopguard/", "127.0.0.1"),  # loopback still needs none
            scope("/_loopguard/?token=wrong-token-0123456789", remote),
            scope(f"/_loopguard/?token={TOKEN[:-1]}", remote),
            scope("/_loopguard/", remote, headers=[(b"x-loopguard-token", b"")]),
            scope(f"/_loopguard/?tok={TOKEN}", remote),
            scope("/_loopguard/", remote),
        ],
    )
    assert [is_page(r) for r in results[:2]] == [True, True]
    assert results[2][0] == 200 and results[2][1]["content-type"] == "application/json"
    assert is_page(results[3])
    assert all(is_refused(r) for r in results[4:])


def test_dashboard_is_off_by_default(loop_name: str) -> None:
    results = serve(loop_name, LoopGuardConfig(), [scope("/_loopguard/")])
    assert is_refused(results[0])


def test_only_get(loop_name: str) -> None:
    results = serve(loop_name, dashboard(), [scope("/_loopguard/", method="POST")])
    status, headers, _ = results[0]
    assert (status, headers["allow"]) == (405, "GET")


def test_data_follows_the_events(loop_name: str) -> None:
    results = serve(
        loop_name,
        dashboard(),
        [
            scope("/_loopguard/data.json?since=0"),
            scope("/block/1"),
            scope("/block/2"),
            scope("/_loopguard/data.json?since=0"),
            scope("/_loopguard/data.json?since=2"),
            scope("/_loopguard/data.json?since=1"),
            scope("/_loopguard/data.json?since=999"),  # a page older than a server restart
            scope("/_loopguard/data.json?since=junk"),
        ],
    )
    data = [json.loads(r[2]) for r in results if r[1].get("content-type") == "application/json"]
    before, full, none, one, reset, junk = data
    assert (before["seq"], before["events"]) == (0, [])
    assert set(before["sections"]) == set(STATS_SECTIONS)
    assert "<b>0</b><span>blocking events</span>" in before["sections"]["lg-summary"]
    assert set(full["sections"]) == set(SECTION_IDS)
    assert full["seq"] == 2 and len(full["events"]) == 2
    assert "/block/1" in full["events"][0] and "/block/2" in full["events"][1]  # oldest first
    timeline = full["sections"]["lg-timeline"].split('class="chart timeline"')[1]
    assert timeline.split("</svg>")[0].count("<rect ") == 2
    assert "GET /block/1" in full["sections"]["lg-routes"]
    assert none["events"] == [] and none["reset"] is False
    assert set(none["sections"]) == set(STATS_SECTIONS)  # nothing new: only the statistics
    assert len(one["events"]) == 1 and "/block/2" in one["events"][0]
    assert set(one["sections"]) == set(SECTION_IDS)
    assert reset["reset"] is True and len(reset["events"]) == 2
    assert len(junk["events"]) == 2  # an unreadable `since` means "everything"


def test_hostile_paths_are_escaped_in_live_data(loop_name: str) -> None:
    results = serve(
        loop_name,
        dashboard(),
        [scope(HOSTILE), scope("/_loopguard/data.json"), scope("/_loopguard/")],
    )
    data = json.loads(results[1][2])
    event = data["events"][0]
    assert "<script>" not in event and "\x1b" not in event and "\r" not in event
    assert "&lt;script&gt;alert(1)&lt;/script&gt;\\x0d\\x0a\\x1b[2J" in event
    page = results[2][2].decode()
    assert page.count("<script") == 2  # our config block and our script, nothing else
    assert "&lt;script&gt;alert(1)" in page


def test_rendering_failure_is_a_500_and_logged(
    loop_name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: Dashboard) -> str:
        raise RuntimeError("renderer bug")

    monkeypatch.setattr(Dashboard, "page", broken)
    caplog.set_level(logging.ERROR, logger="fastapi_loopguard")
    results = serve(loop_name, dashboard(), [scope("/_loopguard/"), scope("/block/1")])
    assert results[0][0] == 500 and b"renderer bug" not in results[0][2]
    assert "rendering the dashboard failed" in caplog.text
    assert results[1][:1] == (200,)  # the app goes on
