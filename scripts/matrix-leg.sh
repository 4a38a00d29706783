#!/usr/bin/env bash
# Run the whole test suite (C++ and Python, asyncio and uvloop) on each Python we claim.
#
# Usage: scripts/matrix-leg.sh LEG...        (as root: chroot and mount need it)
#
#   3.11  the host's python3, which must be 3.11: exactly `make test`
#   3.12  a CPython 3.12 the machine already has (python3.12 on PATH, else pyenv's), on the host:
#         `make test` with its own venv (.venv-3.12); skipped, not failed, when there is none
#   3.13  Debian trixie's python3.13, in a chroot
#   3.14  Debian sid's python3.14, in a chroot (sid is where Debian ships 3.14)
#
# A chroot leg runs the very same `make test` inside the chroot, on a copy of this checkout, so
# every leg builds the package and runs every test the same way; only the interpreter and the
# Debian release (compiler, cmake, GoogleTest) change. 3.12 has no chroot because no Debian
# release ships it (bookworm has 3.11, trixie 3.13): it can only use an interpreter from
# elsewhere (pyenv, a source build), so it runs on the host, with the host's compiler.
#
# The chroots live in CHROOT_DIR (default /var/cache/fastapi-loopguard/chroots), outside the
# checkout, so that every clone on the machine, CI's fresh ones included, reuses them; set
# CHROOT_DIR=.cache/chroots to keep them inside the checkout (.cache/ is gitignored). A missing
# chroot is created with debootstrap from the Debian mirror the host's apt uses (or
# DEBIAN_MIRROR). A flock serialises runs that share one chroot.
#
# For the run, the chroot gets /proc (the engine reads /proc/self/task/*), /dev and a fresh
# /dev/shm, and the host's pip configuration with the files it names (see
# scripts/pip_host_paths.py); all of it is unmounted again when the leg ends, fails or is
# interrupted. Environment passed through: PYTEST_ARGS, JOBS, BUILD_TYPE, CI, PIP_*, CA variables.
#
# Each leg's result and duration is summarised at the end; the exit status is non-zero if any
# leg failed (all requested legs run regardless, so one CI run reports every broken Python).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
chroot_base=${CHROOT_DIR:-/var/cache/fastapi-loopguard/chroots}
[[ $chroot_base == /* ]] || chroot_base="$repo/$chroot_base"

# Debian packages of a chroot. The generic python3-dev/python3-venv are listed too because the
# Makefile's system-deps check asks for them by those names; make runs the tests with the
# versioned interpreter (SYSTEM_PYTHON), so sid moving its default python3 on does not change
# what the 3.14 leg tests.
base_pkgs=(make g++ cmake libgtest-dev ca-certificates python3 python3-dev python3-venv)

usage() {
  echo "usage: $0 LEG...   (LEG: 3.11 | 3.12 | 3.13 | 3.14)" >&2
  exit 2
}

log() { printf 'matrix: %s\n' "$*"; }

# Leg table: LEG -> Debian suite and interpreter. 3.11 and 3.12 are the host.
leg_suite() {
  case $1 in
    3.13) echo trixie ;;
    3.14) echo sid ;;
    *) return 1 ;;
  esac
}

leg_pkgs() {
  local py="python$1"
  echo "${base_pkgs[*]} $py $py-dev $py-venv"
}

# The Debian mirror the host's apt already uses (deb822 .sources or one-line .list files): the
# first URI of the main archive, i.e. ending in /debian (so not debian-security, not
# third-party repositories). A host without one falls back to deb.debian.org.
host_mirror() {
  local uri
  uri=$(
    {
      sed -nE 's/^[[:space:]]*URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | tr -s '[:blank:]' '\n'
      sed -nE 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null
    } | grep -E '^(https?|file)://.*/debian/?$' | head -n1
  ) || true
  echo "${uri:-http://deb.debian.org/debian}"
}

# Mount points at or under $1, deepest first (/proc/self/mountinfo field 5, octal-escaped).
mounts_under() {
  local root=$1
  awk -v root="$root" '{
      p = $5; gsub(/\\040/, " ", p)
      if (p == root || index(p, root "/") == 1) print p
    }' /proc/self/mountinfo | sort -r
}

