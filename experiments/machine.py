"""The machine a benchmark ran on, as its table states it: the CPU model and its flags.

Every benchmark table names the CPU model and the vector extensions that decide its speed (AVX-512,
VNNI, BF16, AMX: /proc/cpuinfo), so that a number can be compared only with numbers from the same
kind of machine. The scripts read them here, one way, instead of each parsing /proc/cpuinfo.
"""

from __future__ import annotations

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
