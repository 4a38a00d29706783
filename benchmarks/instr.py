"""Instructions per request, guarded against bare, counted by callgrind: ``make bench-instr``.

Why instructions: on this shared 2-core machine wrk's throughput ratios move by up to 10 %
between runs, while callgrind's count of executed instructions repeats to a few instructions per
request (with a fixed hash seed), however busy the neighbours are. It counts every thread.

How: each (loop, variant) runs in a child process of its own under
``valgrind --tool=callgrind``. The child drives the FastAPI app in-process, without sockets:
the lifespan is started as a server would, then every request is a task of its own (as uvicorn
makes one per request) with a fresh scope. It calls ``os.getppid()`` before each chunk of N
requests and once after the last, and ``--dump-before=getppid`` makes callgrind write out and
reset its counters, all threads together, at each call: imports and warm-up end up in the first
dump, each chunk in one of its own. A request costs the median chunk / N: the marker and the
loop around a chunk are a few hundred instructions per chunk, and the median leaves out a chunk
that caught a rare lump (see CHUNKS). Markers in one process rather than processes of different
lengths subtracted: the 10 s of imports under valgrind are paid once, and no difference between
two processes' start-up can leak into the result. getppid because nothing on the request path
calls it and libc exports it under that name; the child's dumps are counted, so a stray call
would be noticed rather than shift the chunks.

The thresholds are set far above anything valgrind's slowdown (about 50x) can make a trivial
request take, so this measures the path of a request that did not block, and the guard's
calibration is skipped (it only runs at start and cannot lower the threshold below them). The
child is brought to a server's steady state first: the guard's buffer of finished requests is
full, and the start-up heap is frozen out of the garbage collector's way.

Two parts of the count are driven by time, not by requests: the watchdog and sampler threads,
and on uvloop the heartbeat timer (every ``monitor_interval_ms`` while requests are in flight).
Under valgrind a request takes ~50x longer, so these show ~50x more per request than at full
speed; the table therefore also gives the request-driven count without them.

``--breakdown`` then says where the guarded-minus-bare difference goes: each piece of the guard
is measured on its own in one more child per loop (see piece_pairs), and the native leaves
(engine calls and their binding, ContextVar, the GC hook, heartbeat, threads) are read from
callgrind's own call graph of the request runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import copy
import gc
import importlib.metadata
import json
import os
import platform
import re
import selectors
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testkit.asgi import find_middleware, http_scope

ROOT = Path(__file__).resolve().parent.parent
LOOPS = ("asyncio", "uvloop")
# The config's ceiling for both: an hour, i.e. never within a run however loaded the machine
# (the child checks that the guard saw no stall).
NEVER_MS = 3_600_000
# Route compilation, the guard's lazy start, the adaptive interpreter's specialisation: all done
# before the measured phases begin.
WARMUP = 300
# More than the finished requests the guard keeps for late events (4096): a server that has run a
# while has that buffer full and replaces one entry per request, which is what is measured.
FILL = 5000
MARKER = "getppid"
# Chunks per phase; a unit costs the median chunk / N. Some costs come in rare lumps: the
# OrderedDict of recent requests rebuilds its index every ~6,800 requests (about 1M
# instructions at once). A difference of two phase lengths would add or drop a whole lump
# wherever it falls, ±2k per request at N=500; the median of 5 chunks leaves it out, and the
# report names every chunk that stands out.
CHUNKS = 5

# The guard's config per variant, on top of the thresholds above; None is the bare app.
CONFIGS: dict[str, dict[str, Any] | None] = {
    "bare": None,
    "defaults": {},
    "dev_mode": {"dev_mode": True},
    "no_cumulative": {"cumulative_blocking_enabled": False},
}

Message = dict[str, Any]


# ---- the child: one app, driven in-process under callgrind ------------------------------------


def make_app(config: str) -> Any:
    """The trivial endpoint of benchmarks/apps.py, with its return annotation: FastAPI then
    serialises through pydantic's compiled path. Without one it goes through jsonable_encoder,
    some 40k instructions more per request, which would make every ratio look smaller."""
    from fastapi import FastAPI

    from fastapi_loopguard import LoopGuardConfig, LoopGuardMiddleware

    app = FastAPI()

    @app.get("/ok")
    async def ok() -> dict[str, bool]:
        return {"ok": True}

    extra = CONFIGS[config]
    if extra is not None:
        guard_config = LoopGuardConfig(
            fallback_threshold_ms=NEVER_MS,
            hang_threshold_ms=NEVER_MS,
            calibration_iterations=0,
            **extra,
        )
        app.add_middleware(LoopGuardMiddleware, config=guard_config)
    return app


# The headers of every request the child sends, as a client sends them.
OK_HEADERS = ((b"host", b"bench"), (b"accept", b"*/*"))


def ok_scope() -> dict[str, Any]:
    """A new scope per request, as a server builds one: Starlette writes into it."""
    return http_scope("/ok", list(OK_HEADERS))


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def discard(message: Message) -> None:
    """The measured requests' send: the response goes nowhere, the same in every variant."""


