"""Building the C++ kernels (gemv.cc, gemm.cc, attention.cc, decode_attention.cc, adam.cc, layernorm.cc,
gelu.cc) with the system compiler, once, into a cache, and loading them as XLA FFI targets.

Why at first use rather than at install: the project installs as pure Python (`pip install -e .`
on any machine), and gemv.cc is compiled for the CPU it runs on (-march=native). A library is
keyed by its source, the headers it shares (pool.h, lanes.h, simd_exp.h), the flags, jax's version (XLA's FFI ABI) and,
for a CPU-specific build, this CPU's model and flags, and is renamed into place only when complete,
so concurrent first uses and interrupted builds never load a partial file. The cache is
GPT_KERNEL_CACHE (default ~/.cache/gpt/kernels).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

HEADERS = (Path(__file__).with_name("pool.h"), Path(__file__).with_name("lanes.h"),
           Path(__file__).with_name("simd_exp.h"))


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
