"""Bad values and damaged files in train mode: one line saying what is wrong, up front."""

import json
import logging

import pytest

from gpt import train
from gpt.errors import GPTError

from train_utils import compile_cache, read_metrics, tiny_config


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
  yield from compile_cache(tmp_path_factory)


@pytest.mark.parametrize("name,value", [("seq_len", 0), ("seq_len", -4), ("batch_size", 0)])
def test_nonpositive_sizes_are_refused_before_training(tmp_path, name, value):
  with pytest.raises(GPTError, match=rf"^train\.{name}={value} must be >= 1$"):
    train.run(tiny_config(tmp_path, **{name: value}), str(tmp_path / "run"))
  assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not "training diverged" later


@pytest.mark.slow
def test_truncated_config_json_is_recovered_from_the_checkpoint(tmp_path, caplog):
  workdir = tmp_path / "run"
  config = tiny_config(tmp_path, steps=2, save_every=2)
  train.run(config, str(workdir))
  text = (workdir / "config.json").read_text()
  (workdir / "config.json").write_text(text[:len(text) // 3])  # cut short, as by a full disk
  config.train.steps = 3
  with caplog.at_level(logging.WARNING):
    train.run(config, str(workdir))
  warning = [r.getMessage() for r in caplog.records if "config.json is damaged" in r.getMessage()]
  assert len(warning) == 1 and "taken from checkpoint step 2" in warning[0]
  assert json.loads((workdir / "config.json").read_text())["model"]["n_layer"] == 2  # rewritten
  assert sorted(read_metrics(workdir)) == [1, 2, 3]

  # Starting another run from this workdir's checkpoints (restore_from) reads config.json too:
  # damaged, it is one line saying what to do.
  (workdir / "config.json").write_text("{")
  other = tiny_config(tmp_path, steps=4, restore_from=str(workdir / "checkpoints"))
  with pytest.raises(GPTError, match=r"config\.json is damaged .*restore it, or delete it"):
    train.run(other, str(tmp_path / "other"))
