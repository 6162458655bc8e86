"""gpt.sample: the model wrapped for decoding, prompt fitting, and the sample/interactive modes.

Correctness is checked on the fixture GPT-2 (2 layers, n_ctx 64) against full forward passes and,
when torch and transformers are installed (the [hf] extra), against Hugging Face generate().
"""

import functools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt import sample
from gpt.config import base_config
from gpt.errors import GPTError
from gpt.decoding import prepare_for_decoding
from gpt.kv_cache import KVCache
from gpt.sampling import SamplingOptions

PROMPTS = [[464, 3290, 318, 257, 1588], [50256], [15496, 11, 616, 1438, 318, 5395, 13, 314, 1101]]
HEADER = "=" * 40 + " SAMPLE {} " + "=" * 40


def fixture_config(init, **sampling):
  config = base_config()
  config.init = str(init)
  config.sampling.update(sampling)
  return config


@pytest.fixture(scope="module")
def loaded():
  from conftest import require_shared
  from gpt.weights import load_model

  return load_model(fixture_config(require_shared("fixtures", "openai-gpt2-tiny")))


@pytest.fixture(scope="module")
def full_forward(loaded):
  """Logits [T, V] of a whole sequence by one uncached forward pass (right-padded to n_ctx, so
  it compiles once; attention is causal, so the padding does not change earlier positions)."""
  graphdef, params = nnx.split(loaded.model)
  n_ctx = loaded.cfg.n_ctx
  forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])

  def run(tokens):
    padded = np.zeros((1, n_ctx), np.int32)
    padded[0, :len(tokens)] = tokens
    return forward(params, padded)[:len(tokens)]

  return run


@functools.partial(jax.jit, static_argnums=(0, 5))
def _decode(graphdef, state, tokens, cache, mask, last_only):
  return nnx.merge(graphdef, state).decode(tokens, cache, mask, logits_at="last" if last_only else "all")


def decode_fn(model):
  """The model's decode step, jitted with the model's state as an argument (one jitted function
  for every test: models of one layout and shape share its compiled programs)."""
  graphdef, state = nnx.split(model)
  return lambda tokens, cache, mask=None, last_only=False: _decode(graphdef, state, tokens, cache, mask,
                                                                  last_only)


@pytest.mark.parametrize("last_only", [False, True])
def test_cache_logits_equal_full_forward_at_every_step(loaded, full_forward, last_only):
  """The model prepared for decoding (what sampling runs) against GPT.__call__, left-padded
  prompts of 3 lengths."""
  cfg = loaded.cfg
  step = decode_fn(prepare_for_decoding(loaded.model))
  tokens, mask = sample.pad_left(PROMPTS, sample.bucket(9))
  logits, cache = step(tokens, KVCache.init(cfg, 3, 16 + 32), mask, last_only)
  rows = [list(p) for p in PROMPTS]
  for r, prompt in enumerate(PROMPTS):
    want = full_forward(prompt)[-1:] if last_only else full_forward(prompt)
    np.testing.assert_allclose(logits[r, -len(want):], want, rtol=1e-5, atol=1e-5)
  step_tokens = np.random.default_rng(0).integers(0, cfg.n_vocab, size=(30, 3))
  for t, new in enumerate(step_tokens):
    logits, cache = step(jnp.asarray(new[:, None], jnp.int32), cache, None, last_only)
    for r in range(3):
      rows[r].append(int(new[r]))
      np.testing.assert_allclose(logits[r, 0], full_forward(rows[r])[-1], rtol=1e-5, atol=1e-5,
                                 err_msg=f"step {t} row {r}")


