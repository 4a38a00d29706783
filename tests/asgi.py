"""Driving an ASGI app in-process, for middleware properties that need no network."""

from __future__ import annotations

from typing import Any

Message = dict[str, Any]


def http_scope(path: str, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "query_string": b"",
        "root_path": "",
        "headers": headers or [],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
    }


async def call(app: Any, scope: dict[str, Any]) -> list[Message]:
    """Runs one request through `app` and returns what it sent."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def headers_of(messages: list[Message]) -> dict[str, str]:
    start = next(m for m in messages if m["type"] == "http.response.start")
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]}
