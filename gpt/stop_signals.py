"""Ctrl-C and `kill` as requests to stop cleanly: the handler scaffolding, written once.

A training run saves a checkpoint before it stops, and a sweep lets its running points save
before it kills them; both turn SIGINT/SIGTERM into a request of their own while a block runs and
put back the handlers that were there before when it ends. The request itself (what a first, a
second or a third signal means) is each one's own `on_signal`.
"""

from __future__ import annotations

import signal


class StopSignals:
  """A context manager: inside it, SIGINT and SIGTERM call `self.on_signal(signum)`; on exit the
  earlier handlers are restored. Subclasses define on_signal."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __enter__(self):
    self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)

  def _handle(self, signum, frame) -> None:
    self.on_signal(signum)

  def on_signal(self, signum: int) -> None:
    raise NotImplementedError
