"""The table of blocking calls and their rewrites (``RULES``), and the hint by kind.

A rule names the calls it knows (fnmatch patterns over resolved names), the kinds of blocking
they can cause, and how to write its fix from the call as found. ``KIND_HINTS`` is the fallback
for any call the table does not know, and never names a call.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..events import KINDS
from .calls import Call


@dataclass(frozen=True)
class Hint:
    """What to write instead. ``fix`` is one line of code; ``note`` says why and what else."""

    fix: str
    note: str
    call: str | None = None  # the call recognised, e.g. "time.sleep"; None for a hint by kind

    def __str__(self) -> str:
        return f"{self.fix}  ({self.note})"


# -- the table -------------------------------------------------------------------------------

WAITS = frozenset({"sleep", "io", "lock", "unknown", "starved"})
COMPUTES = frozenset({"cpu", "native", "unknown", "starved"})
# Kinds whose stack does not show the code that blocked the loop.
KIND_ONLY = frozenset({"gil", "gc", "cumulative"})
ANY = frozenset(KINDS) - KIND_ONLY


@dataclass(frozen=True)
class Site:
    """The blocking call as found: its name, and the call on the culprit line if linked."""

    name: str  # "time.sleep", "urllib.request.urlopen", "threading.Event.wait"
    call: Call | None


@dataclass(frozen=True)
class Rule:
    label: str
    patterns: tuple[str, ...]  # fnmatch patterns over resolved or frame names
    kinds: frozenset[str]
    make: Callable[[Site], tuple[str, str]]  # (fix, note)
    # The fix runs the written call itself elsewhere (asyncio.to_thread(call, ...)): right for
    # whatever call on the line led to the frame, e.g. server.shutdown() waiting in Event.wait.
    wraps: bool = False

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)


_STRING = re.compile(r"""^[rRbBuUfF]{0,2}["']""")
_PLAIN = "fn, *args"  # the placeholder when the call's own arguments are not known


def _args_known(call: Call | None) -> bool:
    return call is not None and call.args is not None and not call.with_target


def _to_thread(site: Site, template: str) -> str:
    """``await asyncio.to_thread(callee, args)``: exact for any call, whatever its arguments."""
    call = site.call
    if call is None or not _args_known(call):
        return template
    return f"await asyncio.to_thread({', '.join([call.written, *call.arg_list])})"


def last_name(name: str) -> str:
    return name.rsplit(".", 1)[-1].removesuffix("()")


def _is_module_function(call: Call) -> bool:
    """``pymysql.connect`` (a function of the module) rather than ``cur.execute`` (a method)."""
    return bool(call.name) and "()" not in call.name


def _sleep(site: Site) -> tuple[str, str]:
    call = site.call
    args = call.args if call is not None and _args_known(call) and call.args else "seconds"
    return (
        f"await asyncio.sleep({args})",
        "time.sleep stops the whole event loop; asyncio.sleep suspends only this coroutine",
    )


# requests' arguments that mean the same to httpx (where they are keyword-only).
_HTTPX_KEYWORDS = frozenset(
    {"url", "params", "headers", "cookies", "timeout", "json", "data", "files", "auth"}
)
_VERBS = frozenset({"get", "post", "put", "patch", "delete", "head", "options"})


def _http(site: Site) -> tuple[str, str]:
    verb = last_name(site.name)
    call = site.call
    fix = "await client.request(method, url)"
    if site.name.startswith("urllib.request."):
        fix = "await client.get(url)"  # urlopen's first argument may be a Request: not pasted
    elif verb in _VERBS:
        fix = f"await client.{verb}(url)"
        if call is not None and call.args is not None and not call.with_target and call.arg_list:
            positional = [a for a in call.arg_list if not re.match(r"^\w+\s*=", a)]
            keywords = {a.split("=", 1)[0].strip() for a in call.arg_list} - set(positional)
            if len(positional) <= 1 and keywords <= _HTTPX_KEYWORDS and "**" not in call.args:
                fix = f"await client.{verb}({', '.join(call.arg_list)})"
    return (
        fix,
        "a synchronous HTTP client waits for the server with the loop stopped; use "
        "client = httpx.AsyncClient(), made once (e.g. in the lifespan) and reused",
    )


