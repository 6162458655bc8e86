"""The machine a benchmark ran on, as its table states it: the CPU model, its flags and the load.

Every benchmark table names the CPU model and the vector extensions that decide its speed (AVX-512,
VNNI, BF16, AMX: /proc/cpuinfo), so that a number can be compared only with numbers from the same
kind of machine, and the load average, since the machine is often shared and only same-run ratios
compare. The scripts read them here, one way, instead of each parsing /proc/cpuinfo.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpuinfo_field(name: str) -> str | None:
  """The first `name : value` of /proc/cpuinfo (None off Linux or when absent)."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(name):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def cpu_model() -> str:
  """The CPU's model name, e.g. 'Intel(R) Xeon(R) CPU @ 2.80GHz'."""
  return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
  """The CPU's feature flags (avx2, avx512f, avx512_vnni, ...); empty when unknown."""
  return set((_cpuinfo_field("flags") or "").split())

# The extensions that decide a CPU's matmul speed here (XLA's and gpt.kernels' code paths).
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def vector_flags() -> str:
  """Whether the CPU has each of VECTOR_FLAGS, e.g. 'avx2 yes, ..., avx512_bf16 no, amx_bf16 no'."""
  flags = cpu_flags()
  return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in VECTOR_FLAGS)


def load_average() -> str:
  """The 1, 5 and 15-minute load averages, e.g. '3.6 1.9 1.8 (1/5/15 min)'; 'n/a' where the OS
  does not say."""
  if not hasattr(os, "getloadavg"):
    return "n/a"
  return " ".join(f"{x:.1f}" for x in os.getloadavg()) + " (1/5/15 min)"
