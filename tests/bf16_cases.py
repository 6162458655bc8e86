"""Helpers shared by the bfloat16 tests (test_bf16_matmul.py, test_bf16_head.py): a float64
reference of rounded operands, the operand types of compiled dots, and a tiny model's loss and
gradients."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from gpt.model import GPTConfig

BF16 = jnp.bfloat16


def rounded64(a):
  """a rounded to bfloat16, as float64 numpy."""
  return np.asarray(jnp.asarray(a).astype(BF16).astype(jnp.float32), np.float64)


def dot_operand_types(hlo: str) -> list[tuple[str, ...]]:
  """The element types of every dot's operands in compiled HLO text."""
  types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
  dots = re.findall(r"= \w+\[[^\]]*\]\{[^}]*\} dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)
  return [(types[a], types[b]) for a, b in dots]


def train_loss_and_grads(**fields):
  from flax import nnx

  from gpt.model import init_model
  from gpt.train_step import loss_fn

  windows = jnp.asarray(np.random.default_rng(4).integers(0, 61, (2, 17)), jnp.int32)
  cfg = GPTConfig(n_vocab=61, n_ctx=16, n_embd=32, n_head=2, n_layer=2, **fields)
  model = init_model(cfg, seed=1)
  graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return jax.jit(jax.value_and_grad(
      lambda p: loss_fn(p, graphdef, windows, None, 0.0, False)))(params)
