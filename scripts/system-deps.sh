#!/usr/bin/env bash
# Ensure the given Debian packages are installed.
#
# Usage: scripts/system-deps.sh PKG...
#
# Quiet and network-free when everything is already installed: each package is checked with
# `dpkg -s` first, and only if something is missing do we run `apt-get update` (once) and
# `apt-get install`. Uses sudo when not root. On machines without dpkg (not Debian/Ubuntu) it
# only warns, so a developer with the tools from another source is not blocked.
set -euo pipefail

if (($# == 0)); then
  echo "usage: $0 PKG..." >&2
  exit 2
fi

if ! command -v dpkg >/dev/null 2>&1; then
  echo "system-deps: no dpkg here (not Debian/Ubuntu?); make sure these are installed: $*" >&2
  exit 0
fi

missing=()
for pkg in "$@"; do
  # `dpkg -s` also succeeds for removed-but-not-purged packages ("deinstall ok config-files"),
  # so look at the status line rather than only the exit code.
  if ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed$'; then
    missing+=("$pkg")
  fi
done
((${#missing[@]} == 0)) && exit 0

echo "system-deps: installing missing Debian packages: ${missing[*]}"
if ((EUID == 0)); then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "system-deps: need root to install ${missing[*]}, and sudo is not available." >&2
  echo "system-deps: run as root: apt-get install ${missing[*]}" >&2
  exit 1
fi

# `env` rather than a bare VAR=... so it survives sudo's environment reset; noninteractive so
# no debconf prompt can hang a CI job that has no stdin.
apt=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -y)
"${apt[@]}" update
"${apt[@]}" install --no-install-recommends "${missing[@]}"
