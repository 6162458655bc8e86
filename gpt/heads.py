"""What the model computes at the top of its stack: the tied output head's logits, the training
loss (and its choice of output layer), the output a call asks for (`logits_at`), and the attention
probabilities of every layer.

Why a module of its own: gpt.model holds the layers and the one pass through them (embeddings,
blocks, ln_f); these are the different things a caller wants from that pass, and each has grown
options of its own (rows of the head only where a target is predicted, the fused or the logits
loss, int8 and by-row weights). They are functions of a `gpt.model.GPT` rather than methods so
the layers' module stays about the layers. They own no parameters: the head is `wte` (tied) and
`ln_f`, stored where OpenAI's checkpoint has them, so parameter paths are those of the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from gpt.kernels import gemv
from gpt.matmul import matmul
from gpt.output_loss import tied_cross_entropy

if TYPE_CHECKING:  # gpt.model calls `output` at the top of its forward pass
  from gpt.model import GPT


def output(model: GPT, x: jax.Array, logits_at: Any) -> jax.Array:
  """The output of `GPT.__call__` from the blocks' states x [B, T, D] (before ln_f): see its
  `logits_at` (None: ln_f's hidden states; "all"/"last"/index array [M]: those rows' logits)."""
  if logits_at is None:
    return model.ln_f(x)
  if isinstance(logits_at, str):
    if logits_at == "last":
      x = x[:, -1:]
    elif logits_at != "all":
      raise ValueError(f"logits_at={logits_at!r}: use 'all', 'last', None or an index array")
    return logits(model, model.ln_f(x))
  return logits(model, model.ln_f(x.reshape(-1, x.shape[-1])[logits_at]))


def logits(model: GPT, hidden: jax.Array, at: jax.Array | None = None) -> jax.Array:
  """The tied output head: float32 logits [..., V] of final hidden states [..., D] (after
  ln_f), or of just the rows `hidden.reshape(-1, D)[at]` when `at` [M] is given."""
  if at is not None:
    hidden = hidden.reshape(-1, hidden.shape[-1])[at]
  cfg = model.cfg
  wte, scale = model.wte[...], model.tied_scale()
  if wte.dtype != jnp.int8:
    wte = wte.astype(hidden.dtype)
  if cfg.weights_by_row:  # prepared for decoding: gpt.kernels.gemv where it wins
    return gemv.auto_matmul(hidden, wte, scale=scale, int8_activations=cfg.int8_activations,
                            int16_activations=cfg.int16_activations)
  return matmul(hidden, wte, "...d,vd->...v", scale=scale, impl=cfg.product_impl)


def loss(model: GPT, hidden: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy of final hidden states [B, T, D] (`logits_at=None`) at
  targets [B, T], the training loss. With `output_loss="fused"` (or "auto" where the step's
  matmuls resolved to MKL's) and a float `wte`, it is gpt.output_loss's fused head (the [B, T, V]
  logits never whole, their gradient made in the same pass); otherwise optax's cross-entropy of
  `logits`. Where wte is not differentiated (LoRA, only_train_transformer_layers) the fused head's
  d(wte) product is unused and XLA drops it from the compiled step (tests/test_train.py checks)."""
  wte, cfg = model.wte[...], model.cfg
  # "auto": fused where the step's matmuls are MKL's (its one-pass C++ loss), the whole logits
  # elsewhere (XLA's fused version measured not faster).
  fused = cfg.output_loss == "fused" or (cfg.output_loss == "auto" and cfg.matmul == "mkl")
  if fused and wte.dtype != jnp.int8 and not cfg.weights_by_row:
    return tied_cross_entropy(hidden, wte, targets, impl=cfg.matmul,
                              bf16=cfg.matmul_dtype == "bfloat16")
  return optax.softmax_cross_entropy_with_integer_labels(logits(model, hidden), targets).mean()


def attention_probs(model: GPT, tokens: jax.Array, positions: jax.Array | None = None,
                    mask: jax.Array | None = None) -> jax.Array:
  """Every layer's attention probabilities, float32 [L, B, H, T, T] (query x key), for
  inspection: gpt.attention.attention's weights from the same forward pass."""
  _, probs = model.trunk(tokens, positions, mask, None, None, return_probs=True)
  return probs
