"""gpt.quantize: int8 weight-only models compute what their dequantized weights compute, through
every path (stacked forward for eval, prepared decoding with and without gpt.kernels.gemv); they
load through gpt.weights (model.quantize=int8, and an int8 export folder) and export back; and, on
a model trained here on the Kant text, int8 perplexity stays within 1% of float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt import quantize
from gpt.config import base_config
from gpt.errors import GPTError
from gpt.decoding import prepare_for_decoding
from gpt.kv_cache import KVCache
from gpt.model import GPTConfig, init_model

TINY = GPTConfig(n_vocab=300, n_ctx=32, n_embd=64, n_head=4, n_layer=2)


def tokens(batch=2, length=7, vocab=300, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)), jnp.int32)


def test_quantize_is_per_output_channel_and_within_half_a_step():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((5, 24, 40)).astype(np.float32) * rng.uniform(0.01, 3, (1, 1, 40))
  w[:, :, 3] = 0.0  # an all-zero output channel
  q, scale = quantize.quantize(w, axis=-2)
  assert q.dtype == jnp.int8 and q.shape == w.shape and scale.shape == (5, 40)
  np.testing.assert_allclose(scale[:, 3], 1.0)
  np.testing.assert_allclose(np.abs(q).max(axis=-2)[:, np.r_[0:3, 4:40]], 127)
  err = np.abs(np.asarray(quantize.dequantize(q, scale, -2)) - w)
  assert (err <= np.asarray(scale)[:, None, :] / 2 + 1e-7).all()


def test_int8_model_equals_its_dequantized_weights_and_tracks_float():
  model = init_model(TINY)
  q = quantize.quantize_model(model)
  assert q.cfg.quantize == "int8" and q.wte[...].dtype == jnp.int8
  assert q.h.mlp.c_fc.w[...].dtype == jnp.int8 and q.h.mlp.c_fc.w_scale[...].shape == (2, 256)
  assert q.wpe[...].dtype == jnp.float32 and q.h.mlp.c_fc.b[...].dtype == jnp.float32
  t = tokens()
  deq = quantize.dequantize_model(q)
  got, full = q(t), model(t)
  np.testing.assert_allclose(got, deq(t), rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(got - full).max()) < 0.02 * float(jnp.abs(full).max())
  at = jnp.asarray([1, 5, 9])  # the eval scorer's head at a few positions
  np.testing.assert_allclose(q(t, logits_at=at), deq(t, logits_at=at), rtol=1e-5, atol=1e-5)
  assert quantize.quantize_model(q) is q


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_prepared_decoding_with_and_without_the_kernel_agree(dtype, monkeypatch):
  """Prefill (XLA) and one-row and three-row steps (gemv where it applies) equal GPT_GEMV=0's XLA
  path on the same weights."""
  from gpt.kernels import gemv

  cfg = TINY.replace(dtype="float32" if dtype == "int8" else dtype,
                     param_dtype="float32" if dtype == "int8" else dtype)
  model = init_model(cfg)
  model = quantize.quantize_model(model) if dtype == "int8" else model

  def run(prepared, batch):
    step = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).decode(t, c, logits_at="last"))
    graphdef, state = nnx.split(prepared)
    cache = KVCache.init(cfg, batch, 12)
    outs = []
    logits, cache = step(state, tokens(batch, 6), cache)
    outs.append(logits)
    for i in range(3):
      logits, cache = step(state, tokens(batch, 1, seed=i + 1), cache)
      outs.append(logits)
    return np.concatenate([np.asarray(o, np.float32) for o in outs], axis=1)

  with_kernel = prepare_for_decoding(model)
  if gemv.available():
    assert with_kernel.cfg.weights_by_row and with_kernel.h[0].attn.c_attn.w[...].shape == (192, 64)
  want = {}
  for batch in (1, 3):
    want[batch] = run(with_kernel, batch)
  monkeypatch.setenv("GPT_GEMV", "0")
  plain = prepare_for_decoding(model)
  assert not plain.cfg.weights_by_row and plain.h[0].attn.c_attn.w[...].shape == (64, 192)
  tol = 2e-2 if dtype == "bfloat16" else 1e-5
  for batch in (1, 3):
    got = run(plain, batch)
    np.testing.assert_allclose(got, want[batch], rtol=tol, atol=tol * np.abs(got).max())


def test_int8_activations_decode_as_their_xla_twin_and_near_float_activations(monkeypatch):
  """model.int8_activations: the VNNI kernel's steps equal the same quantized-row arithmetic in XLA
  (gemv.reference), and stay near the float-activation int8 model's logits."""
  from gpt.kernels import gemv

  q = quantize.quantize_model(init_model(TINY))
  a8 = quantize.with_int8_activations(q)
  assert a8.cfg.int8_activations and a8.wte[...].dtype == jnp.int8

  def run(model):
    prepared = prepare_for_decoding(model)
    graphdef, state = nnx.split(prepared)
    step = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).decode(t, c, logits_at="last"))
    cache = KVCache.init(TINY, 3, 12)
    outs = []
    for i, t in enumerate((tokens(3, 6), tokens(3, 1, seed=1), tokens(3, 1, seed=2))):
      logits, cache = step(state, t, cache)
      outs.append(np.asarray(logits))
    return np.concatenate(outs, axis=1)

  got, float_act = run(a8), run(q)
  monkeypatch.setattr(gemv, "vnni", lambda: False)  # the same products through XLA
  want = run(a8)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  assert np.abs(got - float_act).max() < 0.05 * np.abs(float_act).max()
  assert np.abs(got - float_act).max() > 0  # the activations really were quantized
  with pytest.raises(GPTError, match="needs int8 weights"):
    quantize.with_int8_activations(init_model(TINY))


