"""The victims' delay: how long each request was frozen by blocks that others caused.

One real uvicorn server (both loops) runs the integrations app with every surface on: dev-mode
headers, Prometheus, and OpenTelemetry (the ASGI instrumentation and the SDK's in-memory
exporter). Innocent requests await while another request's ``time.sleep(0.2)`` holds
the loop: each innocent must learn that it waited about that long and blocked nothing, and the
culprit the reverse. Bounds are loose on purpose: a busy host stretches every block, and only
the scenario's physics (a 200 ms sleep freezes whoever is in flight for 200 ms) is asserted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Server, start_server, stop_server

APP = "tests.apps.integrations:app"
INNOCENTS = 4


@pytest.fixture
def server(loop_name: str, tmp_path: Path) -> Iterator[Server]:
    options = {
        "dev_mode": True,
        "prometheus_enabled": True,
        "otel_enabled": True,
    }
    env = {"LOOPGUARD_TEST_OTEL": "1", "LOOPGUARD_TEST_OPTIONS": json.dumps(options)}
    server = start_server(APP, loop_name, tmp_path, env=env)
    yield server
    stop_server(server)


def timing(response: httpx.Response) -> dict[str, float]:
    """``loopguard-wait;dur=12.3, loopguard-block;dur=0`` as {"loopguard-wait": 12.3, ...}."""
    out: dict[str, float] = {}
    for entry in response.headers["server-timing"].split(","):
        name, _, dur = entry.strip().partition(";dur=")
        out[name] = float(dur)
    return out


async def _traffic(url: str) -> tuple[httpx.Response, list[httpx.Response]]:
    limits = httpx.Limits(max_connections=INNOCENTS + 2)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:
        innocents = [asyncio.create_task(client.get("/innocent")) for _ in range(INNOCENTS)]
        await asyncio.sleep(0.2)  # every innocent awaits inside the app now
        guilty = await client.get("/sleep/200", headers={"x-request-id": "culprit-1"})
        return guilty, list(await asyncio.gather(*innocents))


def _metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name}{labels} not exposed")


def _request_spans(url: str, count: int) -> list[dict[str, Any]]:
    for _ in range(100):
        spans = httpx.get(url + "/_otel", timeout=5).json()["spans"]
        ours = [s for s in spans if "loopguard.wait_ms" in s["attributes"]]
        if len(ours) >= count:
            return ours
        asyncio.run(asyncio.sleep(0.05))
    raise AssertionError(f"no request span carries the delay: {spans}")


def test_innocents_wait_the_culprit_blocks(server: Server) -> None:
    guilty, innocents = asyncio.run(_traffic(server.url))
    assert guilty.status_code == 200
    assert all(r.status_code == 200 for r in innocents)

    # Server-Timing, read at each response's start.
    culprit = timing(guilty)
    assert culprit["loopguard-block"] >= 150
    assert culprit["loopguard-wait"] < 100  # nobody else blocked meanwhile
    assert float(guilty.headers["x-blocking-total-ms"]) >= 150  # the old headers stay
    waits = []
    for response in innocents:
        t = timing(response)
        assert t["loopguard-block"] == 0
        assert t["loopguard-wait"] >= 150, response.headers
        assert response.headers["x-blocking-count"] == "0"
        waits.append(t["loopguard-wait"])

    # Prometheus: one observation per request, in seconds, by route template.
    text = httpx.get(server.url + "/metrics", timeout=10).text
    name = "loopguard_request_wait_seconds"
    assert _metric(text, f"{name}_count", route="/innocent") == INNOCENTS
    assert _metric(text, f"{name}_sum", route="/innocent") >= INNOCENTS * 0.15
    assert _metric(text, f"{name}_bucket", route="/innocent", le="0.1") == 0
    assert _metric(text, f"{name}_count", route="/sleep/{ms}") == 1
    assert _metric(text, f"{name}_sum", route="/sleep/{ms}") < 0.1

    # OpenTelemetry: the request spans carry both figures.
    spans = _request_spans(server.url, INNOCENTS + 1)
    by_wait = sorted(spans, key=lambda s: s["attributes"]["loopguard.wait_ms"])
    assert by_wait[0]["attributes"]["loopguard.block_ms"] >= 150  # the culprit waited least
    for span in by_wait[1:]:
        assert span["attributes"]["loopguard.wait_ms"] >= 150
        assert span["attributes"]["loopguard.block_ms"] == 0

    print(f"{server.loop}: innocents waited {sorted(waits)} ms, culprit {culprit}")
