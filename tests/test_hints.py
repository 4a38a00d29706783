"""Fix hints: the table on the stacks the sampler really captures, then on real uvicorn.

The first tests build events the way the sampler's stacks look (checked against real events in
the last test): frames outermost first, nothing below a C function, the library's own frames
below a Python one. Their culprit lines are real source files written for the test, because a
C function's call is read from the culprit line itself.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from fastapi_loopguard.hints import KIND_HINTS, RULES, Hint, hint_for_record

from .conftest import ROOT, Server, culprit_line, start_server, stop_server, wait_events

STDLIB = "/usr/lib/python3.11"
SITE = "/srv/venv/lib/python3.11/site-packages"
LOOP = [(f"{STDLIB}/asyncio/events.py", 80, "Handle._run")]


def module(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "app_module.py"
    path.write_text(textwrap.dedent(source).lstrip())
    return path


def event(
    path: Path, marker: str, kind: str, below: list[tuple[str, int, str]] | None = None
) -> dict[str, Any]:
    culprit = {"filename": str(path), "lineno": culprit_line(path, marker), "function": "handler"}
    frames = [{"filename": f, "lineno": n, "function": fn} for f, n, fn in below or []]
    loop = [{"filename": f, "lineno": n, "function": fn} for f, n, fn in LOOP]
    return {"kind": kind, "stack": [*loop, culprit, *frames], "culprit": culprit}


def assert_valid_python(hint: Hint) -> None:
    """A fix is code that compiles where it would go: inside an async function."""
    ast.parse(f"async def _():\n    {hint.fix}\n")


SOURCE = """
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from time import sleep as nap

LOCK = threading.Lock()
RLOCK = threading.RLock()
conn = sqlite3.connect("app.db")


async def handler(path, data, pattern, text, delay):
    time.sleep(0.2)  # culprit:sleep
    nap(delay)  # culprit:nap
    digest = hashlib.pbkdf2_hmac("sha256", b"pw", b"salt", 100_000)  # culprit:pbkdf2
    with LOCK:  # culprit:with-lock
        pass
    RLOCK.acquire()  # culprit:rlock
    conn.execute("SELECT * FROM t WHERE id = ?", (1,))  # culprit:sqlite
    body = json.dumps(data, indent=2)  # culprit:json
    m = re.compile(pattern).match(text)  # culprit:re
    raw = open(path, "rb").read()  # culprit:open-rb
    with open(path) as f:  # culprit:with-open
        pass
    os.system("make")  # culprit:system
    subprocess.run(["git", "status"], check=True)  # culprit:run
    text = Path(path).read_text()  # culprit:read-text
    await asyncio.sleep(0)  # culprit:awaited
    compute(data)  # culprit:unknown
    json.dumps(time.sleep(1))  # culprit:two
    payload = requests.get(url, timeout=5, params={"q": 1})  # culprit:requests
    done.wait(5)  # culprit:event
    server.shutdown()  # culprit:shutdown