def test_int16_activations_decode_near_float_activations():
  """model.int16_activations: the prefill (6 rows) and batch-3 steps run the int16 VNNI loop (single
  rows too where the library has AVX512-BF16, else the float loop): within int16 rounding of the float-activation int8 model, and really
  quantized."""
  from gpt.kernels import gemv

  q = quantize.quantize_model(init_model(TINY))
  a16 = quantize.with_int16_activations(q)
  assert a16.cfg.int16_activations and not q.cfg.int16_activations

  def run(model, batch):
    prepared = prepare_for_decoding(model)
    graphdef, state = nnx.split(prepared)
    step = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).decode(t, c, logits_at="last"))
    cache = KVCache.init(TINY, batch, 12)
    outs = []
    for t in (tokens(batch, 6), tokens(batch, 1, seed=1), tokens(batch, 1, seed=2)):
      logits, cache = step(state, t, cache)
      outs.append(np.asarray(logits))
    return np.concatenate(outs, axis=1)

  for batch in (1, 3):
    got, want = run(a16, batch), run(q, batch)
    # 16-bit activations: ~2^-15 of each row's largest value per element, through 2 layers
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()
    if gemv.vnni():
      assert np.abs(got - want).max() > 0
  with pytest.raises(GPTError, match="needs int8 weights"):
    quantize.with_int16_activations(init_model(TINY))


def fixture_config(init, **model):
  config = base_config()
  config.init = str(init)
  config.model.update(model)
  return config


