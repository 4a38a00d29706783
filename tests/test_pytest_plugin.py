"""The pytest plugin, run by pytester in a subprocess: loaded from its entry point like a user
gets it, under pytest-asyncio and anyio, on asyncio and uvloop, for async tests and for the sync
tests with TestClient that FastAPI's documentation teaches.
"""

from __future__ import annotations

import json

import pytest

from .conftest import culprit_line

# Both loops for pytest-asyncio (its loop-factory hook) and for anyio (its backend fixture).
CONFTEST = """
import asyncio

import pytest
import uvloop


def pytest_asyncio_loop_factories(config, item):
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request):
    return request.param
"""

TESTS = """
import asyncio
import time

import pytest


def helper():
    time.sleep(0.15)  # culprit:helper


@pytest.mark.asyncio
@pytest.mark.no_blocking
async def test_asyncio_blocks():
    await asyncio.sleep(0.01)
    helper()


@pytest.mark.asyncio
@pytest.mark.no_blocking
async def test_asyncio_clean():
    await asyncio.sleep(0.15)


@pytest.mark.anyio
@pytest.mark.no_blocking
async def test_anyio_blocks():
    await asyncio.sleep(0.01)
    helper()


@pytest.mark.anyio
@pytest.mark.no_blocking
async def test_anyio_clean():
    await asyncio.sleep(0.15)


@pytest.mark.asyncio
@pytest.mark.no_blocking
async def test_child_task_blocks():
    async def child():
        time.sleep(0.15)  # culprit:child-task

    await asyncio.create_task(child())
"""


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", *args, timeout=120)


def test_marker_fails_blocking_tests_only(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    path = pytester.makepyfile(test_marked=TESTS)
    result = _run(pytester, "-rf")
    result.assert_outcomes(passed=4, failed=6)
    helper_line = culprit_line(path, "helper")
    # The failure sections only: some pytest versions repeat the whole message in the summary.
    output = result.stdout.str().split("short test summary info")[0]
    for test in ("test_asyncio_blocks", "test_anyio_blocks"):
        for loop in ("asyncio", "uvloop"):
            assert f"test_marked.py::{test}[{loop}] blocked the event loop 1 time(s)" in output
    assert output.count(f"ms sleep at {path}:{helper_line} in helper") == 4
    child_line = culprit_line(path, "child-task")
    assert output.count(f"ms sleep at {path}:{child_line} in ") == 2
    for line in result.outlines:
        if "ms sleep at" in line:
            duration = float(line.split()[0])
            assert 100 <= duration < 1000, line
    result.stdout.no_fnmatch_line("*test_asyncio_clean*FAILED*")


def test_fixture_events_reset_and_assertion(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_fixture="""
        import asyncio
        import time

        import pytest


        @pytest.mark.asyncio
        async def test_events_then_reset(loopguard):
            time.sleep(0.12)
            await asyncio.sleep(0.1)
            [event] = loopguard.events
            assert event.kind == "sleep"
            assert event.culprit.function == "test_events_then_reset"
            assert event.request_id.startswith("test ")
            loopguard.reset()
            await asyncio.sleep(0.01)
            loopguard.assert_no_blocking()
            assert loopguard.events == []


        @pytest.mark.asyncio
        async def test_assertion_fails_right_after_the_block(loopguard):
            await asyncio.sleep(0.01)
            time.sleep(0.12)  # no await since: only the live counters know yet
            loopguard.assert_no_blocking()


        @pytest.mark.asyncio
        async def test_unmarked_fixture_does_not_fail_by_itself(loopguard):
            time.sleep(0.12)
        """
    )
    result = _run(pytester, "-rf")
    result.assert_outcomes(passed=4, failed=2)
    result.stdout.fnmatch_lines(
        ["*test_assertion_fails_right_after_the_block*blocked the event loop 1 time(s)*"]
    )


def test_ini_threshold(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nloopguard_threshold_ms = 400\n")
    pytester.makepyfile(
        test_threshold="""
        import time

        import pytest


        @pytest.mark.asyncio
        @pytest.mark.no_blocking
        async def test_short_block():
            time.sleep(0.15)


        @pytest.mark.asyncio
        @pytest.mark.no_blocking
        async def test_long_block():
            time.sleep(0.6)
        """
    )
    result = _run(pytester, "-rf")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["*test_long_block*(threshold 400 ms)*"])


def test_bad_ini_threshold_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nloopguard_threshold_ms = fast\n")
    pytester.makepyfile(
        test_bad="""
        import pytest

        @pytest.mark.asyncio
        @pytest.mark.no_blocking
        async def test_x():
            pass
        """
    )
    result = _run(pytester)
    assert result.ret != 0
    assert "loopguard_threshold_ms must be a number of milliseconds, got 'fast'" in (
        result.stdout.str() + result.stderr.str()
    )


def test_inert_unless_used(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain="""
        import asyncio
        import time

        import pytest
        from fastapi_loopguard import registry


        def test_sync_blocking_is_nobodys_business():
            time.sleep(0.1)
            assert not registry.live()


        @pytest.mark.asyncio
        async def test_async_unmarked():
            time.sleep(0.1)
            assert not registry.live()


        @pytest.mark.no_blocking
        def test_marker_on_a_sync_test():
            pass
        """
    )
    result = _run(pytester, "-rE", "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.no_blocking: fail this test if its code blocks*"])
    result.stdout.fnmatch_lines(["@pytest.mark.allow_blocking: never fail this test for*"])
    result = _run(pytester, "-rf")
    # A sync test may carry the marker now; this one starts no loop, so nothing can block one.
    result.assert_outcomes(passed=3)