def _socket(site: Site) -> tuple[str, str]:
    if last_name(site.name) == "getaddrinfo":
        return (
            "await asyncio.get_running_loop().getaddrinfo(host, port)",
            "DNS resolution blocks in the C library; the loop's getaddrinfo runs it in a thread",
        )
    return (
        "await asyncio.open_connection(host, port)",
        "a blocking socket waits with the loop stopped; asyncio streams await instead "
        "(reader, writer = ...; await reader.read(n); writer.write(data); await "
        "writer.drain()); for HTTP use httpx.AsyncClient",
    )


def _awaited_method(site: Site, template: str) -> str:
    """``await conn.execute(sql)``: the same method call, awaited, on the async driver's object."""
    call = site.call
    if call is None or not _args_known(call) or _is_module_function(call):
        return template
    if "." not in call.written or "(" in call.written:
        return template
    return f"await {call.written}({call.args})"


def _sqlite(site: Site) -> tuple[str, str]:
    call = site.call
    if last_name(site.name) == "connect":
        args = call.args if call is not None and _args_known(call) and call.args else "path"
        fix = f"await aiosqlite.connect({args})"
    else:
        fix = _awaited_method(site, "await db.execute(sql, params)")
    return (
        fix,
        "with aiosqlite, whose connection and cursor have sqlite3's methods, awaited; plain "
        "sqlite3 in asyncio.to_thread works only on a connection that thread opened itself "
        "(sqlite3 refuses connections from other threads)",
    )


def _psycopg2(site: Site) -> tuple[str, str]:
    return (
        _to_thread(site, "await asyncio.to_thread(cursor.execute, sql, params)"),
        "psycopg2 waits for the server with the loop stopped; a thread can run it (one cursor "
        "per thread), or move to an asyncio driver (psycopg 3's AsyncConnection, asyncpg)",
    )


def _pymysql(site: Site) -> tuple[str, str]:
    if last_name(site.name) == "connect":
        fix = "await aiomysql.connect(host=host, user=user, password=password, db=db)"
    else:
        fix = _awaited_method(site, "await cursor.execute(sql, args)")
    return (
        fix,
        "with aiomysql, which has pymysql's API awaited (async with conn.cursor() as cursor); "
        "or asyncio.to_thread with one pymysql connection per thread (they are not thread-safe)",
    )


def _hashing(site: Site) -> tuple[str, str]:
    module = site.name.split(".")[0]
    return (
        _to_thread(site, f"await asyncio.to_thread({_PLAIN})"),
        f"{module} releases the GIL while it hashes, so in a thread it runs beside the loop",
    )


def _gil_holding(site: Site) -> tuple[str, str]:
    module = site.name.split(".")[0]
    call = site.call
    pool = "await asyncio.get_running_loop().run_in_executor(process_pool, "
    if call is not None and _args_known(call):
        args = ", ".join([call.written, *call.arg_list])
        # run_in_executor passes no keyword arguments: functools.partial carries them.
        fix = f"{pool}functools.partial({args}))" if call.keywords else f"{pool}{args})"
    else:
        fix = f"{pool}{_PLAIN})"
    why = {
        "json": "json's C code holds the GIL until it returns, so a thread would stop the loop "
        "all the same",
        "re": "the regex engine holds the GIL until the match ends, so a thread would stop the "
        "loop all the same; a slow match usually means a pattern that backtracks, fix it too",
    }[module]
    return (
        fix,
        f"{why}; a process pool (process_pool = concurrent.futures.ProcessPoolExecutor(), made "
        "once) runs it beside the loop, arguments and result pickled",
    )


