"""`make test-transparency`: Starlette's and FastAPI's own test suites, with and without our
middleware around every app they build.

Usage: python scripts/transparency/run.py [--suite NAME ...]

For each suite in suites.toml (next to this file):

1. downloads the framework's sdist (`pip download --no-binary :all: --no-deps`), which ships its
   test suite, into build/transparency/downloads/;
2. makes a venv of its own, build/transparency/<suite>/venv, with the framework from that sdist,
   the test requirements its pyproject names (minus the tools suites.toml drops, with reasons),
   our package, built once per run as a wheel from this checkout (scikit-build-core reuses
   build/<wheel tag>/, so that is incremental), and plugin/loopguard_transparency.py. The
   frameworks are pinned to suites.toml's versions in every venv, so FastAPI's suite runs on the
   same Starlette. A requirement that cannot be installed here is reported and left out; the
   rest still runs;
3. runs the suite three times, each from a fresh unpack of the sdist (tests write files into
   their tree): as shipped, with every app wrapped at defaults, and with dev_mode; all three with
   the plugin recording outcomes, our output and our threads;
4. hands the records to compare.py for the verdict, which also writes docs/transparency.md.

Exits non-zero when the verdict fails, or when a suite could not be run at all.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import compare

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WORK = ROOT / "build" / "transparency"
MODES = ("off", "defaults", "dev_mode")
PLUGIN = HERE / "plugin" / "loopguard_transparency.py"
# A suite that hangs must not hold CI forever; the slowest shipped run takes about two minutes.
RUN_TIMEOUT_S = 1800
# Environment that would change how pytest runs the suite, whoever set it.
PYTEST_ENV = ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTHONPATH")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _name(requirement: str) -> str:
    return _normalize(re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0])


def _extras(requirement: str) -> set[str]:
    found = re.match(r"[^\[<>=!~;@\s]+\s*\[([^\]]*)\]", requirement)
    return {e.strip() for e in found.group(1).split(",") if e.strip()} if found else set()


def _pip(python: Path | str, *args: str, quiet: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [str(python), "-m", "pip", *(["-q"] if quiet else []), *args]
    return subprocess.run(cmd, text=True, capture_output=True)


class SetupError(Exception):
    """A suite cannot be run here: it is reported as failed, and the other suites still run."""


def _check(result: subprocess.CompletedProcess[str], what: str) -> None:
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SetupError(f"{what} failed (exit {result.returncode})")


def download(requirement: str) -> Path:
    """The framework's sdist, pinned; pip reuses a file it already downloaded."""
    pin = re.sub(r"\[[^\]]*\]", "", requirement)
    name, version = pin.split("==")
    dest = WORK / "downloads"
    _check(
        _pip(sys.executable, "download", "--no-binary", ":all:", "--no-deps", "-d", str(dest), pin),
        f"pip download {pin}",
    )
    sdists = [
        p
        for p in dest.glob("*.tar.gz")
        if _normalize(p.name) == _normalize(f"{name}-{version}.tar.gz")
    ]
    if len(sdists) != 1:
        raise SetupError(f"no single sdist of {name} {version} in {dest}")
    return sdists[0]


def unpack(sdist: Path, dest: Path) -> Path:
    """A fresh copy of the sdist's tree at dest (its single top folder, renamed)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, tarfile.open(sdist) as tar:
        tar.extractall(tmp, filter="data")
        (top,) = Path(tmp).iterdir()
        top.rename(dest)
    return dest


def test_requirements(sdist: Path, suite: dict[str, Any]) -> list[str]:
    """The sdist's dependency group (include-groups followed) minus suite["drop"], with the
    framework itself from the sdist file, carrying the extras the group and the pin ask for."""
    with tarfile.open(sdist) as tar:
        member = next(
            m
            for m in tar.getmembers()
            if m.name.count("/") == 1 and m.name.endswith("/pyproject.toml")
        )
        extracted = tar.extractfile(member)
        assert extracted is not None
        groups = tomllib.loads(extracted.read().decode())["dependency-groups"]

    def walk(group: str) -> list[str]:
        reqs: list[str] = []
        for item in groups[group]:
            reqs += walk(item["include-group"]) if isinstance(item, dict) else [item]
        return reqs

    own = _name(suite["requirement"])
    drop = {_normalize(d) for d in suite["drop"]}
    listed = walk(suite["group"])
    unknown = drop - {_name(r) for r in listed}
    if unknown:
        # The list must track the sdist: a stale name means its group changed under us.
        raise SetupError(f"suites.toml drops {sorted(unknown)}, which the group does not list")
    extras = _extras(suite["requirement"])
    kept = []
    for req in listed:
        if _name(req) == own:
            extras |= _extras(req)
        elif _name(req) not in drop:
            kept.append(req)
    framework = f"{own}[{','.join(sorted(extras))}]" if extras else own
    return [f"{framework} @ {sdist.as_uri()}", *kept]


def prepare_venv(
    name: str, reqs: list[str], constraints: Path, wheel: Path
) -> tuple[Path, list[str]]:
    """The suite's venv with reqs and our wheel; returns its python and what could not install."""
    venv = WORK / name / "venv"
    python = venv / "bin" / "python"
    stamp = venv / "transparency-requirements.txt"
    # Reinstalled only when what it should hold changed: requirements or framework pins.
    wanted = "".join(f"{r}\n" for r in reqs) + constraints.read_text()
    missing: list[str] = []
    if not (python.exists() and stamp.exists() and stamp.read_text() == wanted):
        shutil.rmtree(venv, ignore_errors=True)
        _check(
            subprocess.run(
                [sys.executable, "-m", "venv", str(venv)], text=True, capture_output=True
            ),
            "python -m venv",
        )
        print(f"transparency: {name}: installing {len(reqs)} requirements into {venv}", flush=True)
        if _pip(python, "install", "-c", str(constraints), *reqs).returncode != 0:
            # Find out which: the framework itself must install, each of the rest may fail alone.
            _check(_pip(python, "install", "-c", str(constraints), reqs[0]), f"installing {name}")
            for req in reqs[1:]:
                if _pip(python, "install", "-c", str(constraints), req).returncode != 0:
                    missing.append(req)
                    print(f"transparency: {name}: cannot install {req!r}; left out", flush=True)
        (venv / "transparency-missing.json").write_text(json.dumps(missing))
        stamp.write_text(wanted)
    else:
        missing = json.loads((venv / "transparency-missing.json").read_text())
    # Always: the wheel has the version of the last install, but not necessarily its code.
    _check(
        _pip(python, "install", "--no-deps", "--force-reinstall", str(wheel)),
        f"installing {wheel.name} into {venv}",
    )
    # Into site-packages, like any pytest plugin: the guard then takes the harness's frames for
    # library code, as it should (it is no part of the app), and never names it as a culprit.
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    shutil.copy(PLUGIN, purelib)
    return python, missing


