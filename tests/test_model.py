"""The model: parameter counts, layouts, KV cache, padding, options, the one forward's outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt import heads
from gpt.decoding import prepare_for_decoding
from gpt.errors import GPTError
from gpt.kv_cache import KVCache, attention_inputs
from gpt.model import GPTConfig, abstract_model, count_params, init_model, param_axes

TINY = GPTConfig(n_vocab=97, n_ctx=32, n_embd=32, n_head=4, n_layer=3)
TOKENS = np.random.RandomState(0).randint(0, 97, size=(2, 12))


@jax.jit
def forward(model, tokens, token_mask=None, rng=None):
  # Jitted: eager op-by-op execution of the scanned blocks is many small compiles.
  positions, mask, _ = attention_inputs(tokens, token_mask)
  return model(tokens, positions, mask, rng=rng)


@jax.jit
def decode(model, tokens, cache, token_mask=None):
  return model.decode(tokens, cache, token_mask)


@pytest.mark.parametrize("n_layer,n_embd,n_head,expected", [
    (12, 768, 12, 124_439_808), (24, 1024, 16, 354_823_168),
    (36, 1280, 20, 774_030_080), (48, 1600, 25, 1_557_611_200)])
def test_released_sizes_param_counts_without_allocating(n_layer, n_embd, n_head, expected):
  cfg = GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head)
  model = abstract_model(cfg)  # eval_shape: ShapeDtypeStructs, no memory
  assert isinstance(model.wte.get_value(), jax.ShapeDtypeStruct)
  assert count_params(model) == expected == cfg.num_params()


def test_parameter_tree_uses_openai_names_with_stacked_layers():
  model = abstract_model(TINY)
  axes = param_axes(model)
  assert set(axes) == {"wte", "wpe", "h", "ln_f"}
  assert set(axes["h"]) == {"ln_1", "attn", "ln_2", "mlp"}
  assert model.h.attn.c_attn.w.get_value().shape == (3, 32, 96)
  assert axes["h"]["attn"]["c_attn"]["w"] == ("layers", "embed", "heads")
  assert axes["wte"] == ("vocab", "embed")


def test_scan_and_unrolled_layouts_agree():
  scanned = init_model(TINY, seed=1)
  unrolled = init_model(TINY.replace(scan_layers=False), seed=1)
  np.testing.assert_allclose(forward(scanned, TOKENS), forward(unrolled, TOKENS), atol=1e-5)


def test_kv_cache_prefill_and_steps_equal_full_forward():
  model = init_model(TINY, seed=2)
  full = forward(model, TOKENS)
  cache = KVCache.init(TINY, batch=2, length=16)
  logits, cache = decode(model, jnp.asarray(TOKENS[:, :5]), cache)
  steps = [logits]
  for t in range(5, 12):
    logits, cache = decode(model, jnp.asarray(TOKENS[:, t:t + 1]), cache)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)
  assert int(cache.index) == 12 and list(cache.pos) == [12, 12]


def test_left_padding_matches_unpadded_rows():
  model = init_model(TINY, seed=3)
  mask = np.ones_like(TOKENS, bool)
  mask[0, :4] = False
  padded = TOKENS.copy()
  padded[0, :4] = 0
  alone = forward(model, TOKENS[:1, 4:])
  np.testing.assert_allclose(forward(model, padded, token_mask=mask)[0, 4:], alone[0], atol=1e-5)
  logits, cache = decode(model, jnp.asarray(padded), KVCache.init(TINY, 2, 16), token_mask=mask)
  np.testing.assert_allclose(logits[0, 4:], alone[0], atol=1e-5)
  assert list(cache.pos) == [8, 12]
  # The next token continues each row at its own position.
  nxt = np.array([[5], [6]])
  step, _ = decode(model, jnp.asarray(nxt), cache)
  ref = forward(model, np.concatenate([TOKENS[:1, 4:], nxt[:1]], axis=1))
  np.testing.assert_allclose(step[0, 0], ref[0, -1], atol=1e-5)


def test_dropout_only_with_rng_and_remat_keeps_values():
  cfg = TINY.replace(embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
  model = init_model(cfg, seed=4)
  det = forward(model, TOKENS)
  np.testing.assert_array_equal(det, forward(model, TOKENS))
  a, b = forward(model, TOKENS, rng=jax.random.key(0)), forward(model, TOKENS, rng=jax.random.key(1))
  assert not np.allclose(a, det) and not np.allclose(a, b)
  np.testing.assert_array_equal(a, forward(model, TOKENS, rng=jax.random.key(0)))
  remat = init_model(TINY.replace(remat="dots"), seed=4)
  np.testing.assert_allclose(forward(remat, TOKENS), det, atol=1e-5)


def test_bfloat16_compute_is_close_to_float32():
  f32 = init_model(TINY, seed=5)
  bf16 = init_model(TINY.replace(dtype="bfloat16"), seed=5)
  logits = forward(bf16, TOKENS)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, forward(f32, TOKENS), atol=0.1)


def test_attention_auto_picks_cudnn_for_half_precision_on_gpu_and_blocked_elsewhere(monkeypatch):
  """`auto` asks jax for the cuDNN kernel on a GPU backend in bfloat16 (cuDNN takes no float32) and
  runs the blocked formulation otherwise: float32 on a GPU, CPU and TPU (the kernel jax is asked
  for is recorded; cuDNN itself cannot run here, so XLA's stands in)."""
  asked = []
  real = jax.nn.dot_product_attention

  def recording(*args, implementation=None, **kwargs):
    asked.append(implementation)
    return real(*args, implementation=None if implementation == "cudnn" else implementation, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  for dtype, atol in (("float32", 1e-6), ("bfloat16", 0.1)):
    cfg = TINY.replace(dtype=dtype)
    model = init_model(cfg.replace(attention_impl="auto"), seed=6)
    reference = forward(init_model(cfg.replace(attention_impl="blocked"), seed=6), TOKENS)
    for backend in ("cpu", "gpu", "tpu"):
      monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
      asked.clear()
      np.testing.assert_allclose(model(TOKENS), reference, atol=atol)  # eager: traced afresh
      cudnn = backend == "gpu" and dtype == "bfloat16"
      assert asked == (["cudnn"] * len(asked) if cudnn else []) and (asked or not cudnn), (
          backend, dtype, asked)


@pytest.mark.parametrize("bad,message", [
    (dict(n_embd=30, n_head=4), "divisible"), (dict(dtype="fp8"), "model.dtype"),
    (dict(remat="some"), "model.remat"), (dict(attention_impl="flash"), "model.attention_impl")])
def test_bad_model_options_are_one_clear_error(bad, message):
  with pytest.raises(GPTError, match=message):
    TINY.replace(**bad)


def test_attention_probs_are_causal_distributions_consistent_with_the_forward():
  model = init_model(TINY, seed=7)
  probs = np.asarray(jax.jit(lambda m, t: heads.attention_probs(m, t))(model, TOKENS))
  assert probs.shape == (3, 2, 4, 12, 12)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  assert np.all(np.triu(probs, k=1) == 0)
  # Layer 0 recomputed by hand from the parameters.
  p = model.h
  x = np.asarray(model.wte[...])[TOKENS] + np.asarray(model.wpe[...])[:12]
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  h = (x - mu) / np.sqrt(var + 1e-5) * np.asarray(p.ln_1.g[...][0]) + np.asarray(p.ln_1.b[...][0])
  qkv = h @ np.asarray(p.attn.c_attn.w[...][0]) + np.asarray(p.attn.c_attn.b[...][0])
  q, k = qkv[..., :32].reshape(2, 12, 4, 8), qkv[..., 32:64].reshape(2, 12, 4, 8)
  s = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(8) + np.triu(np.full((12, 12), -np.inf), 1)
  e = np.exp(s - s.max(-1, keepdims=True))
  np.testing.assert_allclose(probs[0], e / e.sum(-1, keepdims=True), atol=1e-5)


def old_attention_probs(model, tokens):
  """GPT.attention_probs as it was before the one attention function (its own einsum, -inf)."""
  import math
  from flax import nnx
  cfg = model.cfg
  B, T = tokens.shape
  x = (jnp.take(model.wte[...], tokens, axis=0) + model.wpe[...][:T]).astype(cfg.compute_dtype)
  graphdef, layer_params = nnx.split(model.h)
  causal = jnp.tril(jnp.ones((T, T), bool))

  def layer(x, params):
    block = nnx.merge(graphdef, params)
    q, k, _ = jnp.split(block.attn.c_attn(block.ln_1(x)), 3, axis=-1)
    q, k = (a.reshape(B, T, cfg.n_head, cfg.head_dim) for a in (q, k))
    scores = jnp.einsum("bthk,bshk->bhts", q, k).astype(jnp.float32) / math.sqrt(cfg.head_dim)
    probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    return block(x)[0], probs

  return jax.lax.scan(layer, x, layer_params)[1]


def test_attention_probs_flag_equals_the_old_separate_attention():
  model = init_model(TINY, seed=7)
  new = jax.jit(lambda m, t: heads.attention_probs(m, t))(model, TOKENS)
  np.testing.assert_allclose(new, jax.jit(old_attention_probs)(model, TOKENS), atol=1e-6)


def test_logits_at_positions_and_hidden_states_are_slices_of_the_full_forward():
  model = init_model(TINY, seed=8)
  full = np.asarray(forward(model, TOKENS))
  run = jax.jit(lambda m, t, at: m(t, logits_at=at))
  np.testing.assert_allclose(jax.jit(lambda m, t: m(t, logits_at="last"))(model, TOKENS), full[:, -1:],
                             atol=1e-5)
  at = jnp.asarray([0, 5, 11, 12, 23])  # flat b * T + t: row 0's 0, 5, 11 and row 1's 0, 11
  np.testing.assert_allclose(run(model, TOKENS, at), full.reshape(-1, full.shape[-1])[np.asarray(at)],
                             atol=1e-5)
  hidden = jax.jit(lambda m, t: m(t, logits_at=None))(model, TOKENS)
  assert hidden.shape == (2, 12, 32)
  np.testing.assert_allclose(jax.jit(lambda m, h: heads.logits(m, h, at=at))(model, hidden),
                             full.reshape(-1, full.shape[-1])[np.asarray(at)], atol=1e-5)


def test_positions_and_mask_builder_for_padding_and_cache():
  token_mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], bool)
  positions, mask, cache = attention_inputs(jnp.zeros((2, 4), jnp.int32), token_mask)
  np.testing.assert_array_equal(positions, [[0, 0, 0, 1], [0, 1, 2, 3]])
  assert mask.shape == (2, 1, 4, 4) and cache is None
  np.testing.assert_array_equal(mask[0, 0], [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(mask[1, 0], np.tril(np.ones((4, 4), bool)))
  _, none_mask, _ = attention_inputs(jnp.zeros((2, 4), jnp.int32))
  assert none_mask is None  # plain causal: the kernel's own causal path
  cache = KVCache.init(TINY, batch=2, length=6)
  positions, mask, cache = attention_inputs(jnp.zeros((2, 4), jnp.int32), token_mask, cache)
  assert mask.shape == (2, 1, 4, 6) and list(cache.pos) == [2, 4]
  np.testing.assert_array_equal(cache.mask, [[0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
  cache = cache._replace(index=jnp.asarray(4))  # as the model's call leaves it
  positions, mask, _ = attention_inputs(jnp.zeros((2, 1), jnp.int32), None, cache)
  np.testing.assert_array_equal(positions, [[2], [4]])
  np.testing.assert_array_equal(mask[:, 0, 0], [[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prepared_decoding_equals_the_full_forward_at_every_step(dtype):
  """prepare_for_decoding (per-layer weights, what sampling runs) against the stacked full forward,
  left-padded rows, prefill then one token per step, logits of the last column."""
  cfg = TINY.replace(dtype=dtype, param_dtype=dtype)
  model = init_model(cfg, seed=9)
  prepared = prepare_for_decoding(model)
  assert prepared.h[0].mlp.c_fc.w.get_value().dtype == cfg.compute_dtype
  step = jax.jit(lambda m, t, c, k: m.decode(t, c, k, logits_at="last"))
  stacked_step = jax.jit(lambda m, t, c, k: m.decode(t, c, k))
  mask = np.ones((2, 8), bool)
  mask[0, :3] = False
  new_tokens = np.asarray([[t + 1, t + 2] for t in range(8)])  # [step, row]
  rows = [list(TOKENS[0, 3:8]) + list(new_tokens[:, 0]), list(TOKENS[1, :8]) + list(new_tokens[:, 1])]
  # Each row alone, right-padded, in one uncached forward (causal: padding changes nothing before it).
  full = np.asarray(forward(model, np.asarray([rows[0] + [0] * 3, rows[1]])))
  logits, cache = step(prepared, jnp.asarray(TOKENS[:, :8]), KVCache.init(cfg, 2, 20), mask)
  stacked, stacked_cache = stacked_step(model, jnp.asarray(TOKENS[:, :8]), KVCache.init(cfg, 2, 20), mask)
  tol = 1e-5 if dtype == "float32" else 0.05
  for t in range(9):
    for r, seen in enumerate((5 + t, 8 + t)):
      np.testing.assert_allclose(logits[r, -1], full[r, seen - 1], atol=tol, err_msg=f"step {t} row {r}")
      np.testing.assert_allclose(stacked[r, -1], full[r, seen - 1], atol=tol)
    if t < 8:
      logits, cache = step(prepared, jnp.asarray(new_tokens[t][:, None]), cache, None)
      stacked, stacked_cache = stacked_step(model, jnp.asarray(new_tokens[t][:, None]), stacked_cache, None)
  assert int(cache.index) == 16 and list(cache.pos) == [13, 16]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_take_rows_equals_take_with_its_gradient(dtype):
  """gpt.layers.take_rows (the embeddings' gather; bf16 through an optimization barrier) gives
  jnp.take's rows, clipped ids included, and the same gradient, inside and outside a loop."""
  from gpt.layers import take_rows

  table = jax.random.normal(jax.random.key(0), (50, 6)).astype(dtype)
  ids = jnp.asarray([[3, 0, 49], [7, 60, -2]], jnp.int32)
  want = jnp.take(table, ids, axis=0, mode="clip")
  np.testing.assert_array_equal(np.asarray(take_rows(table, ids), np.float32), np.asarray(want, np.float32))
  looped = jax.jit(lambda t: jax.lax.fori_loop(0, 3, lambda i, acc: acc + take_rows(t, ids + i),
                                               jnp.zeros(ids.shape + (6,), t.dtype)))
  want_loop = sum(jnp.take(table, ids + i, axis=0, mode="clip") for i in range(3))
  np.testing.assert_allclose(np.asarray(looped(table), np.float32), np.asarray(want_loop, np.float32),
                             rtol=1e-2)
  loss = lambda f: lambda t: jnp.sum(f(t).astype(jnp.float32) * jnp.arange(6.0))
  grad = jax.grad(loss(lambda t: take_rows(t, ids)))(table)
  want_grad = jax.grad(loss(lambda t: jnp.take(t, ids, axis=0, mode="clip")))(table)
  np.testing.assert_array_equal(np.asarray(grad, np.float32), np.asarray(want_grad, np.float32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_norm_over_flat_rows_equals_the_batched_form(dtype, monkeypatch):
  """gpt.layers.layer_norm runs a one-row batch [1, T, D] as [T, D] (LN_FLAT): the same values and
  gradients as over [1, T, D], against a float64 reference, and the backward's reductions are over
  2-D arrays only (the form XLA:CPU runs fast; the 3-D one measured 3.7x slower)."""
  from gpt import layers

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 7, 16)) * 3 + 1, dtype)
  g, b = (jnp.asarray(rng.standard_normal(16), dtype) for _ in range(2))
  w = jnp.asarray(rng.standard_normal((1, 7, 16)), jnp.float32)
  loss = lambda x, g, b: jnp.sum((layers.layer_norm(x, g, b).astype(jnp.float32) * w).reshape(-1))
  grad = jax.value_and_grad(loss, argnums=(0, 1, 2))

  def ref(x, g, b):  # float64 LayerNorm, differentiated by JAX
    x, g, b = (np.asarray(a, np.float64) for a in (x, g, b))
    with jax.enable_x64():
      f = lambda x, g, b: jnp.sum(((x - x.mean(-1, keepdims=True))
                                   / jnp.sqrt(x.var(-1, keepdims=True) + layers.LN_EPS) * g + b) * w)
      return jax.value_and_grad(f, argnums=(0, 1, 2))(x, g, b)

  tol = 1e-5 if dtype == "float32" else 5e-2
  got, want = grad(x, g, b), ref(x, g, b)
  for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(r), rtol=tol, atol=tol)
  assert layers.layer_norm(x, g, b).shape == x.shape and layers.layer_norm(x, g, b).dtype == x.dtype
  ranks = {e.invars[0].aval.ndim for e in jax.make_jaxpr(grad)(x, g, b).eqns
           if e.primitive.name == "reduce_sum"}
  assert max(ranks) == 2, ranks  # (the loss's own sum is 1-D)
  monkeypatch.setattr(layers, "LN_FLAT", False)  # the batched form: same numbers
  for a, r in zip(jax.tree.leaves(grad(x, g, b)), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(r, np.float64), rtol=tol, atol=tol)
