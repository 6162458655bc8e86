"""Building the C++ kernels (gemv.cc, gemm.cc, attention.cc, decode_attention.cc, adam.cc, layernorm.cc,
gelu.cc, transpose.cc) with the system compiler, once, into a cache, and loading them as XLA FFI targets.

Why at first use rather than at install: the project installs as pure Python (`pip install -e .`
on any machine), and gemv.cc is compiled for the CPU it runs on (-march=native). A library is
keyed by its source, the headers it shares (pool.h, lanes.h, simd_exp.h, bf16.h), the flags, jax's version (XLA's FFI ABI) and,
for a CPU-specific build, this CPU's model and flags, and is renamed into place only when complete,
so concurrent first uses and interrupted builds never load a partial file. The cache is
GPT_KERNEL_CACHE (default ~/.cache/gpt/kernels).

`Kernel` is how a kernel module uses all this: one object per library holding what builds it and
whether it loaded, so that every module answers `available()` and `why_unavailable()` the same way
(tried once per process under a lock, an environment switch that turns it off, a one-line reason
logged and kept when it fails) instead of each repeating that code.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable

import jax
from absl import logging

HEADERS = (Path(__file__).with_name("pool.h"), Path(__file__).with_name("lanes.h"),
           Path(__file__).with_name("simd_exp.h"), Path(__file__).with_name("bf16.h"))


def cache_dir() -> Path:
  """Where built kernel libraries are kept."""
  return Path(os.environ.get("GPT_KERNEL_CACHE") or Path.home() / ".cache" / "gpt" / "kernels")


def cpu_signature() -> bytes:
  """The CPU model and flags: a library built with -march=native runs only where they match."""
  try:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor().encode()
  keep = [l for l in lines if l.startswith(("model name", "flags"))][:2]
  return "\n".join(keep).encode()


@functools.cache
def cpu_vendor() -> str:
  """The CPU's vendor id from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD", ...), or "" where it
  cannot be read (another OS, an unusual CPU)."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("vendor_id"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def library_path(source: Path, flags: tuple[str, ...], *, cpu_specific: bool) -> Path:
  """The cached library's path for this source, its headers, flags, jax and (if asked) CPU."""
  parts = [source.read_bytes(), *(h.read_bytes() for h in HEADERS), " ".join(flags).encode(),
           jax.__version__.encode()]
  if cpu_specific:
    parts.append(cpu_signature())
  key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
  return cache_dir() / f"{source.stem}-{key}.so"


def build(source: Path, flags: tuple[str, ...], *, cpu_specific: bool,
          libraries: tuple[str, ...] = ()) -> Path:
  """Compiles `source` into a shared library (once per key) and returns its path; raises
  RuntimeError when there is no compiler or it fails (callers then keep XLA's own ops)."""
  path = library_path(source, flags, cpu_specific=cpu_specific)
  if path.exists():
    return path
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if not compiler:
    raise RuntimeError("no C++ compiler (g++/c++ or $CXX) on PATH")
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.tmp")
  os.close(fd)
  cmd = [compiler, *flags, f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp, *libraries]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode != 0:
    os.unlink(tmp)
    raise RuntimeError(f"{compiler} failed: {done.stderr.strip().splitlines()[-1:]}")
  os.replace(tmp, path)
  return path


def load(source: Path, flags: tuple[str, ...], targets: tuple[str, ...], *, cpu_specific: bool,
         libraries: tuple[str, ...] = ()) -> ctypes.CDLL:
  """Builds `source` (`build`), loads the library and registers each exported handler named in
  `targets` as an XLA FFI target of the same name on the CPU; returns the library (for its other
  exports). Raises OSError, RuntimeError or AttributeError (a missing export) on failure."""
  lib = ctypes.cdll.LoadLibrary(str(build(source, flags, cpu_specific=cpu_specific,
                                          libraries=libraries)))
  for name in targets:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
  return lib


