# Build, test and lint plumbing for fastapi-loopguard.
#
#   make test    # everything the README promises: C++ unit tests + Python tests
#   make help    # list the targets
#
# Works on a fresh Debian machine (as root, or with sudo) with Python >= 3.11: missing Debian
# packages are installed on demand, and everything Python lives in .venv.

# Fail a recipe on the first failing command, on unset variables and inside pipelines, instead
# of make's default `sh -c` that happily carries on.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
# Several targets mutate shared state (apt, .venv, build/) and `test` relies on running
# install -> test-cpp -> test-py in order, so never run targets of this file in parallel. The
# compilers still use several cores through cmake's -j.
.NOTPARALLEL:
MAKEFLAGS += --no-builtin-rules

# ---- knobs (override on the command line: make test-cpp JOBS=8) -------------------------------
# The interpreter the venv is created from: the system python3 (the first on PATH). Not called
# PYTHON, which CI images sometimes export for their own purposes.
SYSTEM_PYTHON ?= python3
VENV ?= .venv
CMAKE ?= cmake
CTEST ?= ctest
CLANG_FORMAT ?= clang-format
JOBS ?= 2
BUILD_TYPE ?= Release
# Extra arguments for pytest and for the demo, e.g. make test-py PYTEST_ARGS='-k attribution -x'
PYTEST_ARGS ?=
DEMO_ARGS ?=
# e.g. make test-transparency TRANSPARENCY_ARGS='--suite starlette'
TRANSPARENCY_ARGS ?=

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CPPTEST_DIR := build/cpptest
SANITIZE_DIR := build/sanitize
# A venv (and build directory) of its own for the extension built with ASan+UBSan, so .venv
# keeps the normal build.
ASAN_VENV := .venv-asan
# The Python tests that drive the engine hardest (sampler, GIL hand-overs, split stalls, hangs,
# cumulative steps, stacks read without the GIL while the process exits or forks), on real uvicorn
# and in process; the rest would add time, not native coverage.
SANITIZE_PYTEST ?= tests/test_guard.py tests/test_detection.py tests/test_attribution.py \
	tests/test_sampling.py tests/test_faults.py::test_exit_and_fork_during_a_read_without_the_gil

# Debian packages: compiler + cmake + GoogleTest for the C++ tests; headers and venv support
# for the system python3 (only needed when it is Debian's own; harmless otherwise).
SYSTEM_PKGS := g++ cmake libgtest-dev python3-dev python3-venv
# Only the tests need these: the Prometheus server, which the integration tests start themselves
# (never as a service) to scrape gunicorn workers, and a browser, in which the report page and
# the live page are checked headless (tests/test_browser.py).
TEST_PKGS := prometheus chromium
LINT_PKGS := clang-format

