"""Print the host files and folders that pip's configuration here depends on, for a chroot.

Usage: python3 scripts/pip_host_paths.py

scripts/matrix-leg.sh runs the test suite inside Debian chroots, where pip must reach the
registry the way it does on the host: through the same index settings and the same CA bundle (a
machine behind a TLS-inspecting gateway has a CA that the chroot's own bundle lacks). So the
chroot gets the host's pip configuration files, and everything they or the PIP_* / CA
environment variables point at on local disk: certificate and constraint files, find-links
folders and file:// indexes.

Each line is `file PATH` or `dir PATH`, only for paths that exist. For a file:// index the
folder *above* it is printed as well, because a PEP 503 tree's project pages link to their
archives with relative URLs (typically ../../files/...) that leave the index folder.
"""

from __future__ import annotations

import configparser
import os
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

# Options whose values may name local files or folders; several URLs may share one value.
PATH_OPTIONS = {"cert", "client-cert", "constraint", "build-constraint", "find-links"}
INDEX_OPTIONS = {"index-url", "extra-index-url"}
# CA variables that Python's ssl module, requests (pip's vendored copy) and curl read.
CA_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def config_files() -> list[Path]:
    """pip's own search order: global, then user, then PIP_CONFIG_FILE (sites are per-venv)."""
    xdg_dirs = os.environ.get("XDG_CONFIG_DIRS") or "/etc/xdg"
    files = [Path(d) / "pip" / "pip.conf" for d in xdg_dirs.split(os.pathsep) if d]
    files.append(Path("/etc/pip.conf"))
    home = Path.home()
    files.append(home / ".pip" / "pip.conf")
    files.append(Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "pip" / "pip.conf")
    if os.environ.get("PIP_CONFIG_FILE") not in (None, "", os.devnull):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    return [f for f in files if f.is_file()]


def option_values(files: list[Path]) -> list[tuple[str, str]]:
    """(option, value) pairs from every section of the files and from PIP_* variables."""
    pairs: list[tuple[str, str]] = []
    for f in files:
        parser = configparser.RawConfigParser()
        try:
            parser.read(f)
        except configparser.Error as exc:
            print(f"pip_host_paths: ignoring unreadable {f}: {exc}", file=sys.stderr)
            continue
        for section in parser.sections():
            pairs += [(key.replace("_", "-"), value) for key, value in parser.items(section)]
    for name, value in os.environ.items():
        if name.startswith("PIP_"):
            pairs.append((name[4:].lower().replace("_", "-"), value))
    pairs += [("cert", os.environ[name]) for name in CA_VARIABLES if os.environ.get(name)]
    return pairs


def local_paths(option: str, value: str) -> list[Path]:
    found: list[Path] = []
    for item in value.split():
        parsed = urlparse(item)
        if parsed.scheme == "file":
            path = Path(unquote(parsed.path))
        elif item.startswith("/"):
            path = Path(item)
        else:
            continue  # a remote URL or a plain name: nothing on disk to carry
        found.append(path)
        if option in INDEX_OPTIONS and path.is_dir():
            found.append(path.parent)
    return found


def main() -> int:
    files = config_files()
    paths = dict.fromkeys(files)  # ordered and without repeats
    for option, value in option_values(files):
        if option in PATH_OPTIONS | INDEX_OPTIONS:
            paths.update(dict.fromkeys(p for p in local_paths(option, value) if p.exists()))
    dirs = {p for p in paths if p.is_dir()}
    for path in paths:
        # A folder inside another one that is carried whole comes along with it.
        if any(d in path.parents for d in dirs):
            continue
        print(f"{'dir' if path in dirs else 'file'} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
