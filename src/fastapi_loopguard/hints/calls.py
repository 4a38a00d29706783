"""The call on the culprit line, and what the culprit's file binds: read, never run.

The line is split into calls with ``tokenize``, and each callee is resolved through the file's
imports and simple assignments, so that ``sleep(1)`` after ``from time import sleep`` reads as
``time.sleep``. Nothing here imports or executes the user's code.
"""

from __future__ import annotations

import io
import keyword
import linecache
import re
import tokenize
from collections.abc import Mapping
from dataclasses import dataclass

# -- the call on the culprit line ------------------------------------------------------------

_MAX_ARGS = 160  # longer argument text is left out of the rewrite rather than pasted whole


@dataclass(frozen=True)
class Call:
    """One call on the culprit line, as written and as resolved through the file's names."""

    written: str  # the callee as written: "time.sleep", "conn.execute", "Path(p).read_text"
    name: str  # resolved: "time.sleep", "sqlite3.connect().execute"; "" if it resolves to nothing
    args: str | None  # the argument text; None when the call goes on past this line
    arg_list: tuple[str, ...] = ()  # the top-level arguments, each as written
    keywords: bool = False  # whether some argument is name=value or **mapping
    with_target: bool = False  # ``with LOCK:``: entering a context manager, not a call
    receiver: Call | None = None  # ``open(p)`` for ``open(p).read()``


def _tokens(text: str) -> list[tokenize.TokenInfo]:
    """The tokens of one stripped source line; an open bracket just ends the list early."""
    out: list[tokenize.TokenInfo] = []
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.ENDMARKER:
                break
            if token.type not in skip:
                out.append(token)
    except (tokenize.TokenError, SyntaxError):
        pass  # a line of a statement that goes on below it: keep what came before
    return out


def _is_name(token: tokenize.TokenInfo) -> bool:
    return token.type == tokenize.NAME and not keyword.iskeyword(token.string)


def _is_op(token: tokenize.TokenInfo | None, chars: str) -> bool:
    return token is not None and token.type == tokenize.OP and token.string in chars


def _close(tokens: list[tokenize.TokenInfo], i: int) -> int | None:
    """Index of the bracket closing the one at ``i``, or None if it closes on a later line."""
    depth = 0
    for j in range(i, len(tokens)):
        if _is_op(tokens[j], "([{"):
            depth += 1
        elif _is_op(tokens[j], ")]}"):
            depth -= 1
            if depth == 0:
                return j
    return None


def _split_args(
    text: str, tokens: list[tokenize.TokenInfo], lo: int, hi: int
) -> tuple[tuple[str, ...], bool]:
    """The top-level arguments in tokens ``lo`` to ``hi`` (exclusive), and whether any is a
    keyword (``name=value`` or ``**mapping``)."""
    parts: list[str] = []
    keywords = False
    depth = 0
    start = lo
    for j in range(lo, hi + 1):
        t = tokens[j] if j < hi else None
        if _is_op(t, "([{"):
            depth += 1
        elif _is_op(t, ")]}"):
            depth -= 1
        elif t is None or (depth == 0 and t.string == "," and t.type == tokenize.OP):
            if start < j:
                parts.append(text[tokens[start].start[1] : tokens[j - 1].end[1]])
                first, second = tokens[start], tokens[start + 1] if start + 1 < j else None
                if (_is_name(first) and _is_op(second, "=")) or first.string == "**":
                    keywords = True
            start = j + 1
    return tuple(parts), keywords


def calls_on_line(text: str, names: Mapping[str, str]) -> list[Call]:
    """The calls on one line that are not awaited, left to right, resolved through ``names``.

    ``names`` maps what the file binds (``time``, ``sleep``, ``LOCK``, ``self.lock``) to what it
    is (``time``, ``time.sleep``, ``threading.Lock()``); see ``file_names``. Calls inside other
    calls' arguments are found too (``json.loads(f.read())`` holds two).
    """
    text = text.strip()
    tokens = _tokens(text)
    is_with = bool(tokens) and tokens[0].string == "with"
    calls: list[Call] = []
    for i, t in enumerate(tokens):
        before = tokens[i - 1] if i else None
        if not _is_name(t) or (before is not None and before.string == "."):
            continue
        awaited = before is not None and before.string == "await"
        head = t.string
        written = head
        resolved = names.get(head) or ("builtins.open" if head == "open" else None)
        receiver: Call | None = None
        j = i + 1
        made_call = False
        while j < len(tokens):
            tok = tokens[j]
            if tok.string == "." and j + 1 < len(tokens) and _is_name(tokens[j + 1]):
                attribute = tokens[j + 1].string
                if resolved is None and written == head and f"{head}.{attribute}" in names:
                    resolved = names[f"{head}.{attribute}"]  # self.lock = threading.Lock()
                elif resolved is not None:
                    resolved += "." + attribute
                written += "." + attribute
                j += 2
            elif _is_op(tok, "("):
                end = _close(tokens, j)
                if end is None:
                    if not awaited:
                        calls.append(Call(written, resolved or "", None, receiver=receiver))
                    break
                args = text[tok.end[1] : tokens[end].start[1]].strip()
                arg_list, has_keywords = _split_args(text, tokens, j + 1, end)
                call = Call(
                    written,
                    resolved or "",
                    args if len(args) <= _MAX_ARGS else None,
                    arg_list,
                    has_keywords,
                    receiver=receiver,
                )
                if not awaited:
                    calls.append(call)
                made_call = True
                receiver = call
                written += f"({args})"
                if resolved is not None:
                    resolved += "()"
                j = end + 1
            else:
                break
        at_with = before is not None and before.string in ("with", ",") and is_with
        after = tokens[j].string if j < len(tokens) else ""
        if at_with and not made_call and after in (":", ",", "as"):
            name = f"{resolved}.__enter__" if resolved else ""
            calls.append(Call(written, name, None, with_target=True))
    return calls


