"""What a command prints: by default only what it is for (progress, results, one-line errors).

The libraries underneath log for their own developers: jax announces every backend it could not
start (`libtpu.so` on a machine without a TPU), orbax writes dozens of INFO and WARNING lines per
checkpoint it saves or restores (and "Given directory is read only" when reading one), XLA's C++
logs its own lines, and absl stamps every line with a date, thread id and file name. None of it
tells a person running an experiment anything, so by default:

- this package's own log messages are printed plainly: `message`, or `warning: message`;
- every other logger's records below ERROR, and library Python warnings, are dropped;
- XLA's C++ logging is limited to errors (TF_CPP_MIN_LOG_LEVEL=2, unless already set);
- on a machine with neither a TPU nor a GPU, JAX_PLATFORMS=cpu (unless set): jax would end up on
  the CPU anyway, after libtpu (installed by the [tpu] extra) printed a screen of notices while
  failing to find a chip.

`--verbosity=N` (absl's flag, `-v N`) or `GPT_VERBOSE=1` turns all of this off: absl's logging as
it comes, library logs included.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

VERBOSE_ENV = "GPT_VERBOSE"
PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep


def verbose_requested(argv: Sequence[str] = ()) -> bool:
  """True when GPT_VERBOSE is set (not 0) or `argv` (a command line) passes absl's --verbosity/-v."""
  if os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0"):
    return True
  return any(a.split("=")[0].lstrip("-") in ("verbosity", "v") for a in argv[1:] if a.startswith("-"))


def has_accelerator() -> bool:
  """True when a TPU or GPU may be attached: Google's PCI vendor id (TPU chips), /dev/accel*,
  /dev/vfio (TPU v5+), NVIDIA or AMD device nodes. Errs towards True."""
  dev = Path("/dev")
  if any(dev.glob("accel*")) or (dev / "vfio").exists() or any(dev.glob("nvidia[0-9]*")) \
      or (dev / "kfd").exists() or not Path("/sys/bus/pci/devices").is_dir():
    return True
  for vendor in Path("/sys/bus/pci/devices").glob("*/vendor"):
    try:
      if vendor.read_text().strip().lower() == "0x1ae0":  # Google: TPU chips
        return True
    except OSError:
      return True
  return False


def quiet_native_logs() -> None:
  """Quiets what native code prints (see the module docstring); must run before jax is imported,
  which reads these environment variables then."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if "JAX_PLATFORMS" not in os.environ and not has_accelerator():
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already: its config has read the environment
      sys.modules["jax"].config.update("jax_platforms", "cpu")


def is_own_record(record: logging.LogRecord) -> bool:
  """True for records logged from this package's code (absl logs everyone's through one logger,
  so the caller's file, not the logger name, tells ours from orbax's)."""
  return os.path.realpath(record.pathname).startswith(PACKAGE_DIR)


class OwnMessages(logging.Filter):
  """Passes this package's records, and anyone's errors."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or is_own_record(record)


class Plain(logging.Formatter):
  """`message` for INFO, `warning: message` / `error: message` above it; no timestamps."""

  def format(self, record: logging.LogRecord) -> str:
    message = record.getMessage()
    if record.exc_info:
      message = f"{message}\n{self.formatException(record.exc_info)}"
    if record.levelno >= logging.WARNING:
      return f"{record.levelname.lower()}: {message}"
    return message


def quiet() -> None:
  """Routes logging as the module docstring says (call once the command line is parsed)."""
  from absl import flags
  from absl import logging as absl_logging

  if not flags.FLAGS.is_parsed():  # commands with their own parser (gpt.export): no absl notice
    flags.FLAGS.mark_as_parsed()
  absl_logging.use_absl_handler()
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, OwnMessages) for f in handler.filters):
    handler.addFilter(OwnMessages())
  handler.setFormatter(Plain())
  absl_logging.set_verbosity(absl_logging.INFO)
  warnings.filterwarnings("ignore")
  warnings.filterwarnings("default", module=r"gpt(\.|$)")


def setup(verbose: bool) -> None:
  """quiet(), unless `verbose` (--verbosity given, or GPT_VERBOSE=1): then absl's logging as is."""
  if not verbose:
    quiet()
