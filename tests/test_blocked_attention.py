"""gpt.attention.blocked_attention (the default training attention) against the spelled-out reference.

The blocked formulation has its own backward pass (a custom VJP), so values and all three
gradients are compared with the "einsum" attention differentiated by JAX, on small shapes with
several (uneven) query blocks: plain causal, causal with more keys than queries, left-padded rows
(whose padding queries see nothing: a uniform row whose masked scores must get no gradient), and
bfloat16 compute against the float32 reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt.attention import attention, blocked_attention, query_blocks
from gpt.kv_cache import attention_inputs


def _qkv(B, H, T, S, K, dtype, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((B, H, n, K)), dtype) for n in (T, S, S))
  cotangent = jnp.asarray(rng.standard_normal((B, H, T, K)), jnp.float32)
  return q, k, v, cotangent


def _value_and_grads(fn, q, k, v, cotangent):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _compare(q, k, v, cotangent, mask, blocks, atol):
  got = _value_and_grads(lambda q, k, v: blocked_attention(q, k, v, mask, blocks), q, k, v, cotangent)
  f32 = lambda a: a.astype(jnp.float32)
  want = _value_and_grads(lambda q, k, v: attention(q, k, v, mask, impl="einsum"),
                          f32(q), f32(k), f32(v), cotangent)
  for name, g, w in zip(("loss", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), atol=atol, rtol=atol,
                               err_msg=name)


def test_query_blocks_cover_each_row_once_and_stop_at_the_diagonal(monkeypatch):
  assert query_blocks(10, 10, True, blocks=4) == [(0, 10, 10)]  # blocks of at least 64 rows
  monkeypatch.setattr("gpt.attention.MIN_QUERY_BLOCK", 1)
  assert query_blocks(10, 10, True, blocks=4) == [(0, 3, 3), (3, 6, 6), (6, 9, 9), (9, 10, 10)]
  assert query_blocks(1024, 1024, True) == [(0, 256, 256), (256, 512, 512), (512, 768, 768),
                                            (768, 1024, 1024)]
  assert query_blocks(8, 13, True, blocks=2) == [(0, 4, 9), (4, 8, 13)]  # 5 cached keys before
  assert query_blocks(10, 10, False) == [(0, 10, 10)]  # an explicit mask: every key


# save: gpt.attention.SAVE_PROBABILITIES (False: the backward recomputes the probabilities).
@pytest.mark.parametrize("T,S,blocks,save", [(10, 10, 4, True), (10, 13, 3, True), (10, 10, 1, True),
                                            (10, 13, 3, False), (10, 10, 4, False)])
def test_causal_values_and_gradients_match_the_reference(T, S, blocks, save, monkeypatch):
  monkeypatch.setattr("gpt.attention.MIN_QUERY_BLOCK", 1)  # several blocks even at these sizes
  monkeypatch.setattr("gpt.attention.SAVE_PROBABILITIES", save)
  _compare(*_qkv(2, 3, T, S, 8, jnp.float32), None, blocks, atol=2e-5)


def test_padding_masks_match_the_reference_including_fully_masked_rows():
  B, T = 2, 10
  left_padding = jnp.asarray(np.arange(T)[None, :] >= np.array([0, 3])[:, None])
  _, mask, _ = attention_inputs(jnp.zeros((B, T), jnp.int32), left_padding)
  _compare(*_qkv(B, 3, T, T, 8, jnp.float32, seed=1), mask, 4, atol=2e-5)


def test_bfloat16_stays_close_to_the_float32_reference(monkeypatch):
  monkeypatch.setattr("gpt.attention.MIN_QUERY_BLOCK", 1)
  _compare(*_qkv(2, 3, 32, 32, 16, jnp.bfloat16, seed=2), None, 4, atol=0.1)


@pytest.mark.slow  # trains: the model's loss gradients through both kernels
def test_the_model_trains_through_it_as_through_the_library_kernel():
  """The model's default attention outside a one-CPU-device training program is the blocked one;
  its loss gradient equals the one through jax.nn.dot_product_attention (impl "xla")."""
  from flax import nnx

  from gpt.model import GPTConfig, init_model

  cfg = GPTConfig(n_vocab=61, n_ctx=16, n_embd=16, n_head=2, n_layer=2)
  assert cfg.attention_impl == "auto"
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 61, (2, 16)))

  def grads(impl):
    model = init_model(cfg.replace(attention_impl=impl), seed=4)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
      logits = nnx.merge(graphdef, params)(tokens[:, :-1])
      return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    return jax.jit(jax.value_and_grad(loss))(params)

  (lb, gb), (lx, gx) = grads("auto"), grads("xla")
  np.testing.assert_allclose(lb, lx, rtol=1e-6)
  for b, x in zip(jax.tree.leaves(gb), jax.tree.leaves(gx)):
    np.testing.assert_allclose(b, x, atol=1e-6)
