"""Driving an ASGI app in-process, for middleware properties that need no network."""

from __future__ import annotations

from typing import Any

from testkit.asgi import http_scope

__all__ = ["Message", "call", "headers_of", "http_scope"]

Message = dict[str, Any]


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
