"""A small GPT trained quickly with plain Adam on random windows of a token array, and its
perplexity on windows: for experiments and tests that need a model which has learned something.

Why here and not gpt.train: gpt.train is the product (config, data files, workdir, checkpoints,
sharding, resume); comparing two forms of the same weights (float32 vs int8, experiments/
quantize_quality.py and tests/test_quantize.py) only needs weights that are far from random,
from an array already in memory, in a minute. One loop, so that the experiment and its test
train the same way.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gpt.model import GPTConfig, init_model


def train_on_windows(tokens: np.ndarray, cfg: GPTConfig, steps: int, batch: int, *,
                     learning_rate: Any = 3e-3, seed: int = 0, log_every: int = 0):
  """A GPT of `cfg` trained for `steps` Adam steps of `batch` random windows of `cfg.n_ctx` + 1
  tokens of `tokens` (next-token cross-entropy). `learning_rate` is a float or an optax schedule;
  with `log_every` > 0 the loss goes to stderr every that many steps and at the last."""
  model = init_model(cfg, seed=seed)
  graphdef, params = nnx.split(model)
  tx = optax.adam(learning_rate)
  opt = tx.init(params)
  T = cfg.n_ctx

  def loss(p, w):
    logits = nnx.merge(graphdef, p)(w[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:]).mean()

  @jax.jit
  def step(p, o, w):
    value, grads = jax.value_and_grad(loss)(p, w)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, value

  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  for i in range(steps):
    rows = rng.integers(0, len(tokens) - T - 1, batch)
    params, opt, value = step(params, opt, jnp.asarray(np.stack([tokens[r:r + T + 1] for r in rows])))
    if log_every and (i % log_every == 0 or i == steps - 1):
      print(f"train step {i}: loss {float(value):.3f} ({time.perf_counter() - start:.0f}s)",
            file=sys.stderr, flush=True)
  return nnx.merge(graphdef, params)


def perplexity(model, windows: np.ndarray, batch: int = 8) -> float:
  """exp(mean next-token NLL) over `windows` [N, T + 1], in batches of `batch` windows (the last
  N mod `batch` windows are left out)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def nll(s, w):
    logits = nnx.merge(graphdef, s)(w[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:]).sum()

  total = sum(float(nll(state, jnp.asarray(windows[i:i + batch])))
              for i in range(0, len(windows) - batch + 1, batch))
  count = (len(windows) // batch) * batch * (windows.shape[1] - 1)
  return float(np.exp(total / count))
