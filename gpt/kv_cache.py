"""The decoding cache and the one builder of position ids and attention masks.

Why apart from gpt.model: these say what the layers attend over (which slots hold real tokens,
which keys each query may see, where each row's positions continue), for every path: training and
scoring without a cache, prefill and decoding with one. The model's layers consume them; the
sampler and gpt.decoding create and carry the cache without needing the layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # the config is only read (sizes and dtype)
  from gpt.model import GPTConfig


class KVCache(NamedTuple):
  """The decoding cache (one type for every path), fixed size.

  k, v: per-layer tuples of [B * H, S, K] keys and values (batch and heads share one axis: XLA
  then updates the cache in place and feeds it to the attention matmul without copies). `mask`
  [B, S] marks the slots that hold real tokens (left padding stays False). `index` is the next
  slot to write (shared by all rows); `pos` [B] is each row's next position id.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  mask: jax.Array
  index: jax.Array
  pos: jax.Array

  @classmethod
  def init(cls, cfg: GPTConfig, batch: int, length: int | None = None, dtype=None) -> "KVCache":
    """An empty cache of `length` slots per row (default n_ctx) in the compute dtype."""
    length = cfg.n_ctx if length is None else length
    shape = (batch * cfg.n_head, length, cfg.head_dim)
    dtype = cfg.compute_dtype if dtype is None else dtype
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layer))
    return cls(k=zeros(), v=zeros(), mask=jnp.zeros((batch, length), bool),
               index=jnp.zeros((), jnp.int32), pos=jnp.zeros((batch,), jnp.int32))


def attention_inputs(tokens: jax.Array, token_mask: jax.Array | None = None,
                     cache: KVCache | None = None):
  """The one builder of position ids and attention masks: (positions [B, T], mask, cache).

  `token_mask` [B, T] marks real tokens when rows are left-padded (None: all real). Position ids
  count real tokens only, continuing from `cache.pos`; a query sees the real keys at or before it;
  padding sees nothing. Without a cache the keys are the T tokens themselves and the mask is
  [B, 1, T, T], or None for plain causal attention (no padding: the kernel's causal fast path).
  With a cache the keys are its S slots, the tokens going to slots index..index+T-1: the mask is
  [B, 1, T, S] and the returned cache has those slots marked and `pos` advanced (the model's call
  writes the keys and values and advances `index`).
  """
  B, T = tokens.shape
  if token_mask is None and cache is None:
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), None, None
  valid = jnp.ones((B, T), bool) if token_mask is None else token_mask.astype(bool)
  start = jnp.zeros((B,), jnp.int32) if cache is None else cache.pos
  positions = start[:, None] + jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
  if cache is None:
    slots, index = valid, 0
  else:
    index = cache.index
    slots = jax.lax.dynamic_update_slice(cache.mask, valid, (0, index))
    cache = cache._replace(mask=slots, pos=cache.pos + valid.sum(axis=1, dtype=jnp.int32))
  causal = jnp.arange(slots.shape[1])[None, :] <= (index + jnp.arange(T))[:, None]  # [T, S]
  return positions, causal[None, None] & slots[:, None, None, :], cache
