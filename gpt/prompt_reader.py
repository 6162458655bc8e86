"""Reads the prompts of the interactive mode, one at a time, including multi-line ones.

OpenAI's interactive script used `input()`: one line per prompt, so pasting a paragraph of several
lines turned into several prompts. Here a prompt is still one line (press Enter and it runs), but
  - a line ending in a backslash continues on the next line (works in pipes and files too), and
  - on a terminal, lines that arrive together (a paste: the next line is already there within
    `paste_window` seconds) are one prompt, newlines kept.
Input is read from the file descriptor directly: Python's buffered readline would swallow the rest
of a paste, hiding it from the "is more input waiting?" check.
"""

from __future__ import annotations

import io
import os
import select
from typing import TextIO


class PromptReader:
  """`read()` returns the next prompt (without its final newline), or None at end of input."""

  def __init__(self, stream: TextIO, *, paste_window: float = 0.05, is_tty: bool | None = None):
    try:
      self._fd: int | None = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
      self._fd = None  # e.g. a StringIO: read lines from the stream itself
    self._stream = stream
    self._tty = (self._fd is not None and os.isatty(self._fd)) if is_tty is None else is_tty
    self._window = paste_window
    self._buf = b""
    self._eof = False

  @property
  def is_tty(self) -> bool:
    """Whether prompts come from a terminal (which echoes what is typed)."""
    return self._tty

  def read(self) -> str | None:
    """The next prompt: a line, continued past trailing backslashes and, on a terminal, a paste."""
    line = self._readline()
    if line is None:
      return None
    lines = [line]
    while True:
      if lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
      elif not (self._tty and self._more_waiting()):
        break
      line = self._readline()
      if line is None:
        break
      lines.append(line)
    return "\n".join(lines)

  def _readline(self) -> str | None:
    """One line without its newline (or the unterminated last one); None at end of input."""
    if self._fd is None:
      line = self._stream.readline()
      return line.rstrip("\n").rstrip("\r") if line else None
    while b"\n" not in self._buf and not self._eof:
      data = os.read(self._fd, 1 << 16)
      self._buf += data
      self._eof = not data
    if not self._buf:
      return None
    line, _, self._buf = self._buf.partition(b"\n")
    return line.decode("utf-8", errors="replace").rstrip("\r")

  def _more_waiting(self) -> bool:
    """True if another line is already buffered or arrives within the paste window."""
    if b"\n" in self._buf or self._eof or self._fd is None:
      return b"\n" in self._buf
    readable, _, _ = select.select([self._fd], [], [], self._window)
    return bool(readable)