class Lifespan:
    """The server's half of the ASGI lifespan protocol: the guard starts at startup, as under
    uvicorn, and stops (delivering what it holds) at shutdown."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._outbox: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _say(self, what: str) -> None:
        await self._inbox.put({"type": f"lifespan.{what}"})
        answer = await self._outbox.get()
        if answer["type"] != f"lifespan.{what}.complete":
            raise SystemExit(f"lifespan {what} failed: {answer}")

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
        self._task = asyncio.get_running_loop().create_task(
            self._app(scope, self._inbox.get, self._outbox.put)
        )
        await self._say("startup")

    async def shutdown(self) -> None:
        await self._say("shutdown")
        if self._task is not None:
            await self._task


def check_response(config: str, sent: list[Message]) -> None:
    """Warm-up requests only: the app answered, and dev mode added its headers."""
    start, body = sent[0], sent[-1]
    if start.get("status") != 200 or body.get("body") != b'{"ok":true}':
        raise SystemExit(f"unexpected response: {sent}")
    names = {name for name, _ in start.get("headers", ())}
    if (config == "dev_mode") != (b"x-blocking-count" in names):
        raise SystemExit(f"dev-mode headers are wrong for {config}: {sorted(names)}")


Runner = Callable[[int], Awaitable[None]]


async def phases(config: str, requests: int, pieces: bool) -> dict[str, Any]:
    """Brings the app to a steady state, then runs each phase as CHUNKS chunks of N units, with
    a marker before each chunk and one at the end: a dump per chunk after the set-up's."""
    app = make_app(config)
    lifespan = Lifespan(app)
    await lifespan.startup()
    middleware = find_middleware(app)
    if middleware is not None:
        for _ in range(FILL):  # through the public API: cheaper than as many requests
            with middleware.guard.label("fill"):
                pass
    loop = asyncio.get_running_loop()
    for _ in range(WARMUP):
        sent: list[Message] = []

        async def keep(message: Message, sent: list[Message] = sent) -> None:
            sent.append(message)

        await loop.create_task(app(ok_scope(), receive, keep))
        check_response(config, sent)

    async def through_app(count: int) -> None:
        for _ in range(count):
            await loop.create_task(app(ok_scope(), receive, discard))

    measured = piece_pairs(app, middleware) if pieces else [("requests", through_app)]
    # The start-up heap is old and, in a server, rarely collected again. Frozen, it stays out of
    # the measured phases: a full collection landing in one of them would traverse all of it
    # and add the whole app's heap to a few requests.
    gc.collect()
    gc.freeze()
    for _, runner in measured:
        for _ in range(CHUNKS):
            os.getppid()  # callgrind dumps here: see the module docstring
            await runner(requests)
    os.getppid()
    stats = middleware.guard.stats() if middleware is not None else {}
    await lifespan.shutdown()
    return {"phases": [n for n, _ in measured], "stats": stats}


# Where objects land decides collisions in the type attribute cache and pymalloc's pool churn:
# up to 2k instructions per request that the hash seed does not move, and that any unrelated
# change to the process (even to this file) moves. So the seed shifts the heap as well, before
# the app is imported, and several seeds average over layouts too.
_BALLAST: list[object] = []


