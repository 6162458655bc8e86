"""Verifiable checkpoints: damage made on disk for real (a file truncated, a file deleted, one byte
of the parameters flipped, the metadata removed) is found by the checksums on resume; the run
falls back to the newest intact checkpoint with one warning naming the damaged step, which is
moved aside, never deleted. With no intact checkpoint left: one error line."""

import json
import logging
import shutil

import jax
import numpy as np
import pytest

from gpt import train
from gpt.checkpoint import (DAMAGED_DIR, MANIFEST, Checkpointer, NoIntactCheckpoint,
                            abstract_params, checkpoint_dir, load_params, verify_folder, write_manifest)
from gpt.model import GPTConfig

from train_utils import compile_cache, final_params, read_metrics, tiny_config


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
  yield from compile_cache(tmp_path_factory)


def _biggest_params_file(step_dir):
  return max((p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  path = _biggest_params_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)
  return "has"


def _delete(step_dir):
  (step_dir / "opt_state" / "_METADATA").unlink()  # orbax's tree metadata: a missing metadata file
  return "opt_state/_METADATA is missing"


def _flip_byte(step_dir):
  path = _biggest_params_file(step_dir)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))
  return "does not match its checksum"


def _drop_step_metadata(step_dir):
  (step_dir / "_CHECKPOINT_METADATA").unlink()
  return "_CHECKPOINT_METADATA is missing"


def test_manifest_is_written_with_every_save_and_detects_each_kind_of_damage(tmp_path):
  config = tiny_config(tmp_path, steps=4, save_every=2, keep=3)
  train.run(config, str(tmp_path / "run"))
  ckpt_dir = checkpoint_dir(tmp_path / "run")
  assert sorted(int(p.name) for p in ckpt_dir.iterdir()) == [2, 4]
  for damage in (_truncate, _delete, _flip_byte, _drop_step_metadata):
    copy = tmp_path / damage.__name__
    shutil.copytree(ckpt_dir / "4", copy)
    assert (copy / MANIFEST).is_file() and verify_folder(copy) is None
    expected = damage(copy)
    problem = verify_folder(copy)
    assert problem is not None and expected in problem, (damage.__name__, problem)
  # A checkpoint without a manifest (written before manifests existed) is not called damaged.
  legacy = tmp_path / "legacy"
  shutil.copytree(ckpt_dir / "2", legacy)
  (legacy / MANIFEST).unlink()
  assert verify_folder(legacy) is None
  write_manifest(legacy)
  assert verify_folder(legacy) is None


@pytest.mark.slow
def test_resume_falls_back_past_damaged_checkpoints(tmp_path, caplog):
  steps = 6
  straight = tiny_config(tmp_path, steps=steps, save_every=2, keep=3)
  train.run(straight, str(tmp_path / "straight"))
  want = final_params(tmp_path / "straight", straight.model)

  workdir = tmp_path / "run"
  config = tiny_config(tmp_path, steps=steps, save_every=2, keep=3)
  train.run(config, str(workdir))
  ckpt_dir = checkpoint_dir(workdir)
  for n, damage in enumerate((_flip_byte, _truncate, _delete), start=1):
    expected = damage(ckpt_dir / "6")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      train.run(config, str(workdir))  # resumes from step 4 and trains steps 5 and 6 again
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("checkpoint step 6 is damaged")
    assert expected in warnings[0]
    assert sorted(int(p.name.split(".")[0]) for p in (workdir / DAMAGED_DIR).iterdir()) == [6] * n
    assert sorted(int(p.name) for p in ckpt_dir.iterdir()) == [2, 4, 6]
    assert sorted(read_metrics(workdir)) == list(range(1, steps + 1))
    assert all(len(v) == 1 for v in read_metrics(workdir).values())
    got = final_params(workdir, config.model)  # the replayed steps give the very same weights
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))

  # Readers (sample/eval/init from a workdir) skip a damaged latest with a warning, moving nothing.
  _flip_byte(ckpt_dir / "6")
  cfg = GPTConfig.from_config(config.model)
  older = Checkpointer(ckpt_dir, read_only=True)
  step4 = jax.device_get(older.restore_params(abstract_params(cfg), 4))
  older.close()
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    got = jax.device_get(load_params(workdir, cfg))
  assert any("checkpoint step 6" in r.getMessage() and "damaged" in r.getMessage()
             for r in caplog.records)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(step4)))
  assert (ckpt_dir / "6").is_dir()

  # Nothing intact: one error line, and everything is kept aside for inspection.
  for step in (2, 4):
    _truncate(ckpt_dir / str(step))
  with pytest.raises(NoIntactCheckpoint, match=r"no intact checkpoint in .*checkpoints: every one is "
                                                r"damaged \(6 .*4 .*2 "):
    train.run(config, str(workdir))
  assert not list(ckpt_dir.iterdir())
  assert len(list((workdir / DAMAGED_DIR).iterdir())) == 3 + 3
  assert json.loads((workdir / "config.json").read_text())["model"]["n_layer"] == 2
