"""The optimizer from `config.train`: adam / adamw / sgd, a schedule, clipping and freezing.

Parameters are the pure nested dict of the model (`nnx.to_pure_dict(nnx.state(model))`): the
blocks live under `h` (stacked over layers), the rest are `wte`, `wpe` and `ln_f`.

Weight decay (adamw) applies only to the matmul weights `w` of the blocks, never to biases,
LayerNorm gains/biases or the embeddings, as in GPT-2 / nanoGPT practice. With
`only_train_transformer_layers` (nshepperd's flag) everything outside `h` is frozen: its updates
are zero and it is left out of gradient clipping, as nshepperd's train.py left those variables
out of the optimizer altogether.

A LoRA run (gpt.lora) hands this module only the adapters: the frozen base is not part of the
optimized tree at all, so it has no optimizer state.

Gradient accumulation is done by the train step (micro-batches inside one jitted step), not here,
so that one optimizer step is one `config.train.steps` step.

Adam and AdamW can run as one pass per parameter array (gpt.kernels.adam, `train.adam_impl`): given
the mesh's devices, `make_optimizer` then returns a `FusedOptimizer`, whose `init` and `update` are
optax's own (the same state tree, so checkpoints move between the two both ways) and whose `apply`
is the step's whole update, (grads, state, params) -> (params, state), with the same numbers.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gpt.errors import GPTError
from gpt.kernels import adam as kadam

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(t: Any) -> optax.Schedule:
  """constant (after an optional linear warmup) or linear warmup then cosine decay to
  `min_lr_ratio * learning_rate` at `steps`."""
  lr, warmup, steps = float(t.learning_rate), int(t.warmup_steps), int(t.steps)
  if t.schedule == "constant":
    if warmup <= 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.constant_schedule(lr)], [warmup])
  if t.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=lr * float(t.min_lr_ratio))
  raise GPTError(f"train.schedule={t.schedule!r}; choose one of {', '.join(SCHEDULES)}")


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params: Any) -> Any:
  """True for the weights that get weight decay: the blocks' matmul weights `h/.../w` only, and
  the LoRA adapter matrices `lora_a`/`lora_b` (as PEFT with transformers' Trainer decays them)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _path_names(path)[0] == "h" and _path_names(path)[-1] in ("w", "lora_a", "lora_b"),
      params)


def held_names(t: Any, params: Any) -> tuple[str, ...]:
  """The top-level parameters `config.train` holds fixed (`only_train_transformer_layers`: all but
  `h`). The train step does not differentiate them, so their gradient matmuls (the tied head's
  d(wte) among them) are never computed; their optimizer updates are zero either way."""
  if not t.only_train_transformer_layers:
    return ()
  return tuple(k for k in params if k != "h")


def trainable_labels(params: Any, only_transformer_layers: bool) -> Any:
  """'train' / 'freeze' per parameter: with `only_transformer_layers`, only `h/...` trains."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "train" if (not only_transformer_layers or _path_names(path)[0] == "h")
      else "freeze", params)


# True: clipping scales the gradients by one scalar (`clip_by_global_norm`); False: optax's own
# clip_by_global_norm (kept for same-run comparisons, bench_train's `-optaxclip`).
SCALAR_CLIP = True


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm's transformation (the same empty state, the same trigger), with the
  clipped gradient written as g * (max_norm / norm) rather than optax's (g / norm) * max_norm.

  Why: XLA does not duplicate an elementwise divide into several consumers, so optax's form is
  one more full pass that writes a clipped copy of every gradient, which Adam's first- and
  second-moment updates then read beside the gradient itself (the chapter step's profile: a
  [50257, 768] `broadcast_divide_fusion` per parameter, 15 passes over parameter-sized arrays
  where 11 do). A scalar multiply is fused into each consumer. The values differ from optax's by
  float32 rounding (at most a few ulps of the clipped gradient) and only when clipping triggers;
  below `max_norm` the gradients pass through unchanged, as optax's."""

  def update_fn(updates, state, params=None):
    del params
    g_norm = optax.global_norm(updates)
    scale = jnp.where(g_norm < max_norm, 1.0, max_norm / g_norm)  # g * 1.0 is g, bit for bit
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


class FusedOptimizer(NamedTuple):
  """optax's transformation (`init`, `update`) plus `apply(grads, state, params) -> (params,
  state)`: the update and its application in one, by gpt.kernels.adam. gpt.train_step calls
  `apply` where a transformation has one."""

  init: Callable
  update: Callable
  apply: Callable


