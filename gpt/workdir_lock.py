"""One training run per workdir: an OS file lock on `<workdir>/train.lock`.

Two runs writing the same workdir (a command started twice, two sweep points that resolve to one
folder) would overwrite each other's checkpoints and `config.json` and interleave `metrics.jsonl`.
The first run holds an exclusive `flock` on the lock file for its whole life; a second one is
refused with one line naming the holder's pid and host, which the holder writes into the file.

The kernel drops a flock when its process dies, however it dies, so a kill -9 leaves nothing
stale to clean up: the file itself may stay behind, but it only locks while its holder lives.
flock works across processes on one machine and, on Linux, on NFS (emulated with POSIX locks);
in a multi-host run only process 0 takes it (see `gpt.train`).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from gpt.errors import GPTError

LOCK_NAME = "train.lock"


class WorkdirBusy(GPTError):
  """Another live run holds the workdir."""


def _holder(path: Path) -> str:
  """'pid 123 on host h, since 12:00:01 UTC' from the lock file (the holder writes it on start)."""
  try:
    info = json.loads(path.read_text())
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["started"]))
    return f"pid {info['pid']} on host {info['host']}, running since {since}"
  except (OSError, ValueError, KeyError, TypeError):
    return "a process that has not written its pid yet"


class WorkdirLock:
  """Holds `<workdir>/train.lock` from `acquire()` until `release()` or the process's death."""

  def __init__(self, workdir: str | Path):
    self.workdir = Path(workdir)
    self.path = self.workdir / LOCK_NAME
    self.fd: int | None = None

  def acquire(self) -> "WorkdirLock":
    """Takes the lock or raises WorkdirBusy naming the holder."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirBusy(f"{self.workdir} is in use by another training run ({_holder(self.path)}); "
                        f"wait for it to finish, stop it, or pick another --workdir") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": sys.argv}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    self.fd = fd
    return self

  def release(self) -> None:
    """Drops the lock (the file stays; it locks nothing without a live holder)."""
    if self.fd is not None:
      fd, self.fd = self.fd, None
      try:
        os.ftruncate(fd, 0)
      except OSError:
        pass
      os.close(fd)

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def hold_workdir(workdir: str | Path) -> WorkdirLock | None:
  """Locks `workdir` for this run: process 0 takes the lock, and in a multi-host run every
  process learns the outcome, so all of them stop together when the workdir is busy. Returns
  the lock (None on other processes); raises WorkdirBusy."""
  import jax
  import numpy as np

  lock, busy = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir).acquire()
    except WorkdirBusy as e:
      busy = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    held = bool(multihost_utils.broadcast_one_to_all(np.int32(busy is None)))
    if not held and busy is None:
      busy = WorkdirBusy(f"{workdir} is in use by another training run (see process 0's message)")
  if busy is not None:
    raise busy
  return lock
