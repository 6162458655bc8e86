"""The one-pass Adam/AdamW kernel (gpt.kernels.adam through gpt.optim.FusedOptimizer) against optax's
chain: the same parameters and state (within an ulp or two of float32), the same state tree, in
place in the compiled step, and a run that resumes across the switch."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt import optim, train
from gpt.config import base_config
from gpt.errors import GPTError
from gpt.kernels import adam as kadam

from train_utils import compile_cache, final_params, max_abs_diff, read_metrics, tiny_config

pytestmark = pytest.mark.skipif(not kadam.available(), reason=f"adam kernel not built: "
                                f"{kadam.why_unavailable()}")
ONE_CPU = jax.devices("cpu")[:1]


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
  yield from compile_cache(tmp_path_factory)


def tree(seed=0, bf16_leaf=False):
  """A params tree shaped like the model's (blocks under h, stacked), with odd sizes and tails."""
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  params = {"h": {"attn": {"c_attn": {"w": f(2, 33, 37), "b": f(2, 37)}},
                  "ln_1": {"g": f(2, 33), "b": f(2, 33)}},
            "wte": f(1001, 17), "wpe": f(5, 17), "ln_f": {"g": f(17), "b": f(17)}}
  if bf16_leaf:
    params["ln_f"]["g"] = params["ln_f"]["g"].astype(jnp.bfloat16)
  return params


def config(optimizer="adam", clip=1.0, frozen=False, impl="kernel"):
  t = base_config().train
  t.update(optimizer=optimizer, learning_rate=3e-2, weight_decay=0.1, grad_clip=clip,
           only_train_transformer_layers=frozen, adam_impl=impl, b2=0.99)
  return t


def assert_float32_close(a, b, rounding=2):
  """a and b agree within `rounding` float32 roundings: of each element, or of the array's largest
  element where an update cancels (p + lr * u near zero)."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  eps = np.finfo(np.float32).eps
  tol = rounding * (np.spacing(np.maximum(np.abs(a), np.abs(b))) + eps * np.max(np.abs(a)))
  assert np.all(np.abs(a - b) <= tol), np.max(np.abs(a - b) / tol)


def run_both(t, params, steps=4, grad_scales=(3.0, 1e-3, 3.0, 1e-3)):
  """(optax's (params, state), the kernel's (params, state)) after `steps` steps of the same
  gradients, alternating above and below the clipping threshold."""
  ref = optim.make_optimizer(t, params)
  fused = optim.make_optimizer(t, params, devices=ONE_CPU)
  assert isinstance(fused, optim.FusedOptimizer) and not isinstance(ref, optim.FusedOptimizer)

  @jax.jit
  def optax_step(p, s, g):
    u, s = ref.update(g, s, p)
    return optax.apply_updates(p, u), s

  fused_step = jax.jit(lambda p, s, g: fused.apply(g, s, p), donate_argnums=(0, 1))
  rng = np.random.default_rng(1)
  a, b = (params, ref.init(params)), (jax.tree.map(jnp.copy, params), fused.init(params))
  for i in range(steps):
    g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * grad_scales[i % 4],
                                           x.dtype), params)
    a = optax_step(a[0], a[1], g)
    b = fused_step(b[0], b[1], g)
  return a, b


def assert_close(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    if x.dtype == jnp.int32:
      assert int(x) == int(y)
    elif x.dtype == jnp.float32:
      assert_float32_close(x, y)
    else:
      np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-2)


@pytest.mark.parametrize("optimizer,clip,frozen", [
    ("adam", 1.0, False), ("adamw", 1.0, False), ("adamw", 0.0, False), ("adam", 1.0, True),
    ("adamw", 1.0, True)])
def test_kernel_matches_optax_chain(optimizer, clip, frozen):
  params = tree()
  (pa, sa), (pb, sb) = run_both(config(optimizer, clip, frozen), params)
  assert_close((pa, sa), (pb, sb))
  if frozen:  # frozen leaves untouched, and no moments for them (optax's MaskedNode)
    for k in ("wte", "wpe"):
      assert np.array_equal(pb[k], params[k])
  # Most elements are bit for bit optax's (XLA's fusions decide the rest: one rounding apart).
  same = np.mean([np.mean(np.asarray(x) == np.asarray(y))
                  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb))])
  assert same > 0.9, same


def test_portable_build_matches_optax(monkeypatch):
  assert kadam.available(portable=True), kadam.why_unavailable()
  monkeypatch.setattr(kadam, "PORTABLE", True)
  (pa, sa), (pb, sb) = run_both(config("adamw"), tree(2), steps=2)
  assert_close((pa, sa), (pb, sb))


def test_bfloat16_leaves_take_optax_arithmetic():
  (pa, sa), (pb, sb) = run_both(config("adamw"), tree(3, bf16_leaf=True), steps=2)
  assert pb["ln_f"]["g"].dtype == jnp.bfloat16
  assert_close((pa, sa), (pb, sb))


def test_update_is_in_place_in_the_compiled_step():
  """Donated p, m, v: XLA aliases the kernel's outputs to them and copies no parameter array."""
  params = tree()
  tx = optim.make_optimizer(config("adamw"), params, devices=ONE_CPU)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  # (params, state) in and out in the same order, as the train step's donated TrainState: jax pairs
  # donated inputs with outputs of the same shape in order.
  step = jax.jit(lambda p, s, g: tx.apply(g, s, p), donate_argnums=(0, 1))
  hlo = step.lower(params, state, grads).compile().as_text()
  calls = [l for l in hlo.splitlines() if kadam.TARGET in l and "custom-call(" in l]
  assert len(calls) == len(jax.tree.leaves(params))
  assert all("output_to_operand_aliasing" in l for l in calls)
  big = {f"f32[{','.join(map(str, x.shape))}]" for x in jax.tree.leaves(params) if x.size > 200}
  copies = [l for l in hlo.splitlines() if re.search(r"= f32\[[\d,]+\]\{[\d,]*\} copy\(", l)
            and any(s in l for s in big)]
  assert not copies, copies


