"""GPT-2's forward pass laid out for token-by-token decoding; the parameters are gpt.model's.

`GPT.decode` runs the blocks as one `lax.scan` over parameters stacked [n_layer, ...]: right for
training and prefill, but in a decode step on CPU every layer's weights are first copied out of the
stack (a dynamic-slice the size of the weights), the cache is re-stacked every step, bf16 matmuls
with a bf16 result are upcast by XLA by converting the whole weight matrix to float32 first, and the
output projection is computed for every prompt position although sampling needs only the last.
Measured on the 2-core CPU (experiments/bench_decode.py), that costs 2x in float32 and up to 10x in
bfloat16. This module computes the same function with
  - per-layer weight arrays (unstacked once, cast once to `model.dtype`),
  - a per-layer cache laid out [B * H, S, K], updated in place inside the decode loop (with batch
    and heads as separate axes, XLA:CPU fed the attention matmul a second, bitcast copy of the
    updated cache and copied every layer's cache twice per step: ~18% of a batch-1 step),
  - matmuls that accumulate in float32 (`preferred_element_type`), which XLA:CPU runs natively in
    bf16, and LayerNorm/softmax in float32 as in gpt.model,
  - logits for the last position only (`last_only`).
tests/test_generate.py checks it against `GPT.__call__` (the full forward) at every step.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gpt.model import GPT, LN_EPS, GPTConfig

Params = dict[str, Any]  # {"wte", "wpe", "ln_f": {g, b}, "layers": ({ln_1, attn, ln_2, mlp}, ...)}


class Cache(NamedTuple):
  """k, v: per-layer tuples of [B * H, S, K]; mask [B, S]: slots holding real tokens; index: next
  slot to write (shared by all rows); pos [B]: each row's next position id."""

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  mask: jax.Array
  index: jax.Array
  pos: jax.Array


def decode_params(model: GPT) -> Params:
  """The model's parameters as per-layer arrays in the compute dtype (one copy, made once)."""
  dtype = model.cfg.compute_dtype
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  cast = lambda a: jnp.asarray(a, dtype)
  layers = tuple(jax.tree.map(lambda a: cast(a[i]), pure["h"]) for i in range(model.cfg.n_layer))
  return {"wte": cast(pure["wte"]), "wpe": cast(pure["wpe"]), "ln_f": jax.tree.map(cast, pure["ln_f"]),
          "layers": layers}


def init_cache(cfg: GPTConfig, batch: int, length: int) -> Cache:
  """An empty cache with `length` slots per row."""
  shape = (batch * cfg.n_head, length, cfg.head_dim)
  zeros = lambda: tuple(jnp.zeros(shape, cfg.compute_dtype) for _ in range(cfg.n_layer))
  return Cache(k=zeros(), v=zeros(), mask=jnp.zeros((batch, length), bool),
               index=jnp.zeros((), jnp.int32), pos=jnp.zeros((batch,), jnp.int32))


def decode(cfg: GPTConfig, params: Params, tokens: jax.Array, cache: Cache,
           token_mask: jax.Array | None = None, *, last_only: bool = False) -> tuple[jax.Array, Cache]:
  """Runs tokens [B, T] (left-padded when `token_mask` is given) against `cache`.

  Returns float32 logits [B, T, V] ([B, 1, V] for the last position when `last_only`) and the
  cache with the tokens written at `cache.index`. Same semantics as `GPT.decode`.
  """
  B, T = tokens.shape
  S = cache.mask.shape[1]
  valid = jnp.ones((B, T), bool) if token_mask is None else token_mask.astype(bool)
  positions = cache.pos[:, None] + jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
  slot_mask = jax.lax.dynamic_update_slice(cache.mask, valid, (0, cache.index))
  causal = jnp.arange(S)[None, :] <= (cache.index + jnp.arange(T))[:, None]  # [T, S]
  mask = causal[None, None] & slot_mask[:, None, None, :]  # [B, 1, T, S]
  x = (params["wte"][tokens] + params["wpe"][positions]).astype(cfg.compute_dtype)
  ks, vs = [], []
  for layer, k_cache, v_cache in zip(params["layers"], cache.k, cache.v):
    x, k_cache, v_cache = _block(cfg, layer, x, mask, k_cache, v_cache, cache.index)
    ks.append(k_cache)
    vs.append(v_cache)
  if last_only:
    x = x[:, -1:]
  x = _layer_norm(x, params["ln_f"])
  logits = _matmul(x, params["wte"], "...d,vd->...v")
  new_cache = Cache(k=tuple(ks), v=tuple(vs), mask=slot_mask, index=cache.index + T,
                    pos=cache.pos + valid.sum(axis=1, dtype=jnp.int32))
  return logits, new_cache