def child(args: argparse.Namespace) -> None:
    seed = int(os.environ.get("PYTHONHASHSEED", "0"))
    _BALLAST.extend([bytearray(seed * 1000), *([] for _ in range(seed * 100))])
    run = phases(args.config, args.requests, args.pieces)
    if args.loop == "uvloop":
        import uvloop

        result = uvloop.run(run)
    else:
        result = asyncio.run(run)
    Path(args.result).write_text(json.dumps(result))


# ---- the pieces: each measured alone, as the difference of two phases ---------------------------
#
# Python functions are invisible to callgrind, which sees the interpreter's C functions. So each
# piece of the guard is called on its own, in chunks of N calls, in the warmed-up child, next to
# a twin phase that does the same minus that piece; per call = the difference. The pieces are
# called through the guard's and the middleware's own objects, with the arguments the middleware
# passes, and with a request in flight where the piece needs one. Knocking pieces out of the
# request path instead moved everything around them (dict layouts, type-cache collisions,
# pymalloc's pools) by 1-2k instructions a piece, more than several pieces cost.

START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-length", b"11"), (b"content-type", b"application/json")],
}
BODY: Message = {"type": "http.response.body", "body": b'{"ok":true}'}


async def noop_app(scope: Any, receive: Any, send: Any) -> None:
    """Answers at once, with the two messages FastAPI sends: the guard's cost without FastAPI."""
    await send(START)
    await send(BODY)


def piece_pairs(app: Any, mw: Any) -> list[tuple[str, Runner]]:
    """Pairs of phases named "<piece>" and "<piece>/without", in that order."""
    guard: Any = mw.guard
    engine, var = guard._engine, guard._request_var
    guard_module: Any = importlib.import_module("fastapi_loopguard.guard")
    core: Any = importlib.import_module("fastapi_loopguard._core")
    loop = asyncio.get_running_loop()
    # As the middleware sees it once Starlette has routed it (end() reads the route template).
    scope = {**ok_scope(), "route": next(r for r in app.routes if r.path == "/ok")}
    path = scope["path"]
    request_id = core.request_id(scope["headers"])
    # A request in flight for the pieces that need one, begun in a Context of its own: the
    # driver's must not hold the guard's ContextVar, or every set below would replace it.
    in_flight, _ = contextvars.copy_context().run(guard.begin, request_id, "GET", path, scope)
    plain, dev = copy.copy(mw), copy.copy(mw)
    plain.app = dev.app = noop_app
    plain._headers = False  # the defaults' path; the child's config is dev_mode
    selector = getattr(loop, "_selector", None)

    def calls(fn: Callable[[], object]) -> Runner:
        async def run(count: int) -> None:
            for _ in range(count):
                fn()

        return run

    def awaits(fn: Callable[[], Awaitable[object]]) -> Runner:
        async def run(count: int) -> None:
            for _ in range(count):
                await fn()

        return run

    def nothing() -> None:
        pass

    def request_info() -> None:
        guard_module.RequestInfo(1, request_id, "GET", path, scope).release_scope()

    def begin_end() -> None:
        info, token = guard.begin(request_id, "GET", path, scope)
        guard.end(info, token)

    async def trivial() -> None:
        return None

    async def timed() -> None:
        info, token = guard.begin(request_id, "GET", path, scope)
        await guard.timed(trivial(), info)
        guard.end(info, token)

    async def timed_without() -> None:
        info, token = guard.begin(request_id, "GET", path, scope)
        await trivial()
        guard.end(info, token)

    async def checked_send() -> None:
        send = mw._checked_send(scope, in_flight, discard)
        await send(START)
        await send(BODY)

    async def checked_send_without() -> None:
        await discard(START)
        await discard(BODY)

    def request(app: Any) -> Callable[[], Awaitable[None]]:
        async def one() -> None:
            await loop.create_task(app(ok_scope(), receive, discard))

        return one

    pairs: list[tuple[str, Runner, Runner]] = [
        ("request, defaults", awaits(request(plain)), awaits(request(noop_app))),
        ("request, dev_mode", awaits(request(dev)), awaits(request(noop_app))),
        ("request_id()", calls(lambda: core.request_id(scope["headers"])), calls(nothing)),
        ("begin + end", calls(begin_end), calls(nothing)),
        ("start(), running", calls(guard.start), calls(nothing)),
        ("RequestInfo + release_scope", calls(request_info), calls(nothing)),
        ("ContextVar set + reset", calls(lambda: var.reset(var.set(0))), calls(nothing)),
        (
            "engine.begin_request + end_request",
            calls(lambda: engine.end_request(engine.begin_request("GET", path, request_id))),
            calls(nothing),
        ),
        ("timed(), one step", awaits(timed), awaits(timed_without)),
        ("_checked_send, 2 messages", awaits(checked_send), awaits(checked_send_without)),
        (
            "_with_headers",
            calls(lambda: mw._with_headers(START, in_flight, 0, 0.0, 0.0)),
            calls(nothing),
        ),
    ]
    if isinstance(selector, selectors.BaseSelector) and "select" in vars(selector):
        original = type(selector).select.__get__(selector)
        pairs.append(
            (
                "select(), one iteration",
                calls(lambda: selector.select(0)),
                calls(lambda: original(0)),
            )
        )
    return [
        p for name, with_, without in pairs for p in ((name, with_), (f"{name}/without", without))
    ]


