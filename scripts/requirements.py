"""Print requirements read from pyproject.toml, one per line, for `pip install`.

Usage: python scripts/requirements.py build|lint

  build  [build-system].requires (scikit-build-core, nanobind): what `make dev` must put in the
         venv itself, because it installs with --no-build-isolation.
  lint   the runtime dependencies (so mypy can follow imports of starlette & co.) plus the `dev`
         extra minus its self-reference (`fastapi-loopguard[test]`): the linters without
         compiling the C++ extension, which `pip install '.[dev]'` would do.

Reading pyproject.toml keeps the version floors in one place instead of copying them into the
Makefile.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


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
        own = _normalize(project["name"])
        reqs = list(project.get("dependencies", []))
        for req in project.get("optional-dependencies", {}).get("dev", []):
            name = re.split(r"[\s\[<>=!~;@]", req, maxsplit=1)[0]
            if _normalize(name) != own:
                reqs.append(req)
    sys.stdout.write("".join(f"{r}\n" for r in reqs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
