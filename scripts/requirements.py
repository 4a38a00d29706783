"""Print requirements read from pyproject.toml, one per line, for `pip install`.

Usage: python scripts/requirements.py build|lint

  build  [build-system].requires (scikit-build-core, nanobind): what `make dev` must put in the
         venv itself, because it installs with --no-build-isolation.
  lint   the runtime dependencies (so mypy can follow imports of starlette & co.) plus the `dev`
         extra with its references to our own extras (`fastapi-loopguard[test]`, which names
         `[cli]`) expanded: the linters without compiling the C++ extension, which
         `pip install '.[dev]'` would do.

Reading pyproject.toml keeps the version floors in one place instead of copying them into the
Makefile.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Any


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _extra(project: dict[str, Any], extra: str, seen: set[str]) -> list[str]:
    """The requirements of one extra, with references to our own extras expanded in place."""
    own = _normalize(project["name"])
    seen.add(extra)
    reqs: list[str] = []
    for req in project.get("optional-dependencies", {}).get(extra, []):
        name = re.split(r"[\s\[<>=!~;@]", req, maxsplit=1)[0]
        if _normalize(name) != own:
            reqs.append(req)
            continue
        nested = re.search(r"\[([^\]]*)\]", req)
        for inner in nested.group(1).split(",") if nested else []:
            if inner.strip() not in seen:
                reqs += _extra(project, inner.strip(), seen)
    return reqs


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("build", "lint"):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parent.parent
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    if argv[0] == "build":
        reqs = list(pyproject["build-system"]["requires"])
    else:
        project = pyproject["project"]
        reqs = list(project.get("dependencies", [])) + _extra(project, "dev", set())
    sys.stdout.write("".join(f"{r}\n" for r in reqs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
