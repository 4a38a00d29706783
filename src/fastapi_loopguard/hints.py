"""Fix hints: for a blocking event, the async rewrite of the call that blocked the loop.

``RULES`` is the one table: the blocking calls people write most, each with the kinds of
blocking it can cause and a rewrite that is correct Python. ``KIND_HINTS`` is the fallback, by
kind, for every call the table does not know; a hint by kind never names a call.

Finding the call, most trusted first:

1. The frames below the culprit (the stdlib and site-packages code the culprit line called),
   from the one the culprit called inwards: the first whose module the table knows. Starting
   next to the culprit rather than at the innermost frame names the call the application wrote
   (``urllib.request.urlopen``, not the ``socket.SocketIO.readinto`` far below it), which is the
   call the rewrite replaces; walking inwards still finds ``threading`` under an unknown wrapper.
2. The culprit line itself. A C function (``time.sleep``, ``hashlib.pbkdf2_hmac``, a lock's
   ``__enter__``) has no Python frame, so the sampler's stack ends at the line that called it,
   and its source is all there is. The line is read with linecache, split into calls with
   ``tokenize`` (which never runs code), and each callee resolved through the file's imports and
   simple assignments (``from time import sleep``, ``LOCK = threading.Lock()``). A name the file
   does not bind that way (a parameter, an attribute) resolves to nothing, so ``conn.execute``
   only counts as sqlite3 when ``conn = sqlite3.connect(...)`` is in the file.
3. Otherwise the kind.

A rule applies only to the kinds its call can produce: a ``time.sleep`` on a line whose event was
``cpu`` is not trusted. Kinds whose stack is not the code that blocked always get the kind's hint:
``gil`` (the stack is the other thread's), ``gc``, and ``cumulative`` (the stack is where the
request waited after its steps). Two different rules on one line give the kind's hint too.

Source is read after the stall, on the loop thread, when an event is logged or a report is made:
once per file (linecache and the import scan are cached), then a dict lookup and one line's
tokens per event. Only ``.py`` files are read, as for the report's snippets.
"""

from __future__ import annotations

import fnmatch
import io
import keyword
import linecache
import re
import tokenize
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .events import KINDS, BlockingEvent

# (filename, lineno, function): a frame however it arrived (a Frame, or a dict from a log).
FrameKey = tuple[str, int, str]


@dataclass(frozen=True)
class Hint:
    """What to write instead. ``fix`` is one line of code; ``note`` says why and what else."""

    fix: str
    note: str
    call: str | None = None  # the call recognised, e.g. "time.sleep"; None for a hint by kind

    def __str__(self) -> str:
        return f"{self.fix}  ({self.note})"


# -- the call on the culprit line ------------------------------------------------------------

_MAX_ARGS = 160  # longer argument text is left out of the rewrite rather than pasted whole


@dataclass(frozen=True)
class Call:
    """One call on the culprit line, as written and as resolved through the file's names."""

    written: str  # the callee as written: "time.sleep", "conn.execute", "Path(p).read_text"
    name: str  # resolved: "time.sleep", "sqlite3.connect().execute"; "" if it resolves to nothing
    args: str | None  # the argument text; None when the call goes on past this line
    arg_list: tuple[str, ...] = ()  # the top-level arguments, each as written
    keywords: bool = False  # whether some argument is name=value or **mapping
    with_target: bool = False  # ``with LOCK:``: entering a context manager, not a call
    receiver: Call | None = None  # ``open(p)`` for ``open(p).read()``


def _tokens(text: str) -> list[tokenize.TokenInfo]:
    """The tokens of one stripped source line; an open bracket just ends the list early."""
    out: list[tokenize.TokenInfo] = []
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.ENDMARKER:
                break
            if token.type not in skip:
                out.append(token)
    except (tokenize.TokenError, SyntaxError):
        pass  # a line of a statement that goes on below it: keep what came before
    return out


def _is_name(token: tokenize.TokenInfo) -> bool:
    return token.type == tokenize.NAME and not keyword.iskeyword(token.string)