"""


@pytest.mark.parametrize(
    ("marker", "kind", "call", "fix"),
    [
        ("sleep", "sleep", "time.sleep", "await asyncio.sleep(0.2)"),
        ("nap", "sleep", "time.sleep", "await asyncio.sleep(delay)"),
        (
            "pbkdf2",
            "cpu",
            "hashlib.pbkdf2_hmac",
            'await asyncio.to_thread(hashlib.pbkdf2_hmac, "sha256", b"pw", b"salt", 100_000)',
        ),
        ("with-lock", "lock", "threading.Lock", "await asyncio.to_thread(critical_section)"),
        ("rlock", "lock", "threading.RLock.acquire", "await asyncio.to_thread(critical_section)"),
        (
            "sqlite",
            "io",
            "sqlite3.connect.execute",
            'await conn.execute("SELECT * FROM t WHERE id = ?", (1,))',
        ),
        (
            "json",
            "cpu",
            "json.dumps",
            "await asyncio.get_running_loop().run_in_executor(process_pool, "
            "functools.partial(json.dumps, data, indent=2))",
        ),
        (
            "re",
            "native",
            "re.compile.match",
            "await asyncio.get_running_loop().run_in_executor(process_pool, "
            "re.compile(pattern).match, text)",
        ),
        ("open-rb", "io", "open.read", "await asyncio.to_thread(Path(path).read_bytes)"),
        ("with-open", "io", "open", "await asyncio.to_thread(Path(path).read_text)"),
        ("system", "unknown", "os.system", None),
        ("run", "unknown", "subprocess.run", None),
        ("read-text", "io", "pathlib.Path.read_text", None),
    ],
)
def test_a_c_call_is_read_from_the_culprit_line(
    tmp_path: Path, marker: str, kind: str, call: str, fix: str | None
) -> None:
    path = module(tmp_path, SOURCE)
    hint = hint_for_record(event(path, marker, kind))
    assert hint.call == call
    if fix is not None:
        assert hint.fix == fix
    assert_valid_python(hint)


def test_subprocess_and_system_rewrites(tmp_path: Path) -> None:
    path = module(tmp_path, SOURCE)
    run = hint_for_record(event(path, "run", "unknown")).fix
    assert run.startswith('proc = await asyncio.create_subprocess_exec("git", "status", ')
    shell = hint_for_record(event(path, "system", "unknown")).fix
    assert shell.startswith('proc = await asyncio.create_subprocess_shell("make", ')


@pytest.mark.parametrize(
    ("marker", "kind", "why"),
    [
        ("sleep", "cpu", "time.sleep cannot make a cpu event: not trusted"),
        ("awaited", "sleep", "an awaited asyncio.sleep is not the blocking call"),
        ("unknown", "io", "a call the table does not know"),
        ("two", "sleep", "json.dumps cannot sleep; time.sleep inside it can"),
        ("sleep", "cumulative", "a cumulative event's line is where it waited afterwards"),
        ("pbkdf2", "gil", "a gil event's stack is another thread's"),
        ("requests", "io", "requests is not imported by this file: the name means nothing"),
        ("event", "lock", "done is not bound by this file to anything known"),
    ],
)
def test_otherwise_the_hint_is_by_kind(tmp_path: Path, marker: str, kind: str, why: str) -> None:
    path = module(tmp_path, SOURCE)
    hint = hint_for_record(event(path, marker, kind))
    if marker == "two":
        assert hint.call == "time.sleep", why  # the one call that can sleep is the one
        return
    assert hint.call is None, why
    assert hint == KIND_HINTS[kind]


def test_frames_below_the_culprit_name_the_call(tmp_path: Path) -> None:
    path = module(tmp_path, SOURCE)
    # requests is a Python library: its frames are below the line, import or not.
    requests = [
        (f"{SITE}/requests/api.py", 73, "get"),
        (f"{SITE}/requests/sessions.py", 589, "Session.request"),
        (f"{SITE}/urllib3/connectionpool.py", 715, "HTTPConnectionPool.urlopen"),
        (f"{STDLIB}/socket.py", 706, "SocketIO.readinto"),
    ]
    hint = hint_for_record(event(path, "requests", "io", requests))
    assert hint.call == "requests.api.get"  # the call written, not the socket far below it
    assert hint.fix == 'await client.get(url, timeout=5, params={"q": 1})'
    assert "httpx.AsyncClient" in hint.note
    # threading.Event.wait: Python frames, linked to the line's call by its name.
    wait = [(f"{STDLIB}/threading.py", 622, "Event.wait"), (f"{STDLIB}/threading.py", 324, "x")]
    hint = hint_for_record(event(path, "event", "lock", wait))
    assert (hint.call, hint.fix) == (
        "threading.Event.wait",
        "await asyncio.to_thread(done.wait, 5)",
    )
    # A library the table does not know, over one it does: the known one, further in.
    wrapped = [(f"{SITE}/somesdk/client.py", 10, "Client.fetch"), *requests[1:]]
    assert hint_for_record(event(path, "unknown", "io", wrapped)).call == (
        "requests.sessions.Session.request"
    )
    # The line's one call led to the frame: a rewrite that runs the call itself runs that one.
    shutdown = [
        (f"{STDLIB}/socketserver.py", 253, "BaseServer.shutdown"),
        (f"{STDLIB}/threading.py", 622, "Event.wait"),
    ]
    hint = hint_for_record(event(path, "shutdown", "lock", shutdown))
    assert (hint.call, hint.fix) == (
        "threading.Event.wait",
        "await asyncio.to_thread(server.shutdown)",
    )
    # Frames below the line mean the line's own C calls were not running.
    assert hint_for_record(event(path, "sleep", "sleep", wrapped[:1])).call is None
    for below, call in [
        ([(f"{SITE}/psycopg2/extras.py", 236, "RealDictCursor.execute")], "psycopg2"),
        ([(f"{SITE}/pymysql/cursors.py", 153, "Cursor.execute")], "pymysql"),
        ([(f"{SITE}/argon2/_password_hasher.py", 193, "PasswordHasher.hash")], "argon2"),
        ([(f"{STDLIB}/subprocess.py", 548, "run")], "subprocess"),
        ([(f"{STDLIB}/json/__init__.py", 231, "dumps")], "json"),
    ]:
        hint = hint_for_record(event(path, "unknown", "cpu" if call != "pymysql" else "io", below))
        assert hint.call is not None and hint.call.startswith(call), (call, hint)
        assert_valid_python(hint)


def test_every_fix_compiles_and_every_kind_has_one() -> None:
    for hint in KIND_HINTS.values():
        if hint.fix != KIND_HINTS["starved"].fix:  # starved: nothing to rewrite, the OS is busy
            assert_valid_python(hint)
    assert {r.label for r in RULES} >= {"time.sleep", "HTTP client", "sqlite3", "threading"}


def test_source_that_cannot_be_read_gives_the_kind(tmp_path: Path) -> None:
    gone = {"filename": str(tmp_path / "deleted.py"), "lineno": 3, "function": "handler"}
    assert hint_for_record({"kind": "sleep", "stack": [gone], "culprit": gone}).call is None
    # Only .py files are read: a hostile log cannot make the report open another file.
    secret = tmp_path / "secret.txt"
    secret.write_text("time.sleep(1)\n")
    frame = {"filename": str(secret), "lineno": 1, "function": "handler"}
    assert hint_for_record({"kind": "sleep", "stack": [frame], "culprit": frame}).call is None


# -- on real uvicorn ---------------------------------------------------------------------------

APP = ROOT / "tests" / "apps" / "hinted.py"
# endpoint: (the rule, the call it names, the fix when it is exact)
EXPECTED = {
    "sleep": ("time.sleep", "time.sleep", "await asyncio.sleep(0.15)"),
    "urlopen": ("HTTP client", "urllib.request.urlopen", "await client.get(url)"),
    "hash": (
        "password hashing",
        "hashlib.pbkdf2_hmac",
        'await asyncio.to_thread(hashlib.pbkdf2_hmac, "sha256", b"pw", b"salt", 1_500_000)',
    ),
    "lock": ("threading", "threading.Lock", "await asyncio.to_thread(critical_section)"),
    "event": ("threading", "threading.Event.wait", "await asyncio.to_thread(done.wait, 5)"),
    "fifo": ("file I/O", "open.read", "await asyncio.to_thread(Path(FIFO).read_text)"),
    "subprocess": ("subprocess", "subprocess.run", None),
    "sqlite": ("sqlite3", "sqlite3.connect.execute.fetchone", None),
}


@pytest.fixture
def hinted_server(loop_name: str, tmp_path: Path) -> Any:
    server = start_server("tests.apps.hinted:app", loop_name, tmp_path)
    yield server
    stop_server(server)


def test_hints_for_real_blocking_calls(hinted_server: Server, slow_peer: int) -> None:
    for name in EXPECTED:
        params = {"port": slow_peer} if name == "urlopen" else {}
        assert httpx.get(f"{hinted_server.url}/{name}", params=params, timeout=10).is_success
    events = wait_events(hinted_server, len(EXPECTED))
    by_line = {e["culprit"]["lineno"]: e for e in events if e["culprit"]}
    rules = {r.label: r for r in RULES}
    for name, (label, call, fix) in EXPECTED.items():
        found = by_line.get(culprit_line(APP, name))
        assert found is not None, (
            name,
            [
                (
                    e["kind"],
                    round(e["duration_ms"]),
                    e["culprit"] and e["culprit"]["lineno"],
                    e["path"],
                )
                for e in events
            ],
        )
        hint = hint_for_record(found)
        if found["kind"] not in rules[label].kinds:
            # A loaded machine can turn any wait into "starved": then the kind's hint is right.
            assert hint == KIND_HINTS[found["kind"]], (name, found["kind"], hint)
            continue
        assert hint.call == call, (name, found["kind"], found["stack"][-3:], hint)
        if fix is not None:
            assert hint.fix == fix, name
        assert_valid_python(hint)
