#!/usr/bin/env bash
# Create the project virtualenv with the system python3, or reuse it if it is already usable.
#
# Usage: scripts/ensure-venv.sh VENV_DIR [PYTHON]
#
# "System python3" means whatever `python3` is first on PATH (Debian's /usr/bin/python3 on a
# fresh box, a pyenv shim on a developer machine). The package needs >= 3.11 (pyproject's
# requires-python), so check that up front rather than letting pip fail obscurely later.
set -euo pipefail

venv=${1:?usage: $0 VENV_DIR [PYTHON]}
python=${2:-python3}
min=(3 11)
version_ok="import sys; sys.exit(0 if sys.version_info >= (${min[0]}, ${min[1]}) else 1)"

if [[ -e "$venv" ]]; then
  # Reuse, but only if it still works: a venv whose base interpreter was removed or upgraded
  # (pyenv does this) has a dangling bin/python, and an old one may predate the 3.11 floor.
  if "$venv/bin/python" -c "$version_ok" 2>/dev/null; then
    exit 0
  fi
  echo "venv: $venv exists but $venv/bin/python is missing, broken or older than" \
    "${min[0]}.${min[1]}; remove it (make distclean) and retry." >&2
  exit 1
fi

if ! command -v "$python" >/dev/null 2>&1; then
  echo "venv: '$python' not found; install Python >= ${min[0]}.${min[1]}" \
    "(on Debian: make system-deps)." >&2
  exit 1
fi
if ! "$python" -c "$version_ok"; then
  echo "venv: '$python' is Python $("$python" -c 'import platform; print(platform.python_version())')" \
    "but fastapi-loopguard needs Python >= ${min[0]}.${min[1]}." >&2
  echo "venv: put a newer python3 first on PATH, or run: make venv SYSTEM_PYTHON=/path/to/python3.X" >&2
  exit 1
fi

echo "venv: creating $venv with $(command -v "$python")" \
  "($("$python" -c 'import platform; print(platform.python_version())'))"
# If creation fails half-way (e.g. no ensurepip because python3-venv is missing, or no network
# for the pip upgrade), remove the partial venv so the next run does not "reuse" it. (Building
# under a temporary name and renaming is not an option: venv scripts embed absolute paths.)
trap 'rm -rf "$venv"' EXIT
if ! "$python" -m venv "$venv"; then
  echo "venv: '$python -m venv' failed; on Debian install python3-venv (make system-deps)." >&2
  exit 1
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
trap - EXIT