def test_resolve_and_config_errors():
  assert kadam.resolve("auto", ONE_CPU) == "kernel" and kadam.resolve("optax", ONE_CPU) == "optax"
  eight = jax.devices("cpu")
  if len(eight) > 1:  # tests run on 8 fake CPU devices (conftest)
    assert kadam.resolve("auto", eight) == "optax"
    assert not isinstance(optim.make_optimizer(config(impl="auto"), tree(), devices=eight),
                          optim.FusedOptimizer)
    with pytest.raises(GPTError, match="train.adam_impl=kernel cannot be used: it runs on one device"):
      kadam.resolve("kernel", eight)
  with pytest.raises(GPTError, match="choose one of auto, kernel, optax"):
    kadam.resolve("fast", ONE_CPU)
  t = config(impl="kernel")
  t.optimizer = "sgd"
  with pytest.raises(GPTError, match="is for optimizer adam or adamw"):
    optim.make_optimizer(t, tree(), devices=ONE_CPU)
  t.adam_impl = "auto"  # sgd keeps optax's
  assert not isinstance(optim.make_optimizer(t, tree(), devices=ONE_CPU), optim.FusedOptimizer)
  assert not isinstance(optim.make_optimizer(config(impl="optax"), tree(), devices=ONE_CPU),
                        optim.FusedOptimizer)


@pytest.mark.slow
def test_resume_across_the_switch(tmp_path):
  """A checkpoint written by optax's update resumes under the kernel, and the kernel's under
  optax's: both end where an uninterrupted run of either ends (within float32 noise)."""
  def run(name, steps, impl):
    c = tiny_config(tmp_path, steps=steps, adam_impl=impl, save_every=3, grad_accum=2)
    c.mesh.data = 1  # one device: where "kernel" runs
    train.run(c, str(tmp_path / name))
    return c

  c = run("optax", 6, "optax")
  run("kernel", 6, "kernel")
  run("o2k", 3, "optax"), run("o2k", 6, "kernel")
  run("k2o", 3, "kernel"), run("k2o", 6, "optax")
  ref = final_params(tmp_path / "optax", c.model)
  for name in ("kernel", "o2k", "k2o"):
    assert max_abs_diff(ref, final_params(tmp_path / name, c.model)) < 1e-5, name
    losses = read_metrics(tmp_path / name)
    assert sorted(losses) == list(range(1, 7))
    assert np.allclose([losses[s][-1] for s in range(1, 7)],
                       [read_metrics(tmp_path / "optax")[s][-1] for s in range(1, 7)], atol=1e-5)


def test_train_step_with_accumulation_and_freezing():
  """gpt.train_step through FusedOptimizer.apply: two steps of 2 micro-batches with the embeddings
  frozen give optax's losses, state tree and parameters: after the first step within float32
  rounding; after the second within 1% of the learning rate, since Adam turns the gradients that
  are pure rounding noise (c_attn's key bias: softmax ignores it) into updates of up to lr."""
  from flax import nnx

  from gpt.model import GPTConfig, init_model
  from gpt.train_step import create_state, train_step

  model = init_model(GPTConfig(n_vocab=97, n_ctx=16, n_embd=32, n_head=2, n_layer=2), 0)
  graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
  t = config("adamw", frozen=True)
  schedule = optim.learning_rate_schedule(t)
  batch = jnp.asarray(np.random.default_rng(0).integers(0, 97, (4, 17)), jnp.int32)
  out = []
  for tx in (optim.make_optimizer(t, params), optim.make_optimizer(t, params, devices=ONE_CPU)):
    step = jax.jit(lambda s, b, tx=tx: train_step(s, b, graphdef=graphdef, tx=tx, schedule=schedule,
                                                  grad_accum=2, noise=0.0, dropout=False))
    first, m1 = step(create_state(params, tx, 0), batch)
    first = jax.tree.map(np.asarray, first)  # the next call donates it
    second, m2 = step(jax.tree.map(jnp.asarray, first), batch)
    out.append((first, second, float(m1["loss"]), float(m2["loss"])))
  (a1, a2, la1, la2), (b1, b2, lb1, lb2) = out
  assert isinstance(optim.make_optimizer(t, params, devices=ONE_CPU), optim.FusedOptimizer)
  assert jax.tree.structure(a2.opt_state) == jax.tree.structure(b2.opt_state)
  assert la1 == lb1 and la2 == pytest.approx(lb2, abs=1e-6)
  assert_close((a1.params, a1.opt_state), (b1.params, b1.opt_state))
  for k in ("wte", "wpe"):
    assert np.array_equal(b2.params[k], params[k])
  assert max_abs_diff(a2.params, b2.params) < 0.01 * t.learning_rate
