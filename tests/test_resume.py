"""Resume exactness: a run killed with SIGKILL mid-training (even mid-checkpoint-write) and resumed
ends with the parameters and loss curve of an uninterrupted run."""

import signal
import subprocess
import time

import pytest

from gpt import train

from train_utils import (compile_cache, final_params, max_abs_diff, read_metrics, subprocess_env,
                         tiny_config, train_command)

pytestmark = pytest.mark.slow  # trains, and kills a training subprocess

STEPS = 20


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
  yield from compile_cache(tmp_path_factory)


def _kill_mid_write(proc: subprocess.Popen, ckpt_dir, after_step: int, timeout: float = 600) -> bool:
  """SIGKILLs `proc` once checkpoint `after_step` is complete, preferably while a later checkpoint
  is being written (a temporary folder exists); returns whether one was."""
  deadline = time.time() + timeout
  while not (ckpt_dir / str(after_step)).is_dir():
    if proc.poll() is not None or time.time() > deadline:
      raise AssertionError(f"run ended or stalled before checkpoint {after_step} (rc {proc.returncode})")
    time.sleep(0.01)
  give_up = time.time() + 2.0
  mid_write = False
  while time.time() < give_up and not mid_write:
    mid_write = any("tmp" in p.name for p in ckpt_dir.iterdir())
    if not mid_write:
      time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  return mid_write


def test_kill_9_and_resume_equals_uninterrupted_run(tmp_path):
  overrides = dict(steps=STEPS, log_every=1, save_every=1, keep=3)
  # The uninterrupted run.
  config = tiny_config(tmp_path, **overrides)
  train.run(config, str(tmp_path / "straight"))
  straight = read_metrics(tmp_path / "straight")
  assert sorted(straight) == list(range(1, STEPS + 1))

  # The interrupted run: SIGKILL after checkpoint 10, then the same command again.
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(train_command(tmp_path, workdir, train=overrides), env=subprocess_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    mid_write = _kill_mid_write(proc, workdir / "checkpoints", after_step=10)
  finally:
    proc.kill()
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(read_metrics(workdir))
  assert 10 <= killed_at < STEPS
  train.run(config, str(workdir))

  resumed = read_metrics(workdir)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  for step, losses in resumed.items():  # steps logged twice (before and after the kill) agree
    for loss in losses:
      assert abs(loss - straight[step][0]) < 1e-6, (step, loss, straight[step][0])
  assert max_abs_diff(final_params(workdir, config.model),
                      final_params(tmp_path / "straight", config.model)) < 1e-6
  print(f"killed after step {killed_at}, mid-checkpoint-write: {mid_write}")
