"""The optimizer, the train step and the training loop (tiny models, 8 fake CPU devices)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gpt import optim, train
from gpt.checkpoint import Checkpointer, checkpoint_dir
from gpt.config import base_config
from gpt.errors import GPTError
from gpt.model import GPTConfig, abstract_model, init_model
from gpt.train_step import add_noise, create_state, loss_fn, train_step

from train_utils import (VOCAB, compile_cache, final_params, max_abs_diff, read_metrics,
                         subprocess_env, tiny_config, train_command)

REPO = Path(__file__).resolve().parent.parent
TINY = GPTConfig(n_vocab=VOCAB, n_ctx=64, n_embd=64, n_head=4, n_layer=2)


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
  yield from compile_cache(tmp_path_factory)


def pure_params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_weight_decay_and_freezing_masks():
  params = pure_params(abstract_model(TINY))
  decay = {"/".join(str(k.key) for k in path): v for path, v in
           jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]}
  assert {k for k, v in decay.items() if v} == {
      "h/attn/c_attn/w", "h/attn/c_proj/w", "h/mlp/c_fc/w", "h/mlp/c_proj/w"}
  labels = jax.tree.leaves(optim.trainable_labels(params, True))
  assert labels.count("freeze") == 4  # wte, wpe, ln_f/g, ln_f/b
  assert set(jax.tree.leaves(optim.trainable_labels(params, False))) == {"train"}


def test_learning_rate_schedules():
  t = base_config().train
  t.update(learning_rate=1e-3, steps=100, warmup_steps=0, schedule="constant")
  assert float(optim.learning_rate_schedule(t)(57)) == pytest.approx(1e-3)
  t.warmup_steps = 10
  s = optim.learning_rate_schedule(t)
  assert [float(s(i)) for i in (0, 5, 10, 90)] == pytest.approx([0, 5e-4, 1e-3, 1e-3])
  t.update(schedule="cosine", min_lr_ratio=0.1)
  s = optim.learning_rate_schedule(t)
  assert [float(s(i)) for i in (0, 10, 55, 100)] == pytest.approx([0, 1e-3, 5.5e-4, 1e-4], rel=1e-5)
  t.schedule = "linear"
  with pytest.raises(GPTError, match="choose one of constant, cosine"):
    optim.learning_rate_schedule(t)


def test_optimizers_update_as_documented():
  params = {"h": {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}, "wte": jnp.ones((4, 3))}
  grads = jax.tree.map(jnp.zeros_like, params)
  t = base_config().train
  t.update(learning_rate=0.1, grad_clip=0.0, optimizer="adamw", weight_decay=0.5)
  tx = optim.make_optimizer(t, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Zero gradient: only decoupled weight decay moves, and only the blocks' matmul weights.
  assert np.allclose(updates["h"]["w"], -0.1 * 0.5) and np.all(updates["h"]["b"] == 0)
  assert np.all(updates["wte"] == 0)
  t.update(optimizer="sgd", momentum=0.0)
  tx = optim.make_optimizer(t, params)
  grads = jax.tree.map(lambda p: 2 * jnp.ones_like(p), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert np.allclose(updates["wte"], -0.2)
  t.optimizer = "lion"
  with pytest.raises(GPTError, match="choose one of adam, adamw, sgd"):
    optim.make_optimizer(t, params)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_clipping_by_one_scale_is_optax_clip_by_global_norm(optimizer):
  """optim.clip_by_global_norm (a scalar scale, fused by XLA into Adam's passes) against optax's:
  the same state tree (checkpoints resume either way), the gradients unchanged below the norm,
  and float32 rounding apart above it, through a whole Adam/AdamW step."""
  rng = np.random.default_rng(3)
  params = {"h": {"w": jnp.asarray(rng.standard_normal((2, 8, 5)), jnp.float32),
                  "b": jnp.asarray(rng.standard_normal((2, 5)), jnp.float32)},
            "wte": jnp.asarray(rng.standard_normal((11, 8)), jnp.float32)}
  t = base_config().train
  t.update(optimizer=optimizer, learning_rate=1e-3, grad_clip=1.0, weight_decay=0.1)
  ours = optim.make_optimizer(t, params)
  try:
    optim.SCALAR_CLIP = False
    theirs = optim.make_optimizer(t, params)
  finally:
    optim.SCALAR_CLIP = True
  assert (jax.tree.structure(ours.init(params)) == jax.tree.structure(theirs.init(params)))
  for size in (0.01, 30.0):  # global norm below 1 (no clipping), far above it (clipped)
    grads = jax.tree.map(lambda p: size * jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
                         params)
    clip = jax.jit(lambda g: optim.clip_by_global_norm(1.0).update(g, optax.EmptyState())[0])(grads)
    want = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())[0]
    for a, b in zip(jax.tree.leaves(clip), jax.tree.leaves(want)):
      if size < 1:
        np.testing.assert_array_equal(a, b)
      else:
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
        assert float(optax.global_norm(clip)) == pytest.approx(1.0, rel=1e-6)
    step = lambda tx: jax.jit(tx.update)(grads, tx.init(params), params)
    (u1, s1), (u2, s2) = step(ours), step(theirs)
    for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2))):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)


def test_noise_replaces_inputs_at_the_given_rate():
  tokens = jnp.zeros((64, 256), jnp.int32)
  key = jax.random.key(0)
  assert np.array_equal(add_noise(tokens, 0.0, VOCAB, key), tokens)
  noisy = np.asarray(add_noise(tokens, 0.3, VOCAB, key))
  assert abs(np.mean(noisy != 0) - 0.3 * (1 - 1 / VOCAB)) < 0.02
  assert np.array_equal(noisy, add_noise(tokens, 0.3, VOCAB, key))
  assert noisy.max() < VOCAB


def test_noise_touches_inputs_only_and_dropout_is_seeded():
  cfg = TINY.replace(embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
  model = init_model(cfg, 0)
  graphdef, params = nnx.graphdef(model), pure_params(model)
  windows = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (4, 17)), jnp.int32)
  f = jax.jit(loss_fn, static_argnums=(1, 4, 5))
  key = jax.random.key(1)

  @jax.jit
  def direct(params, windows, key):  # noised inputs against clean targets, and no noise at all
    m = nnx.merge(graphdef, params)
    noisy = add_noise(windows[:, :-1], 0.5, VOCAB, jax.random.split(key)[0])
    xent = optax.softmax_cross_entropy_with_integer_labels
    return xent(m(noisy), windows[:, 1:]).mean(), xent(m(windows[:, :-1]), windows[:, 1:]).mean()

  expect, clean = direct(params, windows, key)
  assert float(f(params, graphdef, windows, key, 0.5, False)) == pytest.approx(float(expect), abs=1e-5)
  # Dropout: same key, same loss; another key, another loss; no key, the deterministic loss.
  a = float(f(params, graphdef, windows, key, 0.0, True))
  assert a == float(f(params, graphdef, windows, key, 0.0, True))
  assert a != float(f(params, graphdef, windows, jax.random.key(2), 0.0, True))
  assert float(f(params, graphdef, windows, None, 0.0, True)) == pytest.approx(float(clean), abs=1e-5)


def adam_gradient(opt_state, b1):
  """The gradient Adam saw at step 1, from its first moment (mu = (1 - b1) g)."""
  found = [leaf.mu for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu"))
           if hasattr(leaf, "mu")]
  assert len(found) == 1
  return jax.tree.map(lambda m: np.asarray(m, np.float64) / (1 - b1), found[0])


@pytest.mark.slow  # trains: an Adam step, with and without accumulation
def test_gradient_accumulation_equals_one_big_batch_and_freezing_holds():
  """Four micro-batches of 2 and one batch of 8 give the same gradient, up to float32 summation
  order, and so the same Adam step, up to how Adam's first step magnifies that rounding.

  Adam's first update is -lr * g / (|g| + eps) per parameter: its slope, lr * eps / (|g| + eps)^2,
  reaches lr / eps = 1e5 for gradients near zero. A gradient of ~7e-8 that differs by 3e-10
  between the two summation orders (a 2.5e-9 relative rounding of the ~0.1 gradients it is summed
  with) moves that parameter by ~4e-7; on other jax/XLA versions the summation order, and so the
  largest such difference, changes (1.3e-6 seen with jax 0.12). So the gradients are compared at
  float32 rounding, and each parameter by the difference Adam's slope allows for its gradients.
  """
  model = init_model(TINY, 0)
  graphdef, params = nnx.graphdef(model), pure_params(model)
  t = base_config().train
  t.update(optimizer="adam", learning_rate=1e-3, only_train_transformer_layers=True)
  tx = optim.make_optimizer(t, params)
  schedule = optim.learning_rate_schedule(t)
  batch = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (8, 33)), jnp.int32)
  results = {}
  for accum in (1, 4):
    step = jax.jit(lambda s, b, accum=accum: train_step(
        s, b, graphdef=graphdef, tx=tx, schedule=schedule, grad_accum=accum, noise=0.0,
        dropout=False))
    state, metrics = step(create_state(params, tx, 0), batch)
    results[accum] = (state, metrics)
  (s1, m1), (s4, m4) = results[1], results[4]
  assert float(m1["loss"]) == pytest.approx(float(m4["loss"]), abs=1e-6)
  assert float(m1["grad_norm"]) == pytest.approx(float(m4["grad_norm"]), rel=1e-5)
  g1, g4 = adam_gradient(s1.opt_state, t.b1)["h"], adam_gradient(s4.opt_state, t.b1)["h"]
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(g1))
  assert max_abs_diff(g1, g4) < 1e-6 * scale  # float32 summation order, nothing more
  lr = float(schedule(0))
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(g1)]
  trees = (s1.params["h"], s4.params["h"], g1, g4)
  for path, p1, p4, a, b in zip(paths, *(map(np.float64, jax.tree.leaves(x)) for x in trees)):
    near = np.where(np.sign(a) == np.sign(b), np.minimum(np.abs(a), np.abs(b)), 0.0)
    # float32 rounding: of the new parameter, and of the update (lr * (1 +- a few ulps) where
    # |g| >> eps, from sqrt(nu / (1 - b2)) against |m / (1 - b1)|)
    rounding = 2 * np.spacing(np.abs(p1).astype(np.float32)) + 4 * lr * np.finfo(np.float32).eps
    allowed = lr * t.eps * np.abs(a - b) / (near + t.eps) ** 2 + rounding
    assert np.all(np.abs(p1 - p4) <= allowed), (path, float(np.max(np.abs(p1 - p4) - allowed)))
  assert int(s1.step) == 1
  for name in ("wte", "wpe", "ln_f"):  # frozen: bit-identical
    assert max_abs_diff(s1.params[name], params[name]) == 0
  assert max_abs_diff(s1.params["h"], params["h"]) > 1e-4


@pytest.mark.parametrize("matmul", ["xla", "mkl"])
def test_held_parameters_are_not_differentiated(matmul):
  """only_train_transformer_layers: the step differentiates `h` alone (optim.held_names), so the
  tied head's d(wte) product and the embeddings' scatters are not in the compiled program (with
  MKL's matmuls the fused output loss runs, and XLA drops its unused d(wte) call); the blocks'
  gradients and the new state are what differentiating everything gave, grad_norm is the
  trained gradients' norm (what clipping uses), and the held parameters stay bit-identical."""
  if matmul == "mkl":
    from gpt.kernels import gemm
    if not gemm.available():
      pytest.skip(f"MKL's matmuls are not available here: {gemm.why_unavailable()}")
  model = init_model(TINY.replace(matmul=matmul), 0)
  graphdef, params = nnx.graphdef(model), pure_params(model)
  t = base_config().train
  t.update(optimizer="adam", learning_rate=1e-3, only_train_transformer_layers=True)
  held = optim.held_names(t, params)
  assert set(held) == {"wte", "wpe", "ln_f"}
  tx = optim.make_optimizer(t, params)
  schedule = optim.learning_rate_schedule(t)
  batch = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (8, 33)), jnp.int32)
  runs, texts = {}, {}
  for names in ((), held):
    step = jax.jit(lambda s, b, names=names: train_step(
        s, b, graphdef=graphdef, tx=tx, schedule=schedule, grad_accum=1, noise=0.0,
        dropout=False, held=names))
    state = create_state(params, tx, 0)
    texts[names] = step.lower(state, batch).compile().as_text()
    runs[names] = step(state, batch)
  (s_all, m_all), (s_held, m_held) = runs[()], runs[held]
  # d(wte) is f32[VOCAB, 64]: a product (dot or MKL's custom call) or the lookup's scatter
  vd = re.compile(rf"= f32\[{VOCAB},64\]\{{1,0\}} (dot|custom-call|scatter|fusion)\(")
  assert vd.search(texts[()]) and not vd.search(texts[held])
  g_all, g_held = adam_gradient(s_all.opt_state, t.b1)["h"], adam_gradient(s_held.opt_state, t.b1)["h"]
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(g_all))
  assert max_abs_diff(g_all, g_held) < 1e-6 * scale
  assert float(m_held["loss"]) == pytest.approx(float(m_all["loss"]), abs=1e-6)
  h_grads = jax.grad(loss_fn)(params, graphdef, batch, None, 0.0, False)["h"]  # before clipping
  assert float(m_held["grad_norm"]) == pytest.approx(float(optax.global_norm(h_grads)), rel=1e-5)
  assert float(m_held["grad_norm"]) < float(m_all["grad_norm"])  # wte's gradient is left out
  for name in held:
    assert max_abs_diff(s_held.params[name], params[name]) == 0


