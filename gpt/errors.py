"""User-facing errors: one line saying what was wrong and what to do instead."""


class GPTError(Exception):
  """A mistake in input, config or files; gpt.main prints it as `error: <message>` and exits 2."""
