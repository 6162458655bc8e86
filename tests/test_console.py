"""A command prints what it is for: its own messages plainly, no library logs (gpt/console.py)."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpt import console

REPO = Path(__file__).resolve().parent.parent
ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")  # absl's "I1201 11:47:30.807 ..." prefix


def record(pathname, level=logging.INFO, msg="hello %s", args=("there",)):
  return logging.LogRecord("absl", level, pathname, 1, msg, args, None)


def test_own_messages_pass_plainly_and_library_logs_below_error_do_not():
  own = str(REPO / "gpt" / "train.py")
  orbax = "/usr/lib/python3/site-packages/orbax/checkpoint/checkpoint_manager.py"
  keep = console.OwnMessages()
  assert keep.filter(record(own)) and keep.filter(record(own, logging.WARNING))
  assert not keep.filter(record(orbax)) and not keep.filter(record(orbax, logging.WARNING))
  assert keep.filter(record(orbax, logging.ERROR))
  plain = console.Plain()
  assert plain.format(record(own)) == "hello there"
  assert plain.format(record(own, logging.WARNING)) == "warning: hello there"


def test_verbosity_flag_or_environment_asks_for_library_logs(monkeypatch):
  monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
  assert not console.verbose_requested(["gpt", "--config=configs/tiny.py"])
  assert console.verbose_requested(["gpt", "--verbosity=1"])
  assert console.verbose_requested(["gpt", "-v", "0"])
  monkeypatch.setenv(console.VERBOSE_ENV, "1")
  assert console.verbose_requested(["gpt"])
  monkeypatch.setenv(console.VERBOSE_ENV, "0")
  assert not console.verbose_requested(["gpt"])


def library_lines(stderr: str) -> list[str]:
  return [l for l in stderr.splitlines() if ABSL_LINE.match(l) or re.search(
      r"orbax|absl|libtpu|TPU|InitGoogle|read only|CheckpointManager", l)]


@pytest.mark.slow
def test_train_resume_sample_and_export_print_no_library_logs(tmp_path):
  """Training, resuming (orbax restore), sampling from the workdir and exporting it: stderr holds
  the commands' own lines only; with GPT_VERBOSE=1 the library logs come back."""
  sys.path.insert(0, str(REPO / "tests"))
  from train_utils import write_token_file
  write_token_file(tmp_path / "tokens.bin")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", console.VERBOSE_ENV)}
  env["PYTHONPATH"] = str(REPO)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  workdir = tmp_path / "run"
  train = [sys.executable, "-m", "gpt.main", "--config=configs/tiny.py", f"--workdir={workdir}",
           f"--config.data.path={tmp_path / 'tokens.bin'}", "--config.model.n_vocab=512",
           "--config.model.n_layer=1", "--config.model.n_embd=32", "--config.model.n_head=2",
           "--config.model.n_ctx=32", "--config.train.seq_len=16", "--config.train.batch_size=4",
           "--config.train.log_every=1", "--config.train.save_every=1", "--config.train.val_every=0",
           "--config.train.sample_every=0", "--config.train.peak_flops=1e12"]
  commands = [
      train + ["--config.train.steps=1"],
      train + ["--config.train.steps=2"],
      [sys.executable, "-m", "gpt.main", "--config=configs/tiny.py", "--config.mode=sample",
       f"--config.init={workdir}", "--config.sampling.length=3"],
      [sys.executable, "-m", "gpt.export", f"--init={workdir}", f"--out={tmp_path / 'hf'}"],
  ]
  stderr = []
  for command in commands:
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert library_lines(result.stderr) == [], result.stderr
    stderr.append(result.stderr)
  assert re.search(r"^resumed from checkpoint step 1 \(loss \d+\.\d{4}\)$", stderr[1], re.M), stderr[1]
  verbose = subprocess.run(commands[-1][:-1] + [f"--out={tmp_path / 'hf2'}"], cwd=REPO,
                           env={**env, console.VERBOSE_ENV: "1"}, capture_output=True, text=True,
                           timeout=600)
  assert verbose.returncode == 0 and library_lines(verbose.stderr), verbose.stderr
