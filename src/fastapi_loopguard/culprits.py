"""Names for a culprit that stay the same while the code around it changes.

A culprit line's number drifts with every edit above it, so what identifies "the same culprit"
across runs (the CI gate's baseline) and across processes (a metric label) is its file and
function. The function is the enclosing named one: Python 3.12 inlines comprehensions (PEP 709),
so ``handler.<locals>.<listcomp>`` on 3.11 is ``handler`` on 3.13, and both must be one culprit.
"""

from __future__ import annotations

import os
import sys

# Code objects without a name of their own: the culprit is the function they sit in.
_ANONYMOUS = frozenset({"<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>", "<lambda>"})


def function_key(qualname: str) -> str:
    """``handler.<locals>.<listcomp>.<genexpr>`` -> ``handler``; named inner functions stay."""
    parts = qualname.split(".")
    while len(parts) > 1 and parts[-1] in _ANONYMOUS:
        parts.pop()
        if len(parts) > 1 and parts[-1] == "<locals>":
            parts.pop()
    return ".".join(parts)


def culprit_key(filename: str, function: str, root: str) -> str:
    """``app/main.py:handler``: the file relative to ``root`` (the checkout) when inside it.

    Relative, with forward slashes, so a baseline written on one machine matches another's
    checkout at a different path.
    """
    path = os.path.abspath(filename) if os.path.isabs(filename) else filename
    base = os.path.abspath(root)
    if path.startswith(base + os.sep):
        path = os.path.relpath(path, base)
    return f"{path.replace(os.sep, '/')}:{function_key(function)}"


def module_label(filename: str, function: str) -> str:
    """``app.main:handler``: a dotted module name, no file system path (for metric labels).

    The module comes from the longest ``sys.path`` entry holding the file, as import found it;
    a file outside all of them is named by its base name.
    """
    path = os.path.abspath(filename)
    best = ""
    for entry in sys.path:
        base = os.path.join(os.path.abspath(entry or "."), "")
        if path.startswith(base) and len(base) > len(best):
            best = base
    relative = path[len(best) :] if best else os.path.basename(path)
    module = relative.removesuffix(".py").replace(os.sep, ".").removesuffix(".__init__")
    return f"{module}:{function_key(function)}"
