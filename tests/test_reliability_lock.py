"""One training run per workdir: a second process is refused with one line naming the holder;
the lock dies with its holder, so kill -9 leaves nothing stale."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from gpt import train
from gpt.workdir_lock import LOCK_NAME, WorkdirBusy, WorkdirLock

from train_utils import (compile_cache, read_metrics, subprocess_env, tiny_config,
                         train_command)

HOLD = """
import sys, time
from gpt.workdir_lock import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
  yield from compile_cache(tmp_path_factory)


def _holder(workdir) -> subprocess.Popen:
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], env=subprocess_env(),
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_second_process_is_refused_and_kill_9_leaves_nothing_stale(tmp_path):
  proc = _holder(tmp_path)
  try:
    with pytest.raises(WorkdirBusy) as e:
      WorkdirLock(tmp_path).acquire()
    message = str(e.value)
    assert f"pid {proc.pid} on host {socket.gethostname()}" in message
    assert "in use by another training run" in message and "\n" not in message
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (tmp_path / LOCK_NAME).exists()  # the file stays, but locks nothing any more
    with WorkdirLock(tmp_path) as lock:
      assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
      assert lock.fd is not None
    with WorkdirLock(tmp_path):  # released: takes it again
      pass
  finally:
    proc.kill()


@pytest.mark.slow
def test_two_trainings_in_one_workdir(tmp_path, repo_dir):
  """A training subprocess holds the workdir; a second training on it is refused before it
  writes anything; once the first is killed with SIGKILL, the same command resumes."""
  workdir = tmp_path / "run"
  overrides = dict(steps=400, save_every=5, log_every=1)
  proc = subprocess.Popen(train_command(tmp_path, workdir, train=overrides), env=subprocess_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 600
    while not ((workdir / "metrics.jsonl").exists() and read_metrics(workdir)):
      assert proc.poll() is None and time.time() < deadline, "the first run did not start"
      time.sleep(0.05)
    config_before = (workdir / "config.json").read_bytes()
    config = tiny_config(tmp_path, **dict(overrides, learning_rate=5e-4))
    with pytest.raises(WorkdirBusy, match=f"pid {proc.pid} on host {socket.gethostname()}"):
      train.run(config, str(workdir))
    assert (workdir / "config.json").read_bytes() == config_before
    result = subprocess.run([sys.executable, "-m", "gpt.main", "--config=configs/tiny.py",
                             f"--workdir={workdir}"], cwd=repo_dir,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {workdir} is in use by another training run (pid {proc.pid}")
    assert "Traceback" not in result.stderr
    assert proc.poll() is None  # the first run is untouched and still training
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  config.train.steps = max(read_metrics(workdir)) + 2
  train.run(config, str(workdir))  # no stale lock after kill -9
  assert max(read_metrics(workdir)) == config.train.steps
