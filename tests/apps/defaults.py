"""An app guarded with the production defaults (no dev_mode), plus the exporters a production
service turns on: Prometheus and the event log. The security tests read every response it gives
and everything it writes, looking for what must never leave: headers, stacks, file paths and
query strings.
"""

from __future__ import annotations

import os
import time

from fastapi import FastAPI

from fastapi_loopguard import LoopGuardConfig, LoopGuardMiddleware

app = FastAPI()
app.add_middleware(
    LoopGuardMiddleware,
    config=LoopGuardConfig(
        prometheus_enabled=True,
        event_log_path=os.environ.get("DEFAULTS_EVENT_LOG") or None,
        log_format=os.environ.get("DEFAULTS_LOG_FORMAT", "text"),
    ),
)


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


@app.get("/block")
async def block() -> dict[str, bool]:
    time.sleep(0.12)
    return {"ok": True}


@app.get("/boom")
async def boom() -> dict[str, bool]:
    time.sleep(0.12)
    raise RuntimeError("the app's own failure")
