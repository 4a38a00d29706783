"""Realistic concurrent traffic against the demo app, run in a process of its own."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
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
]


async def worker(client: httpx.AsyncClient, deadline: float, counts: dict[str, int]) -> None:
    weights = [w for w, _, _ in MIX]
    while time.monotonic() < deadline:
        _, method, path = random.choices(MIX, weights)[0]
        try:
            response = await client.request(method, path.format(n=random.randint(1, 999)))
            counts["ok" if response.status_code < 500 else "error"] += 1
            if response.headers.get("x-blocking-detected") == "true":
                counts["blocked"] += 1
        except httpx.HTTPError:
            counts["error"] += 1
        await asyncio.sleep(random.uniform(0.0, 0.05))


async def main(url: str, duration: float, concurrency: int) -> None:
    counts = {"ok": 0, "error": 0, "blocked": 0}
    deadline = time.monotonic() + duration
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        tasks = [asyncio.create_task(worker(client, deadline, counts)) for _ in range(concurrency)]
        start = time.monotonic()
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.5)
            elapsed = min(time.monotonic() - start, duration)
            bar = "#" * int(30 * elapsed / duration)
            sys.stderr.write(
                f"\r  traffic [{bar:<30}] {elapsed:4.1f}/{duration:.0f}s  "
                f"{counts['ok']} ok, {counts['blocked']} saw own blocking, {counts['error']} errors"
            )
            sys.stderr.flush()
        sys.stderr.write("\n")
    print(json.dumps(counts))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--duration", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=30)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.duration, args.concurrency))