class Kernel:
  """One C++ kernel library as its module (gpt.kernels.gemv, ...) uses it.

  `available()` builds, loads and registers the library (`load`) the first time it is asked, once
  per process however many threads ask at once, and answers from then on without retrying: a
  failure (no compiler, a compile error, a missing export, `setup` raising) is logged once with
  `fallback` (what runs instead) and kept as `why_unavailable()`'s one line. Where `env` names an
  environment variable, its value "0" turns the kernel off (read at every call, so a test or a
  benchmark's A/B can switch it without a new process) before anything is built.

  `flags` may be a function returning the flags, read when the library is built: a check that
  rebuilds a kernel with other flags (tests/test_gemv.py's portable build) sets its module's FLAGS
  first. `setup(load)`, where given, is the load itself: it calls `load()` (build, load, register;
  returns the library) with what must happen before it or after it, and returns the library
  (gemm: find MKL before building, hand the library MKL's path after). `warn` logs a failure at
  WARNING instead of INFO (gemv's and decode_attention's, as they always have).
  """

  def __init__(self, source: Path, flags: tuple[str, ...] | Callable[[], tuple[str, ...]],
               targets: tuple[str, ...], *, fallback: str, cpu_specific: bool = True,
               libraries: tuple[str, ...] = (), env: str | None = None, warn: bool = False,
               setup: Callable[[Callable[[], ctypes.CDLL]], ctypes.CDLL] | None = None):
    self.source, self.flags, self.targets = source, flags, tuple(targets)
    self.fallback, self.cpu_specific, self.libraries = fallback, cpu_specific, tuple(libraries)
    self.env, self.warn, self.setup = env, warn, setup
    self._forget()

  def _forget(self) -> None:
    self._lock = threading.Lock()
    self._tried = False
    self._lib: ctypes.CDLL | None = None
    self._why = ""

  def untried(self) -> Kernel:
    """The same kernel not yet tried (tests of a module's fallback swap it in for the module's)."""
    fresh = copy.copy(self)
    fresh._forget()
    return fresh

  def switched_off(self) -> bool:
    """Whether the environment switch (`env`=0) turns the kernel off now."""
    return self.env is not None and os.environ.get(self.env, "1") == "0"

  def available(self) -> bool:
    """True when the library is built, loaded and its targets registered (trying now if never
    tried); False when switched off or when it failed."""
    if self.switched_off():
      return False
    with self._lock:
      if not self._tried:
        self._load()
        self._tried = True
    return self._lib is not None

  def _load(self) -> None:
    flags = self.flags() if callable(self.flags) else self.flags

    def build_and_load() -> ctypes.CDLL:
      return load(self.source, flags, self.targets, cpu_specific=self.cpu_specific,
                  libraries=self.libraries)

    try:
      self._lib = self.setup(build_and_load) if self.setup else build_and_load()
    except (OSError, RuntimeError, AttributeError) as e:
      logging.log(logging.WARNING if self.warn else logging.INFO, "gpt.kernels.%s unavailable, %s: %s",
                  self.source.stem, self.fallback, e)
      self._why = " ".join(str(e).split()) or type(e).__name__

  def why_unavailable(self) -> str:
    """Why the kernel is not available: the switch's message, the failure's one line; "" when it
    is available or was not tried yet."""
    if self.switched_off():
      return f"{self.env}=0 turns it off"
    return self._why

  def library(self) -> ctypes.CDLL:
    """The loaded library, for its plain C exports (gemv's GptGemvHasVnni). Call where
    `available()`; elsewhere a RuntimeError says why not."""
    if not self.available():
      raise RuntimeError(f"gpt.kernels.{self.source.stem} is unavailable: {self.why_unavailable()}")
    return self._lib


def cannot_run_on(devices, available, why_unavailable) -> str | None:
  """Why a CPU kernel cannot run a program on `devices` (a mesh's devices), or None when it can:
  the training kernels' custom calls have no sharding rule, so they run on one CPU device, where
  `available()` says the library loaded (`why_unavailable()` says why not)."""
  devices = list(devices)
  if len(devices) != 1:
    return f"it runs on one device; this mesh has {len(devices)}"
  if devices[0].platform != "cpu":
    return f"it runs on a CPU; this program is for {devices[0].platform}"
  if not available():
    return why_unavailable() or "the kernel did not load"
  return None
