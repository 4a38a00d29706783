"""fastapi-loopguard: find the request and the line that blocked your event loop.

Quick start::

    from fastapi import FastAPI
    from fastapi_loopguard import LoopGuardMiddleware, LoopGuardConfig

    app = FastAPI()
    app.add_middleware(LoopGuardMiddleware, config=LoopGuardConfig(dev_mode=True))
"""

from .config import LoopGuardConfig
from .events import BlockingEvent, Frame
from .guard import LoopGuard
from .middleware import LoopGuardMiddleware
from .registry import label

__all__ = [
    "BlockingEvent",
    "Frame",
    "LoopGuard",
    "LoopGuardConfig",
    "LoopGuardMiddleware",
    "label",
]
__version__ = "0.4.0"
