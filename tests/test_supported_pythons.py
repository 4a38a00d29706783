"""The Pythons we claim are exactly the Pythons we test.

pyproject.toml's classifiers and requires-python, and the legs of `make test-matrix` (the
Makefile's MATRIX_LEGS, which CI runs), must name the same versions: a claim without a leg is
untested, a leg without a claim is wasted.
"""

from __future__ import annotations

import re
import tomllib

from packaging.specifiers import SpecifierSet

from .conftest import ROOT


def matrix_legs() -> set[str]:
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(r"^MATRIX_LEGS := (.+)$", makefile, re.MULTILINE)
    assert match, "MATRIX_LEGS not found in the Makefile"
    return set(match.group(1).split())


def project() -> dict[str, object]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(data["project"])


def test_classifiers_name_exactly_the_matrix_legs() -> None:
    classifiers = project()["classifiers"]
    assert isinstance(classifiers, list)
    prefix = "Programming Language :: Python :: "
    versions = {c.removeprefix(prefix) for c in classifiers if re.fullmatch(r".*:: 3\.\d+", c)}
    assert versions == matrix_legs() == {"3.11", "3.12", "3.13", "3.14"}


def test_requires_python_admits_exactly_the_matrix_legs() -> None:
    spec = SpecifierSet(str(project()["requires-python"]))
    # Every minor version from long ago to well past the newest, at a late patch level too.
    admitted = {
        f"3.{minor}"
        for minor in range(6, 20)
        if spec.contains(f"3.{minor}.0") and spec.contains(f"3.{minor}.15")
    }
    refused_somewhere = {
        f"3.{minor}"
        for minor in range(6, 20)
        if spec.contains(f"3.{minor}.0") != spec.contains(f"3.{minor}.15")
    }
    assert admitted == matrix_legs()
    assert not refused_somewhere, "requires-python must admit or refuse whole minor versions"
