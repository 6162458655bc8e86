"""The decode benchmark's runners: each a callable that samples (or, MatmulsOnly, multiplies) once.

experiments/bench_decode.py times them round-robin and prints the table; they live here so that the
script holds the table and the measurement, and so that the tests and bench_ab.py build a runner
without the script's command line. Every runner is built from a GPTConfig, a batch size and a number
of new tokens, and returns what it made as a numpy array ([batch, new] tokens).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt import sample
from gpt.decoding import prepare_for_decoding
from gpt.kernels import gemv
from gpt.kv_cache import KVCache
from gpt.matmul import matmul
from gpt.model import GPTConfig, init_model
from gpt.quantize import quantize_model
from gpt.sampling import Decoder, SamplingOptions

EOT = 50256


def make_model(cfg: GPTConfig):
  """A random model of `cfg` (quantized after init when cfg.quantize is int8, as loading does)."""
  if cfg.quantize == "int8":
    return quantize_model(init_model(cfg.replace(quantize="none")))
  return init_model(cfg)


class Ours:
  """gpt.sample.Generator's decoder (sample.make_decoder), timed through Decoder.generate."""

  def __init__(self, cfg: GPTConfig, batch: int, new: int, model_decode: bool = False):
    model = make_model(cfg)
    options = SamplingOptions(temperature=1.0, top_k=40)
    if model_decode:  # the model's own cached forward, for comparison
      graphdef, self.params = nnx.split(model)
      logits_fn = lambda p, t, c, m: nnx.merge(graphdef, p).decode(t, c, m, logits_at="last")
      self.decoder = Decoder(logits_fn, lambda b, n: KVCache.init(cfg, b, n), options,
                             stop_token=EOT, stop_at_token=False)
    else:
      self.params = sample.decoding_params(model)
      self.decoder = sample.make_decoder(cfg, options, stop_token=EOT, stop_at_token=False)
    del model
    self.prompt = np.full((batch, 1), EOT, np.int32)
    self.new = new
    self.cache_length = sample.bucket(1) + sample.bucket(new)
    self.seed = 0

  def __call__(self) -> np.ndarray:
    self.seed += 1
    out = self.decoder.generate(self.params, self.prompt, np.ones_like(self.prompt, bool),
                                jax.random.key(self.seed), self.new, cache_length=self.cache_length,
                                max_new=sample.bucket(self.new))
    return np.asarray(out)[:, :self.new]


class UnderEnv:
  """`runner` called with the environment variable `name` set to `value`, restored afterwards to
  what the caller had (unset, or its own value). `every_call=False`: only the first call (the
  warm-up, which traces and compiles: for switches read while tracing); True: every call (for
  switches a kernel reads when it runs)."""

  def __init__(self, runner, name: str, value: str, every_call: bool = False):
    self.runner, self.name, self.value, self.every_call = runner, name, value, every_call
    self.traced = False

  def __call__(self) -> np.ndarray:
    if self.traced and not self.every_call:
      return self.runner()
    before = os.environ.get(self.name)
    os.environ[self.name] = self.value
    try:
      return self.runner()
    finally:
      self.traced = True
      if before is None:
        del os.environ[self.name]
      else:
        os.environ[self.name] = before


def without_decode_attention(runner: Ours) -> UnderEnv:
  """`runner` traced with GPT_DECODE_ATTENTION=0: XLA's einsum attention over the cache in every
  call (the same-run A/B of gpt.kernels.decode_attention)."""
  return UnderEnv(runner, "GPT_DECODE_ATTENTION", "0")


def fused(runner: Ours, mode: str = "1") -> UnderEnv:
  """`runner` traced with GPT_GEMV_FUSE=`mode`: "1" each block's tail as one gemv.layer_tail call,
  "mlp" only the MLP as one call (gemv.mlp), where "ours" makes every matrix its own gemv call."""
  return UnderEnv(runner, "GPT_GEMV_FUSE", mode)


def on_small_pages(runner: Ours) -> UnderEnv:
  """`runner` with GPT_GEMV_HUGEPAGES=0 at every call (gemv.cc reads it per call): its own weights
  are never advised onto 2 MB pages."""
  return UnderEnv(runner, "GPT_GEMV_HUGEPAGES", "0", every_call=True)