# ---- reading callgrind's dumps -----------------------------------------------------------------


@dataclass
class Profile:
    """One callgrind dump: the total, each function's own cost and object file, and each call
    arc (caller, callee) with its call count and inclusive cost."""

    total: int = 0
    own: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    objects: dict[str, str] = field(default_factory=dict)
    arcs: dict[tuple[str, str], list[int]] = field(
        default_factory=lambda: defaultdict(lambda: [0, 0])
    )

    def inclusive(self, fn: str) -> int:
        """Own cost plus every call it made; callgrind includes calls still in progress at the
        dump, so a thread's entry function covers the whole thread."""
        return self.own.get(fn, 0) + sum(
            c for (a, b), (_, c) in self.arcs.items() if a == fn and b != fn
        )

    def calls_to(self, pattern: re.Pattern[str]) -> tuple[int, int]:
        """Calls to functions whose name matches, and their inclusive cost."""
        calls = cost = 0
        for (a, b), (n, c) in self.arcs.items():
            if pattern.search(b) and not pattern.search(a):
                calls, cost = calls + n, cost + c
        return calls, cost


_NAME = re.compile(r"\((\d+)\)(?: (.*))?")


def read_profile(path: Path) -> Profile:
    """Parses callgrind's format (with its name compression) for the one event it counts, Ir."""
    profile = Profile()
    names: dict[str, dict[str, str]] = {"fn": {}, "ob": {}}

    def name(space: str, text: str) -> str:
        match = _NAME.fullmatch(text)
        if match is None:
            return text
        if match.group(2) is not None:
            names[space][match.group(1)] = match.group(2)
        return names[space].get(match.group(1), f"({match.group(1)})")

    fn = callee = ob = ""
    pending: int | None = None  # the call count of a calls= line, until its cost line
    with open(path) as lines:
        for line in lines:
            head = line[:1]
            if head.isdigit() or head in "+-*":
                parts = line.split()
                cost = int(parts[1]) if len(parts) > 1 else 0
                if pending is None:
                    profile.own[fn] += cost
                else:
                    arc = profile.arcs[(fn, callee)]
                    arc[0] += pending
                    arc[1] += cost
                    pending = None
            elif line.startswith("fn="):
                fn = name("fn", line[3:-1])
                profile.objects.setdefault(fn, ob)
            elif line.startswith("cfn="):
                callee = name("fn", line[4:-1])
            elif line.startswith("ob="):
                ob = name("ob", line[3:-1])
            elif line.startswith("cob="):
                name("ob", line[4:-1])
            elif line.startswith("calls="):
                pending = int(line[6:].split()[0])
            elif line.startswith("summary:"):
                profile.total = int(line.split()[1])
    return profile


_TIMERS = re.compile(r"^uv__run_timers$")  # libuv's timer phase: uvloop's heartbeat
_TIMER_CALLBACKS = re.compile(r"TimerHandle__run$")  # one per beat
_LOOP_WAIT = re.compile(r"^epoll_p?wait$")  # one per loop iteration, asyncio and uvloop alike
_GC_HOOK = re.compile(r"^invoke_gc_callback")
_GC = re.compile(r"^gc_collect_main$")
_CONTEXTVAR = {
    "ContextVar.set": re.compile(r"^_contextvars_ContextVar_set$"),
    "ContextVar.reset": re.compile(r"^_contextvars_ContextVar_reset$"),
}
_ENGINE_FUNCTION = re.compile(r"^loopguard::((?:\w+::)*\w+)\(")
_CALLER = re.compile(r"Vectorcall|Call|EvalFrame")


