"""gpt.kernels.decode_attention: the FFI kernel equals gpt.attention's "einsum" formulation over a
KV cache (ragged lengths, left-padded rows, queries that see nothing, T = 1 and prefill T > 1,
float32 and bfloat16 caches and queries), inside jit and a while_loop; decoding with it samples the
same tokens; it falls back where it does not apply."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt import sample
from gpt.attention import attention
from gpt.kernels import decode_attention
from gpt.kv_cache import KVCache, attention_inputs
from gpt.model import GPTConfig, init_model
from gpt.sampling import SamplingOptions

pytestmark = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                reason="the kernel is built with the system C++ compiler")


def cache_case(B, H, T, S, K, index, pad, dtype, cache_dtype, seed=0):
  """q [B, H, T, K] and a cache k, v [B, H, S, K] whose slots 0..index+T-1 are written, with the
  mask `attention_inputs` builds for rows left-padded by `pad[b]` slots at the start of the prompt
  (the prompt of length `index` went into slots 0..index-1, then these T tokens)."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, H, T, K)), dtype)
  k = jnp.asarray(rng.standard_normal((B, H, S, K)), cache_dtype)
  v = jnp.asarray(rng.standard_normal((B, H, S, K)), cache_dtype)
  cache = KVCache.init(GPTConfig(n_vocab=8, n_ctx=S, n_embd=H * K, n_head=H, n_layer=1), B, S)
  if index:
    prompt_mask = np.arange(index)[None, :] >= np.asarray(pad)[:, None]
    _, _, cache = attention_inputs(jnp.zeros((B, index), jnp.int32), jnp.asarray(prompt_mask), cache)
    cache = cache._replace(index=jnp.asarray(index, jnp.int32))
  _, mask, _ = attention_inputs(jnp.zeros((B, T), jnp.int32), None, cache)
  return q, k, v, mask


@pytest.mark.parametrize("dtype,cache_dtype", [("float32", "float32"), ("bfloat16", "float32"),
                                               ("bfloat16", "bfloat16")])
@pytest.mark.parametrize("B,H,T,S,K,index,pad", [
    (3, 4, 1, 37, 64, 20, (0, 5, 19)),   # a decode step: ragged left padding, one row of 1 token
    (2, 2, 1, 16, 64, 15, (0, 0)),       # the cache's last slot
    (1, 3, 1, 40, 24, 0, (0,)),          # the first token, K not a multiple of 16
    (2, 2, 5, 24, 64, 3, (0, 2)),        # T > 1 after a prompt
])
def test_kernel_equals_einsum(dtype, cache_dtype, B, H, T, S, K, index, pad):
  q, k, v, mask = cache_case(B, H, T, S, K, index, pad, dtype, cache_dtype)
  assert decode_attention.runs(q, k, v, mask), "the kernel library did not build or register"
  got = jax.jit(decode_attention.attention)(q, k, v, mask)
  want = attention(q, k, v, mask, impl="einsum")
  assert got.dtype == q.dtype and got.shape == (B, H, T, K)
  tol = 1e-5 if dtype == "float32" else 1e-2
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


def test_prefill_of_left_padded_rows_and_queries_that_see_nothing():
  """A left-padded prompt at once (T = S): padding queries see no key and get the uniform
  average of all S values, as the einsum formulation's -1e30-filled rows do."""
  B, H, T, K = 3, 2, 9, 64
  rng = np.random.default_rng(1)
  token_mask = jnp.asarray(np.arange(T)[None, :] >= np.array([0, 4, 8])[:, None])
  cache = KVCache.init(GPTConfig(n_vocab=8, n_ctx=T, n_embd=H * K, n_head=H, n_layer=1), B, T)
  _, mask, _ = attention_inputs(jnp.zeros((B, T), jnp.int32), token_mask, cache)
  q, k, v = (jnp.asarray(rng.standard_normal((B, H, T, K)), jnp.float32) for _ in range(3))
  assert not bool(mask[1, 0, 0].any())  # a padding query
  got = decode_attention.attention(q, k, v, mask)
  np.testing.assert_allclose(got, attention(q, k, v, mask, impl="einsum"), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1, :, 0], v[1].mean(axis=1), rtol=1e-5, atol=1e-6)


