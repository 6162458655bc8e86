"""The one entry point: parses the experiment config and dispatches on `config.mode`.

  python -m gpt.main --config=configs/117m.py --workdir=runs/kant --config.mode=train

This file is intentionally thin: each mode lives in its own module with a
`run(config, workdir) -> None` function, listed in MODES.
"""

from __future__ import annotations

import importlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from gpt.config import unknown_key_message
from gpt.errors import GPTError

# mode name -> "module:function"; each function takes (config, workdir).
MODES = {
    "train": "gpt.train:run",
    "sample": "gpt.generate:run_sample",
    "interactive": "gpt.generate:run_interactive",
    "eval": "gpt.evaluate:run",
    "attention": "gpt.attention_view:run",
    "compile": "gpt.compile:run",
}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/117m.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for checkpoints, logs, samples and eval results (mode-dependent).")


class UsageError(GPTError):
  """A mistake in the command line or config, reported as one line without a traceback."""


def resolve_mode(mode: str):
  """The `run(config, workdir)` function for `mode`, or UsageError saying what is wrong."""
  if mode not in MODES:
    raise UsageError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)} "
                     f"(--config.mode=...)")
  module_name, func_name = MODES[mode].split(":")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name != module_name:  # a real missing dependency inside the module
      raise
    raise UsageError(f"mode {mode!r} is not implemented yet") from None
  return getattr(module, func_name)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/117m.py")
  run_mode = resolve_mode(config.mode)
  logging.info("mode=%s workdir=%s", config.mode, _WORKDIR.value)
  run_mode(config, _WORKDIR.value)


def _flags_parser(argv: list[str]) -> list[str]:
  """absl's parser, with config mistakes (misspelled keys, bad files) turned into one line.

  ml_collections raises a bare AttributeError/KeyError with a traceback for an unknown
  `--config.x.y` key; users should see which key was wrong and what was meant instead.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e}\nPass --helpfull for the list of flags.")
  except (AttributeError, KeyError) as e:
    _fail(unknown_key_message(e, argv))
  except (FileNotFoundError, ImportError, SyntaxError) as e:
    _fail(f"cannot load the config file: {e}")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def run() -> None:
  """Console-script entry point (`gpt ...`)."""
  try:
    app.run(main, flags_parser=_flags_parser)
  except (UsageError, GPTError) as e:
    _fail(str(e))
  except OSError as e:
    if "config file" not in str(e):
      raise
    _fail(f"cannot load the config file: {str(e).splitlines()[-1].strip()}")


if __name__ == "__main__":
  run()
