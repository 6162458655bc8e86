"""User-facing errors: one line saying what was wrong and what to do instead.

Every command (gpt.main and the `python -m gpt.<tool>` helpers) ends a GPTError the same way,
through `print_error`: `error: <message>` on stderr and exit status 2, no traceback.
"""

import sys


class GPTError(Exception):
  """A mistake in input, config or files; gpt.main prints it as `error: <message>` and exits 2."""


def print_error(message: object) -> int:
  """Prints `error: <message>` on stderr; returns 2, the exit status of a command stopped by it."""
  print(f"error: {message}", file=sys.stderr)
  return 2