def test_model_decode_agrees(loaded):
  """GPT.decode on the stacked model and on the model prepared for decoding give the same logits."""
  cfg = loaded.cfg
  tokens, mask = sample.pad_left(PROMPTS, 16)  # the shapes of the prefill above: no new compile
  want, _ = decode_fn(loaded.model)(tokens, KVCache.init(cfg, 3, 48), mask)
  got, _ = decode_fn(prepare_for_decoding(loaded.model))(tokens, KVCache.init(cfg, 3, 48), mask)
  np.testing.assert_allclose(got * mask[..., None], want * mask[..., None], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # compiles the decoder twice more (bf16)
def test_bfloat16_decode_tracks_float32(full_forward, openai_fixture):
  """bf16 weights and compute (float32 accumulation), batch 1 (the paired-row path on CPU) and 3."""
  from gpt.weights import load_model

  config = fixture_config(openai_fixture)
  config.model.dtype = config.model.param_dtype = "bfloat16"
  bf16 = load_model(config)
  prepared = prepare_for_decoding(bf16.model)
  assert prepared.h[0].mlp.c_fc.w.get_value().dtype == jnp.bfloat16
  step = decode_fn(prepared)
  for prompts in (PROMPTS[:1], PROMPTS):
    tokens, mask = sample.pad_left(prompts, 16)
    _, cache = step(tokens, KVCache.init(bf16.cfg, len(prompts), 17), mask, True)
    new = np.full((len(prompts), 1), 11, np.int32)  # one decode step: a single row when batch 1
    logits, _ = step(new, cache, None, True)
    for r, prompt in enumerate(prompts):
      want = np.asarray(full_forward(prompt + [11])[-1])
      err = np.abs(np.asarray(logits[r, 0]) - want).max()
      assert err < 0.02 * np.abs(want).max(), (r, err, np.abs(want).max())


def test_greedy_equals_argmax_loop_over_full_forwards(loaded, full_forward):
  gen = sample.Generator(loaded.model, loaded.tokenizer, SamplingOptions(temperature=0.0),
                           stop_at_eot=False)
  with pytest.raises(GPTError, match="do not fit n_ctx=64"):
    gen.generate([[1] * 60, [2]], 6, jax.random.key(0))
  got = gen.generate(PROMPTS, 40, jax.random.key(0))
  for prompt, row in zip(PROMPTS, got):
    tokens = list(prompt)  # a plain argmax loop over full forward passes, no cache
    for _ in range(40):
      tokens.append(int(np.argmax(full_forward(tokens)[-1])))
    assert row == tokens[len(prompt):]


@pytest.mark.slow  # runs PyTorch's generate as the reference
def test_greedy_equals_hugging_face_generate(hf_fixture):
  torch = pytest.importorskip("torch", reason="needs the [hf] extra (torch) for the reference")
  transformers = pytest.importorskip("transformers", reason="needs the [hf] extra (transformers)")
  from gpt.weights import load_model

  hf = transformers.GPT2LMHeadModel.from_pretrained(hf_fixture).eval()
  ours = load_model(fixture_config(hf_fixture))
  gen = sample.Generator(ours.model, ours.tokenizer, SamplingOptions(temperature=0.0),
                           stop_at_eot=False)
  got = gen.generate(PROMPTS, 48, jax.random.key(0))
  for prompt, row in zip(PROMPTS, got):
    with torch.no_grad():
      out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                        do_sample=False, max_new_tokens=48, min_new_tokens=48, pad_token_id=50256)
    assert row == out[0, len(prompt):].tolist()


def test_fit_prompt():
  fit = sample.fit_prompt
  assert fit([1, 2, 3], 0, 64, False) == ([1, 2, 3], 62)  # fill the context (last token not fed)
  assert fit([1, 2, 3], 62, 64, False) == ([1, 2, 3], 62)
  with pytest.raises(GPTError, match=r"prompt \(3 tokens\) \+ sampling.length \(63\) = 66 .*n_ctx=64"):
    fit([1, 2, 3], 63, 64, False)
  assert fit([1, 2, 3], 63, 64, True) == ([2, 3], 63)
  with pytest.raises(GPTError, match="70 tokens, more than the context of n_ctx=64"):
    fit(list(range(70)), 0, 64, False)
  assert fit(list(range(70)), 0, 64, True) == (list(range(37, 70)), 32)
  with pytest.raises(GPTError, match="sampling.length=65"):
    fit([1], 65, 64, False)
  with pytest.raises(GPTError, match="empty"):
    fit([], 5, 64, False)


def test_counts_and_stop_option():
  sample.check_counts(0, 4)
  sample.check_counts(8, 4)
  with pytest.raises(GPTError, match="nsamples=6 must be a multiple of sampling.batch_size=4"):
    sample.check_counts(6, 4)
  with pytest.raises(GPTError, match="batch_size=0"):
    sample.check_counts(4, 0)
  assert sample.stop_at_eot("auto", True) and not sample.stop_at_eot("auto", False)
  assert sample.stop_at_eot(True, False) and not sample.stop_at_eot("false", True)
  with pytest.raises(GPTError, match="stop_at_eot"):
    sample.stop_at_eot("maybe", True)
  assert [sample.bucket(n) for n in (1, 16, 17, 64, 65)] == [16, 16, 32, 64, 128]


def test_sample_mode_prompt_file_output_file_and_seed(openai_fixture, tmp_path, capsys):
  (tmp_path / "prompt.txt").write_text("The critique of pure reason\n", encoding="utf-8")
  config = fixture_config(openai_fixture, prompt_file=str(tmp_path / "prompt.txt"), nsamples=4,
                          batch_size=2, length=20, seed=3, output_file=str(tmp_path / "out.txt"))
  sample.run_sample(config, None)
  first = capsys.readouterr().out
  assert [line for line in first.splitlines() if "SAMPLE" in line] == [HEADER.format(n) for n in range(1, 5)]
  assert (tmp_path / "out.txt").read_text(encoding="utf-8") == first
  sample.run_sample(config, None)
  assert capsys.readouterr().out == first, "same seed, same text"


