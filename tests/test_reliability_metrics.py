"""metrics.jsonl and TensorBoard after a resume read like an uninterrupted run's: the rows the
killed run logged past its last checkpoint are dropped (TensorBoard: purged), not duplicated."""

import json
import signal
import subprocess
import time

import pytest

from gpt import train
from gpt.train_log import TrainLog, drop_rows_after

from train_utils import compile_cache, read_metrics, subprocess_env, tiny_config, train_command
from experiments.tb_events import read_scalars


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
  yield from compile_cache(tmp_path_factory)


def test_drop_rows_after_keeps_earlier_rows_and_drops_a_cut_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "split": split, "loss": 1.0} for s in (1, 2, 3, 4) for split in ("train", "val")]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "spl')
  assert drop_rows_after(path, 2) == 5
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 1, 2, 2]
  assert drop_rows_after(path, 2) == 0
  assert drop_rows_after(tmp_path / "absent.jsonl", 2) == 0


def test_tensorboard_holds_each_step_once_scalars_returns(tmp_path):
  """Events are written in the caller's thread: when `scalars` returns, the event file holds the
  step as metrics.jsonl does (a kill -9 then loses it from neither), before any close."""
  log = TrainLog(tmp_path, start_step=0)
  try:
    for step in range(1, 21):
      log.scalars(step, {"loss": 1.0 / step}, "train")
      assert max(read_metrics(tmp_path)) == step
      assert read_scalars(tmp_path / "tensorboard")["train/loss"][-1] == (step, pytest.approx(1.0 / step))
  finally:
    log.close()


def test_tensorboard_of_a_resumed_log_drops_the_steps_after_its_start(tmp_path):
  """A TrainLog started at step 2 over a workdir that logged 1..5: TensorBoard shows 1, 2 and then
  only what the new log writes, as metrics.jsonl does."""
  first = TrainLog(tmp_path, start_step=0)
  for step in range(1, 6):
    first.scalars(step, {"loss": float(step)}, "train")
  first.close()
  time.sleep(1.1)  # event file names carry the creation time in seconds: the resumed one sorts later
  resumed = TrainLog(tmp_path, start_step=2)
  try:
    assert [s for s, _ in read_scalars(tmp_path / "tensorboard")["train/loss"]] == [1, 2]
    resumed.scalars(3, {"loss": 30.0}, "train")
    assert read_scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert sorted(read_metrics(tmp_path)) == [1, 2, 3]
  finally:
    resumed.close()


@pytest.mark.slow
def test_resumed_run_logs_each_step_once(tmp_path):
  """Killed at step >= 7 with the last checkpoint at 4, then resumed to 5 steps only: steps 6 and
  up must be gone from metrics.jsonl and from what TensorBoard shows, and 5 logged once."""
  workdir = tmp_path / "run"
  overrides = dict(steps=400, save_every=4, keep=2, log_every=1, val_every=2, val_batches=1)
  proc = subprocess.Popen(train_command(tmp_path, workdir, train=overrides), env=subprocess_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 600
    while not ((workdir / "metrics.jsonl").exists() and max(read_metrics(workdir), default=0) >= 7):
      assert proc.poll() is None and time.time() < deadline
      time.sleep(0.01)
    ckpts = workdir / "checkpoints"
    while any("tmp" in p.name for p in ckpts.iterdir()):  # not mid-save: the checkpoint is known
      time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    proc.kill()
  last_ckpt = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  logged = max(read_metrics(workdir))
  assert logged > last_ckpt + 1, (logged, last_ckpt)
  tb_before = read_scalars(workdir / "tensorboard")["train/loss"]
  assert max(s for s, _ in tb_before) == logged

  config = tiny_config(tmp_path, **dict(overrides, steps=last_ckpt + 1))
  train.run(config, str(workdir))
  for split in ("train", "val"):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["split"] == split]
    assert steps == sorted(set(steps)), (split, steps)  # each once, in order
  assert sorted(read_metrics(workdir)) == list(range(1, last_ckpt + 2))
  assert max(read_metrics(workdir, "val")) <= last_ckpt + 1
  tb = read_scalars(workdir / "tensorboard")
  assert [s for s, _ in tb["train/loss"]] == list(range(1, last_ckpt + 2))
  assert max(s for s, _ in tb["val/loss"]) <= last_ckpt + 1