def _threading(site: Site) -> tuple[str, str]:
    call = site.call
    name = site.name
    what = last_name(name)
    lock = call.written if call is not None and call.with_target else None
    section = (
        "await asyncio.to_thread(critical_section)",
        "a threading lock waits in the OS with the loop stopped: move the code that holds "
        f"it{f' (with {lock}: and its block)' if lock else ''} into a function, "
        "critical_section, and run that in a thread; if only coroutines ever take the lock, "
        "use asyncio.Lock() and async with",
    )
    # A Condition must be waited on by the thread holding its lock, an RLock released by the
    # thread that took it: only the whole critical section can move.
    if lock is not None or what in ("__enter__", "wait_for") or ".Condition" in name:
        return section
    if ".RLock" in name or (what == "acquire" and ".Lock" not in name and "Semaphore" not in name):
        return section
    if what == "result" and name.startswith("concurrent.futures"):
        future = call.written.rsplit(".", 1)[0] if call is not None else "future"
        return (
            f"await asyncio.wrap_future({future})",
            "Future.result() blocks until another thread finishes; wrap_future awaits it",
        )
    return (
        _to_thread(site, f"await asyncio.to_thread({_PLAIN})"),
        "it waits for another thread with the loop stopped; in a thread the wait stops nothing "
        "(or use asyncio.Event, asyncio.Queue, asyncio.Lock when only coroutines are involved)",
    )


def _files(site: Site) -> tuple[str, str]:
    note = (
        "file system calls wait for the disk (a cold cache, a network mount) with the loop "
        "stopped; in a thread they stop nothing"
    )
    call = site.call
    opened = None
    if call is not None and call.name == "builtins.open":
        opened = call
    elif call is not None and call.receiver is not None and call.receiver.name == "builtins.open":
        opened = call.receiver  # open(path).read()
    if opened is not None and opened.args is not None and opened.arg_list:
        path, rest = opened.arg_list[0], opened.arg_list[1:]
        modes = [m.split("=", 1)[1].strip() if m.startswith("mode") else m for m in rest[:1]]
        if not modes or _STRING.match(modes[0]):
            mode = modes[0] if modes else ""
            binary = "b" in mode
            if any(c in mode for c in "wax+"):
                method = "write_bytes, data" if binary else "write_text, data"
            else:
                method = "read_bytes" if binary else "read_text"
            return f"await asyncio.to_thread(Path({path}).{method})", note
    return _to_thread(site, "await asyncio.to_thread(Path(path).read_text)"), note


def _subprocess(site: Site) -> tuple[str, str]:
    call = site.call
    note = (
        "subprocess waits for the child with the loop stopped; asyncio's subprocesses are "
        "awaited (check=True becomes a test of proc.returncode)"
    )
    args = call.arg_list if call is not None and _args_known(call) else ()
    first = args[0] if args and "=" not in args[0] else None
    shell = last_name(site.name) in ("system", "popen", "getoutput", "getstatusoutput") or any(
        a.replace(" ", "") == "shell=True" for a in args
    )
    tail = "stdout=asyncio.subprocess.PIPE); out, _ = await proc.communicate()"
    if shell:
        return f"proc = await asyncio.create_subprocess_shell({first or 'command'}, {tail}", note
    if first is not None and first[:1] in "[(" and first[-1:] in "])":
        program = first[1:-1].strip().rstrip(",")  # a literal list: its items, one by one
    else:
        program = "program, *args"  # a variable may be a list or one string: not guessed
    return f"proc = await asyncio.create_subprocess_exec({program}, {tail}", note


