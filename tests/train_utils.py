"""Helpers for the training tests: a tiny model config and a learnable synthetic token file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gpt import encode
from gpt.config import base_config

VOCAB = 512  # divisible by 2 and 4, so tensor-parallel meshes really split the vocabulary


def write_token_file(path: Path, n: int = 20_000, seed: int = 0) -> Path:
  """A .bin of a noisy deterministic chain (next = 5 * prev + 3 mod VOCAB, 10% random): a model
  can learn it quickly, so the loss falls within a few dozen steps."""
  rng = np.random.default_rng(seed)
  tokens = np.empty(n, np.uint16)
  tokens[0] = 1
  noise = rng.random(n) < 0.1
  random = rng.integers(0, VOCAB, n)
  for i in range(1, n):
    tokens[i] = random[i] if noise[i] else (5 * int(tokens[i - 1]) + 3) % VOCAB
  encode.write_tokens([encode.Piece(tokens)], path, eot_id=50256)
  return path


def tiny_config(tmp_path: Path, steps: int = 5, **train):
  """The base config shrunk to a 2-layer, 64-wide model on the synthetic tokens."""
  c = base_config()
  c.init = "scratch"
  c.model.update(n_vocab=VOCAB, n_ctx=64, n_embd=64, n_head=4, n_layer=2)
  tokens = tmp_path / "tokens.bin"
  if not tokens.exists():
    write_token_file(tokens)
  c.data.path = str(tokens)
  c.data.val_fraction = 0.1
  c.data.cache_dir = str(tmp_path / "cache")
  c.train.update(steps=steps, batch_size=8, seq_len=32, optimizer="adamw", learning_rate=1e-3,
                 weight_decay=0.1, grad_clip=1.0, log_every=1, val_every=0, sample_every=0,
                 save_every=0, keep=2, peak_flops=1e12)
  c.train.update(**train)
  return c


def read_metrics(workdir: Path, split: str = "train") -> dict[int, list[float]]:
  """step -> every loss logged for it in metrics.jsonl (a resumed run may log a step twice)."""
  out: dict[int, list[float]] = {}
  for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if record["split"] == split:
      out.setdefault(record["step"], []).append(record["loss"])
  return out


def final_params(workdir: Path, cfg_model) -> dict:
  """The parameters of the latest checkpoint in `workdir`, as numpy."""
  import jax

  from gpt.checkpoint import load_params
  from gpt.model import GPTConfig

  return jax.device_get(load_params(workdir, GPTConfig.from_config(cfg_model)))


def max_abs_diff(a, b) -> float:
  import jax

  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def compile_cache(tmp_path_factory):
  """Module fixture body: a persistent XLA compilation cache shared by this test session and
  its subprocesses, so runs that compile the same step (same model, mesh and shapes) compile
  once. Restores jax's settings afterwards. When the session already has one (conftest's
  COMPILE_CACHE, the default), that one is used."""
  import os

  import jax

  from conftest import COMPILE_CACHE

  if COMPILE_CACHE:
    yield COMPILE_CACHE
    return
  path = str(tmp_path_factory.getbasetemp() / "jax_compile_cache")
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  for n, v in zip(names, (path, 0, 0)):
    jax.config.update(n, v)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path  # inherited by subprocesses
  yield path
  os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
  for n, v in old.items():
    jax.config.update(n, v)


def subprocess_env(**extra) -> dict:
  """Environment for a training subprocess: this one's (8 fake devices, compile cache) plus
  the repository and tests folders on the path."""
  import os

  env = dict(os.environ)
  tests = str(Path(__file__).resolve().parent)
  env["PYTHONPATH"] = os.pathsep.join([tests, str(Path(tests).parent), env.get("PYTHONPATH", "")])
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  env.update(extra)
  return env


TRAIN_SCRIPT = """
import sys, json
from pathlib import Path
from train_utils import tiny_config
from gpt import train
tmp, workdir, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
config = tiny_config(Path(tmp), **overrides.pop("train", {}))
for section, values in overrides.items():
  config[section].update(values)
train.run(config, workdir)
import jax
print(f"processes {jax.process_count()} devices {jax.device_count()}", flush=True)
"""


def train_command(tmp: Path, workdir: Path, **overrides) -> list[str]:
  """argv running `tiny_config(tmp)` with `overrides` ({'train': {...}, 'mesh': {...}})."""
  import sys

  return [sys.executable, "-c", TRAIN_SCRIPT, str(tmp), str(workdir), json.dumps(overrides)]
