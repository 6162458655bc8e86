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
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from gpt.errors import GPTError

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


def make_optimizer(t: Any, params: Any) -> optax.GradientTransformation:
  """The optax transformation for `config.train` over a params tree shaped like `params`."""
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
  if not t.only_train_transformer_layers:
    return opt
  return optax.multi_transform({"train": opt, "freeze": optax.set_to_zero()},
                               trainable_labels(params, True))