class MatmulsOnly:
  """The weight matmuls of one decode step and nothing else, as the prepared model computes them.

  Each layer's c_attn, attn c_proj, c_fc and mlp c_proj and the LM head, chained so none can be
  skipped, `new` times per call inside one jitted fori_loop: the speed XLA:CPU's matrix kernels
  allow before any attention, sampling or loop overhead (a ceiling for the "ours" column).
  """

  def __init__(self, cfg: GPTConfig, batch: int, new: int):
    prepared = prepare_for_decoding(make_model(cfg))
    by_row = prepared.cfg.weights_by_row
    self.params = nnx.to_pure_dict(nnx.state(prepared))
    del prepared
    self.x = jnp.ones((batch, 1, cfg.n_embd), cfg.compute_dtype)
    self.new = new
    D = cfg.n_embd

    def mm(x, p):
      w, scale = p["w"], p.get("w_scale")
      if by_row:
        return gemv.auto_matmul(x, w, scale=scale, int8_activations=cfg.int8_activations,
                                int16_activations=cfg.int16_activations).astype(x.dtype)
      return matmul(x, w, scale=scale).astype(x.dtype)

    def run(params, x):
      def step(_, x):
        for layer in params["h"].values():
          qkv = mm(x, layer["attn"]["c_attn"])
          x = mm(qkv[..., :D], layer["attn"]["c_proj"])
          h = mm(x, layer["mlp"]["c_fc"])
          x = mm(h, layer["mlp"]["c_proj"])
        head = {"w": params["wte"], "w_scale": params.get("wte_scale")}
        logits = mm(x, head) if by_row else matmul(x, head["w"], "...d,vd->...v", scale=head["w_scale"])
        return x + logits[..., :D].astype(x.dtype)  # the next step depends on the head
      return jax.lax.fori_loop(0, new, step, x)

    self.run = jax.jit(run)

  def __call__(self) -> np.ndarray:
    """The last step's hidden state [B, 1, D] (it has no tokens to return)."""
    return np.asarray(self.run(self.params, self.x))


class HuggingFace:
  """transformers' GPT2LMHeadModel.generate with sampling and its KV cache."""

  def __init__(self, cfg: GPTConfig, batch: int, new: int, device: str = "cpu"):
    import torch
    import transformers

    self.torch = torch
    hf_cfg = transformers.GPT2Config(n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                     n_positions=cfg.n_ctx, vocab_size=cfg.n_vocab)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    with torch.device(device):  # initialised where it runs (a 1542M on the GPU in seconds)
      self.model = transformers.GPT2LMHeadModel(hf_cfg).to(dtype).eval()
    self.prompt = torch.full((batch, 1), EOT, dtype=torch.long, device=device)
    self.new = new

  def __call__(self) -> np.ndarray:
    with self.torch.no_grad():
      out = self.model.generate(self.prompt, attention_mask=self.torch.ones_like(self.prompt),
                                do_sample=True, top_k=40, max_new_tokens=self.new,
                                min_new_tokens=self.new, pad_token_id=EOT)
    return out[:, 1:].cpu().numpy()


class CTranslate2:
  """CTranslate2 (the engine people pick to run GPT-2 fast on a CPU) on our weights: exported with
  gpt.weights.export_hf, converted once per shape by its TransformersConverter."""

  converted: dict = {}  # (n_layer, n_embd, n_head) -> converted model folder, shared by rows

  def __init__(self, cfg: GPTConfig, batch: int, new: int, compute_type: str):
    import tempfile

    import ctranslate2
    from ctranslate2.converters import TransformersConverter
    from gpt.tokenizer import get_tokenizer
    from gpt.weights import export_hf

    key = (cfg.n_layer, cfg.n_embd, cfg.n_head)
    if key not in CTranslate2.converted:
      hf_dir, ct2_dir = tempfile.mkdtemp(prefix="bench_hf_"), tempfile.mkdtemp(prefix="bench_ct2_")
      plain = cfg.replace(dtype="float32", param_dtype="float32", quantize="none")
      export_hf(init_model(plain), get_tokenizer(), hf_dir)
      TransformersConverter(hf_dir).convert(ct2_dir, force=True)
      CTranslate2.converted[key] = ct2_dir
    self.generator = ctranslate2.Generator(CTranslate2.converted[key], device="cpu",
                                           compute_type=compute_type, intra_threads=os.cpu_count())
    self.prompt = [["<|endoftext|>"]] * batch
    self.new = new

  def __call__(self) -> np.ndarray:
    results = self.generator.generate_batch(self.prompt, max_length=self.new, min_length=self.new,
                                            sampling_topk=40, include_prompt_in_result=False)
    return np.array([r.sequences_ids[0] for r in results])


def ct2_available() -> str | None:
  """None if ctranslate2 imports, else why its columns are skipped."""
  try:
    import ctranslate2  # noqa: F401
  except ImportError as e:
    return f"CTranslate2 columns skipped: {e} (pip install .[bench])"
  return None


def hf_available() -> str | None:
  """None if torch and transformers import, else why not."""
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError as e:
    return f"HF column skipped: {e} (pip install .[hf])"
  torch.set_num_threads(os.cpu_count() or 1)
  return None