def _is_op(token: tokenize.TokenInfo | None, chars: str) -> bool:
    return token is not None and token.type == tokenize.OP and token.string in chars


def _close(tokens: list[tokenize.TokenInfo], i: int) -> int | None:
    """Index of the bracket closing the one at ``i``, or None if it closes on a later line."""
    depth = 0
    for j in range(i, len(tokens)):
        if _is_op(tokens[j], "([{"):
            depth += 1
        elif _is_op(tokens[j], ")]}"):
            depth -= 1
            if depth == 0:
                return j
    return None


def _split_args(
    text: str, tokens: list[tokenize.TokenInfo], lo: int, hi: int
) -> tuple[tuple[str, ...], bool]:
    """The top-level arguments in tokens ``lo`` to ``hi`` (exclusive), and whether any is a
    keyword (``name=value`` or ``**mapping``)."""
    parts: list[str] = []
    keywords = False
    depth = 0
    start = lo
    for j in range(lo, hi + 1):
        t = tokens[j] if j < hi else None
        if _is_op(t, "([{"):
            depth += 1
        elif _is_op(t, ")]}"):
            depth -= 1
        elif t is None or (depth == 0 and t.string == "," and t.type == tokenize.OP):
            if start < j:
                parts.append(text[tokens[start].start[1] : tokens[j - 1].end[1]])
                first, second = tokens[start], tokens[start + 1] if start + 1 < j else None
                if (_is_name(first) and _is_op(second, "=")) or first.string == "**":
                    keywords = True
            start = j + 1
    return tuple(parts), keywords


def calls_on_line(text: str, names: Mapping[str, str]) -> list[Call]:
    """The calls on one line that are not awaited, left to right, resolved through ``names``.

    ``names`` maps what the file binds (``time``, ``sleep``, ``LOCK``, ``self.lock``) to what it
    is (``time``, ``time.sleep``, ``threading.Lock()``); see ``file_names``. Calls inside other
    calls' arguments are found too (``json.loads(f.read())`` holds two).
    """
    text = text.strip()
    tokens = _tokens(text)
    is_with = bool(tokens) and tokens[0].string == "with"
    calls: list[Call] = []
    for i, t in enumerate(tokens):
        before = tokens[i - 1] if i else None
        if not _is_name(t) or (before is not None and before.string == "."):
            continue
        awaited = before is not None and before.string == "await"
        head = t.string
        written = head
        resolved = names.get(head) or ("builtins.open" if head == "open" else None)
        receiver: Call | None = None
        j = i + 1
        made_call = False
        while j < len(tokens):
            tok = tokens[j]
            if tok.string == "." and j + 1 < len(tokens) and _is_name(tokens[j + 1]):
                attribute = tokens[j + 1].string
                if resolved is None and written == head and f"{head}.{attribute}" in names:
                    resolved = names[f"{head}.{attribute}"]  # self.lock = threading.Lock()
                elif resolved is not None:
                    resolved += "." + attribute
                written += "." + attribute
                j += 2
            elif _is_op(tok, "("):
                end = _close(tokens, j)
                if end is None:
                    if not awaited:
                        calls.append(Call(written, resolved or "", None, receiver=receiver))
                    break
                args = text[tok.end[1] : tokens[end].start[1]].strip()
                arg_list, has_keywords = _split_args(text, tokens, j + 1, end)
                call = Call(
                    written,
                    resolved or "",
                    args if len(args) <= _MAX_ARGS else None,
                    arg_list,
                    has_keywords,
                    receiver=receiver,
                )
                if not awaited:
                    calls.append(call)
                made_call = True
                receiver = call
                written += f"({args})"
                if resolved is not None:
                    resolved += "()"
                j = end + 1
            else:
                break
        at_with = before is not None and before.string in ("with", ",") and is_with
        after = tokens[j].string if j < len(tokens) else ""
        if at_with and not made_call and after in (":", ",", "as"):
            name = f"{resolved}.__enter__" if resolved else ""
            calls.append(Call(written, name, None, with_target=True))
    return calls


