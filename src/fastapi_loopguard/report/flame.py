"""The blocking profile as a flame graph: inline SVG, no script, readable on a phone.

Drawn top-down (the outermost frame on top, as speedscope's "left heavy" view and Chrome's
profiler do), each frame as wide as the loop time blocked while it was on the stack, coloured
by the kind that weighs most under it.

Choices the page's constraints forced:

- No script (the static report has none, and its Content-Security-Policy allows none), so
  "hover or tap shows file:line and ms" is CSS: every frame is a focusable group (``tabindex``)
  holding its details in a bar at the top of the graph, shown on ``:hover`` and ``:focus``. A
  tap focuses it on a phone, a click on a desktop, and the details stay until focus moves. Each
  frame also has a ``<title>``, which desktop browsers show as a tooltip and screen readers read.
- Readable on a phone: an SVG scales its text with its width, so one drawing cannot serve 1200
  and 360 pixels. Two are drawn, 1000 and 400 units wide, and a media query shows one.
- Every blocked stack starts with the same frames (the runner, the event loop, the server, the
  framework's middleware), often 30 of them. A chain of frames that never branches and blocks
  nowhere itself is drawn as one box ("12 frames: run ... run_endpoint_function"), so the
  picture starts where the stacks differ. A culprit line is never folded into a chain: it is
  what the reader looks for.

Text comes from logs and requests: it goes through ``charts.esc``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .charts import esc, fmt_ms, kind_class
from .profile import NO_STACK_FILE, FrameKey, Node

WIDE, NARROW = 1000, 400
ROW = 20  # height of one row of frames
BAR = 46  # the details bar at the top
FONT_PX = 12  # frame labels
TIP_PX = 13
MAX_ROWS = 80
MIN_CHAIN = 3  # shorter chains keep a row per frame


@dataclass
class Box:
    """What one rectangle stands for: one frame, or a chain of frames that never branch."""

    frames: list[FrameKey]
    node: Node  # the innermost frame's node: its children are the next row

    @property
    def last(self) -> FrameKey:
        return self.frames[-1]


def _boxes(node: Node) -> list[Box]:
    """The children of ``node``, each with the unbranching chain below it folded in."""
    out = []
    for child in node.sorted_children():
        chain = [child]
        while (
            not chain[-1].culprit
            and len(chain[-1].children) == 1
            and chain[-1].self_ms == 0
            and not (only := next(iter(chain[-1].children.values()))).culprit
            and only.total_ms == chain[-1].total_ms
        ):
            chain.append(only)
        if len(chain) < MIN_CHAIN:
            chain = chain[:1]
        out.append(Box([n.frame for n in chain if n.frame is not None], chain[-1]))
    return out


def _where(frame: FrameKey, full: bool) -> str:
    filename, lineno, _ = frame
    if filename == NO_STACK_FILE:
        return "no stack was captured for these events"
    return f"{filename if full else os.path.basename(filename)}:{lineno}"


def _fit(text: str, width: float, px: float) -> str:
    """Cut ``text`` to what fits ``width`` units at ``px`` (an average glyph is 0.6 em)."""
    chars = int(width / (px * 0.6))
    if len(text) <= chars:
        return text
    return text[: max(chars - 1, 0)] + "\u2026" if chars > 1 else ""


def _name(box: Box) -> str:
    if len(box.frames) == 1:
        return box.last[2]
    return f"{len(box.frames)} frames: {box.frames[0][2]} \u2026 {box.last[2]}"


def _svg(root: Node, width: int, full_paths: bool) -> str:
    total = root.total_ms
    rows: list[list[tuple[float, Box]]] = []
    level: list[tuple[float, Box]] = [(0.0, Box([], root))]
    hidden = 0.0
    while level and len(rows) < MAX_ROWS:
        rows.append(level)
        below: list[tuple[float, Box]] = []
        for x, box in level:
            offset = x
            for child in _boxes(box.node):
                w = child.node.total_ms / total * width
                if w >= 1.0:
                    below.append((offset, child))
                else:
                    hidden += child.node.total_ms
                offset += w
        level = below
    height = BAR + len(rows) * ROW + 4
    cls = "wide" if width == WIDE else "narrow"
    hint = (
        "Hover or tap a frame for its file:line and blocked time."
        if width == WIDE
        else "Tap a frame for its file:line and time."
    )
    parts = [
        f'<svg class="flame fg-{cls}" viewBox="0 0 {width} {height}" role="group" '
        f'aria-label="Flame graph of {fmt_ms(total)} of blocked loop">'
        f'<text class="fg-hint" x="6" y="{BAR / 2 + 5:.0f}">{esc(_fit(hint, width - 12, TIP_PX))}'
        "</text>"
    ]
    for depth, level_boxes in enumerate(rows):
        y = BAR + depth * ROW
        for x, box in level_boxes:
            parts.append(_box(box, x, y, total, width, full_paths))
    parts.append("</svg>")
    note = (
        f'<p class="muted">{esc(fmt_ms(hidden))} in frames too narrow to draw are left out.</p>'
        if hidden >= total * 0.001 and hidden > 0
        else ""
    )
    return "".join(parts) + note


def _box(box: Box, x: float, y: float, total: float, width: int, full_paths: bool) -> str:
    node = box.node
    w = node.total_ms / total * width
    share = node.total_ms / total * 100
    plural = "s" if node.events != 1 else ""
    amount = f"{fmt_ms(node.total_ms)} ({share:.0f}%), {node.events} event{plural}"
    if not box.frames:
        name, where = "all blocks", f"{amount}; the rows below split it by frame"
        title = esc(f"all blocked loop time: {amount}")
    else:
        name = _name(box)
        where = _where(box.last, full_paths)
        heaviest = sorted(node.kind_ms.items(), key=lambda kv: -kv[1])
        kinds = ", ".join(f"{k} {fmt_ms(ms)}" for k, ms in heaviest)
        lines = [f"{f[2]}  {_where(f, True)}" for f in box.frames[:12]]
        if len(box.frames) > 12:
            lines.append(f"... {len(box.frames) - 12} more frames")
        self_part = f", {fmt_ms(node.self_ms)} in this frame itself" if node.self_ms else ""
        # One escaped line each: esc() would make the line breaks themselves visible as \x0a.
        title = "\n".join(esc(line) for line in [*lines, f"{amount}{self_part}; {kinds}"])
    label = _fit(name, w - 6, FONT_PX)
    text = (
        f'<text class="fg-l" x="{x + 3:.1f}" y="{y + 14:.1f}">{esc(label)}</text>' if label else ""
    )
    tip_line1 = _fit(f"{name}: {amount}", width - 12, TIP_PX)
    tip_line2 = _fit(where, width - 12, TIP_PX)
    return (
        f'<g class="fg-n" tabindex="0"><title>{title}</title>'
        f'<rect class="k {kind_class(node.kind or "unknown")}" x="{x:.1f}" y="{y:.1f}" '
        f'width="{max(w - 0.5, 0.5):.1f}" height="{ROW - 1}" rx="2"/>{text}'
        f'<g class="fg-tip"><rect class="fg-bg" x="0" y="0" width="{width}" height="{BAR - 4}"/>'
        f'<text x="6" y="17">{esc(tip_line1)}</text>'
        f'<text class="fg-where" x="6" y="36">{esc(tip_line2)}</text></g></g>'
    )


def flame_graph(root: Node) -> str:
    """Both drawings (wide and narrow); the stylesheet shows the one that fits the screen."""
    if root.total_ms <= 0:
        return ""
    return _svg(root, WIDE, True) + _svg(root, NARROW, False)


CSS = """
svg.flame{display:block;width:100%;height:auto}
svg.fg-narrow{display:none}
.fg-n{cursor:pointer;outline:none}
.fg-n rect.k{opacity:.8}
.fg-n:hover rect.k,.fg-n:focus rect.k{opacity:1;stroke:var(--fg);stroke-width:1.5px}
.fg-l{font-size:12px;fill:#fff;pointer-events:none}
.fg-hint{font-size:13px;fill:var(--muted)}
.fg-tip{visibility:hidden;pointer-events:none}
.fg-tip text{font-size:13px;fill:var(--fg)}
.fg-tip .fg-where{fill:var(--muted);font-family:ui-monospace,"DejaVu Sans Mono",monospace}
.fg-bg{fill:var(--card)}
.fg-n:hover .fg-tip,.fg-n:focus .fg-tip{visibility:visible}
@media (max-width:700px){svg.fg-wide{display:none}svg.fg-narrow{display:block}}
""".strip()