def make_optimizer(t: Any, params: Any, devices: Any = None) -> optax.GradientTransformation:
  """The optax transformation for `config.train` over a params tree shaped like `params`. Given
  the `devices` the step runs on, Adam/AdamW come as a `FusedOptimizer` where `train.adam_impl`
  resolves to the kernel there (gpt.kernels.adam.resolve); without, optax's update is kept."""
  schedule = learning_rate_schedule(t)
  if t.optimizer == "adam":
    opt = optax.adam(schedule, b1=t.b1, b2=t.b2, eps=t.eps)
  elif t.optimizer == "adamw":
    opt = optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                      mask=decay_mask)
  elif t.optimizer == "sgd":
    opt = optax.sgd(schedule, momentum=t.momentum or None)
  else:
    raise GPTError(f"train.optimizer={t.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
  if t.grad_clip < 0:
    raise GPTError(f"train.grad_clip={t.grad_clip} must be >= 0 (0 turns clipping off)")
  if t.grad_clip > 0:
    clip = clip_by_global_norm if SCALAR_CLIP else optax.clip_by_global_norm
    opt = optax.chain(clip(t.grad_clip), opt)
  if t.only_train_transformer_layers:
    opt = optax.multi_transform({"train": opt, "freeze": optax.set_to_zero()},
                                trainable_labels(params, True))
  choice = t.get("adam_impl", "auto")
  if t.optimizer == "sgd" and choice == "kernel":
    raise GPTError("train.adam_impl=kernel is for optimizer adam or adamw; use auto or optax")
  # The kernel clips by one scale (clip_by_global_norm); bench_train's -optaxclip keeps optax's.
  if devices is None or t.optimizer == "sgd" or not SCALAR_CLIP:
    return opt
  if kadam.resolve(choice, devices) == "optax":
    return opt
  return FusedOptimizer(opt.init, opt.update, fused_adam_apply(t, params, schedule))


def _is_state(x) -> bool:
  return isinstance(x, (optax.ScaleByAdamState, optax.ScaleByScheduleState))


def _states(state: Any) -> tuple[Any, Any]:
  """The one ScaleByAdamState and the one ScaleByScheduleState (the learning rate's count) of an
  adam/adamw state tree as make_optimizer builds it (inside clipping and freezing wrappers)."""
  found = [s for s in jax.tree.leaves(state, is_leaf=_is_state) if _is_state(s)]
  adam = [s for s in found if isinstance(s, optax.ScaleByAdamState)]
  sched = [s for s in found if isinstance(s, optax.ScaleByScheduleState)]
  if len(adam) != 1 or len(sched) != 1:
    raise GPTError(f"the fused Adam update found {len(adam)} Adam and {len(sched)} schedule states "
                   "(expected one each); use train.adam_impl=optax")
  return adam[0], sched[0]


def _reference_leaf(p, g, m, v, scale, bc1, bc2, lr_neg, *, b1, b2, eps, weight_decay):
  """The kernel's update in jnp, for leaves it does not take (not float32): optax's operations."""
  g = g * scale.astype(g.dtype)
  m = (1 - b1) * g + b1 * m
  v = (1 - b2) * (g * g) + b2 * v
  u = (m / bc1.astype(m.dtype)) / (jnp.sqrt(v / bc2.astype(v.dtype)) + eps)
  if weight_decay:
    u = u + weight_decay * p
  u = jnp.array(lr_neg, dtype=u.dtype) * u
  return jnp.asarray(p + u).astype(p.dtype), m.astype(p.dtype), v.astype(p.dtype)


def fused_adam_apply(t: Any, params: Any, schedule: optax.Schedule) -> Callable:
  """`FusedOptimizer.apply` for adam/adamw per `t`: clipping by one scale over the trained leaves'
  global norm, then gpt.kernels.adam.update on each trained float32 leaf (frozen leaves, optax's
  MaskedNode in the moments, are returned as they are). The new state is the old one with its
  Adam moments and counts replaced, the tree optax's update returns."""
  b1, b2, eps = float(t.b1), float(t.b2), float(t.eps)
  wd = float(t.weight_decay) if t.optimizer == "adamw" else 0.0
  max_norm = float(t.grad_clip)
  decays = decay_mask(params)

  def apply(grads, state, params):
    adam, sched = _states(state)
    masked = lambda x: isinstance(x, optax.MaskedNode)
    trained = [g for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(adam.mu, is_leaf=masked))
               if not masked(m)]
    scale = jnp.ones((), jnp.float32)
    if max_norm > 0:  # clip_by_global_norm's scale, over the trained leaves as optax's chain has it
      g_norm = optax.global_norm(trained)
      scale = jnp.where(g_norm < max_norm, 1.0, max_norm / g_norm)
    count = optax.safe_increment(adam.count)
    bc1, bc2 = 1 - b1 ** count, 1 - b2 ** count  # optax.tree.bias_correction's
    lr_neg = -1 * schedule(sched.count)  # scale_by_learning_rate's -learning_rate(count)
    # XLA divides by a bias correction as a multiply by its reciprocal: the kernel takes those.
    scalars = jnp.stack([jnp.asarray(x, jnp.float32) for x in (scale, 1 / bc1, 1 / bc2, lr_neg)])

    def leaf(m, v, p, g, decay):
      if masked(m):
        return p, m, v
      w = wd if decay else 0.0
      if p.dtype == g.dtype == m.dtype == v.dtype == jnp.float32 and kadam.available():
        return kadam.update(p, g, m, v, scalars, b1=b1, b2=b2, eps=eps, weight_decay=w)
      return _reference_leaf(p, g, m, v, scale, bc1, bc2, lr_neg, b1=b1, b2=b2, eps=eps,
                             weight_decay=w)

    out = jax.tree.map(leaf, adam.mu, adam.nu, params, grads, decays, is_leaf=masked)
    pick = lambda i: jax.tree.map(lambda o: o[i], out, is_leaf=lambda o: isinstance(o, tuple))
    new_adam = optax.ScaleByAdamState(count=count, mu=pick(1), nu=pick(2))
    new_sched = optax.ScaleByScheduleState(count=optax.safe_increment(sched.count))
    new_state = jax.tree.map(
        lambda s: new_adam if isinstance(s, optax.ScaleByAdamState)
        else new_sched if isinstance(s, optax.ScaleByScheduleState) else s, state, is_leaf=_is_state)
    return pick(0), new_state

  return apply
