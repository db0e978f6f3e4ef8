"""A dependency-free progress bar for `lmfast bench` (on stderr, so stdout stays the table)."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """`step(label)` marks the previous step done and shows `label` as the one running now.

    On a terminal it redraws one line:  [#########...........]  9/40  0:42  softmax ...: round 1/2
    Elsewhere (CI logs, pipes) it prints one such line per step instead."""

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total = max(total, 1)
        self.stream = stream or sys.stderr
        self.width = width
        self.done = -1  # step() is called when a step starts
        self.start = time.monotonic()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def step(self, label: str) -> None:
        self.done = min(self.done + 1, self.total)
        self._draw(label)

    def _draw(self, label: str) -> None:
        filled = self.width * self.done // self.total
        elapsed = int(time.monotonic() - self.start)
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done:>3}/{self.total}  "
                f"{elapsed // 60}:{elapsed % 60:02d}  {label}")
        if self.tty:
            self.stream.write("\r\x1b[2K" + line[:150])  # clear the line, then redraw it
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, label: str = "done") -> None:
        self.done = self.total - 1
        self.step(label)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