# Unmount everything left under a chroot (a run killed with SIGKILL cannot clean up after
# itself), so that neither a new run nor a removal ever works through a stale bind of /dev.
unmount_all_under() {
  local root=$1 m
  while IFS= read -r m; do
    [[ -n $m ]] || continue
    log "unmounting stale $m"
    umount "$m" 2>/dev/null || umount -l "$m"
  done < <(mounts_under "$root")
  if [[ -n $(mounts_under "$root") ]]; then
    echo "matrix: cannot unmount everything under $root; refusing to go on" >&2
    return 1
  fi
}

remove_tree() {
  local dir=$1
  [[ -e $dir ]] || return 0
  unmount_all_under "$dir"
  # --one-file-system: even a mount that appeared meanwhile is never descended into.
  rm -rf --one-file-system "$dir"
}

# A path inside the chroot, refusing one that a symlink in the chroot resolves (on the host,
# where we run) to somewhere outside it: mounting or copying there would change the host.
inside() {
  local root path=$2 real
  root=$(realpath -m "$1")
  real=$(realpath -m "$root$path")
  if [[ $real != "$root" && $real != "$root"/* ]]; then
    echo "matrix: $root$path resolves outside the chroot ($real); refusing" >&2
    return 1
  fi
  echo "$real"
}

# ---- per-leg state, cleaned up by the EXIT trap -------------------------------------------------
leg_dir=
mounted=()

cleanup_leg() {
  local i status=0
  [[ -n $leg_dir ]] && stop_strays "$leg_dir"
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
    # Something still busy after stop_strays (a process that ignored SIGKILL while in the
    # kernel): detach lazily rather than leave the mount behind.
    umount "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}" || status=1
  done
  mounted=()
  return $status
}

mount_at() {
  local target=$1
  shift
  mount "$@" "$target"
  mounted+=("$target")
}

create_chroot() {
  local leg=$1 dir=$2 suite pkgs mirror start
  suite=$(leg_suite "$leg")
  read -r -a pkgs <<<"$(leg_pkgs "$leg")"
  if ! command -v debootstrap >/dev/null 2>&1; then
    "$repo/scripts/system-deps.sh" debootstrap
  fi
  mirror=${DEBIAN_MIRROR:-$(host_mirror)}
  log "creating the $suite chroot in $dir from $mirror"
  start=$SECONDS
  # Built under a temporary name and renamed at the end, so an interrupted creation is never
  # mistaken for a usable chroot.
  remove_tree "$dir.partial"
  remove_tree "$dir"
  mkdir -p "$(dirname "$dir")"
  debootstrap --variant=minbase --include="$(
    IFS=,
    echo "${pkgs[*]}"
  )" "$suite" "$dir.partial" "$mirror"
  unmount_all_under "$dir.partial"
  mv "$dir.partial" "$dir"
  log "created the $suite chroot in $((SECONDS - start)) s"
}

# A chroot made by an older version of this script may lack a package added since. Runs with
# /proc and /dev mounted, which package scripts expect.
install_missing() {
  local leg=$1 dir=$2 p pkgs missing=()
  read -r -a pkgs <<<"$(leg_pkgs "$leg")"
  for p in "${pkgs[@]}"; do
    # shellcheck disable=SC2016 # ${Status} is dpkg-query's field, not a shell expansion
    if ! chroot "$dir" dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null \
      | grep -q '^install ok installed$'; then
      missing+=("$p")
    fi
  done
  ((${#missing[@]})) || return 0
  log "installing into the chroot: ${missing[*]}"
  chroot "$dir" env DEBIAN_FRONTEND=noninteractive apt-get -q -y update
  chroot "$dir" env DEBIAN_FRONTEND=noninteractive \
    apt-get -q -y install --no-install-recommends "${missing[@]}"
}

# Processes left running in the chroot (a failed test's server, say) would keep its mounts busy
# and outlive the leg. The lock guarantees that every process whose root is this chroot was
# started by this run.
stop_strays() {
  local root=$1 pid pids sig
  root=$(realpath -m "$root")
  for sig in TERM KILL; do
    pids=()
    for pid in /proc/[0-9]*; do
      [[ $(readlink "$pid/root" 2>/dev/null) == "$root" ]] && pids+=("${pid#/proc/}")
    done
    ((${#pids[@]})) || return 0
    log "stopping processes left in the chroot (SIG$sig): ${pids[*]}"
    kill -s "$sig" "${pids[@]}" 2>/dev/null || true
    sleep 1
  done
}

# Everything the run needs from the host, mounted or copied into the chroot.
prepare_run() {
  local dir=$1 kind path target
  mount_at "$(inside "$dir" /proc)" -t proc proc
  mount_at "$(inside "$dir" /dev)" --bind /dev
  # The bind above is not recursive: give the chroot a /dev/shm of its own (POSIX semaphores
  # and shared memory of multiprocessing live there) rather than the host's.
  mount_at "$(inside "$dir" /dev/shm)" -t tmpfs -o mode=1777,nosuid,nodev shm
  # Name resolution for pip: the host's, as of now.
  for path in /etc/resolv.conf /etc/hosts; do
    cp --remove-destination "$path" "$(inside "$dir" "$path")"
  done
  while read -r kind path; do
    target=$(inside "$dir" "$path")
    if [[ $kind == file ]]; then
      mkdir -p "$(dirname "$target")"
      # --remove-destination: never write through a symlink the chroot has at that path.
      cp --remove-destination "$path" "$target"
    elif [[ -d $target && -n $(ls -A "$target") ]]; then
      # Never shadow the chroot's own files (e.g. Debian's /usr/share/python-wheels).
      log "not mounting $path: the chroot has its own"
    else
      mkdir -p "$target"
      mount_at "$target" --bind -o ro "$path"
    fi
  done < <(python3 "$repo/scripts/pip_host_paths.py")
}

# The checkout, as it is now (uncommitted edits included), into the chroot's /src. build/ is
# removed: CMake decides what to rebuild by timestamps, and the copy may come from a different
# checkout than the last run's, whose objects could look newer than these sources. .venv is
# kept: it only holds PyPI packages, and pip reinstalls the project itself on every run. The
# host's other venvs (.venv-3.12, .venv-asan) are left out: their interpreters are the host's.
copy_source() {
  local dir=$1 src
  src=$(inside "$dir" /src)
  mkdir -p "$src"
  find "$src" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf --one-file-system {} +
  tar -C "$repo" --exclude=./.venv --exclude='./.venv-*' --exclude=./build --exclude=./.cache \
    --exclude=./.git --exclude='*/__pycache__' -cf - . | tar -C "$src" -xf -
}

run_in_chroot() {
  local leg=$1 dir=$2
  local -a envs=(HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "SYSTEM_PYTHON=python$leg")
  local name
  for name in CI PYTEST_ARGS JOBS BUILD_TYPE SSL_CERT_FILE SSL_CERT_DIR REQUESTS_CA_BUNDLE \
    CURL_CA_BUNDLE $(compgen -e | grep '^PIP_' || true); do
    [[ -n ${!name+set} ]] && envs+=("$name=${!name}")
  done
  # No host variables leak in otherwise (PATH with pyenv shims, VIRTUAL_ENV, ...). Started in
  # the background and waited for, because bash runs a signal's trap only once the foreground
  # command is over: `wait` returns at once, and the EXIT trap stops the run and unmounts.
  env -i "${envs[@]}" chroot "$dir" /bin/bash -c 'cd /src && exec make test' </dev/null &
  wait $!
}

chroot_leg() {
  local leg=$1 suite dir status=0
  suite=$(leg_suite "$leg")
  dir="$chroot_base/$suite"
  mkdir -p "$chroot_base"
  exec 9>"$dir.lock"
  flock 9
  unmount_all_under "$dir"
  [[ -x $dir/usr/bin/python$leg ]] || create_chroot "$leg" "$dir"
  leg_dir=$dir
  trap 'cleanup_leg' EXIT
  prepare_run "$dir"
  # sid's Release files carry a Valid-Until only days ahead, and the mirror this machine reaches
  # can lag behind the clock; without this every apt-get update in the chroot (the tests' own
  # Debian packages included) fails with "Release file ... is expired".
  printf 'Acquire::Check-Valid-Until "false";\n' >"$dir/etc/apt/apt.conf.d/99loopguard-valid-until"
  install_missing "$leg" "$dir"
  copy_source "$dir"
  log "leg $leg: make test in the $suite chroot ($(chroot "$dir" "python$leg" --version))"
  run_in_chroot "$leg" "$dir" || status=$?
  cleanup_leg
  trap - EXIT
  return $status
}

# Leg 3.11: `make test` itself, on the host's python3 (or SYSTEM_PYTHON), into .venv.
host_leg() {
  local leg=$1 py=${SYSTEM_PYTHON:-python3} version
  version=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [[ $version != "$leg" ]]; then
    echo "matrix: leg $leg runs on the host's $py, which is Python $version here" >&2
    return 1
  fi
  log "leg $leg: make test on the host ($("$py" --version))"
  make -C "$repo" test
}

# The CPython 3.12 for leg 3.12, as its real path (sys.executable): the first python3.12 on PATH,
# else the newest of pyenv's 3.12 versions. Each candidate is asked what it is rather than
# trusted by name: pyenv's python3.12 shim is on PATH even when 3.12 is not the selected version,
# and then it only prints "command not found".
find_python312() {
  local cand what
  while IFS= read -r cand; do
    [[ -x $cand ]] || continue
    what=$("$cand" -c 'import sys; print(sys.implementation.name, *sys.version_info[:2])' \
      </dev/null 2>/dev/null) || continue
    if [[ $what == "cpython 3 12" ]]; then
      "$cand" -c 'import sys; print(sys.executable)' </dev/null
      return 0
    fi
  done < <(
    command -v python3.12 || true
    compgen -G '/root/.pyenv/versions/3.12*/bin/python3.12' | sort -rV || true
  )
  return 1
}

# Leg 3.12: the same `make test` on the host, from that interpreter, into a venv of its own so the
# 3.11 leg's .venv is never touched (`make distclean` removes both). The wheel's build directory
# is per wheel tag already (build/cp312-cp312-<platform>/, pyproject's build-dir); the C++ unit
# tests' build/cpptest is shared with the 3.11 leg on purpose: it is built without Python, by the
# same host compiler, so it is the same build. The Debian packages `make test` checks for are the
# host's, as on the 3.11 leg (python3-dev and python3-venv serve the host's python3, not this one,
# which brings its own headers and venv).
py312_leg() {
  local py
  py=$(find_python312)
  log "leg 3.12: make test on the host ($("$py" --version), $py)"
  make -C "$repo" test SYSTEM_PYTHON="$py" VENV=.venv-3.12
}

# Why a leg cannot run on this machine, printed, when it cannot; such a leg is reported as
# skipped, not failed. Only leg 3.12 depends on what happens to be installed.
skip_reason() {
  if [[ $1 == 3.12 ]] && ! find_python312 >/dev/null; then
    echo "3.12: built against the same API as 3.11 and 3.13; not run here" \
      "(no CPython 3.12 on this machine)"
    return 0
  fi
  return 1
}

run_leg() {
  local leg=$1
  case $leg in
    3.11) host_leg "$leg" ;;
    3.12) py312_leg ;;
    3.13 | 3.14)
      if ((EUID != 0)); then
        echo "matrix: leg $leg needs root (debootstrap, chroot, mount); run it as root" >&2
        return 1
      fi
      chroot_leg "$leg"
      ;;
    *) usage ;;
  esac
}

