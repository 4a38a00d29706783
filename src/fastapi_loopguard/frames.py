"""Where this interpreter keeps what: the directories the native frame filter needs.

The rule that picks a stack's culprit lives in the engine (``cpp/include/loopguard/frame_filter.h``)
and is used by the sampler at capture and by the guard for a suspended coroutine's stack. All it
needs from Python is the layout of this interpreter, read once, when the first guard asks (the
engine is loaded on first use, see _native.py): the standard library, the event loop's
packages, site-packages, this package, the script directories and the main script.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import site
import sys
import sysconfig
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._core import FrameFilter, FrameFilterConfig

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# The functions of asyncio and uvloop that run a loop: asyncio.run, asyncio.Runner.run,
# uvloop.run, and the loop methods they call (uvloop's own are native and leave no frame).
_LOOP_ENTRIES = [
    "run",
    "Runner.run",
    "BaseEventLoop.run_forever",
    "BaseEventLoop.run_until_complete",
]


def _spellings(paths: set[str]) -> list[str]:
    """Each directory as written and with its symbolic links resolved, both normalised.

    File names in frames are compared lexically (the sampler may not touch the file system), so
    a directory reached through a link must be known under both of its names.
    """
    out = set()
    for path in paths:
        if path:
            out.add(os.path.normpath(os.path.abspath(path)))
            out.add(os.path.realpath(path))
    return sorted(os.path.join(p, "") for p in out)


def _loop_dirs(stdlib: str) -> set[str]:
    """asyncio's directory and uvloop's (found without importing it, if it is installed)."""
    dirs = {os.path.join(stdlib, "asyncio")}
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("uvloop")
        if spec is not None and spec.origin:
            dirs.add(os.path.dirname(spec.origin))
    return dirs


def _main_script() -> str:
    main = sys.modules.get("__main__")
    filename = getattr(main, "__file__", None)
    if not isinstance(filename, str) or filename.startswith("<"):
        return ""  # an interactive session, python -c: no script
    return os.path.normpath(os.path.abspath(filename))


def _layout() -> dict[str, Any]:
    """The ``FrameFilterConfig`` fields for this interpreter, as plain Python values."""
    paths = sysconfig.get_paths()
    library = {paths.get("purelib", ""), paths.get("platlib", ""), *site.getsitepackages()}
    if site.ENABLE_USER_SITE and site.USER_SITE:
        library.add(site.USER_SITE)
    scripts = {paths.get("scripts", ""), os.path.dirname(os.path.abspath(sys.executable))}
    with contextlib.suppress(KeyError):
        scripts.add(sysconfig.get_path("scripts", f"{os.name}_user"))
    return {
        "runtime_prefixes": _spellings({paths.get("stdlib", ""), paths.get("platstdlib", "")}),
        "loop_prefixes": _spellings(_loop_dirs(paths.get("stdlib", ""))),
        "library_prefixes": _spellings(library),
        "own_prefixes": _spellings({_PACKAGE_DIR}),
        # The bundled demo is application code, although it is installed inside this package.
        "application_prefixes": _spellings({os.path.join(_PACKAGE_DIR, "demo")}),
        "launcher_prefixes": _spellings(scripts),
        "loop_entry_functions": _LOOP_ENTRIES,
        "main_script": _main_script(),
    }


# Read once, at import: resolving the directories touches the file system (realpath, getcwd),
# which must not happen on a running loop. Starlette's own suite runs blockbuster, which fails
# such a call inside a loop, and the first guard starts on one.
_LAYOUT = _layout()

# The native objects below are made afresh on each call and never kept here: one reachable from
# a module at interpreter exit (a daemon thread's frame keeps __main__ and what it imported
# alive) would outlive the extension, and nanobind reports it as a leak on the app's stderr.


def frame_config(core: Any) -> FrameFilterConfig:
    """A ``FrameFilterConfig`` describing this interpreter, from the loaded extension ``core``."""
    config: FrameFilterConfig = core.FrameFilterConfig()
    for name, value in _LAYOUT.items():
        setattr(config, name, value)
    return config


def frame_filter(core: Any) -> FrameFilter:
    """The same rule for stacks read on the Python side (a cumulative event's suspended
    coroutine): a ``FrameFilter`` for one stack, dropped after it."""
    rule: FrameFilter = core.FrameFilter(frame_config(core))
    return rule