@dataclass
class Counts:
    """Per-unit figures of one chunk (a unit: a request, or one call of a piece)."""

    total: float
    threads: float
    timers: float
    timer_calls: float
    loop_waits: float
    gc_runs: float
    gc_cost: float
    gc_hook: float
    contextvars: dict[str, float]
    engine: dict[str, tuple[float, float]]  # method -> (calls, instructions), and "dispatch"

    @property
    def time_driven(self) -> float:
        return self.threads + self.timers

    @property
    def request_driven(self) -> float:
        return self.total - self.time_driven


def _engine_calls(profile: Profile) -> dict[str, list[int]]:
    """Calls from the interpreter into the extension: [calls, instructions] per engine function,
    and under "nanobind" what the binding layer costs around them.

    The interpreter enters nanobind's unnamed dispatch functions (the extension is stripped),
    which convert the arguments and call the first named ``loopguard::`` function: the C++ work
    proper. Everything inside the extension on the way there, and the conversion of the result,
    is the binding's share: the calls' inclusive cost minus that of the named functions.
    """

    def in_core(fn: str) -> bool:
        return "/_core." in profile.objects.get(fn, "")

    callees: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    for (a, b), (n, c) in profile.arcs.items():
        callees[a].append((b, n, c))
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    todo = []
    for (a, b), (n, c) in profile.arcs.items():
        # The call machinery of the interpreter, not its GC traversing nanobind's objects.
        if in_core(b) and "libpython" in profile.objects.get(a, "") and _CALLER.search(a):
            out["nanobind"][0] += n
            out["nanobind"][1] += c
            if (match := _ENGINE_FUNCTION.match(b)) is not None:
                out[match.group(1)][0] += n
                out[match.group(1)][1] += c
                out["nanobind"][1] -= c
            else:
                todo.append(b)
    seen = set(todo)
    while todo:
        for callee, n, c in callees[todo.pop()]:
            if (match := _ENGINE_FUNCTION.match(callee)) is not None:
                out[match.group(1)][0] += n
                out[match.group(1)][1] += c
                out["nanobind"][1] -= c
            elif in_core(callee) and callee not in seen:
                seen.add(callee)
                todo.append(callee)
    return out


def counts(profile: Profile, n: int) -> Counts:
    """The figures of one chunk of n units, per unit."""

    def per(f: Callable[[Profile], float]) -> float:
        return f(profile) / n

    def calls(pattern: re.Pattern[str]) -> float:
        return per(lambda p: p.calls_to(pattern)[0])

    def cost(pattern: re.Pattern[str]) -> float:
        return per(lambda p: p.calls_to(pattern)[1])

    engine = {m: (calls / n, cost / n) for m, (calls, cost) in _engine_calls(profile).items()}
    return Counts(
        total=per(lambda p: p.total),
        threads=per(lambda p: p.inclusive("start_thread")),
        timers=cost(_TIMERS),
        timer_calls=calls(_TIMER_CALLBACKS),
        loop_waits=calls(_LOOP_WAIT),
        gc_runs=calls(_GC),
        gc_cost=cost(_GC),
        gc_hook=cost(_GC_HOOK),
        contextvars={name: cost(pattern) for name, pattern in _CONTEXTVAR.items()},
        engine=engine,
    )


# ---- the parent: runs the children, prints the tables -----------------------------------------


@dataclass(frozen=True)
class Run:
    loop: str
    config: str
    pieces: bool = False  # the pieces' phases instead of whole requests through FastAPI
    seed: int = 0

    def label(self) -> str:
        what = " pieces" if self.pieces else ""
        return f"{self.loop} {self.config}{what} (seed {self.seed})"


@dataclass
class Result:
    phases: dict[str, Counts]  # each phase's median chunk
    lumps: list[str]  # chunks that stood out from their phase's median

    @property
    def counts(self) -> Counts:
        return self.phases["requests"]


