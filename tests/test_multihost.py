"""Multi-host training for real: two processes on 127.0.0.1 (jax.distributed, gloo CPU
collectives), one CPU device each, train the tiny model together and match one process."""

import socket
import subprocess

import pytest

from gpt import train

from train_utils import (compile_cache, final_params, max_abs_diff, read_metrics, subprocess_env,
                         tiny_config, train_command)

pytestmark = pytest.mark.slow  # spawns a second training process


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
  yield from compile_cache(tmp_path_factory)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
  overrides = dict(steps=4, log_every=1, val_every=2, val_batches=2)
  # One process, two devices: the same (data=2) mesh the two hosts form together.
  config = tiny_config(tmp_path, **overrides)
  config.mesh.update(data=2)
  train.run(config, str(tmp_path / "single"))

  workdir = tmp_path / "multi"
  port = _free_port()
  env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      train_command(tmp_path, workdir, train=overrides,
                    mesh=dict(distributed=True, coordinator_address=f"127.0.0.1:{port}",
                              num_processes=2, process_id=i)),
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=600)[0])
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert all("processes 2 devices 2" in out for out in outputs)

  for split in ("train", "val"):
    single, multi = read_metrics(tmp_path / "single", split), read_metrics(workdir, split)
    assert sorted(multi) == sorted(single) and multi
    for step in single:
      assert multi[step] == pytest.approx(single[step], abs=1e-6), (split, step)
  assert max_abs_diff(final_params(workdir, config.model),
                      final_params(tmp_path / "single", config.model)) < 1e-6