(($# > 0)) || usage
for leg in "$@"; do
  [[ $leg == 3.11 || $leg == 3.12 ]] || leg_suite "$leg" >/dev/null || usage
done

# Turn SIGINT/SIGTERM into an ordinary exit so EXIT traps (the unmounting) run.
trap 'exit 130' INT
trap 'exit 143' TERM

if (($# == 1)); then
  if reason=$(skip_reason "$1"); then
    log "$reason"
    exit 0
  fi
  run_leg "$1"
  exit 0
fi

# Several legs: each in a process of its own. Not a function call under `if` or `||`: bash
# ignores `set -e` inside those, and a leg must stop at its first failing step. Waited for in
# the background so that a signal reaches the running leg (which then cleans up) at once.
# Always as SIGTERM: a background process of a non-interactive shell ignores SIGINT.
child=
# shellcheck disable=SC2317 # called from the traps below
forward() {
  [[ -n $child ]] && kill -s TERM "$child" 2>/dev/null && wait "$child"
  exit "$1"
}
trap 'forward 130' INT
trap 'forward 143' TERM
results=()
failed=0
for leg in "$@"; do
  if reason=$(skip_reason "$leg"); then
    log "$reason"
    results+=("$leg skipped -")
    continue
  fi
  start=$SECONDS
  status=0
  "$BASH" "${BASH_SOURCE[0]}" "$leg" &
  child=$!
  wait "$child" || status=$?
  child=
  if ((status == 0)); then
    results+=("$leg passed $((SECONDS - start))")
  else
    results+=("$leg FAILED $((SECONDS - start))")
    failed=1
  fi
done

printf '\n%-6s %-7s %s\n' leg result seconds
for r in "${results[@]}"; do
  # shellcheck disable=SC2086 # split the three fields on purpose
  printf '%-6s %-7s %s\n' $r
done
exit $failed
