"""gpt.kernels.attention (the fused causal CPU attention behind JAX's FFI) against the references.

Values and the three gradients are compared with float64 attention differentiated by JAX and with
the blocked formulation, on ragged lengths (one row, one below, at and above a tile, several
tiles), more keys than queries, head sizes that are not the SIMD width, under a layer scan, vmap
and remat, and through the train mode's whole step. Also: what runs where the kernel does not
(masks, bfloat16 keep the blocked formulation), and the one-line error when a user insists on it
where it cannot run. Skips the kernel's own tests with the reason when no C++ compiler built it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt import sharding
from gpt.attention import MASK_VALUE, attention, blocked_attention
from gpt.errors import GPTError
from gpt.kernels import attention as kattn
from gpt.kv_cache import attention_inputs
from gpt.model import REMAT_POLICIES, GPTConfig, init_model
from gpt.train import build_programs
from gpt.train_step import create_state
from tests.train_utils import tiny_config


@pytest.fixture
def kernel():
  if not kattn.available():
    pytest.skip(f"gpt.kernels.attention unavailable: {kattn.why_unavailable()}")


def _qkv(B, H, T, S, K, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((B, H, n, K)), jnp.float32) for n in (T, S, S))
  cotangent = jnp.asarray(rng.standard_normal((B, H, T, K)), jnp.float32)
  return q, k, v, cotangent


def _value_and_grads(fn, q, k, v, cotangent):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent.astype(q.dtype))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _float64_attention(q, k, v):
  """Causal attention (the last query is the last key) in float64, differentiated by JAX."""
  T, S = q.shape[2], k.shape[2]
  s = jnp.einsum("bhtk,bhsk->bhts", q, k) / np.sqrt(q.shape[-1])
  s = jnp.where(jnp.tril(jnp.ones((T, S), bool), S - T), s, -jnp.inf)
  return jnp.einsum("bhts,bhsk->bhtk", jax.nn.softmax(s, axis=-1), v)


def _assert_close(got, want, atol, what=""):
  for name, g, w in zip(("value", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), atol=atol,
                               rtol=atol, err_msg=f"{what} {name}")


# (T, S, K): one row, around a 64-row tile, several tiles, more keys than queries, other head
# sizes, and a length past LONG_QUERIES (128-row query tiles).
SHAPES = [(1, 1, 64), (63, 63, 64), (64, 64, 64), (65, 65, 64), (200, 200, 64), (37, 100, 64),
          (1, 70, 64), (70, 70, 8), (130, 130, 20), (530, 600, 64)]


@pytest.mark.parametrize("T,S,K", SHAPES)
def test_values_and_gradients_match_float64_and_blocked(kernel, T, S, K):
  q, k, v, cotangent = _qkv(2, 3, T, S, K)
  got = _value_and_grads(kattn.flash_attention, q, k, v, cotangent)
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(np.asarray(a), jnp.float64)
    want = _value_and_grads(_float64_attention, f64(q), f64(k), f64(v), f64(cotangent))
  _assert_close(got, want, 2e-5, "vs float64")
  blocked = _value_and_grads(lambda q, k, v: blocked_attention(q, k, v, None), q, k, v, cotangent)
  _assert_close(got, blocked, 2e-5, "vs blocked")


@pytest.mark.parametrize("block_q,block_k", [(1, 1), (16, 48), (128, 32)])
def test_tile_sizes_give_the_same_numbers(kernel, block_q, block_k):
  q, k, v, cotangent = _qkv(1, 2, 90, 100, 64, seed=1)
  want = _value_and_grads(kattn.flash_attention, q, k, v, cotangent)
  got = _value_and_grads(lambda q, k, v: kattn.flash_attention(q, k, v, block_q=block_q,
                                                               block_k=block_k), q, k, v, cotangent)
  _assert_close(got, want, 2e-5, f"tiles {block_q}x{block_k}")


@pytest.fixture
def bf16_kernel(kernel):
  if not kattn.bf16_products():
    pytest.skip("the attention kernel's bf16 products need a CPU with AVX512-BF16")


def _rounded(*arrays):
  """float64 copies of the arrays rounded to bfloat16 (what the bf16 products multiply)."""
  return tuple(jnp.asarray(np.asarray(a.astype(jnp.bfloat16), np.float64)) for a in arrays)


# (T, S, K, block_q, block_k): the chapter's tiles, odd lengths and head sizes (the pair words'
# zero padding), more keys than queries, odd tiles (rounded up to even ones).
BF16_SHAPES = [(130, 130, 64, None, 64), (37, 41, 33, 16, 16), (257, 300, 64, 64, 64),
               (21, 21, 8, 7, 5), (1, 1, 64, None, 64), (530, 530, 64, None, None)]


@pytest.mark.parametrize("T,S,K,block_q,block_k", BF16_SHAPES)
def test_bf16_products_match_float64_of_the_rounded_inputs(bf16_kernel, T, S, K, block_q, block_k):
  """flash_attention(bf16=True): value and gradients against float64 attention of the inputs and
  cotangent rounded to bfloat16, within what rounding P and dS to bf16 adds (a relative 2^-8 per
  product term; 1% of the largest entry here), and measurably not the float32 kernel's numbers."""
  q, k, v, cotangent = _qkv(2, 2, T, S, K, seed=7)
  tiles = {name: n for name, n in (("block_q", block_q), ("block_k", block_k)) if n}
  got = _value_and_grads(lambda q, k, v: kattn.flash_attention(q, k, v, bf16=True, **tiles),
                         q, k, v, cotangent)
  f32 = _value_and_grads(lambda q, k, v: kattn.flash_attention(q, k, v, **tiles), q, k, v, cotangent)
  with jax.enable_x64(True):
    want = _value_and_grads(_float64_attention, *_rounded(q, k, v, cotangent))
  differs = False
  for name, g, w, f in zip(("value", "dq", "dk", "dv"), *map(jax.tree.leaves, (got, want, f32))):
    g, w, f = (np.asarray(a, np.float64) for a in (g, w, f))
    scale = np.abs(w).max() + 1e-3  # a one-key row's dq is 0
    np.testing.assert_allclose(g, w, atol=1e-2 * scale, rtol=0, err_msg=name)
    differs |= np.abs(g - f).max() > 1e-4 * scale
  assert differs  # bf16 products ran, not the float32 ones