# -- what a file binds -----------------------------------------------------------------------

_IMPORT = re.compile(r"^\s*import\s+(.+)$")
_FROM = re.compile(r"^\s*from\s+([A-Za-z_][\w.]*)\s+import\s+(.+)$")
_ASSIGN = re.compile(r"^\s*((?:self\.)?[A-Za-z_]\w*)\s*(?::[^=]+)?=\s*([A-Za-z_][\w.]*)\s*\(")
_WITH_AS = re.compile(r"\bwith\s+([A-Za-z_][\w.]*)\s*\(.*\)\s+as\s+([A-Za-z_]\w*)\s*:")
_names_cache: dict[str, tuple[int, dict[str, str]]] = {}
_MAX_CACHED_FILES = 512


def _source(filename: str) -> list[str]:
    # Only .py files: names come from logs too, and must not make us read arbitrary files.
    if not filename.endswith(".py"):
        return []
    return linecache.getlines(filename)


def file_names(filename: str) -> dict[str, str]:
    """What the file's imports and simple assignments bind, e.g. ``{"sleep": "time.sleep"}``.

    Regular expressions over the lines, not a parse of the whole file: this may run on the loop
    thread, and a name bound two different ways is dropped (never a wrong specific hint).
    """
    lines = _source(filename)
    cached = _names_cache.get(filename)
    if cached is not None and cached[0] == id(lines):
        return cached[1]
    found: dict[str, set[str]] = {}

    def bind(name: str, value: str) -> None:
        found.setdefault(name, set()).add(value)

    assigned: list[tuple[str, str]] = []
    index = 0
    while index < len(lines):
        line = lines[index].split("#", 1)[0]
        index += 1
        if m := _IMPORT.match(line):
            for part in m.group(1).split(","):
                words = part.split()
                if len(words) == 3 and words[1] == "as":
                    bind(words[2], words[0])
                elif len(words) == 1:
                    bind(words[0].split(".")[0], words[0].split(".")[0])
        elif m := _FROM.match(line):
            module, names = m.group(1), m.group(2)
            if "(" in names:  # from x import (a,\n b)
                while ")" not in names and index < len(lines):
                    names += " " + lines[index].split("#", 1)[0]
                    index += 1
            for part in names.replace("(", " ").replace(")", " ").replace("\\", " ").split(","):
                words = part.split()
                if len(words) == 3 and words[1] == "as":
                    bind(words[2], f"{module}.{words[0]}")
                elif len(words) == 1 and words[0] != "*":
                    bind(words[0], f"{module}.{words[0]}")
        else:
            if m := _ASSIGN.match(line):
                assigned.append((m.group(1), m.group(2)))
            for m in _WITH_AS.finditer(line):
                assigned.append((m.group(2), m.group(1)))
    imports = {name: next(iter(v)) for name, v in found.items() if len(v) == 1}
    for target, callee in assigned:
        head, _, rest = callee.partition(".")
        base = imports.get(head) or ("builtins.open" if head == "open" else None)
        if base is not None:
            bind(target, base + ("." + rest if rest else "") + "()")
        else:
            bind(target, "?")  # bound to something we cannot name: makes the name ambiguous
    names = {name: next(iter(v)) for name, v in found.items() if len(v) == 1 and "?" not in v}
    if len(_names_cache) >= _MAX_CACHED_FILES:
        _names_cache.clear()
    _names_cache[filename] = (id(lines), names)
    return names


def module_of(filename: str) -> str | None:
    """``/usr/lib/python3.11/urllib/request.py`` -> ``urllib.request``; None for app code."""
    path = filename.replace("\\", "/")
    for marker in ("/site-packages/", "/dist-packages/"):
        at = path.rfind(marker)
        if at >= 0:
            relative = path[at + len(marker) :]
            break
    else:
        m = re.search(r"/python\d+(?:\.\d+)?t?/(.+)$", path)
        if m is None:
            return None
        relative = m.group(1)
    if not relative.endswith(".py"):
        return None
    parts = relative[:-3].split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) if parts and all(p.isidentifier() for p in parts) else None


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


