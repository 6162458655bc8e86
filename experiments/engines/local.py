"""The `local` engine: N runs at once on this machine, each pinned to its own share of the devices.

Devices (`--devices`):
  auto         the GPUs if there are any (CUDA_VISIBLE_DEVICES or nvidia-smi), else the CPU cores
  gpu:0,1,2,3  these GPUs: slot k gets its share through CUDA_VISIBLE_DEVICES
  cpu:0-7      these CPU cores: slot k's runs get CPU affinity to its share
  none         no pinning (every run sees everything)
With 4 GPUs and --parallel=2, two runs go at once, on GPUs 0,1 and 2,3. A TPU host's chips are not
split (JAX wants all of a host's chips in one process): use --parallel=1 there, or the Ray engine.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable

from experiments.engines.point import Outcome, Pin, Point, StopRequest, run_point
from gpt.errors import GPTError


def _parse_ids(spec: str) -> list[int]:
  """'0,2,4-7' -> [0, 2, 4, 5, 6, 7]."""
  ids = []
  try:
    for part in spec.split(","):
      lo, _, hi = part.strip().partition("-")
      ids.extend(range(int(lo), int(hi or lo) + 1))
  except ValueError:
    raise GPTError(f"bad device list {spec!r}: use numbers and ranges like 0,1 or 0-3") from None
  return ids


def detect_gpus() -> list[int]:
  """GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return [int(v) for v in visible.split(",") if v.strip().isdigit()]
  if not shutil.which("nvidia-smi"):
    return []
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [int(line) for line in out.split() if line.strip().isdigit()]


def device_slots(devices: str, parallel: int) -> list[Pin]:
  """`parallel` disjoint device shares (one per concurrent run), as described in the module doc."""
  if parallel < 1:
    raise GPTError(f"--parallel={parallel} must be >= 1")
  if devices == "none":
    return [Pin() for _ in range(parallel)]
  if devices == "auto":
    gpus = detect_gpus()
    kind, ids = ("gpu", gpus) if gpus else ("cpu", sorted(os.sched_getaffinity(0)))
  else:
    kind, _, spec = devices.partition(":")
    if kind not in ("gpu", "cpu") or not spec:
      raise GPTError(f"--devices={devices!r}: use auto, none, gpu:0,1,... or cpu:0-7")
    ids = _parse_ids(spec)
  if len(ids) < parallel:
    raise GPTError(f"--parallel={parallel} runs need at least {parallel} devices, but {kind} has "
                   f"{len(ids)} ({ids}); lower --parallel or pass --devices")
  shares = [ids[k * len(ids) // parallel:(k + 1) * len(ids) // parallel] for k in range(parallel)]
  if kind == "gpu":
    return [Pin(env={"CUDA_VISIBLE_DEVICES": ",".join(map(str, s))}) for s in shares]
  return [Pin(cpus=tuple(s)) for s in shares]


class LocalEngine:
  """A pool of `parallel` worker threads, each supervising one `gpt.main` process at a time."""

  def __init__(self, parallel: int = 1, devices: str = "auto"):
    self.slots = device_slots(devices, parallel)

  def run(self, points: list[Point], retries: int, stop: StopRequest,
          on_done: Callable[[Outcome], None]) -> list[Outcome]:
    """Runs the points; once a stop is requested no new point starts and running ones are stopped."""
    free: queue.Queue = queue.Queue()
    for pin in self.slots:
      free.put(pin)

    def work(point: Point) -> Outcome:
      if stop.graceful.is_set():
        return Outcome(point.name, "interrupted")
      pin = free.get()
      try:
        outcome = run_point(point, retries, pin, stop)
      finally:
        free.put(pin)
      on_done(outcome)
      return outcome

    with ThreadPoolExecutor(len(self.slots), thread_name_prefix="sweep") as pool:
      futures = [pool.submit(work, p) for p in points]
      # Waiting with a timeout keeps the main thread responsive to SIGINT/SIGTERM.
      while not all(f.done() for f in futures):
        wait(futures, timeout=0.2)
      return [f.result() for f in futures]