@pytest.mark.parametrize("T,S,block_q,block_k", [(200, 200, 16, 16), (150, 230, None, None),
                                                 (97, 97, 32, 24)])
def test_scores_that_rise_and_fall_along_the_keys(kernel, T, S, block_q, block_k):
  """Rows whose scores climb by ~0.15 a key and swing by ~+-7.5 (a ramp plus a sine in one channel
  of k against a constant one of q): the float32 forward's running max moves at some tiles (a rise
  past its slack: y and the sum rescaled) and stays stale at others (probabilities above 1); value
  and gradients against float64, within 2e-5 of the largest entry. (The bf16 forward moves its max
  at every rise: the paths the tests above take.)"""
  q, k, v, cotangent = _qkv(1, 2, T, S, 64, seed=11)
  q = q.at[..., 0].set(3.0)
  k = k.at[..., 0].set(0.4 * jnp.arange(S) + 20.0 * jnp.sin(jnp.arange(S) / 7.0))
  tiles = {name: n for name, n in (("block_q", block_q), ("block_k", block_k)) if n}
  got = _value_and_grads(lambda q, k, v: kattn.flash_attention(q, k, v, **tiles), q, k, v,
                         cotangent)
  with jax.enable_x64(True):
    want = _value_and_grads(_float64_attention, *(jnp.asarray(np.asarray(a), jnp.float64)
                                                  for a in (q, k, v, cotangent)))
  for name, g, w in zip(("value", "dq", "dk", "dv"), *map(jax.tree.leaves, (got, want))):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    np.testing.assert_allclose(g, w, atol=2e-5 * np.abs(w).max(), rtol=0, err_msg=name)


