"""The pytest plugin, run by pytester in a subprocess: loaded from its entry point like a user
gets it, under pytest-asyncio and anyio, on asyncio and uvloop.
"""

from __future__ import annotations

import pytest

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
    time.sleep(0.15)  # the culprit


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
        time.sleep(0.15)  # in a task the test started

    await asyncio.create_task(child())
"""


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", *args, timeout=120)


def test_marker_fails_blocking_tests_only(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    path = pytester.makepyfile(test_marked=TESTS)
    result = _run(pytester, "-rf")
    result.assert_outcomes(passed=4, failed=6)
    # TESTS starts with a newline that makepyfile drops: list index == line number.
    culprit_line = next(n for n, line in enumerate(TESTS.splitlines()) if "# the culprit" in line)
    # The failure sections only: some pytest versions repeat the whole message in the summary.
    output = result.stdout.str().split("short test summary info")[0]
    for test in ("test_asyncio_blocks", "test_anyio_blocks"):
        for loop in ("asyncio", "uvloop"):
            assert f"test_marked.py::{test}[{loop}] blocked the event loop 1 time(s)" in output
    assert output.count(f"ms sleep at {path}:{culprit_line} in helper") == 4
    child_line = next(n for n, line in enumerate(TESTS.splitlines()) if "# in a task" in line)
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
        from fastapi_loopguard import guard


        def test_sync_blocking_is_nobodys_business():
            time.sleep(0.1)
            assert not guard._live_guards


        @pytest.mark.asyncio
        async def test_async_unmarked():
            time.sleep(0.1)
            assert not guard._live_guards


        @pytest.mark.no_blocking
        def test_marker_on_a_sync_test():
            pass
        """
    )
    result = _run(pytester, "-rE", "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.no_blocking: fail this async test*"])
    result = _run(pytester, "-rf")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*no_blocking and the loopguard fixture apply to async tests*"])