def test_sample_mode_int8_quantizes_on_load_as_its_export_does(openai_fixture, tmp_path, capsys):
  """--config.model.quantize=int8 through the sample mode (gpt.weights quantizes on load; the
  decoder streams int8 weights through gpt.kernels.gemv where it runs) writes the same greedy text
  as sampling the int8 export of the same weights, and its first token is the int8 model's argmax."""
  from gpt import weights

  config = fixture_config(openai_fixture, nsamples=1, batch_size=1, length=12, seed=0,
                          temperature=0.0)
  config.model.quantize = "int8"
  sample.run_sample(config, None)
  quantized = capsys.readouterr().out
  loaded = weights.load_model(config)
  folder = weights.export(loaded.model, loaded.tokenizer, tmp_path / "int8", fmt="int8")
  config = fixture_config(folder, nsamples=1, batch_size=1, length=12, seed=0, temperature=0.0)
  sample.run_sample(config, None)
  assert "SAMPLE 1" in quantized and capsys.readouterr().out == quantized
  eot = loaded.tokenizer.eot_id
  first = int(jnp.argmax(loaded.model(jnp.asarray([[eot]]))[0, -1]))
  assert quantized.split("\n")[1].startswith(loaded.tokenizer.decode([first]))


def test_sample_mode_rejects_bad_options_before_loading(tmp_path):
  for key, value, word in [("top_p", 1.5, "top_p"), ("nsamples", 3, "multiple"), ("temperature", -1, "temperature")]:
    sampling = dict(nsamples=2, batch_size=2)
    sampling[key] = value
    config = fixture_config(tmp_path / "does-not-exist", **sampling)
    with pytest.raises(GPTError, match=word):
      sample.run_sample(config, None)


