"""Several jobs' text streaming side by side in a terminal (used by ``qworker demo``).

On a terminal every job gets a panel (a header and its text, wrapped) that is redrawn in
place as tokens arrive, at most ``fps`` times a second. Anywhere else (a pipe, a log,
a test) each job's text comes out as whole lines prefixed ``[n]``, interleaved in the
order they complete, so the output stays readable.
"""

from __future__ import annotations

import shutil
import textwrap
import time
from typing import TextIO

_COLORS = ("36", "33", "35", "32", "34", "31")     # ANSI: cyan, yellow, magenta, ...
_CURSOR = "▍"


class LiveView:
    """``add(i, text)`` as deltas arrive, ``finish(i, note)`` once, ``close()`` at the end."""

    def __init__(self, labels: list[str], out: TextIO, tty: bool | None = None,
                 width: int | None = None, fps: float = 15.0):
        self.labels, self.out = labels, out
        self.tty = out.isatty() if tty is None else tty
        size = shutil.get_terminal_size((100, 40))
        self.width = max(40, (width or size.columns) - 1)
        self.height = max(10, size.lines)
        self.texts = ["" for _ in labels]
        self.notes: list[str | None] = [None for _ in labels]
        self.pending = ["" for _ in labels]             # line mode: text not printed yet
        self.drawn, self.last, self.interval = 0, 0.0, 1.0 / fps
        if not self.tty:
            for i, label in enumerate(labels):
                self._write(f"[{i + 1}] > {label}\n")

    def add(self, i: int, text: str) -> None:
        """Append streamed ``text`` to job ``i``."""
        self.texts[i] += text
        if self.tty:
            self.refresh()
            return
        self.pending[i] += text
        lines = self.pending[i].split("\n")
        self.pending[i] = lines.pop()
        while len(self.pending[i]) >= self.width - 5:
            cut = self.pending[i].rfind(" ", 0, self.width - 5)
            cut = cut if cut > 0 else self.width - 5
            lines.append(self.pending[i][:cut])
            self.pending[i] = self.pending[i][cut:].lstrip(" ")
        for line in lines:
            self._write(f"[{i + 1}] {line}\n")

    def finish(self, i: int, note: str) -> None:
        """Job ``i`` is done; ``note`` (e.g. "length, 64 tokens") closes its panel."""
        self.notes[i] = note
        if self.tty:
            self.refresh(force=True)
            return
        if self.pending[i].strip():
            self._write(f"[{i + 1}] {self.pending[i]}\n")
        self.pending[i] = ""
        self._write(f"[{i + 1}] ✓ {note}\n")

    def refresh(self, force: bool = False) -> None:
        """Redraw the panels (terminal only; rate-limited unless ``force``)."""
        now = time.monotonic()
        if not self.tty or (not force and now - self.last < self.interval):
            return
        self.last = now
        rows = max(2, (self.height - 2) // max(1, len(self.labels)) - 1)
        self._redraw(self._render(rows))

    def close(self) -> None:
        """Leave every job's whole text on screen."""
        if self.tty:
            self._redraw(self._render(rows=None))
            self.drawn = 0

    # ---- terminal panels -------------------------------------------------------------
    def _render(self, rows: int | None) -> list[str]:
        lines = []
        for i, label in enumerate(self.labels):
            color = _COLORS[i % len(_COLORS)]
            head = f"[{i + 1}] {label}"[: self.width]
            lines.append(f"\x1b[1;{color}m{head}\x1b[0m")
            body = self.texts[i] + ("" if self.notes[i] else _CURSOR)
            wrapped = [w for para in body.split("\n")
                       for w in (textwrap.wrap(para, self.width - 4, drop_whitespace=False)
                                 or [""])]
            keep = max(1, (rows or 0) - 1 - (1 if self.notes[i] else 0))
            if rows is not None and len(wrapped) > keep + 1:    # header + … + keep + note
                wrapped = ["…"] + wrapped[-keep:]
            lines += ["    " + w for w in wrapped]
            if self.notes[i]:
                lines.append(f"    \x1b[2m✓ {self.notes[i]}\x1b[0m")
        return lines

    def _redraw(self, lines: list[str]) -> None:
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        self._write(up + "\x1b[J" + "\n".join(lines) + "\n")
        self.drawn = len(lines)

    def _write(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()
