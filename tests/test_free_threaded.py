"""Free-threaded CPython (Py_GIL_DISABLED) is refused at import, with an error that says why.

The sampler reads the loop thread's frames and Context while holding the GIL; without a GIL that
would race with the loop thread, so until that is designed for, importing the package must fail
loudly rather than load an extension that cannot work safely.

The real proof takes a free-threaded interpreter, given in LOOPGUARD_FREE_THREADED_PYTHON (e.g. a
python3.14t built with --disable-gil); `make test-matrix` passes one in when the chroot's Debian
release ships it, but at the time of writing neither trixie nor sid (nor experimental) packages a
free-threaded CPython, so there that test is skipped. The check's own behaviour (the message, and
refusing before the extension is loaded) is still proven on every leg by a subprocess whose
sysconfig reports Py_GIL_DISABLED, since that build variable is all the check reads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastapi_loopguard

FREE_THREADED_ENV = "LOOPGUARD_FREE_THREADED_PYTHON"

REFUSAL = (
    "ImportError: fastapi_loopguard does not support free-threaded Python (Py_GIL_DISABLED) yet: "
    "its sampler relies on the GIL to read the event-loop thread's frames safely."
)


@pytest.fixture
def free_threaded_python() -> str:
    python = os.environ.get(FREE_THREADED_ENV)
    if not python:
        pytest.skip(f"no free-threaded interpreter given in {FREE_THREADED_ENV}")
    return python


def run(
    python: str, code: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-c", code],
        cwd=Path(__file__).parent,  # not the checkout: its src/ must not shadow the install
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


# Imports the package, printing afterwards whether the extension module was loaded.
IMPORT_AND_REPORT = (
    "import sys\n"
    "try:\n"
    "    import fastapi_loopguard\n"
    "finally:\n"
    "    print('fastapi_loopguard._core' in sys.modules)\n"
)


def test_refusal_when_the_build_says_gil_disabled() -> None:
    # The installed package on this very interpreter, with the one build variable the check
    # reads set the way a free-threaded build sets it.
    pretend = (
        "import sysconfig\n"
        "real = sysconfig.get_config_var\n"
        "sysconfig.get_config_var = lambda name: 1 if name == 'Py_GIL_DISABLED' else real(name)\n"
    )
    result = run(sys.executable, pretend + IMPORT_AND_REPORT)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.split() == ["False"]
    assert result.stderr.strip().splitlines()[-1] == REFUSAL

    # The same import without the pretence succeeds, and the extension loads when first needed:
    # the refusal above came from the build variable, not from something else in this
    # environment.
    control = run(
        sys.executable,
        IMPORT_AND_REPORT + "from fastapi_loopguard import _native\n"
        "print(_native.load() is not None, 'fastapi_loopguard._core' in sys.modules)\n",
    )
    assert control.returncode == 0, control.stderr
    assert control.stdout.split() == ["False", "True", "True"]


def test_free_threaded_interpreter_is_refused_at_import(free_threaded_python: str) -> None:
    # First make sure the interpreter really runs without a GIL, or the test would prove nothing.
    probe = run(
        free_threaded_python,
        "import sys, sysconfig; "
        "print(sysconfig.get_config_var('Py_GIL_DISABLED'), sys._is_gil_enabled())",
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["1", "False"]

    # The package exactly as installed for the tests (its pure-Python part needs nothing from
    # the site-packages it sits in before the check). Its extension was built for the GIL
    # interpreter running these tests, so the refusal must come before any attempt to load it:
    # the error must be ours, and _core must not have been imported.
    installed = Path(fastapi_loopguard.__file__).resolve().parent.parent
    result = run(free_threaded_python, IMPORT_AND_REPORT, env={"PYTHONPATH": str(installed)})
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.split() == ["False"]
    assert result.stderr.strip().splitlines()[-1] == REFUSAL
