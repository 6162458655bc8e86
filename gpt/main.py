"""The one entry point: parses the experiment config and dispatches on `config.mode`.

  python -m gpt.main --config=configs/117m.py --workdir=runs/kant --config.mode=train

This file is intentionally thin: each mode lives in its own module with a
`run(config, workdir) -> None` function, listed in MODES. `run(argv)` is the entry point for the
console script, `python -m gpt.main` and in-process callers (tests) alike: it ends in SystemExit,
0 on success and 2 after one `error: ...` line for anything a user can cause. By default only the
command's own messages are printed (gpt/console.py); `--verbosity=N` or GPT_VERBOSE=1 brings the
libraries' logs back.
"""

from __future__ import annotations

import importlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from gpt import console, host_memory
from gpt.config import unknown_key_message
from gpt.errors import GPTError, print_error

# mode name -> "module:function"; each function takes (config, workdir).
MODES = {
    "train": "gpt.train:run",
    "sample": "gpt.sample:run_sample",
    "interactive": "gpt.sample:run_interactive",
    "eval": "gpt.evaluate:run",
    "attention": "gpt.attention_view:run",
    "compile": "gpt.compile:run",
}

# This command's own flags live apart from absl's global FLAGS, so that gpt.main can run in a
# process that defines its own --workdir (experiments/sweep.py, the tests) and run more than once.
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/117m.py.", lock_config=True,
    flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for checkpoints, logs, samples and eval results (mode-dependent).",
    flag_values=FLAGS)


class UsageError(GPTError):
  """A mistake in the command line or config, reported as one line without a traceback."""


def resolve_mode(mode: str):
  """The `run(config, workdir)` function for `mode`, or UsageError saying what is wrong."""
  if mode not in MODES:
    raise UsageError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)} "
                     f"(--config.mode=...)")
  module_name, func_name = MODES[mode].split(":")
  return getattr(importlib.import_module(module_name), func_name)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/117m.py")
  run_mode = resolve_mode(config.mode)
  console.setup(verbose=console.verbose_requested() or bool(flags.FLAGS["verbosity"].present))
  logging.debug("mode=%s workdir=%s", config.mode, _WORKDIR.value)
  logging.debug("host memory: %s", host_memory.keep_freed_memory() or "freed memory kept")
  run_mode(config, _WORKDIR.value)


def _flags_parser(argv: list[str]) -> list[str]:
  """absl's parser, with config mistakes (misspelled keys, bad files) turned into one line.

  ml_collections raises a bare AttributeError/KeyError with a traceback for an unknown
  `--config.x.y` key; users should see which key was wrong and what was meant instead.
  """
  try:
    if any(a.split("=")[0] in ("--help", "--helpfull", "-h", "--helpshort") for a in argv[1:]):
      print(FLAGS.main_module_help() or FLAGS, file=sys.stderr)
    rest = FLAGS(argv, known_only=True)  # --config, --config.*, --workdir
    return flags.FLAGS(rest)  # absl's own: --verbosity, --help, ...
  except flags.Error as e:
    _fail(f"{e}\nFlags: --config=<file> --config.<key>=<value> ... --workdir=<folder>; "
          f"--helpfull for absl's flags.")
  except (AttributeError, KeyError) as e:
    _fail(unknown_key_message(e, argv))
  except (FileNotFoundError, ImportError, SyntaxError) as e:
    _fail(f"cannot load the config file: {e}")


def _fail(message: str) -> None:
  sys.exit(print_error(message))


def _forget_previous_parse() -> None:
  """Lets the flags be parsed again in this process: ml_collections defines one flag per
  `--config.x.y` override it sees, and absl keeps every flag's last value."""
  for name in [n for n in FLAGS if n.startswith(f"{_CONFIG.name}.")]:
    delattr(FLAGS, name)
  FLAGS.unparse_flags()
  flags.FLAGS.unparse_flags()


def run(argv: list[str] | None = None) -> None:
  """The entry point: `gpt ...`, `python -m gpt.main ...` (argv None: sys.argv), or in process
  `run(["--config=configs/tiny.py", ...])`. Always ends in SystemExit (0, or 2 after one
  `error: ...` line on stderr)."""
  # Before jax starts its backend's threads: every repeated jitted call (a train step, an eval batch,
  # a sampling call) then reuses its temp buffer's pages instead of faulting in fresh ones.
  host_memory.keep_freed_memory()
  saved_argv = sys.argv
  if argv is not None:
    # ml_collections reads the --config.* overrides from sys.argv, not from the parser's argv.
    sys.argv = [sys.argv[0] if sys.argv else "gpt", *argv]
    if FLAGS.is_parsed():
      _forget_previous_parse()
  if not console.verbose_requested(sys.argv):
    console.quiet_native_logs()
  try:
    app.run(main, argv=list(sys.argv), flags_parser=_flags_parser)
  except (UsageError, GPTError) as e:
    _fail(str(e))
  except OSError as e:
    if "config file" not in str(e):
      raise
    _fail(f"cannot load the config file: {str(e).splitlines()[-1].strip()}")
  finally:
    sys.argv = saved_argv


if __name__ == "__main__":
  run()