def _block(cfg: GPTConfig, p: Params, x, mask, k_cache, v_cache, index):
  """One pre-LayerNorm transformer block; writes this step's keys and values into the cache."""
  B, T, _ = x.shape
  H, K = cfg.n_head, cfg.head_dim
  S = k_cache.shape[1]
  heads = lambda a: a.reshape(B, T, H, K).transpose(0, 2, 1, 3).reshape(B * H, T, K)
  q, k, v = map(heads, jnp.split(_dense(_layer_norm(x, p["ln_1"]), p["attn"]["c_attn"]), 3, axis=-1))
  k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0))
  v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0))
  scores = jnp.einsum("ntk,nsk->nts", q, k_cache, preferred_element_type=jnp.float32)
  # -1e30, not -inf: a fully padded row's softmax stays finite.
  scores = jnp.where(mask, scores.reshape(B, H, T, S) / math.sqrt(K), -1e30)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype).reshape(B * H, T, S)
  y = jnp.einsum("nts,nsk->ntk", probs, v_cache, preferred_element_type=jnp.float32)
  y = y.reshape(B, H, T, K).transpose(0, 2, 1, 3).reshape(B, T, H * K)
  x = x + _dense(y.astype(x.dtype), p["attn"]["c_proj"])
  h = jax.nn.gelu(_dense(_layer_norm(x, p["ln_2"]), p["mlp"]["c_fc"]), approximate=True)
  return x + _dense(h, p["mlp"]["c_proj"]), k_cache, v_cache


def _dense(x: jax.Array, p: Params) -> jax.Array:
  """x @ w + b, accumulated in float32, returned in x's dtype."""
  return (_matmul(x, p["w"]) + p["b"].astype(jnp.float32)).astype(x.dtype)


def _matmul(x: jax.Array, w: jax.Array, spec: str = "...d,df->...f") -> jax.Array:
  """einsum(spec, x, w) in float32. XLA:CPU has no bf16 matrix-vector kernel: for a single row it
  converts the whole bf16 weight matrix to float32 first (4-10x slower than reading it). Two rows
  take its bf16 matrix-matrix kernel instead, so a lone bf16 row is computed as a pair."""
  rows = math.prod(x.shape[:-1])
  if rows == 1 and w.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
    pair = jnp.concatenate([x, x], axis=0)
    return jnp.einsum(spec, pair, w, preferred_element_type=jnp.float32)[:1]
  return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)


def _layer_norm(x: jax.Array, p: Params) -> jax.Array:
  """gpt.model.LayerNorm: computed in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + LN_EPS)
  return (y * p["g"].astype(jnp.float32) + p["b"].astype(jnp.float32)).astype(x.dtype)


def make_logits_fn(cfg: GPTConfig):
  """`logits_fn(params, tokens, cache, token_mask) -> (logits [B, 1, V], cache)` for gpt.sampling."""

  def logits_fn(params, tokens, cache, token_mask):
    return decode(cfg, params, tokens, cache, token_mask, last_only=True)

  return logits_fn
