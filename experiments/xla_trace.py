"""Where a jitted call spends its time on XLA:CPU: per-instruction op times from a profiler trace.

The benchmark scripts' `--profile` flags use this. Per-op trace events exist only when XLA starts
with `--xla_cpu_enable_xprof_traceme=true` in XLA_FLAGS, so a script must set that before jax
initialises its backend (see `enable_op_events`).
"""

from __future__ import annotations

import collections
import glob
import os
import re
import sys
import tempfile
import time
from typing import Callable

TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"


def enable_op_events() -> None:
  """Turns on XLA:CPU's per-op trace events; call before jax initialises its backend."""
  if TRACE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + TRACE_FLAG


def traced_op_times(fn: Callable[[], object]) -> tuple[float, collections.Counter]:
  """Runs `fn` once under the profiler: (wall seconds, {XLA instruction name: nanoseconds})."""
  import jax

  folder = tempfile.mkdtemp(prefix="xla_trace_")
  jax.profiler.start_trace(folder)
  start = time.perf_counter()
  fn()
  wall = time.perf_counter() - start
  jax.profiler.stop_trace()
  path = sorted(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True), key=os.path.getmtime)[-1]
  totals = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      for event in line.events:
        # Skip the enclosing events (the executable, while loops, runtime wrappers): they would
        # count the instructions inside them twice.
        if not ("Execute" in event.name or event.name.startswith(("while", "$", "Pjit", "Slinky"))):
          totals[event.name] += event.duration_ns
  return wall, totals


def hlo_summaries(hlo_text: str) -> dict[str, str]:
  """{instruction name: its shape and operands <- the jax op it came from} from compiled HLO text."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%([\w.-]+) = (.*?)(?:, metadata=\{op_name="([^"]*)".*)?$', line)
    if m:
      out.setdefault(m.group(1), f"{m.group(2)[:90]} <- {(m.group(3) or '')[-60:]}")
  return out


def print_breakdown(totals: collections.Counter, hlo: dict[str, str], *, per: float = 1.0,
                    unit: str = "ms", top: int = 12, file=sys.stdout) -> None:
  """Op time by kind (instruction names without their number) and the largest instructions,
  each divided by `per` (e.g. tokens, to print ms per token)."""
  all_ns = sum(totals.values()) or 1
  kinds = collections.Counter()
  for name, ns in totals.items():
    kinds[re.sub(r"\.\d+$", "", name)] += ns
  print("By op kind:", file=file)
  for name, ns in kinds.most_common(top):
    print(f"  {ns / 1e6 / per:8.2f} {unit} {100 * ns / all_ns:5.1f}%  {name}", file=file)
  print("Largest instructions:", file=file)
  for name, ns in totals.most_common(top):
    print(f"  {ns / 1e6 / per:8.2f} {unit} {100 * ns / all_ns:5.1f}%  {name}: {hlo.get(name, '')}",
          file=file)
