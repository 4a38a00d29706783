"""Making untrusted text (paths, header values) safe for log lines and headers."""

from __future__ import annotations

MAX_PATH_CHARS = 200


def escape(text: str, limit: int = MAX_PATH_CHARS) -> str:
    """Escapes control and other non-printable characters and truncates long text.

    A path can carry CR/LF (log injection) or ANSI escapes (terminal tricks); neither reaches a
    log line raw. Long text is cut so one hostile request cannot flood the log.
    """
    if len(text) <= limit and text.isprintable() and "\\" not in text:
        return text  # the common case, on every request: nothing to escape, checked in C
    out: list[str] = []
    for ch in text[:limit]:
        if ch.isprintable() and ch != "\\":
            out.append(ch)
        elif ch == "\\":
            out.append("\\\\")
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    if len(text) > limit:
        out.append(f"...(+{len(text) - limit} chars)")
    return "".join(out)


def visible(text: str) -> str:
    """Non-printable characters (controls, ANSI escapes, lone surrogates) as visible escapes.

    For display (the HTML report), where text is shown whole: no truncation, tabs kept, and
    backslashes left alone so paths and code read as written.
    """
    if text.isprintable():
        return text
    return "".join(
        ch
        if ch.isprintable() or ch == "\t"
        else (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        for ch in text
    )