# -- what a file binds -----------------------------------------------------------------------

_IMPORT = re.compile(r"^\s*import\s+(.+)$")
_FROM = re.compile(r"^\s*from\s+([A-Za-z_][\w.]*)\s+import\s+(.+)$")
_ASSIGN = re.compile(r"^\s*((?:self\.)?[A-Za-z_]\w*)\s*(?::[^=]+)?=\s*([A-Za-z_][\w.]*)\s*\(")
_WITH_AS = re.compile(r"\bwith\s+([A-Za-z_][\w.]*)\s*\(.*\)\s+as\s+([A-Za-z_]\w*)\s*:")
_names_cache: dict[str, tuple[int, dict[str, str]]] = {}
_MAX_CACHED_FILES = 512


def read_source(filename: str) -> list[str]:
    # Only .py files: names come from logs too, and must not make us read arbitrary files.
    if not filename.endswith(".py"):
        return []
    return linecache.getlines(filename)


def file_names(filename: str) -> dict[str, str]:
    """What the file's imports and simple assignments bind, e.g. ``{"sleep": "time.sleep"}``.

    Regular expressions over the lines, not a parse of the whole file: this may run on the loop
    thread, and a name bound two different ways is dropped (never a wrong specific hint).
    """
    lines = read_source(filename)
    cached = _names_cache.get(filename)
    if cached is not None and cached[0] == id(lines):
        return cached[1]
    found: dict[str, set[str]] = {}

    def bind(name: str, value: str) -> None:
        found.setdefault(name, set()).add(value)

    assigned: list[tuple[str, str]] = []
    index = 0
    while index < len(lines):
        line = lines[index].split("#", 1)[0]
        index += 1
        if m := _IMPORT.match(line):
            for part in m.group(1).split(","):
                words = part.split()
                if len(words) == 3 and words[1] == "as":
                    bind(words[2], words[0])
                elif len(words) == 1:
                    bind(words[0].split(".")[0], words[0].split(".")[0])
        elif m := _FROM.match(line):
            module, names = m.group(1), m.group(2)
            if "(" in names:  # from x import (a,\n b)
                while ")" not in names and index < len(lines):
                    names += " " + lines[index].split("#", 1)[0]
                    index += 1
            for part in names.replace("(", " ").replace(")", " ").replace("\\", " ").split(","):
                words = part.split()
                if len(words) == 3 and words[1] == "as":
                    bind(words[2], f"{module}.{words[0]}")
                elif len(words) == 1 and words[0] != "*":
                    bind(words[0], f"{module}.{words[0]}")
        else:
            if m := _ASSIGN.match(line):
                assigned.append((m.group(1), m.group(2)))
            for m in _WITH_AS.finditer(line):
                assigned.append((m.group(2), m.group(1)))
    imports = {name: next(iter(v)) for name, v in found.items() if len(v) == 1}
    for target, callee in assigned:
        head, _, rest = callee.partition(".")
        base = imports.get(head) or ("builtins.open" if head == "open" else None)
        if base is not None:
            bind(target, base + ("." + rest if rest else "") + "()")
        else:
            bind(target, "?")  # bound to something we cannot name: makes the name ambiguous
    names = {name: next(iter(v)) for name, v in found.items() if len(v) == 1 and "?" not in v}
    if len(_names_cache) >= _MAX_CACHED_FILES:
        _names_cache.clear()
    _names_cache[filename] = (id(lines), names)
    return names


def module_of(filename: str) -> str | None:
    """``/usr/lib/python3.11/urllib/request.py`` -> ``urllib.request``; None for app code."""
    path = filename.replace("\\", "/")
    for marker in ("/site-packages/", "/dist-packages/"):
        at = path.rfind(marker)
        if at >= 0:
            relative = path[at + len(marker) :]
            break
    else:
        m = re.search(r"/python\d+(?:\.\d+)?t?/(.+)$", path)
        if m is None:
            return None
        relative = m.group(1)
    if not relative.endswith(".py"):
        return None
    parts = relative[:-3].split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) if parts and all(p.isidentifier() for p in parts) else None