def test_bf16_products_off_is_the_float32_kernel(kernel, monkeypatch):
  """BF16_PRODUCTS off (bench_train's `attnf32`) or a CPU without AVX512-BF16: bf16=True runs the
  float32 products, bit for bit; the attribute the program passes says which."""
  q, k, v, cotangent = _qkv(1, 2, 70, 70, 16, seed=8)
  want = _value_and_grads(kattn.flash_attention, q, k, v, cotangent)
  monkeypatch.setattr(kattn, "BF16_PRODUCTS", False)
  assert not kattn.bf16_products()
  got = _value_and_grads(lambda q, k, v: kattn.flash_attention(q, k, v, bf16=True), q, k, v, cotangent)
  _assert_close(got, want, 0)
  hlo = jax.jit(lambda q: kattn.flash_attention(q, k, v, bf16=True)).lower(q).as_text()
  assert "bf16 = 0" in hlo


def test_matmul_dtype_bfloat16_gives_the_kernel_bf16_products(kernel):
  """The mixed mode (model.matmul_dtype=bfloat16) asks the attention kernel for bf16 products,
  both passes; the default float32 model does not."""
  q, k, v, _ = _qkv(1, 2, 40, 40, 16, seed=9)
  for products, flag in ((False, "bf16 = 0"), (True, f"bf16 = {int(kattn.bf16_products())}")):
    fn = lambda q: jnp.sum(attention(q, k, v, None, impl="kernel", bf16_products=products))
    hlo = jax.jit(jax.grad(fn)).lower(q).as_text()
    assert hlo.count(flag) == 2, (products, flag)


def test_masks_and_bfloat16_keep_the_blocked_formulation(kernel):
  """impl="kernel" with an explicit mask (left padding: fully masked rows are uniform, as
  MASK_VALUE makes them) or bfloat16 inputs is the blocked attention, bit for bit."""
  q, k, v, cotangent = _qkv(2, 2, 12, 12, 16, seed=2)
  padding = jnp.ones((2, 12), bool).at[1, :5].set(False)  # row 1 left-padded by 5
  _, mask, _ = attention_inputs(jnp.zeros((2, 12), jnp.int32), padding)
  assert not bool(mask[1, 0, 0].any())  # a padding query that sees nothing
  for q_, k_, v_, m in ((q, k, v, mask), (*(a.astype(jnp.bfloat16) for a in (q, k, v)), None)):
    got = _value_and_grads(lambda q, k, v: attention(q, k, v, m, impl="kernel"), q_, k_, v_, cotangent)
    want = _value_and_grads(lambda q, k, v: blocked_attention(q, k, v, m), q_, k_, v_, cotangent)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    hlo = jax.jit(lambda q, k, v: attention(q, k, v, m, impl="kernel")).lower(q_, k_, v_).as_text()
    assert kattn.FORWARD not in hlo
  assert MASK_VALUE < -1e29  # the uniform fully-masked rows above rely on a finite mask value


def test_attention_impl_kernel_runs_the_kernel(kernel):
  q, k, v, cotangent = _qkv(1, 2, 40, 40, 16, seed=3)
  hlo = jax.jit(jax.grad(lambda q: jnp.sum(attention(q, k, v, None, impl="kernel")))).lower(q).as_text()
  assert kattn.FORWARD in hlo and kattn.BACKWARD in hlo
  got = _value_and_grads(lambda q, k, v: attention(q, k, v, None, impl="kernel"), q, k, v, cotangent)
  _assert_close(got, _value_and_grads(kattn.flash_attention, q, k, v, cotangent), 0)


def test_layer_scan_vmap_and_dots_remat(kernel):
  """Through a scan over layers with "dots" remat (which must save the kernel's outputs by name:
  its forward runs once per layer, not again in the backward) and under vmap, the same numbers."""
  q, k, v, cotangent = _qkv(1, 2, 70, 70, 16, seed=4)
  ws = jnp.asarray(np.random.default_rng(5).standard_normal((3, 16, 16)), jnp.float32)

  def stack(fn, remat):
    def layer(x, w):
      return fn(x @ w, k, v), None
    if remat:
      layer = jax.checkpoint(layer, policy=REMAT_POLICIES["dots"], prevent_cse=False)
    return lambda q: jnp.sum(jax.lax.scan(layer, q, ws)[0] * cotangent)

  got = jax.jit(jax.value_and_grad(stack(kattn.flash_attention, True)))
  want = jax.jit(jax.value_and_grad(stack(lambda q, k, v: blocked_attention(q, k, v, None), False)))
  _assert_close(got(q), want(q), 2e-5, "scan + remat")
  text = got.lower(q).compile().as_text()
  plain = jax.jit(jax.value_and_grad(stack(kattn.flash_attention, False))).lower(q).compile().as_text()
  assert text.count(kattn.FORWARD) == plain.count(kattn.FORWARD) >= 1

  batched = jax.vmap(kattn.flash_attention)(q[None].repeat(2, 0), k[None].repeat(2, 0),
                                            v[None].repeat(2, 0))
  np.testing.assert_allclose(batched[1], kattn.flash_attention(q, k, v), atol=0)


