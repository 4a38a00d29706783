"""Realistic concurrent traffic against the demo app, run in a process of its own.

A separate process, so the client's own work never shares the server's event loop or GIL. It
reports progress as one JSON object per line on stdout, which ``loopguard demo`` draws.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import httpx

# (weight, method, path): mostly healthy traffic, with culprits mixed in.
MIX = [
    (40, "GET", "/api/items/{n}"),
    (20, "GET", "/api/search?q=lamp"),
    (4, "GET", "/api/reports/{n}"),
    (4, "GET", "/api/prices/SKU-{n}"),
    (3, "GET", "/api/recommendations"),
    (3, "POST", "/api/login"),
    (4, "POST", "/api/orders"),
    (4, "POST", "/api/checkout"),
    (3, "GET", "/api/export"),
    (2, "GET", "/api/feed"),
]


async def worker(
    client: httpx.AsyncClient, deadline: float, counts: dict[str, int], first: int
) -> None:
    weights = [w for w, _, _ in MIX]
    # Each worker's first request is the mix's entry number `first`, so that even a short run
    # (`--duration 5`: some 150 requests, where a 4-in-87 culprit is missed about once in 1,000
    # runs) shows every culprit; the rest are drawn by weight.
    choice = MIX[first % len(MIX)]
    while time.monotonic() < deadline:
        _, method, path = choice
        choice = random.choices(MIX, weights)[0]
        try:
            response = await client.request(method, path.format(n=random.randint(1, 999)))
            counts["ok" if response.status_code < 500 else "error"] += 1
            if response.headers.get("x-blocking-detected") == "true":
                counts["blocked"] += 1
        except httpx.HTTPError:
            counts["error"] += 1
        await asyncio.sleep(random.uniform(0.0, 0.05))


def _progress(elapsed: float, counts: dict[str, int], done: bool = False) -> None:
    print(json.dumps({"elapsed": round(elapsed, 2), "done": done, **counts}), flush=True)


async def main(url: str, duration: float, concurrency: int) -> None:
    counts = {"ok": 0, "error": 0, "blocked": 0}
    start = time.monotonic()
    deadline = start + duration
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        tasks = [
            asyncio.create_task(worker(client, deadline, counts, i)) for i in range(concurrency)
        ]
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.25)
            _progress(min(time.monotonic() - start, duration), counts)
        await asyncio.gather(*tasks)
    _progress(duration, counts, done=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--duration", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=30)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.duration, args.concurrency))