def test_runs_in_a_while_loop_and_the_cache_path_calls_it():
  q, k, v, mask = cache_case(2, 2, 1, 32, 64, 10, (0, 3), "float32", "float32")

  def chain(impl):
    step = lambda _, q: jnp.tanh(attention(q, k, v, mask, impl=impl))
    return jax.jit(lambda q: jax.lax.fori_loop(0, 4, step, q))

  np.testing.assert_allclose(chain("cache")(q), chain("einsum")(q), rtol=1e-5, atol=1e-5)
  assert "GptDecodeAttention" in chain("cache").lower(q).as_text()
  assert "GptDecodeAttention" not in chain("einsum").lower(q).as_text()


def test_falls_back_for_weights_dropout_off_and_the_switch(monkeypatch):
  q, k, v, mask = cache_case(1, 2, 1, 8, 16, 4, (0,), "float32", "float32")
  lowered = lambda **kw: jax.jit(lambda q: attention(q, k, v, mask, impl="cache", **kw)).lower(q).as_text()
  assert "GptDecodeAttention" in lowered()
  assert "GptDecodeAttention" not in lowered(return_probs=True)  # the attention view's weights
  assert "GptDecodeAttention" not in lowered(dropout=0.5, rng=jax.random.key(0))
  assert not decode_attention.runs(q, k, v, None)  # no explicit mask
  long = jnp.zeros((1, 2, decode_attention.MAX_QUERIES + 1, 16))  # a long prompt's prefill
  assert not decode_attention.runs(long, k, v, jnp.ones((1, 1, long.shape[2], 8), bool))
  with decode_attention.off():  # compile mode lowering for a TPU on a CPU host
    assert not decode_attention.runs(q, k, v, mask) and "GptDecodeAttention" not in lowered()
  y, probs = attention(q, k, v, mask, impl="cache", return_probs=True)
  np.testing.assert_allclose(y, decode_attention.attention(q, k, v, mask), rtol=1e-5, atol=1e-6)
  monkeypatch.setenv("GPT_DECODE_ATTENTION", "0")
  assert not decode_attention.runs(q, k, v, mask) and "GptDecodeAttention" not in lowered()


@pytest.mark.parametrize("options", [SamplingOptions(temperature=0.0), SamplingOptions(top_k=5)])
def test_decoding_samples_the_same_tokens_as_einsum(options):
  """A whole sample (left-padded prefill, then the while_loop) with the kernel and without it
  (GPT_DECODE_ATTENTION=0 at trace time): the same tokens."""
  cfg = GPTConfig(n_vocab=97, n_ctx=48, n_embd=64, n_head=4, n_layer=2)
  model = init_model(cfg, seed=3)
  params = sample.decoding_params(model)
  prompt, prompt_mask = sample.pad_left([[5, 6, 7, 8, 9, 10], [11], [12, 13, 14]], 8)

  def run(kernel: bool):
    with pytest.MonkeyPatch.context() as mp:
      mp.setenv("GPT_DECODE_ATTENTION", "1" if kernel else "0")
      decoder = sample.make_decoder(cfg, options, stop_token=0, stop_at_token=False)
      state = decoder.start(params, prompt, prompt_mask, jax.random.key(7), cache_length=40, max_new=30)
      assert ("GptDecodeAttention" in decoder.lower_advance(params, state).as_text()) == kernel
      return np.asarray(decoder.advance(params, state, 30).tokens)

  got, want = run(True), run(False)
  assert got.shape == (3, 30)
  np.testing.assert_array_equal(got, want)


def test_bench_decode_traces_its_einsum_column_without_the_kernel(monkeypatch):
  """bench_decode --einsum_attention: the wrapped runner's first call (the warm-up, which traces
  and compiles) runs with GPT_DECODE_ATTENTION=0; later calls and the environment are as before."""
  from test_benchmarks import load_script

  seen = []
  runner = load_script("decode_runners").without_decode_attention(
      lambda: seen.append(os.environ.get("GPT_DECODE_ATTENTION")) or np.zeros((2, 5)))
  monkeypatch.delenv("GPT_DECODE_ATTENTION", raising=False)
  assert runner().shape == (2, 5) and "GPT_DECODE_ATTENTION" not in os.environ
  runner()
  assert seen == ["0", None]