RULES: tuple[Rule, ...] = (
    # native too: a loaded machine has been seen to make a time.sleep line's samples miss the GIL.
    Rule("time.sleep", ("time.sleep",), WAITS | {"native"}, _sleep),
    Rule(
        "HTTP client",
        (
            "urllib.request.*",
            "requests.*",
            "urllib3.*",
            "http.client.*",
            "httpx._api.*",
            "httpx._client.Client.*",
            "httpx.Client*",
            "httpx.get",
            "httpx.post",
            "httpcore._sync.*",
        ),
        ANY,
        _http,
    ),
    Rule("socket", ("socket.*", "ssl.*"), ANY, _socket),
    Rule("sqlite3", ("sqlite3.*",), ANY, _sqlite),
    Rule("psycopg2", ("psycopg2.*",), ANY, _psycopg2, wraps=True),
    Rule("pymysql", ("pymysql.*", "MySQLdb.*"), ANY, _pymysql),
    Rule("password hashing", ("hashlib.*", "bcrypt.*", "argon2.*"), COMPUTES, _hashing, wraps=True),
    Rule("json / re", ("json.*", "re.*"), COMPUTES - {"starved"}, _gil_holding, wraps=True),
    Rule(
        "threading",
        ("threading.*", "queue.*", "concurrent.futures.*"),
        frozenset({"lock", "unknown", "starved"}),
        _threading,
        wraps=True,
    ),
    Rule(
        "file I/O",
        (
            "builtins.open",
            "builtins.open().*",
            "io.open",
            "pathlib.*",
            "shutil.*",
            "os.walk",
            "os.listdir",
            "os.scandir",
            "glob.*",
        ),
        ANY,
        _files,
        wraps=True,
    ),
    Rule(
        "subprocess",
        ("subprocess.*", "os.system", "os.popen", "os.wait*"),
        ANY,
        _subprocess,
    ),
)

_TO_THREAD = "await asyncio.to_thread(fn, *args)"
KIND_HINTS: dict[str, Hint] = {
    "sleep": Hint(
        _TO_THREAD,
        "the loop thread slept in the OS: time.sleep(s) becomes await asyncio.sleep(s); a "
        "library call that sleeps or polls runs in a thread as shown",
    ),
    "io": Hint(
        _TO_THREAD,
        "the loop thread waited for blocking I/O: use the library's asyncio client "
        "(httpx.AsyncClient, an async database driver), or run the call in a thread as shown",
    ),
    "cpu": Hint(
        _TO_THREAD,
        "the loop thread was computing: in a thread (or Starlette's await "
        "run_in_threadpool(fn, *args)) the loop keeps serving, sharing the GIL with it in 5 ms "
        "slices; long pure-Python work belongs in a process pool: await "
        "loop.run_in_executor(process_pool, fn, *args)",
    ),
    "lock": Hint(
        "await asyncio.to_thread(critical_section)",
        "the loop thread waited for a threading lock, event or queue: run the code that takes "
        "it in a thread as shown, or use asyncio.Lock / asyncio.Event / asyncio.Queue when only "
        "coroutines use it",
    ),
    "gil": Hint(
        "await asyncio.get_running_loop().run_in_executor(process_pool, fn, *args)",
        "another thread held the GIL while the loop waited for it (the stack shown is that "
        "thread's, often a def endpoint in the threadpool): move its CPU-heavy work to a "
        "process pool (concurrent.futures.ProcessPoolExecutor)",
    ),
    "native": Hint(
        _TO_THREAD,
        "native code held the GIL on the loop thread: in a thread it frees the loop if the "
        "extension releases the GIL (most I/O and compression do); otherwise use a process pool",
    ),
    "gc": Hint(
        "gc.freeze()",
        "a garbage collection paused the loop (on the loop thread, or on another thread while "
        "the loop waited for the GIL): call gc.freeze() once after start-up so long-lived "
        "objects are not scanned again, and allocate fewer objects per request",
    ),
    "starved": Hint(
        "give the loop thread a CPU",
        "it was ready to run but the OS did not schedule it for most of the block: the machine "
        "or container has more busy workers or threads than cores. If this line computes, that "
        "work competes for the CPU too: move it off the loop (await asyncio.to_thread(fn, "
        "*args), or a process pool for long pure-Python work)",
    ),
    "cumulative": Hint(
        _TO_THREAD,
        "many short steps of this request added up; the line shown is where it waited after "
        "the last one, the work is in the code before that await: batch it into one function "
        "and run that in a thread",
    ),
    "unknown": Hint(_TO_THREAD, "run the blocking call in a thread"),
}


def kind_hint(kind: str) -> Hint:
    return KIND_HINTS.get(kind, KIND_HINTS["unknown"])