def measure(run: Run, requests: int, workdir: Path) -> Result:
    out = workdir / f"{run.loop}-{run.config}{'-pieces' if run.pieces else ''}-seed{run.seed}"
    out.mkdir()
    result_file = out / "result.json"
    cmd = ["valgrind", "--tool=callgrind", "-q", f"--dump-before={MARKER}",
           "--trace-children=no", f"--callgrind-out-file={out}/callgrind.out",
           sys.executable, "-m", "benchmarks.instr", "--child", "--loop", run.loop,
           "--config", run.config, "--requests", str(requests), "--result", str(result_file),
           *(["--pieces"] if run.pieces else [])]  # fmt: skip
    # The hash seed decides dict probe sequences and type-cache collisions all over the
    # interpreter, which moves a request's count by a few hundred instructions: fixed, so that
    # runs repeat; several (--seeds) to see how far that alone moves the ratios. One malloc arena:
    # each thread maps an arena of its own at its first allocation, at a moment the scheduler
    # decides, and that moves where the loop thread's memory lands. With one, a guarded run's
    # request-driven count repeats to the instruction; without, it wandered by up to 4k.
    env = {**os.environ, "PYTHONHASHSEED": str(run.seed), "MALLOC_ARENA_MAX": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{run.label()} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    facts = json.loads(result_file.read_text())
    names = facts["phases"]
    dumps = sorted(out.glob("callgrind.out.*"), key=lambda p: int(p.suffix[1:]))
    triggers = [_trigger(p) for p in dumps]
    if triggers != [f"--dump-before={MARKER}"] * (1 + CHUNKS * len(names)):
        raise SystemExit(f"{run.label()}: expected {1 + CHUNKS * len(names)} dumps: {triggers}")
    if facts["stats"].get("stalls", 0) or facts["stats"].get("hangs", 0):
        raise SystemExit(f"{run.label()}: the guard saw a stall: not the path of a good request")
    phases, lumps = {}, []
    for i, name in enumerate(names):
        chunks = [counts(read_profile(d), requests) for d in dumps[1 + CHUNKS * i :][:CHUNKS]]
        median = sorted(chunks, key=lambda c: c.request_driven)[CHUNKS // 2]
        phases[name] = median
        for j, c in enumerate(chunks):
            extra = (c.request_driven - median.request_driven) * requests
            # Not the few thousand instructions of a first chunk's specialisation and caches.
            if abs(extra) > max(100_000, median.request_driven * requests / 200):
                lumps.append(f"{run.label()} {name}, chunk {j + 1}: {extra:+,.0f} instructions")
    print(f"  measured: {run.label()}", flush=True)
    return Result(phases, lumps)


def _trigger(path: Path) -> str:
    with open(path) as f:
        for line in f:
            if line.startswith("desc: Trigger:"):
                return line.split(":", 2)[2].strip()
    return "?"


def measure_all(
    runs: Sequence[Run], requests: int, jobs: int, keep: Path | None
) -> dict[Run, Result]:
    with contextlib.ExitStack() as stack:
        if keep is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="instr-")))
        else:
            keep.mkdir(parents=True, exist_ok=True)
            workdir = Path(tempfile.mkdtemp(prefix="instr-", dir=keep))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {r: pool.submit(measure, r, requests, workdir) for r in runs}
            return {r: f.result() for r, f in futures.items()}


def environment() -> str:
    valgrind = subprocess.run(["valgrind", "--version"], capture_output=True, text=True)
    versions = ", ".join(
        f"{p} {importlib.metadata.version(p)}" for p in ("fastapi", "starlette", "uvloop")
    )
    return (
        f"CPython {platform.python_version()}, {valgrind.stdout.strip()}, {versions}, "
        f"{os.cpu_count()} CPUs"
    )


def _spread(values: Sequence[float], fmt: str) -> str:
    """The mean over the seeds, and half their range when there are several."""
    mean = sum(values) / len(values)
    text = format(mean, fmt)
    if len(values) > 1:
        text += "±" + format((max(values) - min(values)) / 2, fmt)
    return text