@pytest.mark.slow  # trains (2 steps of the tiny model through the train mode)
def test_train_mode_with_only_transformer_layers_trains_only_h(tmp_path):
  """The train mode's own program (sharded state, held names, one CPU device's MKL matmuls and Adam
  kernel where they resolve) with only_train_transformer_layers: wte, wpe and ln_f are bit-identical
  to the initial ones after training, h moved, and the loss is finite."""
  config = tiny_config(tmp_path, steps=2, optimizer="adam", only_train_transformer_layers=True)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config.train.save_every = 1
  train.run(config, str(tmp_path / "run"))
  first = jax.device_get(init_model(GPTConfig.from_config(config.model), config.seed))
  first = nnx.to_pure_dict(nnx.state(first, nnx.Param))
  last = final_params(tmp_path / "run", config.model)
  for name in ("wte", "wpe", "ln_f"):
    assert max_abs_diff(last[name], first[name]) == 0, name
  assert max_abs_diff(last["h"], first["h"]) > 1e-4
  assert all(np.isfinite(v).all() for v in read_metrics(tmp_path / "run").values())


@pytest.mark.slow  # trains: gradients with and without remat, and a bf16 train step
def test_remat_gives_the_same_gradients_and_bf16_keeps_float32_master_weights():
  windows = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (4, 33)), jnp.int32)
  params = pure_params(init_model(TINY, 0))
  results = {}
  for remat in ("none", "full"):
    graphdef = nnx.graphdef(abstract_model(TINY.replace(remat=remat)))
    grad_fn = jax.jit(jax.value_and_grad(loss_fn), static_argnums=(1, 4, 5))
    results[remat] = grad_fn(params, graphdef, windows, None, 0.0, False)
  assert float(results["full"][0]) == pytest.approx(float(results["none"][0]), abs=1e-6)
  assert max_abs_diff(results["full"][1], results["none"][1]) < 1e-6
  # bfloat16 compute: matmuls in bf16, parameters and optimizer state stay float32.
  graphdef = nnx.graphdef(abstract_model(TINY.replace(dtype="bfloat16")))
  t = base_config().train
  tx, schedule = optim.make_optimizer(t, params), optim.learning_rate_schedule(t)
  state, metrics = jax.jit(lambda s, b: train_step(
      s, b, graphdef=graphdef, tx=tx, schedule=schedule, grad_accum=1, noise=0.0,
      dropout=False))(create_state(params, tx, 0), windows)
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
  assert float(metrics["loss"]) == pytest.approx(float(results["none"][0]), abs=0.05)


