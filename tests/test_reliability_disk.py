"""A full disk while saving, for real: the workdir lives on a 4 MB tmpfs (mounted for the test;
skipped where mounting is not allowed), which holds two checkpoints of the tiny model but not a
third. The failed save stops the run with one line (space needed, where), no traceback; the
earlier checkpoints stay intact and a run resumes from them."""

import shutil
import subprocess
import sys
import uuid

import pytest

from gpt import train
from gpt.checkpoint import Checkpointer, SaveFailed, checkpoint_dir, verify_folder

from train_utils import compile_cache, final_params, read_metrics, subprocess_env, tiny_config

SIZE = "4m"  # a tiny-model checkpoint is about 1.7 MB


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
  yield from compile_cache(tmp_path_factory)


@pytest.fixture
def small_disk(tmp_path):
  """A 4 MB tmpfs at tmp_path/disk, unmounted afterwards."""
  mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
  mount.mkdir()
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
  if result.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}): "
                f"needs root or CAP_SYS_ADMIN")
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _assert_earlier_checkpoints_intact(workdir, steps):
  ckpt_dir = checkpoint_dir(workdir)
  assert sorted(p.name for p in ckpt_dir.iterdir()) == [str(s) for s in steps]  # no partial left
  for s in steps:
    assert verify_folder(ckpt_dir / str(s)) is None


@pytest.mark.slow
def test_full_disk_stops_the_run_with_one_line(tmp_path, small_disk, repo_dir):
  tokens = tmp_path / "tokens.bin"
  tiny_config(tmp_path)  # writes the token file
  workdir = small_disk / "run"
  result = subprocess.run(
      [sys.executable, "-m", "gpt.main", "--config=configs/tiny.py", f"--workdir={workdir}",
       "--config.model.n_vocab=512", "--config.model.n_embd=64", "--config.model.n_layer=2",
       "--config.model.n_ctx=64", "--config.train.seq_len=32", f"--config.data.path={tokens}",
       f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.train.steps=20",
       "--config.train.save_every=2", "--config.train.keep=10", "--config.train.val_every=0",
       "--config.train.sample_every=0", "--config.train.peak_flops=1e12",
       "--config.train.log_every=1"],
      cwd=repo_dir, env=subprocess_env(JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: saving checkpoint step 6 failed, so training stopped: the disk "
                         "is full: the checkpoint needs about 1.6 MB and "), last
  assert f"are free in {workdir / 'checkpoints'}" in last
  assert last.endswith("then run the same command to resume (checkpoint step 4 is intact)")
  assert max(read_metrics(workdir)) == 6  # nothing trained past the failed save
  _assert_earlier_checkpoints_intact(workdir, [2, 4])


@pytest.mark.slow
def test_disk_filling_up_mid_write(tmp_path, small_disk, monkeypatch, capfd):
  """The space check before saving is skipped, so the disk fills while orbax writes in the
  background: the failure still stops the run within a step, as one SaveFailed."""
  monkeypatch.setattr(Checkpointer, "check_space", lambda self, size: None)
  config = tiny_config(tmp_path, steps=20, save_every=2, keep=10)
  workdir = small_disk / "run"
  with pytest.raises(SaveFailed, match=r"saving checkpoint step 6 failed, so training stopped: the "
                                       r"disk is full: the checkpoint needs about 1\.6 MB"):
    train.run(config, str(workdir))
  assert "Traceback" not in capfd.readouterr().err
  assert max(read_metrics(workdir)) <= 8  # stopped at once, not steps later
  _assert_earlier_checkpoints_intact(workdir, [2, 4])

  # Space freed (here: the workdir moved to a roomier disk): the same command resumes from 4.
  moved = tmp_path / "moved"
  shutil.copytree(workdir, moved)
  monkeypatch.undo()
  config.train.steps = 8
  train.run(config, str(moved))
  assert sorted(read_metrics(moved)) == list(range(1, 9))
  straight = tiny_config(tmp_path, steps=8, save_every=2, keep=10)
  train.run(straight, str(tmp_path / "straight"))
  import jax
  import numpy as np
  assert all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(final_params(moved, config.model)),
      jax.tree.leaves(final_params(tmp_path / "straight", config.model))))


def test_closed_loop_callback_tracebacks_are_dropped_and_others_kept(capsys):
  """When one write of a save fails, orbax closes its event loop and tensorstore reports each
  later write's callback through sys.excepthook / sys.unraisablehook: those (only) are dropped."""
  import asyncio
  import types

  from gpt.checkpoint import quiet_failed_write_callbacks

  old = sys.excepthook, sys.unraisablehook
  try:
    shown = []
    sys.excepthook = lambda *a: shown.append(a[1])
    sys.unraisablehook = lambda u: shown.append(u.exc_value)
    quiet_failed_write_callbacks()
    loop = asyncio.new_event_loop()
    loop.close()
    try:
      loop.call_soon_threadsafe(print)
    except RuntimeError as e:
      noise = e
    callback_tb = noise.__traceback__.tb_next  # as from C: call_soon_threadsafe is outermost
    sys.excepthook(RuntimeError, noise, callback_tb)
    sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=noise,
                                             exc_traceback=callback_tb, err_msg=None, object=None))
    assert shown == []
    sys.excepthook(RuntimeError, noise, noise.__traceback__)  # raised by Python code: kept
    other = ValueError("x")
    sys.excepthook(ValueError, other, None)
    assert shown == [noise, other]
  finally:
    sys.excepthook, sys.unraisablehook = old