def main_table(
    results: dict[Run, Result], loops: Sequence[str], seeds: Sequence[int]
) -> Iterator[str]:
    yield (
        f"{'loop':<8} {'variant':<14} {'instr/request':>14} {'vs bare':>13} "
        f"{'time-driven':>12} {'request-driven':>15} {'vs bare':>13}"
    )
    for loop in loops:
        for config in CONFIGS:
            own = [results[Run(loop, config, seed=s)].counts for s in seeds]
            bare = [results[Run(loop, "bare", seed=s)].counts for s in seeds]
            ratio = [c.total / b.total for c, b in zip(own, bare, strict=True)]
            driven = [c.request_driven / b.request_driven for c, b in zip(own, bare, strict=True)]
            yield (
                f"{loop:<8} {config:<14} {_spread([c.total for c in own], ',.0f'):>14} "
                f"{_spread(ratio, '.3f') + 'x':>13} "
                f"{_spread([c.time_driven for c in own], ',.0f'):>12} "
                f"{_spread([c.request_driven for c in own], ',.0f'):>15} "
                f"{_spread(driven, '.3f') + 'x':>13}"
            )


def _piece_rows(results: dict[Run, Result], loop: str, seed: int) -> dict[str, float]:
    """One seed's breakdown, per request: each piece (its phase minus its twin), what is left
    of the piece that contains it, and the same request measured through FastAPI."""
    phases = results[Run(loop, "dev_mode", pieces=True, seed=seed)].phases

    def piece(name: str) -> float:
        return phases[name].request_driven - phases[f"{name}/without"].request_driven

    request = piece("request, defaults")
    begin_end, timed = piece("begin + end"), piece("timed(), one step")
    checked = piece("_checked_send, 2 messages")
    rows = {
        "request through the guard, defaults (a no-op ASGI app)": request,
        "  request_id(): the X-Request-ID scan or a new id, in C++": piece("request_id()"),
        "  begin + end": begin_end,
        "    ContextVar set + reset": piece("ContextVar set + reset"),
        "    engine.begin_request + end_request (the label, in C++)": piece(
            "engine.begin_request + end_request"
        ),
        "    start(), already running": piece("start(), running"),
        "    RequestInfo + release_scope": piece("RequestInfo + release_scope"),
        "    the rest: the units dict, exporters, recent requests": begin_end
        - piece("ContextVar set + reset")
        - piece("engine.begin_request + end_request")
        - piece("start(), running")
        - piece("RequestInfo + release_scope"),
        "  timed(), one step: the native step timer, the engine's record_step": timed,
        "  the rest: __call__ dispatch, _tracked, the ASGI plumbing": request
        - piece("request_id()")
        - begin_end
        - timed,
    }
    if "select(), one iteration" in phases:
        iterations = results[Run(loop, "defaults", seed=seed)].counts.loop_waits
        rows[f"select() wrapper x{iterations:.0f} loop iterations"] = iterations * piece(
            "select(), one iteration"
        )
    rows["dev_mode on top (a no-op ASGI app)"] = piece("request, dev_mode") - request
    rows["  _checked_send, 2 messages"] = checked
    rows["    _with_headers: the header list, in C++"] = piece("_with_headers")
    rows["    the rest: the wrapper, its closure, the live counters"] = checked - piece(
        "_with_headers"
    )
    bare = results[Run(loop, "bare", seed=seed)].counts
    defaults = results[Run(loop, "defaults", seed=seed)].counts
    dev = results[Run(loop, "dev_mode", seed=seed)].counts
    rows["through FastAPI, defaults - bare (request-driven)"] = (
        defaults.request_driven - bare.request_driven
    )
    rows["through FastAPI, dev_mode - defaults (request-driven)"] = (
        dev.request_driven - defaults.request_driven
    )
    return rows


def breakdown_table(
    results: dict[Run, Result], loops: Sequence[str], seeds: Sequence[int]
) -> Iterator[str]:
    rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for loop in loops:
        for seed in seeds:
            for label, value in _piece_rows(results, loop, seed).items():
                rows[label][loop].append(value)
    width = 13 if len(seeds) > 1 else 9
    yield f"{'piece (instructions per request)':<68}" + "".join(f"{lp:>{width}}" for lp in loops)
    for label, by_loop in rows.items():
        cells = (_spread(by_loop[lp], ",.0f") if lp in by_loop else "-" for lp in loops)
        yield f"{label:<68}" + "".join(f"{cell:>{width}}" for cell in cells)