def build_wheel() -> Path:
    out = WORK / "wheel"
    shutil.rmtree(out, ignore_errors=True)
    print("transparency: building our wheel from the checkout", flush=True)
    _check(_pip(sys.executable, "wheel", "--no-deps", "-w", str(out), str(ROOT)), "pip wheel")
    (wheel,) = out.glob("fastapi_loopguard-*.whl")
    return wheel


def versions(python: Path) -> dict[str, str]:
    listed = _pip(python, "list", "--format=json", quiet=False)
    _check(listed, "pip list")
    found = {_normalize(p["name"]): p["version"] for p in json.loads(listed.stdout)}
    py = subprocess.run(
        [str(python), "-c", "import platform; print(platform.python_version())"],
        text=True,
        capture_output=True,
    ).stdout.strip()
    return {"python": py, **found}


def run_suite(name: str, suite: dict[str, Any], sdist: Path, python: Path, mode: str) -> None:
    src = unpack(sdist, WORK / name / mode)
    # The tests then import the framework installed from this very sdist, from site-packages, as
    # a user's app does: so the guard tells the framework's frames from application code as it
    # would there (a framework frame is never a culprit), instead of taking the unpacked tree,
    # first on sys.path, for the app.
    shutil.rmtree(src / _name(suite["requirement"]))
    record = WORK / name / f"{mode}.json"
    record.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in PYTEST_ENV}
    env["PYTHONPATH"] = os.pathsep.join(str(src / p) for p in suite.get("pythonpath", []))
    cmd = [
        str(python),
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "loopguard_transparency",
        f"--loopguard-inject={mode}",
        f"--loopguard-record={record}",
        *suite["pytest_args"],
    ]
    print(f"transparency: {name}: running the suite, {mode} ...", flush=True)
    out_path, err_path = WORK / name / f"{mode}.stdout", WORK / name / f"{mode}.stderr"
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    timed_out = False
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=src, env=env, stdout=out, stderr=err)
        try:
            returncode = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            returncode = proc.wait()
            timed_out = True
    wall = time.monotonic() - start
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    stderr = err_path.read_text(errors="replace").splitlines()
    meta = {
        "src": str(src),
        "returncode": returncode,
        "timed_out": timed_out,
        "wall_s": wall,
        "cpu_s": cpu,
        # What reached the process's own stderr, i.e. was said while pytest captured nothing.
        "stderr_lines": [line for line in stderr if "loopguard" in line.lower()],
        "stderr_tail": stderr[-30:],
    }
    (WORK / name / f"{mode}.run.json").write_text(json.dumps(meta, indent=1))
    print(f"transparency: {name}: {mode}: exit {returncode} in {wall:.1f} s", flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", action="append", help="run only this suite (repeatable)")
    args = parser.parse_args(argv)
    settings = tomllib.loads((HERE / "suites.toml").read_text())
    suites: dict[str, Any] = settings["suites"]
    chosen = args.suite or list(suites)
    for name in chosen:
        if name not in suites:
            parser.error(f"no suite {name!r} in suites.toml (there are: {', '.join(suites)})")
    WORK.mkdir(parents=True, exist_ok=True)
    constraints = WORK / "constraints.txt"
    constraints.write_text(
        "".join(re.sub(r"\[[^\]]*\]", "", s["requirement"]) + "\n" for s in suites.values())
    )
    try:
        wheel = build_wheel()
    except SetupError as exc:
        print(f"transparency: our package cannot be built: {exc}", file=sys.stderr)
        return 2
    for name in chosen:
        suite = suites[name]
        folder = WORK / name
        folder.mkdir(exist_ok=True)
        # Nothing of an earlier run may pass for this one's.
        for old in [*folder.glob("*.json"), *folder.glob("*.stdout"), *folder.glob("*.stderr")]:
            old.unlink()
        try:
            sdist = download(suite["requirement"])
            reqs = test_requirements(sdist, suite)
            python, missing = prepare_venv(name, reqs, constraints, wheel)
            env = {
                "versions": versions(python),
                "missing": missing,
                "sdist": sdist.name,
                "sha256": hashlib.sha256(sdist.read_bytes()).hexdigest(),
            }
        except SetupError as exc:
            print(f"transparency: {name}: cannot be run here: {exc}", flush=True)
            (folder / "env.json").write_text(json.dumps({"error": str(exc)}))
            continue
        (folder / "env.json").write_text(json.dumps(env, indent=1))
        for mode in MODES:
            run_suite(name, suite, sdist, python, mode)
    return compare.main([str(WORK), *(f"--suite={name}" for name in chosen)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
