"""Keeps freed host memory in the process, so repeated jitted calls stop faulting in fresh pages.

XLA:CPU allocates each executable's whole temporary buffer (829 MiB for the 30M training step,
1299 MiB for the chapter's 117M at ctx 1024) with malloc at every execution and frees it at the
end. glibc serves a block that large with mmap (it is above the mmap threshold) and gives it back
with munmap, so every step touches the whole buffer in fresh 4 KB pages: one page fault and one
kernel page-zeroing each (212k faults and ~0.6 s of system time per 30M step, of ~4.8 s CPU).
Setting `MALLOC_MMAP_MAX_=0` alone does not help: XLA allocates on its worker threads, whose
non-main arenas are 64 MB heaps that fall back to mmap for anything larger whatever the setting.
jaxlib offers no allocator hook from Python, so the allocator's settings are the place to act.

`keep_freed_memory()` tells glibc, through mallopt, to (1) use one arena for every thread (the
main heap, grown with brk, so M_MMAP_MAX applies), (2) never serve a block with mmap, (3) never
give the top of the heap back to the kernel (trim), and (4) grow it by a large pad, so a step's
buffer is carved from pages the process already touched. It must run before jax starts its
backend (the thread pool): a thread that has already picked an arena keeps it. It changes where
memory comes from, never what is computed. The cost is resident memory: the heap keeps its
high-water mark, which settles at about three temp buffers after the first few steps (two are
alive at once while the previous execution's is released, and smaller blocks split freed holes),
e.g. peak RSS 6.0 GB instead of 3.4 GB for the chapter step. Threads also share one arena's lock.
Measured in BENCHMARKS.md, "train-alloc, session 7".

It is a no-op on platforms without glibc (macOS, musl) and when GPT_KEEP_FREED_MEMORY=0.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys

ENV = "GPT_KEEP_FREED_MEMORY"

# glibc's <malloc.h> mallopt parameters.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8

# Never trim the top of the heap: mallopt takes an int, and glibc reads this one as a size_t, so -1
# is SIZE_MAX. (2^31 - 1 is not enough: at 30M the heap's free top passes 2 GB after a few steps,
# glibc gives it back, and the next step faults all 212k pages in again.)
TRIM_THRESHOLD = -1
# The heap grows by at least this much beyond a request (fewer brk calls while it grows).
TOP_PAD = 64 << 20

_state = {"applied": None}


def disabled_by_env() -> bool:
  """True when GPT_KEEP_FREED_MEMORY is set to 0/false/no/off."""
  return os.environ.get(ENV, "").strip().lower() in ("0", "false", "no", "off")


def glibc():
  """glibc as a ctypes library, or None when this process does not run on glibc (macOS, musl)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    if not os.confstr("CS_GNU_LIBC_VERSION"):
      return None
  except (ValueError, OSError):
    return None
  try:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None


def keep_freed_memory() -> str | None:
  """Configures glibc malloc as the module docstring says; idempotent. Returns None when applied,
  or a one-line reason why nothing was done (disabled, not glibc, mallopt refused a setting)."""
  if _state["applied"] is not None:
    return _state["applied"] or None
  reason = _apply()
  _state["applied"] = reason or ""
  return reason


def _apply() -> str | None:
  if disabled_by_env():
    return f"{ENV}=0: freed memory goes back to the kernel (glibc's defaults)"
  libc = glibc()
  if libc is None:
    return "not glibc: the allocator's defaults are kept"
  return _mallopt(libc, ((M_ARENA_MAX, 1),) + KEEP)


# The settings that keep freed memory (M_ARENA_MAX aside, which is set once), and glibc's defaults
# for the same parameters as a long-running process reaches them: its dynamic mmap threshold stops
# at 32 MB and its trim threshold at twice that; 65536 mmaps at most; a 128 KB top pad.
KEEP = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
DEFAULTS = ((M_MMAP_MAX, 65536), (M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 64 << 20),
            (M_TOP_PAD, 128 << 10))


def _mallopt(libc, settings) -> str | None:
  libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  libc.mallopt.restype = ctypes.c_int
  for param, value in settings:
    if libc.mallopt(param, value) != 1:  # mallopt returns 1 on success
      return f"mallopt({param}, {value}) failed: glibc's defaults are partly kept"
  return None


@contextlib.contextmanager
def glibc_defaults():
  """Within the block, blocks above 32 MB are mapped and unmapped again as with glibc's defaults
  (one arena stays: threads keep the arena they have); afterwards freed memory is kept again.
  For benchmarks that measure the route off beside it in one process (bench_train's `freedoff`
  rows, and the torch rows, which run as users run them); a no-op where keep_freed_memory() did
  nothing."""
  libc = glibc() if applied() else None
  if libc is not None:
    _mallopt(libc, DEFAULTS)
  try:
    yield
  finally:
    if libc is not None:
      _mallopt(libc, KEEP)


def applied() -> bool:
  """True when keep_freed_memory() has configured the allocator in this process."""
  return _state["applied"] == ""