def test_resolve_and_the_one_line_errors(monkeypatch):
  cpu = jax.devices("cpu")
  assert kattn.resolve("xla", cpu[:1]) == "xla"
  assert kattn.resolve("auto", cpu[:1]) == ("kernel" if kattn.available() else "auto")
  assert kattn.resolve("blocked", cpu[:1]) == "blocked"  # a config can pin blocked
  monkeypatch.setattr(kattn, "USE_KERNEL", False)
  assert kattn.resolve("auto", cpu[:1]) == "auto"
  if len(cpu) > 1:  # conftest's 8 host devices: a sharded program keeps the blocked formulation
    assert kattn.resolve("auto", cpu) == "auto"
    with pytest.raises(GPTError, match="kernel cannot be used: it runs on one device"):
      kattn.resolve("kernel", cpu)
  with pytest.raises(GPTError, match="model.attention_impl='flash'"):
    GPTConfig(attention_impl="flash")


def test_without_the_library_blocked_runs_and_kernel_is_an_error(monkeypatch):
  monkeypatch.setenv("GPT_ATTENTION_KERNEL", "0")
  cpu = jax.devices("cpu")[:1]
  assert kattn.resolve("auto", cpu) == "auto"
  with pytest.raises(GPTError, match="attention_impl=kernel cannot be used: GPT_ATTENTION_KERNEL=0"):
    kattn.resolve("kernel", cpu)
  q, k, v, _ = _qkv(1, 1, 4, 4, 8)
  with pytest.raises(GPTError, match="attention_impl=kernel cannot be used"):
    attention(q, k, v, None, impl="kernel")


def _one_step(config, impl: str, monkeypatch):
  """Loss and parameter update of one step of the train mode's own program on one device, with
  `model.attention_impl=impl` (the kernel's switch on: "blocked" must stay blocked)."""
  monkeypatch.setattr(kattn, "USE_KERNEL", True)
  config.model.attention_impl = impl
  cfg = GPTConfig.from_config(config.model)
  config.mesh.data = 1
  programs = build_programs(config, cfg, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  params = nnx.to_pure_dict(nnx.state(init_model(cfg, 0), nnx.Param))
  state = jax.device_put(create_state(params, programs.tx, 0), programs.state_sharding)
  t = config.train
  tokens = np.random.default_rng(0).integers(0, cfg.n_vocab, (t.batch_size, t.seq_len + 1))
  batch = jax.device_put(jnp.asarray(tokens, jnp.int32), programs.batch_sharding)
  hlo = programs.train_step.lower(state, batch, programs.abstract_frozen).as_text()
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = programs.train_step(state, batch, {})
  return float(metrics["loss"]), jax.tree.map(lambda a, b: np.asarray(a) - b, state.params, before), hlo


def test_train_step_kernel_equals_blocked(kernel, tmp_path, monkeypatch):
  """The train mode's step (layer scan, dots remat, gradient accumulation) with the kernel against
  the blocked formulation: the same loss and update up to float32 reassociation. Plain SGD at rate 1
  makes the update the gradient itself."""
  config = tiny_config(tmp_path, grad_accum=2, optimizer="sgd", learning_rate=1.0, momentum=0.0,
                       grad_clip=0.0, warmup_steps=0, schedule="constant")
  config.model.update(scan_layers=True, remat="dots")
  loss_b, update_b, hlo_b = _one_step(config, "blocked", monkeypatch)  # pinned by the config
  loss_k, update_k, hlo_k = _one_step(config, "auto", monkeypatch)  # the default: the kernel
  assert kattn.FORWARD not in hlo_b and kattn.FORWARD in hlo_k and kattn.BACKWARD in hlo_k
  np.testing.assert_allclose(loss_k, loss_b, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(update_k), jax.tree.leaves(update_b)):
    scale = np.abs(b).max()
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path))