# A FastAPI app as its tests build it, with or without the middleware.
APP = """
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from fastapi_loopguard import LoopGuardConfig, LoopGuardMiddleware


def slow_helper():
    time.sleep(0.2)  # culprit:slow-helper


def build(guarded, startup_block=0.0):
    @asynccontextmanager
    async def lifespan(app):
        time.sleep(startup_block)  # in the fixture that starts the app: not the test's
        yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/slow")
    async def slow():
        slow_helper()
        return {}

    @app.get("/fast")
    async def fast():
        return {}

    if guarded:
        config = LoopGuardConfig(log_blocking_events=False)
        app.add_middleware(LoopGuardMiddleware, config=config)
    return app
"""

# Every app twice (with and without the middleware), every TestClient loop twice (the test
# picks uvloop through anyio's loop_factory), async tests on both loops (pytest-asyncio).
APP_CONFTEST = """
import asyncio

import pytest
import uvloop
from fastapi.testclient import TestClient

from app_under_test import build


def pytest_asyncio_loop_factories(config, item):
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=["bare", "guarded"])
def guarded(request):
    return request.param == "guarded"


@pytest.fixture
def app(guarded):
    return build(guarded)


@pytest.fixture(params=["asyncio", "uvloop"])
def backend_options(request):
    return {"loop_factory": uvloop.new_event_loop} if request.param == "uvloop" else {}


@pytest.fixture
def client(guarded, backend_options):
    # Its loop starts here, in the fixture, and so does the app's (blocking) startup.
    with TestClient(build(guarded, startup_block=0.2), backend_options=backend_options) as c:
        yield c
"""

SYNC_TESTS = """
import asyncio
import time

import anyio.from_thread
import pytest
from fastapi.testclient import TestClient


@pytest.mark.no_blocking
def test_with_blocks(app, backend_options):
    with TestClient(app, backend_options=backend_options) as client:
        client.get("/slow")


@pytest.mark.no_blocking
def test_without_with_blocks(app, backend_options):
    TestClient(app, backend_options=backend_options).get("/slow")


@pytest.mark.no_blocking
def test_clean(app, backend_options):
    with TestClient(app, backend_options=backend_options) as client:
        client.get("/fast")
    TestClient(app, backend_options=backend_options).get("/fast")


@pytest.mark.no_blocking
def test_fixture_client_blocks(client):
    client.get("/slow")


@pytest.mark.no_blocking
def test_fixture_client_clean(client):
    client.get("/fast")


@pytest.mark.no_blocking
def test_asyncio_run_blocks():
    async def main():
        time.sleep(0.2)  # culprit:before-first-await

    asyncio.run(main())


@pytest.mark.no_blocking
def test_portal_blocks():
    async def work():
        time.sleep(0.2)  # culprit:portal-thread

    with anyio.from_thread.start_blocking_portal() as portal:
        portal.call(work)
"""


def _failures(result: pytest.RunResult) -> list[str]:
    """The failure sections' lines: the summaries that follow repeat some of them."""
    return result.stdout.str().split("short test summary info")[0].splitlines()


