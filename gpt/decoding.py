"""The model laid out for token-by-token decoding: what sampling, interactive and training's samples run.

Why a layout of its own: a decode step reads every weight once for one token per row, so how the
weights lie in memory decides its speed, not the FLOPs. The training layout (blocks stacked under
one `lax.scan`, parameters in `param_dtype`, Conv1D weights [n_in, n_out]) makes every CPU decode
step copy each layer's weights out of the stack and re-stack the cache (2x slower in float32, up
to 10x in bfloat16: experiments/bench_decode.py). `prepare_for_decoding` therefore makes, once per
set of weights, the same GPT (gpt.model, same forward pass, same function) with one Block per
layer, weights cast once to the compute dtype, and, where gpt.kernels.gemv runs, every dense
weight transposed to [n_out, n_in] so the kernel streams each output's weights contiguously.
`decoding_functions` hands that model to gpt.sampling's model-agnostic Decoder. Nothing here has
a gradient or a training use: the parameter tree (`h/0/...`) differs from the checkpoint's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gpt.kernels import gemv
from gpt.kv_cache import KVCache
from gpt.model import GPT, GPTConfig


def prepare_for_decoding(model: GPT) -> GPT:
  """The same model laid out for token-by-token decoding (sampling), computing the same function.

  The stacked blocks become one Block per layer, each weight cast once to the compute dtype. In a
  scan over stacked weights, every decode step on CPU first copies each layer's weights out of the
  stack and re-stacks the cache (2x slower in float32, up to 10x in bfloat16, measured by
  experiments/bench_decode.py); per-layer weights and per-layer KVCache arrays avoid both. Over a
  cache, attention is the spelled-out "einsum" one, whose cache layout XLA updates in place. Made
  once per set of weights; not for training (the parameter tree differs: `h/0/...`, ...).
  Where gpt.kernels.gemv runs (a CPU and a built library, `decodes_by_row`), every Conv1D weight
  is also transposed once to [n_out, n_in] (`weights_by_row`): the kernel then streams each
  output's weights contiguously for the steps' few rows. int8 weights (model.quantize=int8) stay
  int8 with their float32 scales; the kernel converts them in registers.
  """
  cfg = model.cfg
  graphdef, abstract = _decoding_layout(cfg)
  by_row = decodes_by_row(cfg)
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  def cast(path, a):
    a = jnp.asarray(a)
    if a.dtype == jnp.int8 or path[-1].key.endswith("_scale"):
      return a
    return a.astype(cfg.compute_dtype)

  def layer(i):
    params = jax.tree_util.tree_map_with_path(lambda p, a: cast(p, a[i]), pure["h"])
    if by_row:
      for sub, name in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
        params[sub][name]["w"] = gemv.to_rows(params[sub][name]["w"])
    return params

  rest = {k: v for k, v in pure.items() if k != "h"}
  params = {**jax.tree_util.tree_map_with_path(cast, rest), "h": {i: layer(i) for i in range(cfg.n_layer)}}
  nnx.replace_by_pure_dict(abstract, params)
  return nnx.merge(graphdef, abstract)


def decodes_by_row(cfg: GPTConfig) -> bool:
  """Whether decoding lays weights out by row for gpt.kernels.gemv (it runs for this weight dtype
  here: a CPU backend, the library built, GPT_GEMV not 0)."""
  dtype = jnp.int8 if cfg.quantize == "int8" else cfg.compute_dtype
  return gemv.max_rows(dtype) > 0


def _decoding_layout(cfg: GPTConfig):
  """(graphdef, abstract state) of the per-layer model that `prepare_for_decoding` makes."""
  dcfg = cfg.replace(param_dtype=cfg.dtype, attention_impl="xla", scan_layers=False, remat="none",
                     weights_by_row=decodes_by_row(cfg))
  return nnx.split(nnx.eval_shape(lambda: GPT(dcfg, rngs=nnx.Rngs(params=0), per_layer=True)))


def decoding_functions(cfg: GPTConfig):
  """(logits_fn, init_cache) for gpt.sampling.Decoder over a model prepared for decoding.

  `logits_fn(params, tokens, cache, token_mask)` returns the last column's logits [B, 1, V] and
  the updated KVCache, where `params` is `nnx.state(prepare_for_decoding(model))` (passed as a
  jit argument, never baked in). `init_cache(batch, length)` is `KVCache.init(cfg, batch, length)`
  in `cache_dtype(cfg)`.
  """
  graphdef, _ = _decoding_layout(cfg)

  def logits_fn(params, tokens, cache, token_mask):
    return nnx.merge(graphdef, params).decode(tokens, cache, token_mask, logits_at="last")

  dtype = cache_dtype(cfg)
  return logits_fn, lambda batch, length: KVCache.init(cfg, batch, length, dtype)


def cache_dtype(cfg: GPTConfig):
  """The decoding KV cache's dtype: the compute dtype, except float32 for bfloat16 where decoding
  runs this CPU's layout (`decodes_by_row`).

  XLA:CPU has no bf16 batched dot: over a bf16 cache, every step of every layer converted the whole
  cache to float32 for the attention and wrote a second, new bf16 cache instead of updating it in
  place (a quarter of a bf16 batch-8 step: BENCHMARKS.md, "decoding outside the matmuls"). A float32
  cache holds the same bf16-rounded keys and values (the model writes `k.astype(cache dtype)` of
  bf16 k), is updated in place and feeds a float32 dot directly; it takes twice the memory.
  """
  if cfg.compute_dtype == jnp.bfloat16 and decodes_by_row(cfg):
    return jnp.float32
  return cfg.compute_dtype
