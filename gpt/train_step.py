"""The pure training and evaluation steps, jitted over a mesh with the train state donated.

`train_step(state, batch)` takes token windows [B, T+1] (inputs are the first T tokens, targets the
last T) and returns the next state and a few scalars. Gradient accumulation splits the global batch
into `grad_accum` micro-batches inside the step (a lax.scan), so memory holds one micro-batch of
activations and the result equals one big batch (the mean of equal-sized micro-batch means).
Micro-batch m takes rows m, m + accum, m + 2*accum, ...: every device keeps a share of every
micro-batch, so no device idles while another works.

Frozen weights (the base model of a LoRA run, gpt.lora) are not part of the state: they come in as
a separate argument `frozen`, merged with `state.params` inside the loss, so only the trainable
leaves get gradients and optimizer state, and the frozen ones are neither donated nor copied.
Full fine-tuning passes `frozen={}`.

Randomness (dropout, input noise) comes from `fold_in(fold_in(state.rng, step), micro_batch)`: a
pure function of the seed and the step, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gpt import heads
from gpt.lora import combine
from gpt.model import GPTConfig
from gpt.optim import FusedOptimizer


class TrainState(flax.struct.PyTreeNode):
  """Everything a training run carries from step to step (and checkpoints)."""

  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any  # pure nested dict of the trainable float arrays (all of the model, or its adapters)
  opt_state: Any  # optax state over `params`
  rng: jax.Array  # uint32[2]: raw key data of the run's base PRNG key


def create_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """Step 0 for `params`: a fresh optimizer state and the run's base key."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)))


def add_noise(tokens: jax.Array, rate: float, n_vocab: int, rng: jax.Array) -> jax.Array:
  """Replaces each token with a uniformly random one with probability `rate` (nshepperd's --noise)."""
  r_where, r_tok = jax.random.split(rng)
  random_tokens = jax.random.randint(r_tok, tokens.shape, 0, n_vocab, tokens.dtype)
  return jnp.where(jax.random.uniform(r_where, tokens.shape) < rate, random_tokens, tokens)


def loss_fn(params: Any, graphdef: Any, windows: jax.Array, rng: jax.Array | None,
            noise: float, dropout: bool, frozen: Any = None) -> jax.Array:
  """Mean next-token cross-entropy over windows [B, T+1]; noise only touches the inputs.
  `frozen` holds the parameters that are not trained (not differentiated), if any."""
  inputs, targets = windows[:, :-1], windows[:, 1:]
  model = nnx.merge(graphdef, combine(params, frozen))
  r_noise, r_drop = (None, None) if rng is None else jax.random.split(rng)
  if noise > 0:
    inputs = add_noise(inputs, noise, model.cfg.n_vocab, r_noise)
  hidden = model(inputs, rng=r_drop if dropout else None, logits_at=None)
  return heads.loss(model, hidden, targets)


def uses_dropout(cfg: GPTConfig) -> bool:
  return max(cfg.embd_pdrop, cfg.attn_pdrop, cfg.resid_pdrop, cfg.lora_dropout) > 0


def train_step(state: TrainState, batch: jax.Array, frozen: Any = None, *, graphdef: Any,
               tx: optax.GradientTransformation, schedule: optax.Schedule, grad_accum: int,
               noise: float, dropout: bool, micro_sharding: Any = None,
               held: tuple[str, ...] = ()) -> tuple[TrainState, dict]:
  """One optimizer step on `batch` [B, T+1] (with `frozen` parameters held fixed); returns the new
  state and {loss, grad_norm, lr}. `held` names top-level entries of `state.params` that the
  optimizer freezes (optim.held_names): they are not differentiated (their gradients are zeros
  for `tx`, which zeroes their updates anyway), and grad_norm is the trained gradients' norm, the
  one clipping uses."""
  step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  grad_fn = jax.value_and_grad(loss_fn)
  trained = {k: v for k, v in state.params.items() if k not in held} if held else state.params
  if held:  # held fixed as `frozen` is: loss_fn sees them, jax does not differentiate them
    frozen = combine({k: state.params[k] for k in held}, frozen)
  B, T1 = batch.shape
  micro = batch.reshape(B // grad_accum, grad_accum, T1).swapaxes(0, 1)
  if micro_sharding is not None and grad_accum > 1:
    micro = jax.lax.with_sharding_constraint(micro, micro_sharding)

  def accumulate(carry, xs):
    loss_sum, grad_sum = carry
    windows, i = xs
    loss, grads = grad_fn(trained, graphdef, windows, jax.random.fold_in(step_rng, i),
                          noise, dropout, frozen)
    return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

  if grad_accum == 1:  # no loop: keeps the whole step one straight-line program
    loss, grads = grad_fn(trained, graphdef, batch, jax.random.fold_in(step_rng, 0), noise,
                          dropout, frozen)
  else:
    zeros = jax.tree.map(jnp.zeros_like, trained)
    (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros),
                                    (micro, jnp.arange(grad_accum)))
    loss = loss / grad_accum
    grads = jax.tree.map(lambda g: g / grad_accum, grads)
  grad_norm = optax.global_norm(grads)  # the trained leaves', as clipping computes it: shared
  if held:  # the optimizer's tree: zeros where held (its updates there are zero whatever they are)
    grads = {**grads, **{k: jax.tree.map(jnp.zeros_like, state.params[k]) for k in held}}
    grads = {k: grads[k] for k in state.params}
  if isinstance(tx, FusedOptimizer):  # Adam's update and its application in one pass per leaf
    params, opt_state = tx.apply(grads, state.opt_state, state.params)
  else:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: jax.Array, frozen: Any = None, *, graphdef: Any) -> jax.Array:
  """Mean next-token loss of `batch` [B, T+1] (no dropout, no noise)."""
  return loss_fn(params, graphdef, batch, None, 0.0, False, frozen)


def jit_train_step(graphdef: Any, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                   grad_accum: int, noise: float, dropout: bool, state_sharding: Any,
                   batch_sharding: Any, micro_sharding: Any, scalar_sharding: Any,
                   frozen_sharding: Any = None, held: tuple[str, ...] = ()):
  """`train_step` jitted over the mesh: state in and out with its sharding, and donated. With
  `frozen_sharding` the step takes (state, batch, frozen); without, (state, batch)."""
  fn = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                         grad_accum=grad_accum, noise=noise, dropout=dropout,
                         micro_sharding=micro_sharding, held=held)
  in_shardings = (state_sharding, batch_sharding)
  if frozen_sharding is not None:
    in_shardings += (frozen_sharding,)
  return jax.jit(fn, in_shardings=in_shardings,
                 out_shardings=(state_sharding, scalar_sharding), donate_argnums=0)


def jit_eval_step(graphdef: Any, *, params_sharding: Any, batch_sharding: Any, scalar_sharding: Any,
                  frozen_sharding: Any = None):
  """`eval_step` jitted over the mesh: (params, batch) or, with `frozen_sharding`, (params, batch,
  frozen)."""
  in_shardings = (params_sharding, batch_sharding)
  if frozen_sharding is not None:
    in_shardings += (frozen_sharding,)
  return jax.jit(functools.partial(eval_step, graphdef=graphdef), in_shardings=in_shardings,
                 out_shardings=scalar_sharding)