PORTABLE_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from gpt.attention import blocked_attention
from gpt.kernels import attention as kattn
kattn.FLAGS = tuple(f for f in kattn.FLAGS if not f.startswith(("-march", "-mprefer"))) + MARCH
assert kattn.available(), kattn.why_unavailable()
import ctypes
from gpt.kernels import native
lib = ctypes.cdll.LoadLibrary(str(native.build(kattn.SOURCE, kattn.FLAGS, cpu_specific=True)))
assert lib.GptAttentionHasAvx512() == AVX512 and lib.GptAttentionHasBf16() == 0
assert not kattn.bf16_products()
for T, S, K in [(65, 65, 64), (37, 100, 20)]:
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 3, n, K)), jnp.float32) for n in (T, S, S))
  loss = lambda fn: jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * q),
                                               argnums=(0, 1, 2)))(q, k, v)
  got, want = loss(kattn.flash_attention), loss(lambda q, k, v: blocked_attention(q, k, v, None))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)
  # the bf16 products' fallback where the build has no AVX512-BF16: the float32 kernel, exactly
  for g, w in zip(jax.tree.leaves(loss(lambda q, k, v: kattn.flash_attention(q, k, v, bf16=True))),
                  jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
print("portable ok")
"""


@pytest.mark.slow  # spawns a process that builds the kernel without AVX-512 / AVX512-BF16
@pytest.mark.parametrize("march,avx512", [(("-march=x86-64",), 0),
                                          (("-march=native", "-mno-avx512bf16"), 1)])
def test_the_portable_build_without_avx512_gives_the_same_numbers(kernel, tmp_path, march, avx512):
  """The loops for CPUs without AVX-512 (built here with -march=x86-64), and the AVX-512 build
  without AVX512-BF16 (where bf16=True falls back to the float32 products), in a fresh process (a
  process registers one library per FFI target name), against the blocked formulation."""
  if avx512 and not kattn.KERNEL.library().GptAttentionHasAvx512():
    pytest.skip("this CPU has no AVX-512")
  import os
  import subprocess
  import sys

  from conftest import REPO
  env = {**os.environ, "GPT_KERNEL_CACHE": str(tmp_path), "PYTHONPATH": str(REPO)}
  check = f"MARCH, AVX512 = {march!r}, {avx512}\n" + PORTABLE_CHECK
  out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0 and "portable ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.slow  # builds the kernel once more, from git
def test_attention_ab_runs_an_earlier_revision_under_targets(kernel, tmp_path, capsys):
  """experiments/attention_ab.py: HEAD's attention.cc built from git and registered under other
  names; TARGETS pointed at it traces programs that call it (and only it), with the current
  kernel's numbers (the same source at HEAD, or a revision of it within float32 rounding); the
  `--layer` table has both products' rows."""
  from experiments import attention_ab
  attention_ab.register(attention_ab.build_revision("HEAD", tmp_path))
  q, k, v, cotangent = _qkv(1, 2, 70, 70, 16, seed=12)
  want = _value_and_grads(kattn.flash_attention, q, k, v, cotangent)
  saved, kattn.TARGETS = kattn.TARGETS, attention_ab.BASE_TARGETS
  try:
    fn = lambda q, k, v: kattn.flash_attention(q, k, v)
    got = _value_and_grads(fn, q, k, v, cotangent)
    hlo = jax.jit(jax.grad(lambda q: jnp.sum(fn(q, k, v)))).lower(q).as_text()
  finally:
    kattn.TARGETS = saved
  assert all(name in hlo for name in attention_ab.BASE_TARGETS)
  assert kattn.FORWARD not in hlo and kattn.BACKWARD not in hlo
  _assert_close(got, want, 1e-5, "HEAD's build")
  attention_ab.layer((1, 2, 40, 16), rounds=1)
  table = capsys.readouterr().out
  assert "| float32 |" in table and ("| bf16 |" in table) == kattn.bf16_products()