@pytest.mark.slow
def test_training_run_logs_samples_checkpoints_and_resumes(tmp_path):
  config = tiny_config(tmp_path, steps=30, learning_rate=3e-3, log_every=10, val_every=15,
                       val_batches=2, sample_every=15, sample_length=8, sample_num=2,
                       save_every=15, keep=1)
  workdir = tmp_path / "run"
  train.run(config, str(workdir))
  losses, val = read_metrics(workdir), read_metrics(workdir, "val")
  assert sorted(losses) == [10, 20, 30] and sorted(val) == [15, 30]
  assert losses[30][0] < losses[10][0] < np.log(VOCAB)
  assert val[30][0] < val[15][0]
  counts = np.bincount(np.memmap(config.data.path, np.uint16, mode="r"), minlength=VOCAB)
  p = counts[counts > 0] / counts.sum()
  unigram_entropy = float(-(p * np.log(p)).sum())  # the best loss without context: ~6.2 nats
  assert val[30][0] < unigram_entropy - 1.0, (val, unigram_entropy)
  record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
  assert record["step"] == 10 and record["split"] == "train"
  assert {"loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(record)
  for step in (15, 30):
    text = (workdir / "samples" / f"step_{step:06d}.txt").read_text()
    assert text.count(" SAMPLE ") == 2
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["n_layer"] == 2 and saved["train"]["steps"] == 30
  ckpt = Checkpointer(checkpoint_dir(workdir), read_only=True)
  assert ckpt.all_steps() == [30]  # keep=1
  assert ckpt.read_meta()["data_step"] == 30
  ckpt.close()
  # The workdir is a model: gpt.weights loads its latest parameters.
  from gpt.weights import load_model
  c = base_config()
  c.init = str(workdir)
  c.model.update(n_vocab=VOCAB)
  loaded = load_model(c)
  assert loaded.cfg.n_embd == 64
  assert max_abs_diff(pure_params(loaded.model), final_params(workdir, config.model)) == 0
  # Running again with more steps continues from step 30.
  config.train.steps = 40
  train.run(config, str(workdir))
  assert sorted(read_metrics(workdir)) == [10, 20, 30, 40]
  train.run(config, str(workdir))  # already at 40: nothing to do
  assert sorted(read_metrics(workdir)) == [10, 20, 30, 40]
  config.train.restore_from = "fresh"
  with pytest.raises(GPTError, match="already has checkpoints"):
    train.run(config, str(workdir))
  # restore_from=<path>: start a new run from those weights (fresh optimizer, step 0).
  config.train.update(restore_from=str(workdir), steps=1, val_every=0, sample_every=0)
  train.run(config, str(tmp_path / "run2"))
  assert sorted(read_metrics(tmp_path / "run2")) == [1]


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = tiny_config(tmp_path, steps=20, optimizer="sgd", learning_rate=1e30, grad_clip=0.0,
                       save_every=1, log_every=5)
  workdir = tmp_path / "run"
  with pytest.raises(train.TrainingDiverged) as e:
    train.run(config, str(workdir))
  message = str(e.value)
  assert re.search(r"loss is (nan|inf) at step 2: training diverged", message), message
  assert "the last good checkpoint is step 1" in message and "\n" not in message
  ckpt = Checkpointer(checkpoint_dir(workdir), read_only=True)
  assert ckpt.all_steps() == [1]
  ckpt.close()
  params = final_params(workdir, config.model)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def _when_logged(workdir: Path, n_lines: int, action, timeout: float = 600):
  """Calls `action()` once metrics.jsonl holds `n_lines` lines (polling in a thread)."""
  def poll():
    deadline = time.time() + timeout
    while time.time() < deadline:
      path = workdir / "metrics.jsonl"
      if path.exists() and len(path.read_text().splitlines()) >= n_lines:
        action()
        return
      time.sleep(0.05)

  thread = threading.Thread(target=poll, daemon=True)
  thread.start()
  return thread


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_returns(tmp_path):
  config = tiny_config(tmp_path, steps=100_000)
  workdir = tmp_path / "run"
  before = signal.getsignal(signal.SIGTERM)  # not always SIG_DFL: ray.init() installs its own
  _when_logged(workdir, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
  train.run(config, str(workdir))  # returns normally
  logged = max(read_metrics(workdir))
  ckpt = Checkpointer(checkpoint_dir(workdir), read_only=True)
  assert ckpt.all_steps() == [logged] and logged >= 3
  ckpt.close()
  assert signal.getsignal(signal.SIGTERM) == before  # handlers restored


@pytest.mark.slow
def test_ctrl_c_in_a_subprocess_saves_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(train_command(tmp_path, workdir, train={"steps": 100_000}),
                          env=subprocess_env(), stderr=subprocess.PIPE, text=True)
  try:
    _when_logged(workdir, 3, lambda: proc.send_signal(signal.SIGINT)).join()
    _, err = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-2000:]
  match = re.search(r"stopped by SIGINT at step (\d+); checkpoint saved", err)
  assert match, err[-2000:]
  ckpt = Checkpointer(checkpoint_dir(workdir), read_only=True)
  assert ckpt.all_steps() == [int(match.group(1))] == [max(read_metrics(workdir))]
  ckpt.close()


def test_config_mistakes_are_one_line_errors(tmp_path):
  for overrides, pattern in [({"seq_len": 128}, "exceeds the model's context n_ctx=64"),
                             ({"batch_size": 6}, "multiple of grad_accum=1 x 8"),
                             ({"noise": 1.5}, r"train.noise=1.5 must be in \[0, 1\)")]:
    with pytest.raises(GPTError, match=pattern):
      train.run(tiny_config(tmp_path, **overrides), str(tmp_path / "run"))
  with pytest.raises(GPTError, match="needs --workdir"):
    train.run(tiny_config(tmp_path), None)
  mesh = base_config().mesh
  mesh.distributed = True  # no coordinator and not on a TPU pod or Slurm: say what to pass
  with pytest.raises(GPTError, match="pass --config.mesh.coordinator_address=host:port"):
    train.init_distributed(mesh)


def _main(*args, env=None, timeout=600):
  return subprocess.run([sys.executable, "-m", "gpt.main", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_chapter_flow_with_117m_config_and_fixture_model(tmp_path, openai_fixture):
  """encode.py -> train.py -> sample from the workdir, as the book chapter runs them."""
  kant = str(tmp_path / "kant.npz")
  from gpt import encode
  from conftest import require_shared
  assert encode.main([str(require_shared("data", "kant", "critique_of_pure_reason.txt")), kant]) == 0
  env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=1")  # one CPU, as a user
  workdir = tmp_path / "kant_run"
  result = _main("--config=configs/117m.py", f"--workdir={workdir}", f"--config.init={openai_fixture}",
                 f"--config.data.path={kant}", "--config.train.steps=4", "--config.train.seq_len=32",
                 "--config.train.log_every=1", "--config.train.val_every=4",
                 "--config.train.val_batches=1", "--config.train.sample_every=4",
                 "--config.train.sample_length=16", f"--config.data.cache_dir={tmp_path / 'cache'}",
                 env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 4 | loss" in result.stderr and "step 4 | val | loss" in result.stderr
  assert "SAMPLE 1" in (workdir / "samples" / "step_000004.txt").read_text()
  saved = json.loads((workdir / "config.json").read_text())
  assert (saved["model"]["n_layer"], saved["model"]["n_embd"]) == (2, 16)  # the fixture's shape
  assert (saved["train"]["learning_rate"], saved["train"]["optimizer"]) == (2e-5, "adam")
  sample = _main("--config=configs/117m.py", "--config.mode=sample", f"--config.init={workdir}",
                 "--config.sampling.length=8", "--config.sampling.seed=1", env=env)
  assert sample.returncode == 0, sample.stderr[-3000:]
  assert "SAMPLE 1" in sample.stdout


def test_offline_main_command_says_what_to_pass(gpt_main, tmp_path, openai_fixture):
  """Offline, the first run says what to pass and leaves no empty folders behind."""
  from http_fixture import closed_port_url
  offline = closed_port_url()
  code, _, stderr = gpt_main("--config=configs/117m.py", f"--workdir={tmp_path / 'w1'}",
                             f"--config.models_dir={tmp_path / 'models'}",
                             f"--config.download_url={offline}")
  assert code == 2
  assert stderr.strip().splitlines()[-1].startswith("error: ")
  assert "--config.init=" in stderr.strip().splitlines()[-1]
  assert not (tmp_path / "models" / "124M").exists() and not (tmp_path / "w1" / "checkpoints").exists()
  code, _, stderr = gpt_main("--config=configs/117m.py", f"--workdir={tmp_path / 'w2'}",
                             f"--config.init={openai_fixture}", f"--config.data.path={offline}/pg4280.txt",
                             "--config.train.seq_len=32", "--config.train.batch_size=8",  # 8 test devices
                             f"--config.data.cache_dir={tmp_path / 'cache'}")
  assert code == 2
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("error: cannot reach") and "--config.data.path=" in last
  assert not (tmp_path / "w2" / "checkpoints").exists()