def test_sync_tests_with_testclient(pytester: pytest.Pytester) -> None:
    app_path = pytester.makepyfile(app_under_test=APP)
    pytester.makeconftest(APP_CONFTEST)
    tests_path = pytester.makepyfile(test_sync=SYNC_TESTS)
    result = _run(pytester, "-rf")
    result.assert_outcomes(passed=8, failed=14)
    lines = _failures(result)
    combos = [f"{kind}-{loop}" for kind in ("bare", "guarded") for loop in ("asyncio", "uvloop")]
    for test in ("test_with_blocks", "test_without_with_blocks", "test_fixture_client_blocks"):
        for combo in combos:
            head = (
                f"test_sync.py::{test}[{combo}] blocked the event loop 1 time(s) (threshold 50 ms):"
            )
            assert head in lines
    # The app's middleware names the request; the plugin's own guard names the line anyway.
    culprit = f" ms sleep at {app_path}:{culprit_line(app_path, 'slow-helper')} in slow_helper"
    assert sum(line.endswith(culprit + " (GET /slow)") for line in lines) == 6
    assert sum(line.endswith(culprit) for line in lines) == 6
    run_line = culprit_line(tests_path, "before-first-await")
    assert f"ms sleep at {tests_path}:{run_line} in test_asyncio_run_blocks.<locals>.main" in (
        result.stdout.str()
    )
    portal_line = culprit_line(tests_path, "portal-thread")
    assert f"ms sleep at {tests_path}:{portal_line} in test_portal_blocks.<locals>.work" in (
        result.stdout.str()
    )
    for line in lines:
        if " ms sleep at " in line:
            assert 100 <= float(line.split()[0]) < 1000, line
    result.stdout.no_fnmatch_line("*_clean*blocked the event loop*")


ASYNC_TESTS = """
import asyncio
import time

import httpx
import pytest

from app_under_test import build


@pytest.mark.asyncio
@pytest.mark.no_blocking
async def test_asgi_blocks(app):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await client.get("/slow")


@pytest.mark.asyncio
@pytest.mark.no_blocking
async def test_asgi_clean(app):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await client.get("/fast")


@pytest.mark.asyncio
@pytest.mark.no_blocking
async def test_blocks_after_the_apps_shutdown():
    app = build(True)
    to_app, from_app = asyncio.Queue(), asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    lifespan = asyncio.create_task(app(scope, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    assert (await from_app.get())["type"] == "lifespan.startup.complete"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await client.get("/fast")
    await to_app.put({"type": "lifespan.shutdown"})
    assert (await from_app.get())["type"] == "lifespan.shutdown.complete"
    await lifespan
    # The app's guard has stopped and taken its pulse off the loop: the plugin's stays.
    selector = getattr(asyncio.get_running_loop(), "_selector", None)
    if selector is not None:
        assert "select" in vars(selector)
    time.sleep(0.2)  # culprit:after-shutdown
"""


def test_async_tests_with_asgi_transport(pytester: pytest.Pytester) -> None:
    app_path = pytester.makepyfile(app_under_test=APP)
    pytester.makeconftest(APP_CONFTEST)
    tests_path = pytester.makepyfile(test_async=ASYNC_TESTS)
    result = _run(pytester, "-rf")
    result.assert_outcomes(passed=4, failed=6)
    lines = _failures(result)
    for kind in ("bare", "guarded"):
        for loop in ("asyncio", "uvloop"):
            # pytest-asyncio's loop id first, then the fixture's.
            test = f"test_async.py::test_asgi_blocks[{loop}-{kind}]"
            assert f"{test} blocked the event loop 1 time(s) (threshold 50 ms):" in lines
    # Both guards saw the block; the app's event is kept, because it names the request.
    culprit = f" ms sleep at {app_path}:{culprit_line(app_path, 'slow-helper')} in slow_helper"
    assert sum(line.endswith(culprit + " (GET /slow)") for line in lines) == 2
    assert sum(line.endswith(culprit) for line in lines) == 2
    after = f" ms sleep at {tests_path}:{culprit_line(tests_path, 'after-shutdown')} in "
    assert sum(after in line for line in lines) == 2
    for line in lines:
        if " ms sleep at " in line:
            assert 100 <= float(line.split()[0]) < 1000, line


def test_fixture_on_sync_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(app_under_test=APP)
    pytester.makeconftest(APP_CONFTEST)
    pytester.makepyfile(
        test_fixture_sync="""
        from fastapi.testclient import TestClient


        def test_events_then_reset(loopguard, app, guarded, backend_options):
            with TestClient(app, backend_options=backend_options) as client:
                client.get("/slow")
                [event] = loopguard.events
                assert event.kind == "sleep"
                assert event.culprit.function == "slow_helper"
                request = ("GET", "/slow") if guarded else (None, None)
                assert (event.method, event.route) == request
                loopguard.reset()
                client.get("/fast")
                loopguard.assert_no_blocking()
                assert loopguard.events == []


        def test_assertion_fails(loopguard, app):
            TestClient(app).get("/slow")
            loopguard.assert_no_blocking()


        def test_unmarked_fixture_does_not_fail_by_itself(loopguard, app):
            TestClient(app).get("/slow")
        """
    )
    result = _run(pytester, "-rf")
    result.assert_outcomes(passed=6, failed=2)
    for kind in ("bare", "guarded"):
        result.stdout.fnmatch_lines(
            [f"*test_assertion_fails[[]{kind}[]] blocked the event loop 1 time(s)*"]
        )