def _last(name: str) -> str:
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
    verb = _last(site.name)
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
    if _last(site.name) == "getaddrinfo":
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
    if _last(site.name) == "connect":
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
    if _last(site.name) == "connect":
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
    what = _last(name)
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
    shell = _last(site.name) in ("system", "popen", "getoutput", "getstatusoutput") or any(
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


# -- choosing ----------------------------------------------------------------------------------


def _rule_for(name: str) -> Rule | None:
    return next((r for r in RULES if r.matches(name)), None)


def _linked(calls: Sequence[Call], rule: Rule, frame_name: str) -> Call | None:
    """The line's call that the frame below the culprit belongs to, if exactly one fits."""
    function = _last(frame_name)
    fits = [
        c
        for c in calls
        if (c.name and rule.matches(c.name)) or (not c.name and _last(c.written) == function)
    ]
    if not fits and rule.wraps:
        fits = [c for c in calls if not c.with_target]  # the line's one call, if it has one
    return fits[0] if len({c.written for c in fits}) == 1 else None


def hint_for(kind: str, stack: Sequence[FrameKey], culprit: FrameKey | None) -> Hint:
    """The hint for one event: by its call when the table knows it, else by its kind."""
    if kind in KIND_ONLY:
        return kind_hint(kind)
    if culprit is not None:
        at = max((i for i, f in enumerate(stack) if f == culprit), default=-1)
        below = list(stack[at + 1 :]) if at >= 0 else []
    else:
        below = list(reversed(stack))  # no application frame: from the innermost outwards
    for filename, _, function in below:
        module = module_of(filename)
        if module is None:
            continue
        name = f"{module}.{function}"
        rule = _rule_for(name)
        if rule is not None:
            if kind not in rule.kinds:
                break  # the call is known, and it cannot block this way: say only the kind
            return _made(rule, Site(name, _linked(_line_calls(culprit), rule, name)))
    # Python frames under the culprit mean the loop was in them, not in a C function the line
    # calls: the line's text is evidence only when the stack ends at the culprit.
    if culprit is None or below:
        return kind_hint(kind)
    matched = [
        (c, r) for c in _line_calls(culprit) if c.name and (r := _rule_for(c.name)) is not None
    ]
    matched = [(c, r) for c, r in matched if kind in r.kinds]
    if len({r.label for _, r in matched}) != 1:
        return kind_hint(kind)  # nothing known, or two different calls: which one blocked?
    rule = matched[0][1]
    # One call, or one chain (open(p).read() holds open(p) too): its outermost call.
    outer = max((c for c, _ in matched), key=lambda c: len(c.written))
    chain = all(outer.written.startswith(c.written) for c, _ in matched)
    if chain:
        return _made(rule, Site(outer.name, outer))
    return _made(rule, Site(matched[0][0].name, None))


def _line_calls(culprit: FrameKey | None) -> list[Call]:
    if culprit is None or not _source(culprit[0]):
        return []
    text = linecache.getline(culprit[0], culprit[1])
    return calls_on_line(text, file_names(culprit[0])) if text else []


def _made(rule: Rule, site: Site) -> Hint:
    fix, note = rule.make(site)
    shown = site.name.replace("()", "").removesuffix(".__enter__").removeprefix("builtins.")
    return Hint(fix, note, shown)


def hint_for_event(event: BlockingEvent) -> Hint:
    stack = [(f.filename, f.lineno, f.function) for f in event.stack]
    culprit = event.culprit
    key = (culprit.filename, culprit.lineno, culprit.function) if culprit is not None else None
    return hint_for(event.kind, stack, key)


def hint_for_record(event: Mapping[str, Any]) -> Hint:
    """The same for an event in the event log's shape (the report's and the gate's)."""
    stack = [(f["filename"], f["lineno"], f["function"]) for f in event.get("stack") or ()]
    culprit = event.get("culprit")
    key = (culprit["filename"], culprit["lineno"], culprit["function"]) if culprit else None
    return hint_for(str(event.get("kind")), stack, key)