# Python dirs to lint; $(wildcard) drops ones that do not exist (yet), which ruff would report
# as an error.
PY_DIRS := $(wildcard src tests testkit benchmarks scripts)
# Lazily expanded so `find` only runs for lint/format.
CPP_SOURCES = $(shell find cpp \( -name '*.h' -o -name '*.cpp' \) -type f | sort) \
	$(wildcard src/bindings/*.cpp)

# Keep pip quiet about its own version and never let it wait for input (no stdin in CI).
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1

.PHONY: help system-deps test-deps lint-deps venv install dev test test-cpp test-py test-matrix \
	test-leg test-transparency demo bench bench-instr soak sanitize lint format clean distclean

help: ## Show this help
	@echo "Usage: make <target> [VAR=value ...]"
	@echo
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) \
		| awk 'BEGIN {FS = ":.*## "}; {printf "  %-18s %s\n", $$1, $$2}'
	@echo
	@echo "Variables: PYTEST_ARGS, DEMO_ARGS, TRANSPARENCY_ARGS, JOBS (=$(JOBS)), BUILD_TYPE (=$(BUILD_TYPE)),"
	@echo "           SYSTEM_PYTHON (=$(SYSTEM_PYTHON)), VENV (=$(VENV)), LEG, CHROOT_DIR"

# ---- environment -------------------------------------------------------------------------------

system-deps: ## Install missing Debian build/test packages (apt, uses sudo if not root)
	@scripts/system-deps.sh $(SYSTEM_PKGS)

test-deps: ## Install the Debian packages only the tests need (prometheus, chromium)
	@scripts/system-deps.sh $(TEST_PKGS)

# Only the C++ formatter comes from Debian. ruff, mypy and the runtime dependencies (so mypy can
# follow imports of starlette) go into the venv, with the version floors from pyproject.toml and
# without building the extension as `pip install '.[dev]'` would. When they are already
# satisfied this is a quick, offline no-op.
lint-deps: venv ## Install the linters: clang-format (Debian), ruff + mypy (.venv)
	@scripts/system-deps.sh $(LINT_PKGS)
	@$(PIP) install -q $$($(PY) scripts/requirements.py lint)

venv: ## Create .venv from the system python3 (>= 3.11) and upgrade pip; reused if present
	@scripts/ensure-venv.sh $(VENV) $(SYSTEM_PYTHON)

# ---- build -------------------------------------------------------------------------------------

# A regular (non-editable) install, like a user would get: pip builds a wheel in an isolated
# environment that fetches scikit-build-core and nanobind from PyPI. pip always rebuilds a local
# directory, and scikit-build-core reuses build/<wheel tag>/ so that is incremental.
install: system-deps venv ## Build and install the package with its test extras into .venv
	$(PIP) install '.[test]'

# Editable install for the edit-compile-test loop. With editable.rebuild=true, importing
# fastapi_loopguard re-runs the CMake build in build/<wheel tag>/ first, so C++ edits are picked
# up without reinstalling. That rebuild runs long after pip has exited, so it cannot use pip's
# throw-away isolated build environment: the build dependencies must live in the venv itself,
# hence installing them here and --no-build-isolation. (`make clean` deletes that build dir;
# run `make dev` again afterwards.)
dev: system-deps venv ## Editable install (rebuilds the C++ extension on import) + dev tools
	$(PIP) install $$($(PY) scripts/requirements.py build)
	$(PIP) install --no-build-isolation -Ceditable.rebuild=true -e '.[dev]'

# ---- tests -------------------------------------------------------------------------------------

test: install test-deps test-cpp test-py ## Run all tests (C++ + Python) -- the README's command

# The engine is built without Python here (LOOPGUARD_BUILD_MODULE=OFF): the unit tests drive it
# with fake clocks and samplers, so they need neither the venv nor nanobind. --no-tests=error:
# a test binary that registers nothing (a broken or empty test file) must fail, not pass.
test-cpp: system-deps ## Build the C++ unit tests into build/cpptest and run them with ctest
	$(CMAKE) -S . -B $(CPPTEST_DIR) -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) \
		-DLOOPGUARD_BUILD_TESTS=ON -DLOOPGUARD_BUILD_MODULE=OFF
	$(CMAKE) --build $(CPPTEST_DIR) -j $(JOBS)
	$(CTEST) --test-dir $(CPPTEST_DIR) --output-on-failure --no-tests=error

# Runs against whatever `make install` or `make dev` put into the venv (the src/ layout means
# the checkout itself is not importable), so it does not reinstall by itself; `make test` does.
test-py: ## Run the Python tests with .venv's pytest (PYTEST_ARGS=...)
	@$(PY) -c 'import importlib.util as u, sys; \
		sys.exit(not (u.find_spec("pytest") and u.find_spec("fastapi_loopguard")))' \
		2>/dev/null || { echo "test-py: pytest or fastapi_loopguard is not installed in" \
		"$(VENV); run 'make install' (or 'make dev') first." >&2; exit 1; }
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The Pythons we claim (pyproject's classifiers): 3.11 is the host's python3 and runs `make test`
# itself; 3.12 runs the same `make test` on the host, from a CPython 3.12 the machine has (pyenv's,
# say: no Debian release ships one) into a venv of its own, and is skipped when there is none;
# 3.13 and 3.14 run it inside Debian trixie and sid chroots (created on first use in CHROOT_DIR,
# then reused). Needs root. See scripts/matrix-leg.sh.
MATRIX_LEGS := 3.11 3.12 3.13 3.14
# The venvs of host legs other than 3.11 (named in scripts/matrix-leg.sh), for distclean.
MATRIX_VENVS := .venv-3.12
test-matrix: ## Run all tests on every Python we claim: 3.11 to 3.14 (root; chroots)
	@scripts/matrix-leg.sh $(MATRIX_LEGS)

test-leg: ## Run all tests on one Python of the matrix: make test-leg LEG=3.13
	@[[ -n "$(LEG)" ]] || { echo "test-leg: say which one, e.g. make test-leg LEG=3.13" \
		"(legs: $(MATRIX_LEGS))" >&2; exit 2; }
	@scripts/matrix-leg.sh $(LEG)

# Starlette's and FastAPI's own test suites, from their sdists, as shipped and with our middleware
# around every app they build (at defaults, then with dev_mode): the same outcomes, nothing said
# outside the tests that really block, no thread of ours left, at most 1.2x the time. Everything
# lives in build/transparency/ (venvs of its own; our package goes in as a wheel built from this
# checkout); the verdict is printed and written to docs/transparency.md. See
# scripts/transparency/run.py.
test-transparency: system-deps venv ## Framework suites (Starlette, FastAPI) with our middleware injected
	$(PY) scripts/transparency/run.py $(TRANSPARENCY_ARGS)

# Sanitizers. The C++ unit tests run under ASan+UBSan (all of them) and TSan (the watchdog and
# the hand-off queue: the two places where threads meet). The extension itself runs under
# ASan+UBSan inside the Python tests listed in SANITIZE_PYTEST: CPython is not built with ASan, so
# the runtime is preloaded. libstdc++ is preloaded with it: ASan must find __cxa_throw when it
# starts, or the extension's first C++ exception (nanobind's way of raising) aborts the process.
# Leak checking is off because CPython keeps its own allocations for the life of the process.
# TSan cannot run the extension: an uninstrumented CPython takes and hands over the GIL without
# TSan seeing it, so every sampler read would be a false race.
# setarch -R: gcc 12's TSan refuses the address layout of kernels with high mmap randomisation
# (the build runs the test binary too, to list its tests). The extension is built in a directory
# of its own, so the normal build's CMake cache never learns the sanitizer flags.
sanitize: system-deps ## C++ tests under ASan+UBSan and TSan; Python subset under ASan+UBSan
	$(CMAKE) -S . -B $(SANITIZE_DIR)/asan -DCMAKE_BUILD_TYPE=RelWithDebInfo \
		-DLOOPGUARD_BUILD_TESTS=ON -DLOOPGUARD_BUILD_MODULE=OFF -DLOOPGUARD_SANITIZE=address,undefined
	$(CMAKE) --build $(SANITIZE_DIR)/asan -j $(JOBS)
	UBSAN_OPTIONS=print_stacktrace=1 $(CTEST) --test-dir $(SANITIZE_DIR)/asan \
		--output-on-failure --no-tests=error
	$(CMAKE) -S . -B $(SANITIZE_DIR)/tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo \
		-DLOOPGUARD_BUILD_TESTS=ON -DLOOPGUARD_BUILD_MODULE=OFF -DLOOPGUARD_SANITIZE=thread
	setarch "$$(uname -m)" -R $(CMAKE) --build $(SANITIZE_DIR)/tsan -j $(JOBS)
	TSAN_OPTIONS=halt_on_error=1 setarch "$$(uname -m)" -R $(CTEST) --test-dir $(SANITIZE_DIR)/tsan \
		--output-on-failure --no-tests=error -R '^(EngineTest|BoundedQueue)\.'
	[[ -x $(ASAN_VENV)/bin/python ]] || $(SYSTEM_PYTHON) -m venv $(ASAN_VENV)
	$(ASAN_VENV)/bin/python -m pip install -q --upgrade pip
	$(ASAN_VENV)/bin/python -m pip install -q -Cbuild-dir=$(SANITIZE_DIR)/wheel \
		-Ccmake.define.LOOPGUARD_SANITIZE=address,undefined -Ccmake.build-type=RelWithDebInfo \
		'.[test]'
	LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libstdc++.so)" \
		ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
		$(ASAN_VENV)/bin/python -m pytest -q -p no:cacheprovider $(SANITIZE_PYTEST)

# `loopguard demo` is the README's first command; the console script comes with the install.
demo: install ## Install, then run `loopguard demo` (DEMO_ARGS=..., e.g. --duration 30)
	$(VENV)/bin/loopguard demo $(DEMO_ARGS)

bench: install ## A/B against a bare app: throughput ratios and idle CPU, asyncio and uvloop (wrk)
	@scripts/system-deps.sh wrk util-linux
	$(PY) -m benchmarks.bench $(BENCH_ARGS)

# Counts instructions instead of timing them, so the figures repeat on a busy, shared machine.
# Each variant runs in a child under callgrind, once per seed: a few minutes on an idle 2-core
# machine. BENCH_INSTR_ARGS: '--breakdown' adds where the guard's instructions go, piece by piece;
# '--seeds 0' for one quick pass; '--jobs 1' to leave the neighbours a core.
bench-instr: install ## Instructions per request under callgrind, guarded/bare, asyncio and uvloop
	@scripts/system-deps.sh valgrind
	$(PY) -m benchmarks.instr $(BENCH_INSTR_ARGS)

# SOAK_ARGS='--seconds 60' for a short run (the seconds are per loop).
soak: install ## 10 min of mixed load + blocking culprits: no crash, flat RSS, no event lost (wrk)
	@scripts/system-deps.sh wrk util-linux
	$(PY) -m benchmarks.soak $(SOAK_ARGS)

# ---- code style --------------------------------------------------------------------------------

# Runs every check even when an earlier one fails, so one CI run reports all problems, then
# fails if any did. mypy checks the Python side against the engine's stub (_core.pyi), which the
# build generates from the module itself: hence the install of this tree first.
lint: lint-deps install ## Check style: ruff check + ruff format --check, mypy, clang-format
	@status=0; \
	echo "--- ruff check"; $(VENV)/bin/ruff check $(PY_DIRS) || status=1; \
	echo "--- ruff format --check"; $(VENV)/bin/ruff format --check $(PY_DIRS) || status=1; \
	echo "--- mypy"; $(VENV)/bin/mypy || status=1; \
	echo "--- clang-format"; \
	$(CLANG_FORMAT) --dry-run --Werror $(CPP_SOURCES) && echo "C++ sources formatted" \
		|| status=1; \
	exit $$status

# Fix first, then format: some fixes (import sorting) need reformatting. --exit-zero because the
# leftovers are reported (and enforced) by `make lint`; formatting should still happen.
format: lint-deps ## Apply ruff fixes + ruff format and clang-format in place
	$(VENV)/bin/ruff check --fix --exit-zero $(PY_DIRS)
	$(VENV)/bin/ruff format $(PY_DIRS)
	$(CLANG_FORMAT) -i $(CPP_SOURCES)

# ---- cleanup -----------------------------------------------------------------------------------

clean: ## Remove build output (build/, dist/) and tool caches; keeps .venv
	rm -rf build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
	find $(wildcard src tests) -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean ## clean, and also remove .venv (and the sanitizer and 3.12 leg venvs)
	rm -rf $(VENV) $(ASAN_VENV) $(MATRIX_VENVS)