WHOLE_SUITE_TESTS = """
import asyncio
import time

import pytest
from fastapi.testclient import TestClient

from app_under_test import build


def test_sync_blocks():
    TestClient(build(False)).get("/slow")


def test_sync_blocks_longer():
    async def main():
        time.sleep(0.5)  # culprit:worst

    asyncio.run(main())


@pytest.mark.asyncio
async def test_async_blocks():
    time.sleep(0.2)  # the test's own code


def test_clean():
    TestClient(build(False)).get("/fast")


@pytest.mark.allow_blocking
def test_allowed():
    TestClient(build(False)).get("/slow")
"""


@pytest.mark.parametrize("how", ["option", "ini"])
def test_whole_suite_mode(pytester: pytest.Pytester, how: str) -> None:
    pytester.makepyfile(app_under_test=APP)
    tests_path = pytester.makepyfile(test_all=WHOLE_SUITE_TESTS)
    if how == "ini":
        pytester.makeini("[pytest]\nloopguard_all = true\n")
    result = _run(pytester, "-rf", *(["--loopguard"] if how == "option" else []))
    result.assert_outcomes(passed=2, failed=3)
    for test in ("test_sync_blocks", "test_sync_blocks_longer", "test_async_blocks"):
        assert f"test_all.py::{test} blocked the event loop 1 time(s) (threshold 50 ms):" in (
            _failures(result)
        )
    # The session summary: the blocking tests, worst first.
    summary = result.stdout.str().split("tests that blocked the event loop, worst first")[1]
    listed = [
        line.split("block(s)  ")[1].split()[0] for line in summary.splitlines() if " ms in " in line
    ]
    assert listed[0] == "test_all.py::test_sync_blocks_longer"
    assert sorted(listed) == [
        "test_all.py::test_async_blocks",
        "test_all.py::test_sync_blocks",
        "test_all.py::test_sync_blocks_longer",
    ]
    line = culprit_line(tests_path, "worst")
    assert "test_all.py::test_sync_blocks_longer  (worst: sleep, " in summary
    assert f" ms, test_all.py:{line})" in summary


def test_whole_suite_mode_is_off_by_default(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(app_under_test=APP)
    pytester.makepyfile(test_all=WHOLE_SUITE_TESTS)
    result = _run(pytester, "-rf")
    result.assert_outcomes(passed=5)
    assert "tests that blocked the event loop" not in result.stdout.str()


# Written at the very end of the session: what the plugin left behind in the process.
INERT_CONFTEST = """
import asyncio
import json
import sys


def pytest_sessionfinish(session):
    from fastapi_loopguard import delivery

    state = {
        "plugin_loaded": session.config.pluginmanager.has_plugin("loopguard"),
        "core_imported": "fastapi_loopguard._core" in sys.modules,
        "loops_hooked": hasattr(asyncio.BaseEventLoop.run_forever, "__wrapped__"),
        "observers": len(delivery._observers),
    }
    with open("loopguard-state.json", "w") as f:
        json.dump(state, f)
"""


def test_unused_plugin_loads_no_engine(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(INERT_CONFTEST)
    pytester.makepyfile(
        test_plain="""
        import asyncio
        import time

        import pytest
        from fastapi import FastAPI
        from fastapi.testclient import TestClient


        def test_sync_blocking():
            time.sleep(0.1)


        def test_testclient():
            app = FastAPI()

            @app.get("/")
            async def slow():
                time.sleep(0.1)

            TestClient(app).get("/")
            asyncio.run(asyncio.sleep(0))


        @pytest.mark.asyncio
        async def test_async_unmarked():
            time.sleep(0.1)
        """
    )
    result = _run(pytester)
    result.assert_outcomes(passed=3)
    state = json.loads((pytester.path / "loopguard-state.json").read_text())
    assert state == {
        "plugin_loaded": True,
        "core_imported": False,
        "loops_hooked": False,
        "observers": 0,
    }
