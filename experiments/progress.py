"""What each running sweep point is doing: its newest log line, printed while the sweep runs.

The engines send a point's output to `<point>/sweep/<stage>.log` (stage names are
`<index>-<mode>`, e.g. `0-train.log`), so the sweep would otherwise sit silent for the minutes a
point trains. The driver watches those files instead of the engines: the same code serves the
local and the Ray engine (whose workers share the filesystem), and nothing in a point's process
changes. A line is printed when a point's newest line changed, at most every `every` seconds.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, TextIO

TAIL_BYTES = 4096  # enough for the last line of a training log (tqdm bars rewrite one line)


def last_line(path: Path) -> str:
  """The last non-empty line of `path` ('' if none); a progress bar's newest redraw counts as a
  line (tqdm separates redraws with carriage returns)."""
  try:
    with open(path, "rb") as f:
      f.seek(max(0, os.fstat(f.fileno()).st_size - TAIL_BYTES))
      tail = f.read().decode("utf-8", errors="replace")
  except OSError:
    return ""
  pieces = [p.strip() for p in tail.replace("\r", "\n").split("\n")]
  return next((p for p in reversed(pieces) if p), "")


class PointProgress:
  """Prints `  <point> [<stage>] <newest log line>` for each point whose log moved on."""

  def __init__(self, points: list, every: float = 10.0, out: TextIO | None = None,
               clock: Callable[[], float] = time.time):
    self.points = points
    self.every = every
    self.out = out or sys.stdout
    self.started = clock()
    self.shown: dict[str, str] = {}
    self.done: set[str] = set()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def finished(self, name: str) -> None:
    """No more lines for this point (its outcome is printed by the sweep)."""
    self.done.add(name)

  def poll(self) -> list[str]:
    """The lines to print now: one per running point whose newest log line changed."""
    lines = []
    for point in self.points:
      if point.name in self.done:
        continue
      logs = [(s, point.log(s)) for s in point.stages]
      active = [(s, log) for s, log in logs if log.exists() and log.stat().st_mtime >= self.started]
      if not active:
        continue
      stage, log = active[-1]
      line = last_line(log)
      if line and self.shown.get(point.name) != line:
        self.shown[point.name] = line
        lines.append(f"  {point.name} [{stage.name}] {line}")
    return lines

  def _loop(self) -> None:
    while not self._stop.wait(self.every):
      for line in self.poll():
        print(line, file=self.out, flush=True)

  def __enter__(self) -> "PointProgress":
    self._thread = threading.Thread(target=self._loop, name="sweep-progress", daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