def test_load_quantized_export_and_load_back(openai_fixture, tmp_path):
  from gpt import weights

  float_model = weights.load_model(fixture_config(openai_fixture))
  loaded = weights.load_model(fixture_config(openai_fixture, quantize="int8"))
  assert loaded.cfg.quantize == "int8" and loaded.model.wte[...].dtype == jnp.int8
  t = tokens(1, 9, vocab=loaded.cfg.n_vocab)
  logits = loaded.model(t)
  want = float_model.model(t)
  assert float(jnp.abs(logits - want).max()) < 0.02 * float(jnp.abs(want).max())

  folder = weights.export(loaded.model, loaded.tokenizer, tmp_path / "int8", fmt="int8")
  assert (folder / quantize.WEIGHTS_FILE).is_file()
  assert weights.resolve_init(str(folder), "models")[0] == "int8"
  assert weights.planned_model_config(fixture_config(folder)).quantize == "int8"
  back = weights.load_model(fixture_config(folder))  # int8 whatever model.quantize says
  assert back.kind == "int8" and back.cfg.quantize == "int8"
  for a, b in zip(jax.tree.leaves(nnx.state(back.model)), jax.tree.leaves(nnx.state(loaded.model))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # a float export of the int8 model is its dequantized weights, loadable by anyone
  hf = weights.export(back.model, back.tokenizer, tmp_path / "hf", fmt="hf")
  np.testing.assert_allclose(weights.load_model(fixture_config(hf)).model(t), logits,
                             rtol=1e-5, atol=1e-5)


def test_bad_quantize_and_damaged_export_are_one_line_errors(openai_fixture, tmp_path):
  from gpt import weights

  with pytest.raises(GPTError, match="model.quantize='int4'"):
    weights.load_model(fixture_config(openai_fixture, quantize="int4"))
  loaded = weights.load_model(fixture_config(openai_fixture))
  folder = quantize.export_int8(loaded.model, loaded.tokenizer, tmp_path / "q")
  (folder / quantize.WEIGHTS_FILE).write_bytes(b"not safetensors")
  with pytest.raises(GPTError, match="not a readable safetensors"):
    weights.load_model(fixture_config(folder))


def kant_bytes(shared_dir):
  from conftest import require_shared

  text = require_shared("data", "kant", "critique_of_pure_reason.txt").read_bytes()
  return np.frombuffer(text, np.uint8).astype(np.int32)


@pytest.mark.slow  # trains a model
def test_int8_perplexity_within_one_percent_on_kant(shared_dir, capsys):
  from experiments.quick_train import perplexity, train_on_windows
  from gpt.sample import make_decoder
  from gpt.sampling import SamplingOptions

  data = kant_bytes(shared_dir)
  held_out, train = data[:60_000], data[60_000:]
  cfg = GPTConfig(n_vocab=256, n_ctx=64, n_embd=96, n_head=4, n_layer=2)
  model = train_on_windows(train, cfg, steps=300, batch=16)  # constant 3e-3: far from uniform
  q = quantize.quantize_model(model)
  windows = jnp.asarray(held_out[:(len(held_out) // 65) * 65].reshape(-1, 65)[:512])
  f32, int8 = perplexity(model, windows, batch=64), perplexity(q, windows, batch=64)
  counts = np.bincount(train, minlength=256) + 1.0
  unigram = float(np.exp(-np.mean(np.log(counts / counts.sum())[np.asarray(windows[:, 1:])])))
  assert f32 < 0.85 * unigram, f"the model did not train (perplexity {f32:.2f}, unigram {unigram:.2f})"
  assert abs(int8 / f32 - 1) < 0.01, (f32, int8)
  # int8 activations too (decoding's layout, the same arithmetic as the VNNI kernel): reported
  a8 = perplexity(prepare_for_decoding(quantize.with_int8_activations(q)), windows, batch=64)

  # greedy continuations of a few prompts through the sampler (prepared, gemv where it runs)
  options = SamplingOptions(temperature=0.0)
  prompts = [data[s:s + 16] for s in range(0, 48_000, 6_000)]
  from gpt.sample import decoding_params, pad_left
  prompt, mask = pad_left([list(map(int, p)) for p in prompts], 16)
  key = jax.random.PRNGKey(0)
  outs = []
  for m in (model, q, quantize.with_int16_activations(q)):  # 8 prompts: int16 runs at 8 rows
    decoder = make_decoder(m.cfg, options, stop_token=-1, stop_at_token=False)
    outs.append(np.asarray(decoder.generate(decoding_params(m), prompt, mask, key, 24,
                                            cache_length=40)))
  agree = float((outs[0] == outs[1]).mean())
  agree16 = float((outs[2] == outs[1]).mean())
  with capsys.disabled():
    print(f"\nKant bytes: perplexity float32 {f32:.4f}, int8 {int8:.4f} ({100 * (int8 / f32 - 1):+.2f}%), "
          f"int8 + int8 activations {a8:.4f} ({100 * (a8 / f32 - 1):+.2f}%); "
          f"greedy agreement {100 * agree:.1f}% of {outs[0].size} tokens over {len(prompts)} prompts; "
          f"int8 + int16 activations vs int8: {100 * agree16:.1f}%")
  assert agree > 0.5
  assert agree16 > 0.95  # int16 rounding is ~1/128 of the int8 weights' own


def test_training_an_int8_model_is_refused_in_one_line(gpt_main, openai_fixture, tmp_path):
  code, _, stderr = gpt_main("--config=configs/tiny.py", "--config.mode=train",
                             f"--config.init={openai_fixture}", f"--workdir={tmp_path / 'run'}",
                             "--config.model.quantize=int8")
  assert code == 2 and "model.quantize=int8 is for inference" in stderr, stderr


@pytest.mark.slow  # runs the decode benchmark's runners
def test_decode_benchmark_runs_int8(monkeypatch):
  import importlib.util
  import sys

  from conftest import REPO

  spec = importlib.util.spec_from_file_location("bench_decode", REPO / "experiments" / "bench_decode.py")
  bench = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, "bench_decode", bench)
  spec.loader.exec_module(bench)
  runners = sys.modules["experiments.decode_runners"]  # its runners' module, imported by the script
  cfg = GPTConfig(n_vocab=256, n_ctx=32, n_embd=32, n_head=2, n_layer=2, quantize="int8")
  tokens = runners.Ours(cfg, batch=2, new=5)()
  assert tokens.shape == (2, 5) and ((0 <= tokens) & (tokens < 256)).all()
  assert np.isfinite(runners.MatmulsOnly(cfg, 2, 5)()).all()
  for mode in ("1", "mlp"):  # --fused's columns: traced with GPT_GEMV_FUSE, then restored
    assert runners.fused(runners.Ours(cfg, batch=1, new=3), mode)().shape == (1, 3)
    assert "GPT_GEMV_FUSE" not in __import__("os").environ
  monkeypatch.setenv("GPT_GEMV_FUSE", "mlp")  # a value the caller had set stays
  runners.fused(runners.Ours(cfg, batch=1, new=3), "1")()
  assert __import__("os").environ["GPT_GEMV_FUSE"] == "mlp"
  assert bench.roofline(cfg, 1, 1, 1e9) > 3 * bench.roofline(cfg.replace(quantize="none"), 1, 1, 1e9)


@pytest.mark.parametrize("activations", ["float", "int8"])
def test_fused_calls_decode_the_same_greedy_tokens_as_separate_calls(activations, monkeypatch):
  """With GPT_GEMV_FUSE=1, decoding an int8 model runs each block's tail (attn c_proj, residual, ln_2,
  MLP, residual) as one gemv.layer_tail call; with GPT_GEMV_FUSE=mlp only the MLP is one call (gemv.mlp), with
  GPT_GEMV_FUSE=0 (the default) every matrix is its own call with XLA between. All three decode the same greedy
  continuations at batch 1 and 3 (fused at up to 3 rows here), and their steps' logits agree to
  float32 rounding."""
  from gpt import sample
  from gpt.kernels import gemv
  from gpt.sampling import SamplingOptions

  model = quantize.quantize_model(init_model(TINY.replace(n_vocab=256), seed=3))
  if activations == "int8":
    if not gemv.vnni():
      pytest.skip("int8 activations run the VNNI kernel only where the CPU has AVX-512 VNNI")
    model = quantize.with_int8_activations(model)
  params = sample.decoding_params(model)
  if not prepare_for_decoding(model).cfg.weights_by_row:
    pytest.skip("gpt.kernels.gemv did not build here")

  def greedy(batch):
    decoder = sample.make_decoder(model.cfg, SamplingOptions(temperature=0.0), stop_token=0,
                                  stop_at_token=False)
    prompt = np.asarray(tokens(batch, 3, vocab=256, seed=batch))
    return np.asarray(decoder.generate(params, prompt, np.ones_like(prompt, bool), jax.random.key(0),
                                       12, cache_length=16))

  def step_text_and_logits():
    graphdef, state = nnx.split(prepare_for_decoding(model))
    step = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).decode(t, c, logits_at="last"))
    cache = KVCache.init(model.cfg, 1, 8)
    t = tokens(1, 1, vocab=256)
    return step.lower(state, t, cache).as_text(), np.asarray(step(state, t, cache)[0])

  calls = lambda text, name: text.count(f"custom_call @{name}")
  monkeypatch.setattr(gemv, "FUSE_ROWS", {jnp.dtype(jnp.int8): 3})  # batch 3 fused too
  monkeypatch.setenv("GPT_GEMV_FUSE", "1")
  fused = {batch: greedy(batch) for batch in (1, 3)}
  text, logits = step_text_and_logits()
  assert calls(text, "GptGemvTail") == TINY.n_layer and calls(text, "GptGemvMlp") == 0
  for mode, tail, mlp in (("mlp", 0, TINY.n_layer), ("0", 0, 0)):
    monkeypatch.setenv("GPT_GEMV_FUSE", mode)
    text, other = step_text_and_logits()
    assert (calls(text, "GptGemvTail"), calls(text, "GptGemvMlp")) == (tail, mlp), mode
    for batch in (1, 3):
      np.testing.assert_array_equal(greedy(batch), fused[batch], err_msg=mode)
    np.testing.assert_allclose(other, logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max(), err_msg=mode)