def test_samples_from_a_training_workdir(loaded, openai_fixture, tmp_path, capsys):
  """A workdir checkpoint holding the fixture's weights gives exactly the fixture's samples."""
  from gpt.checkpoint import Checkpointer, checkpoint_dir

  config = fixture_config(openai_fixture, nsamples=2, length=24, seed=1)
  sample.run_sample(config, None)
  expected = capsys.readouterr().out
  workdir = tmp_path / "run"
  ckpt = Checkpointer(checkpoint_dir(workdir), async_save=False)
  params = nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))
  state = types.SimpleNamespace(params=params, opt_state={"unused": jnp.zeros(1)}, step=jnp.asarray(5), rng=jax.random.PRNGKey(0))
  ckpt.save(state, {"step": 5})
  ckpt.close()
  model_section = {k: getattr(loaded.cfg, k) for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")}
  (workdir / "config.json").write_text(json.dumps({"model": model_section}))
  config.init = str(workdir)
  sample.run_sample(config, None)
  assert capsys.readouterr().out == expected


def test_prompt_reader_joins_pastes_and_continuations():
  """On a terminal, lines that arrive together are one prompt; a trailing backslash continues."""
  from gpt.prompt_reader import PromptReader

  read_fd, write_fd = os.pipe()
  with os.fdopen(read_fd, "rb", buffering=0) as stream:
    tty = PromptReader(stream, is_tty=True, paste_window=0.2)
    os.write(write_fd, "first line\nsecond line\n".encode())  # a paste: both lines at once
    assert tty.read() == "first line\nsecond line"
    os.write(write_fd, b"typed\n")
    assert tty.read() == "typed"  # nothing else waiting: one line is one prompt
    pipe = PromptReader(stream, is_tty=False)
    os.write(write_fd, "a\nb \\\nc\n\nd".encode())
    os.close(write_fd)
    assert [pipe.read() for _ in range(5)] == ["a", "b \nc", "", "d", None]


# ---- end to end, as a user runs it: python -m gpt.main ... in a subprocess ----

class Session:
  """A `python -m gpt.main` subprocess whose stdout is collected by a thread."""

  def __init__(self, repo_dir, init, mode, *overrides, stdin=subprocess.PIPE):
    cmd = [sys.executable, "-m", "gpt.main", "--config=configs/tiny.py", f"--config.init={init}",
           f"--config.mode={mode}", *overrides]
    # A terminal's foreground process gets Ctrl-C; a child of a background job (nohup, `&` in a
    # script, some CI runners) inherits SIGINT ignored, so Python would never raise
    # KeyboardInterrupt and the Ctrl-C tests would wait on a sampler that runs forever.
    self.proc = subprocess.Popen(cmd, cwd=repo_dir, stdin=stdin, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    self.out = ""
    self._chunks = queue.Queue()
    threading.Thread(target=self._pump, daemon=True).start()

  def _pump(self):
    for char in iter(lambda: self.proc.stdout.read(1), ""):
      self._chunks.put(char)

  def wait_for(self, text, timeout=120):
    deadline = time.time() + timeout
    while text not in self.out:
      try:
        self.out += self._chunks.get(timeout=max(0.01, deadline - time.time()))
      except queue.Empty:
        self.proc.kill()  # never leave a sampler streaming after a failed test
        raise AssertionError(f"no {text!r} after {timeout}s; got:\n{self.out}\n{self.proc.stderr.read()}")
    return self.out

  def finish(self, timeout=120):
    rc = self.proc.wait(timeout=timeout)
    time.sleep(0.2)
    while not self._chunks.empty():
      self.out += self._chunks.get()
    return rc, self.out, self.proc.stderr.read()


@pytest.mark.slow
def test_interactive_piped_session(repo_dir, openai_fixture):
  session = Session(repo_dir, openai_fixture, "interactive", "--config.sampling.nsamples=2",
                    "--config.sampling.length=12")
  session.proc.stdin.write("Kant wrote\n\nOne line \\\nand the next\n")
  session.proc.stdin.close()
  rc, out, err = session.finish()
  assert rc == 0, err
  assert out.count("Model prompt >>> ") == 4  # prompt, empty, two-line prompt, end of input
  assert out.count(HEADER.format(1)) == 2 and out.count(HEADER.format(2)) == 2
  assert "Prompt should not be empty!" in out
  assert "Model prompt >>> One line \nand the next\n" in out  # the echoed two-line prompt
  assert out.count("=" * 80 + "\n") == 2
  assert "Traceback" not in err


@pytest.mark.slow
def test_interactive_ctrl_c_stops_the_sample_then_eof_exits(repo_dir, openai_fixture):
  session = Session(repo_dir, openai_fixture, "interactive", "--config.sampling.nsamples=0",
                    "--config.sampling.length=20")
  session.wait_for("Model prompt >>> ")
  session.proc.stdin.write("Once upon a time\n")
  session.proc.stdin.flush()
  session.wait_for(HEADER.format(3))  # nsamples=0: samples keep coming (streamed) until Ctrl-C
  session.proc.send_signal(signal.SIGINT)
  session.wait_for("[stopped: Ctrl-C]\nModel prompt >>> ")
  session.proc.stdin.close()
  rc, out, err = session.finish()
  assert rc == 0, err
  assert out.endswith("Model prompt >>> \n")
  assert "Traceback" not in err


@pytest.mark.slow
def test_sample_mode_runs_until_ctrl_c(repo_dir, openai_fixture):
  session = Session(repo_dir, openai_fixture, "sample", "--config.sampling.nsamples=0",
                    "--config.sampling.length=16", stdin=subprocess.DEVNULL)
  session.wait_for(HEADER.format(3))
  session.proc.send_signal(signal.SIGINT)
  rc, out, err = session.finish()
  assert rc == 0, err
  assert "stopped (Ctrl-C)" in err and "Traceback" not in err
  assert os.linesep == "\n" and out.startswith(HEADER.format(1) + "\n")


def test_bfloat16_decode_loop_converts_no_whole_cache_or_table():
  """On XLA:CPU a bf16 decode keeps a float32 cache of bf16 values (updated in place, fed to the
  attention's dots as it is) and gathers wte rows without a float32 copy of the whole table: the
  compiled loop has neither (BENCHMARKS.md, "decoding outside the matmuls")."""
  import re

  from gpt.decoding import cache_dtype, decodes_by_row
  from gpt.model import GPTConfig, init_model

  cfg = GPTConfig(n_vocab=1000, n_ctx=64, n_embd=64, n_head=4, n_layer=2, dtype="bfloat16",
                  param_dtype="bfloat16")
  if not decodes_by_row(cfg):
    pytest.skip("no CPU gemv layout here (another backend, GPT_GEMV=0 or no compiler)")
  assert cache_dtype(cfg) == jnp.float32
  params = sample.decoding_params(init_model(cfg))
  decoder = sample.make_decoder(cfg, SamplingOptions(top_k=4), stop_token=0, stop_at_token=False)
  prompt = np.ones((2, 1), np.int32)
  state = decoder.start(params, prompt, np.ones_like(prompt, bool), jax.random.key(0),
                        cache_length=24, max_new=16)
  assert state.cache.k[0].dtype == jnp.float32 and state.cache.k[0].shape == (8, 24, 16)
  text = decoder.lower_advance(params, state).compile().as_text()
  assert not re.search(r"= f32\[1000,64\]\{1,0\} fusion\(", text)  # a float32 copy of wte
  assert not re.search(r"\[8,24,16\]\{2,1,0\} convert\(", text)  # a converted cache layer
  out = decoder.advance(params, state, 16).tokens
  assert out.shape == (2, 16) and int(out.min()) >= 0 and int(out.max()) < 1000