def leaves_table(results: dict[Run, Result], loops: Sequence[str], seed: int) -> Iterator[str]:
    """Native leaves of the request runs, from callgrind's call graph, guarded minus bare."""
    for loop in loops:
        bare = results[Run(loop, "bare", seed=seed)].counts
        for config in ("defaults", "dev_mode"):
            c = results[Run(loop, config, seed=seed)].counts
            yield f"{loop} {config} (per request, minus bare where bare has it too):"
            yield (
                f"  loop iterations (epoll_wait) {c.loop_waits:.2f} (bare {bare.loop_waits:.2f}); "
                f"GC runs {c.gc_runs:.3f} (bare {bare.gc_runs:.3f}), "
                f"{c.gc_cost - bare.gc_cost:+,.0f} instr in collections, "
                f"{c.gc_hook - bare.gc_hook:,.0f} in the gc.callbacks hook"
            )
            cv = ", ".join(f"{k} {v - bare.contextvars[k]:,.0f}" for k, v in c.contextvars.items())
            yield f"  {cv}"
            engine = sorted(c.engine.items(), key=lambda kv: -kv[1][1])
            total = sum(cost for _, cost in c.engine.values())
            parts = ", ".join(
                f"{m} {calls:.2f}x{cost / calls:,.0f}" for m, (calls, cost) in engine if calls > 0
            )
            yield f"  engine calls {total:,.0f}: {parts} (calls x instr/call)"
            if c.timer_calls > 0:
                yield (
                    f"  heartbeat: {c.timer_calls:.2f} beats, {c.timers / c.timer_calls:,.0f} "
                    f"instr/beat; threads {c.threads:,.0f}"
                )
            else:
                yield f"  threads {c.threads:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests",
        type=int,
        default=int(os.environ.get("BENCH_INSTR_REQUESTS", "200")),
        help=f"N: requests per chunk, {CHUNKS} chunks (default 200, env BENCH_INSTR_REQUESTS)",
    )
    parser.add_argument("--loops", default=",".join(LOOPS))
    parser.add_argument(
        "--seeds",
        default="0,1,2,3,4",
        help="comma-separated; each run once per seed (sets PYTHONHASHSEED, shifts the heap)",
    )
    # Counting does not depend on it; only the time-driven column grows when children share a core.
    parser.add_argument("--jobs", type=int, default=2, help="children under valgrind at once")
    parser.add_argument("--breakdown", action="store_true", help="also the per-piece tables")
    parser.add_argument("--keep", type=Path, help="keep the callgrind dumps under this dir")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loop", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--pieces", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import fastapi_loopguard  # noqa: F401  (an editable install rebuilds here, once, natively)

    loops = [lp for lp in args.loops.split(",") if lp]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    runs = [Run(loop, config, seed=s) for s in seeds for loop in loops for config in CONFIGS]
    if args.breakdown:
        runs += [Run(loop, "dev_mode", pieces=True, seed=s) for s in seeds for loop in loops]
    print(f"bench-instr: {len(runs)} runs under callgrind, N={args.requests}: {environment()}")
    results = measure_all(runs, args.requests, args.jobs, args.keep)
    print(
        f"\nInstructions per GET /ok request, in-process, callgrind (all threads), "
        f"N={args.requests}, PYTHONHASHSEED={args.seeds} (mean±half-range over the seeds)"
    )
    for line in main_table(results, loops, seeds):
        print(line)
    lumps = [lump for r in runs for lump in results[r].lumps]
    print("Chunks left out by the median (more than 0.5 % off):", *lumps or ["none"], sep="\n  ")
    print(
        "(time-driven: watchdog/sampler threads and uvloop's heartbeat timer, ~50x more per "
        "request under valgrind than at full speed)"
    )
    if args.breakdown:
        print()
        for line in breakdown_table(results, loops, seeds):
            print(line)
        print(f"\nNative leaves (seed {seeds[0]}):")
        for line in leaves_table(results, loops, seeds[0]):
            print(line)


if __name__ == "__main__":
    main()
