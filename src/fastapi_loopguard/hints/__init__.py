"""Fix hints: for a blocking event, the async rewrite of the call that blocked the loop.

``RULES`` is the one table: the blocking calls people write most, each with the kinds of
blocking it can cause and a rewrite that is correct Python. ``KIND_HINTS`` is the fallback, by
kind, for every call the table does not know; a hint by kind never names a call.

Finding the call, most trusted first:

1. The frames below the culprit (the stdlib and site-packages code the culprit line called),
   from the one the culprit called inwards: the first whose module the table knows. Starting
   next to the culprit rather than at the innermost frame names the call the application wrote
   (``urllib.request.urlopen``, not the ``socket.SocketIO.readinto`` far below it), which is the
   call the rewrite replaces; walking inwards still finds ``threading`` under an unknown wrapper.
2. The culprit line itself. A C function (``time.sleep``, ``hashlib.pbkdf2_hmac``, a lock's
   ``__enter__``) has no Python frame, so the sampler's stack ends at the line that called it,
   and its source is all there is. The line is read with linecache, split into calls with
   ``tokenize`` (which never runs code), and each callee resolved through the file's imports and
   simple assignments (``from time import sleep``, ``LOCK = threading.Lock()``). A name the file
   does not bind that way (a parameter, an attribute) resolves to nothing, so ``conn.execute``
   only counts as sqlite3 when ``conn = sqlite3.connect(...)`` is in the file.
3. Otherwise the kind.

A rule applies only to the kinds its call can produce: a ``time.sleep`` on a line whose event was
``cpu`` is not trusted. Kinds whose stack is not the code that blocked always get the kind's hint:
``gil`` (the stack is the other thread's), ``gc``, and ``cumulative`` (the stack is where the
request waited after its steps). Two different rules on one line give the kind's hint too.

Source is read after the stall, on the loop thread, when an event is logged or a report is made:
once per file (linecache and the import scan are cached), then a dict lookup and one line's
tokens per event. Only ``.py`` files are read, as for the report's snippets.
"""

from __future__ import annotations

import linecache
from collections.abc import Mapping, Sequence
from typing import Any

from ..events import BlockingEvent
from .calls import Call, calls_on_line, file_names, module_of, read_source
from .table import ANY, KIND_HINTS, KIND_ONLY, RULES, Hint, Rule, Site, kind_hint, last_name

__all__ = [
    "ANY",
    "KIND_HINTS",
    "KIND_ONLY",
    "RULES",
    "FrameKey",
    "Hint",
    "hint_for",
    "hint_for_event",
    "hint_for_record",
]

# (filename, lineno, function): a frame however it arrived (a Frame, or a dict from a log).
FrameKey = tuple[str, int, str]

# -- choosing ----------------------------------------------------------------------------------


def _rule_for(name: str) -> Rule | None:
    return next((r for r in RULES if r.matches(name)), None)


def _linked(calls: Sequence[Call], rule: Rule, frame_name: str) -> Call | None:
    """The line's call that the frame below the culprit belongs to, if exactly one fits."""
    function = last_name(frame_name)
    fits = [
        c
        for c in calls
        if (c.name and rule.matches(c.name)) or (not c.name and last_name(c.written) == function)
    ]
    if not fits and rule.wraps:
        fits = [c for c in calls if not c.with_target]  # the line's one call, if it has one
    return fits[0] if len({c.written for c in fits}) == 1 else None


def hint_for(kind: str, stack: Sequence[FrameKey], culprit: FrameKey | None) -> Hint:
    """The hint for one event: by its call when the table knows it, else by its kind."""
    if kind in KIND_ONLY:
        return kind_hint(kind)
    if culprit is not None:
        at = max((i for i, f in enumerate(stack) if f == culprit), default=-1)
        below = list(stack[at + 1 :]) if at >= 0 else []
    else:
        below = list(reversed(stack))  # no application frame: from the innermost outwards
    for filename, _, function in below:
        module = module_of(filename)
        if module is None:
            continue
        name = f"{module}.{function}"
        rule = _rule_for(name)
        if rule is not None:
            if kind not in rule.kinds:
                break  # the call is known, and it cannot block this way: say only the kind
            return _made(rule, Site(name, _linked(_line_calls(culprit), rule, name)))
    # Python frames under the culprit mean the loop was in them, not in a C function the line
    # calls: the line's text is evidence only when the stack ends at the culprit.
    if culprit is None or below:
        return kind_hint(kind)
    matched = [
        (c, r) for c in _line_calls(culprit) if c.name and (r := _rule_for(c.name)) is not None
    ]
    matched = [(c, r) for c, r in matched if kind in r.kinds]
    if len({r.label for _, r in matched}) != 1:
        return kind_hint(kind)  # nothing known, or two different calls: which one blocked?
    rule = matched[0][1]
    # One call, or one chain (open(p).read() holds open(p) too): its outermost call.
    outer = max((c for c, _ in matched), key=lambda c: len(c.written))
    chain = all(outer.written.startswith(c.written) for c, _ in matched)
    if chain:
        return _made(rule, Site(outer.name, outer))
    return _made(rule, Site(matched[0][0].name, None))


def _line_calls(culprit: FrameKey | None) -> list[Call]:
    if culprit is None or not read_source(culprit[0]):
        return []
    text = linecache.getline(culprit[0], culprit[1])
    return calls_on_line(text, file_names(culprit[0])) if text else []


def _made(rule: Rule, site: Site) -> Hint:
    fix, note = rule.make(site)
    shown = site.name.replace("()", "").removesuffix(".__enter__").removeprefix("builtins.")
    return Hint(fix, note, shown)


def hint_for_event(event: BlockingEvent) -> Hint:
    stack = [(f.filename, f.lineno, f.function) for f in event.stack]
    culprit = event.culprit
    key = (culprit.filename, culprit.lineno, culprit.function) if culprit is not None else None
    return hint_for(event.kind, stack, key)


def hint_for_record(event: Mapping[str, Any]) -> Hint:
    """The same for an event in the event log's shape (the report's and the gate's)."""
    stack = [(f["filename"], f["lineno"], f["function"]) for f in event.get("stack") or ()]
    culprit = event.get("culprit")
    key = (culprit["filename"], culprit["lineno"], culprit["function"]) if culprit else None
    return hint_for(str(event.get("kind")), stack, key)
