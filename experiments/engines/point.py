"""Running one sweep point: its stages in order, each retried, and marked done only on real success.

Standard library only: the Ray engine ships this module to cluster workers by value, so it must
import nothing from the project.

A point's workdir holds, next to what `gpt.main` writes:
  sweep/point.json          the point: overrides, stage commands, resolved configs
  sweep/<stage>.log         stdout+stderr of every attempt of the stage; stages are named
                            <index>-<mode> (0-train.log, 1-eval.log, ...)
  sweep/<stage>.done        written (atomically) after the stage's command exited 0 and nothing
                            interrupted it; holds the command. A stage counts as finished only if
                            its marker exists AND records the same command, so editing a sweep
                            (e.g. more train steps) reruns the points it changes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PYTHON = "{python}"  # placeholder for the interpreter of whichever machine runs the point
GRACE_SECONDS = 120  # after SIGTERM, time a run gets to save a checkpoint before SIGKILL

# Runs a command with this process as the parent-death signal target (Linux prctl: the run gets
# SIGTERM if the sweep driver or Ray worker dies, instead of living on unsupervised), pinned to the
# CPUs in argv[2] ('' = all); argv[1] is the expected parent pid, argv[3:] the command.
_SHIM = """
import ctypes, os, sys
try:
  ctypes.CDLL(None, use_errno=True).prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM
except (OSError, AttributeError):
  pass
if os.getppid() != int(sys.argv[1]):
  sys.exit(143)
if sys.argv[2]:
  os.sched_setaffinity(0, {int(c) for c in sys.argv[2].split(",")})
os.execvp(sys.argv[3], sys.argv[3:])
"""


@dataclasses.dataclass
class StopRequest:
  """How a sweep is being stopped: `graceful` (start nothing new; running commands get SIGTERM and
  time to save) and then, if asked again, `kill` (running commands get SIGKILL now)."""

  graceful: threading.Event = dataclasses.field(default_factory=threading.Event)
  kill: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass
class Stage:
  """One `gpt.main` invocation of a point (e.g. train, then eval)."""

  name: str  # e.g. "0-train"; names the log and marker files
  command: list[str]  # command[0] may be PYTHON


@dataclasses.dataclass
class Point:
  """One run of a sweep."""

  name: str
  workdir: str  # absolute
  cwd: str  # absolute; where commands run (relative config and data paths resolve here)
  stages: list[Stage]
  env: dict[str, str] = dataclasses.field(default_factory=dict)

  def marker(self, stage: Stage) -> Path:
    return Path(self.workdir) / "sweep" / f"{stage.name}.done"

  def log(self, stage: Stage) -> Path:
    return Path(self.workdir) / "sweep" / f"{stage.name}.log"

  def stage_finished(self, stage: Stage) -> bool:
    try:
      return json.loads(self.marker(stage).read_text())["command"] == stage.command
    except (OSError, ValueError, KeyError):
      return False

  def finished(self) -> bool:
    return all(self.stage_finished(s) for s in self.stages)


@dataclasses.dataclass
class Pin:
  """Devices a run may use: CPU cores (affinity) and/or environment variables (CUDA_VISIBLE_DEVICES)."""

  cpus: tuple[int, ...] = ()
  env: dict[str, str] = dataclasses.field(default_factory=dict)

  def describe(self) -> str:
    parts = [f"{k}={v}" for k, v in self.env.items()] + ([f"cpus={_ranges(self.cpus)}"] if self.cpus else [])
    return " ".join(parts) or "all devices"


@dataclasses.dataclass
class Outcome:
  """What happened to a point."""

  name: str
  status: str  # done | skipped (finished before) | failed | interrupted
  attempts: int = 0  # processes started, over all stages
  retries: int = 0  # of those, reruns of a failed stage
  seconds: float = 0.0
  stage: str = ""  # the stage that failed or was interrupted
  detail: str = ""  # the end of its log on failure
  devices: str = ""


def _ranges(cpus) -> str:
  return ",".join(str(c) for c in cpus)


def _write_marker(path: Path, record: dict) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(record, indent=2))
  os.replace(tmp, path)


def _tail(path: Path, lines: int = 6) -> str:
  try:
    text = path.read_text(encoding="utf-8", errors="replace")
  except OSError:
    return ""
  return "\n".join(text.rstrip().splitlines()[-lines:])


def _run_once(point: Point, stage: Stage, pin: Pin, stop: StopRequest | None,
              attempt: int) -> tuple[int | None, float]:
  """Runs the stage's command once; (exit code or None if interrupted, seconds)."""
  command = [sys.executable if c == PYTHON else c for c in stage.command]
  env = {**os.environ, **point.env, **pin.env}
  shim = [sys.executable, "-c", _SHIM, str(os.getpid()), _ranges(pin.cpus)]
  start = time.time()
  with open(point.log(stage), "a", encoding="utf-8") as log:
    log.write(f"=== attempt {attempt} at {time.strftime('%Y-%m-%d %H:%M:%S')} on "
              f"{pin.describe()}: {' '.join(command)}\n")
    log.flush()
    proc = subprocess.Popen(shim + command, cwd=point.cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
      while True:
        try:
          rc = proc.wait(timeout=0.2)
          break
        except subprocess.TimeoutExpired:
          if stop is not None and stop.graceful.is_set():
            _terminate(proc, stop.kill)
            return None, time.time() - start
      # A run that exits 0 while a stop was requested may have stopped early (training saves and
      # exits cleanly on SIGTERM): never mark it done.
      if stop is not None and stop.graceful.is_set():
        return None, time.time() - start
      return rc, time.time() - start
    except BaseException:  # KeyboardInterrupt from Ray's cancel, or the driver going down
      _terminate(proc)
      raise


def _terminate(proc: subprocess.Popen, kill: threading.Event | None = None) -> None:
  """SIGTERM (a training run saves a checkpoint), then SIGKILL after the grace period or as soon
  as `kill` is set."""
  if proc.poll() is not None:
    return
  proc.send_signal(signal.SIGTERM)
  deadline = time.time() + GRACE_SECONDS
  while proc.poll() is None:
    if time.time() > deadline or (kill is not None and kill.is_set()):
      proc.kill()
      proc.wait()
      return
    time.sleep(0.1)


def run_point(point: Point, retries: int = 1, pin: Pin | None = None,
              stop: StopRequest | None = None) -> Outcome:
  """Runs the point's unfinished stages in order, each up to 1 + `retries` times."""
  pin = pin or Pin()
  if point.finished():
    return Outcome(point.name, "skipped")
  (Path(point.workdir) / "sweep").mkdir(parents=True, exist_ok=True)
  attempts, reruns, seconds = 0, 0, 0.0
  for stage in point.stages:
    if point.stage_finished(stage):
      continue
    for attempt in range(1, retries + 2):
      attempts += 1
      reruns += attempt > 1
      rc, took = _run_once(point, stage, pin, stop, attempt)
      seconds += took
      if rc is None:
        return Outcome(point.name, "interrupted", attempts, reruns, seconds, stage.name,
                       devices=pin.describe())
      if rc == 0:
        _write_marker(point.marker(stage), {"command": stage.command, "attempt": attempt,
                                            "seconds": round(took, 2), "finished": time.time()})
        break
      with open(point.log(stage), "a", encoding="utf-8") as log:
        log.write(f"=== attempt {attempt} exited with code {rc}\n")
    else:
      return Outcome(point.name, "failed", attempts, reruns, seconds, stage.name,
                     _tail(point.log(stage)), pin.describe())
  return Outcome(point.name, "done", attempts, reruns, seconds, devices=pin.describe())
