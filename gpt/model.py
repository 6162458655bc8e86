"""GPT-2 in Flax NNX, parameter for parameter the model OpenAI released, and its one forward pass.

Parameter names follow OpenAI's checkpoint (`wte`, `wpe`, `h/ln_1/g`, `h/attn/c_attn/w`, ...,
`ln_f/b`), so loading and exporting are renames (`gpt.formats.convert`). The blocks are stored stacked:
every parameter under `h` has a leading `[n_layer]` axis, and the forward pass runs them with
`lax.scan` (rolled, fast to compile) or fully unrolled (a little faster per step on CPU). Both
layouts share one parameter tree, so checkpoints move freely between them.

Every mode runs `GPT.__call__` (tokens, positions, mask, optional KVCache, `logits_at`), built
from one of each piece, defined once: `attention` (gpt/attention.py, with its formulations; it can
also return its weights, for `gpt.heads.attention_probs`), the layer primitives of gpt/layers.py
(`LayerNorm`, `Conv1D` over gpt.matmul's float32-accumulating `matmul`, `take_rows`) and
`attention_inputs` (gpt/kv_cache.py, with `KVCache`: position ids and masks for left-padded rows
and for the cache). This module is the blocks and the pass through them (`GPT.trunk`); what is
computed at the top of the stack (the tied head's logits, the training loss, the attention
probabilities) is gpt.heads, which `GPT.__call__` ends with. Decoding does not get a second
model: gpt.decoding's `prepare_for_decoding` lays the same model out per layer in the compute dtype
(one Block per layer instead of a scan over the stack, dense weights by row for gpt.kernels.gemv),
which is what makes token-by-token steps fast on CPU; there, with int8 weights, a Block runs all it
computes after the attention as one kernel call where GPT_GEMV_FUSE=1 asks (`Block.fused_tail`).

Every parameter carries logical axis names in its `axes` metadata ("vocab", "embed", "heads",
"mlp", "layers"); `gpt.sharding` maps them to mesh axes.

Shape legend: B batch, T new tokens, S cached key slots, L layers, D width, H heads, K head dim,
V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gpt import heads
from gpt.attention import apply_dropout, attention
from gpt.errors import GPTError
from gpt.kernels import attention as kattn
from gpt.kernels import gemm, gemv
from gpt.kv_cache import KVCache, attention_inputs
from gpt.layers import Conv1D, LayerNorm, fused_mlp, param, take_rows

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_SAVE_GEMM = jax.checkpoint_policies.save_only_these_names(gemm.CHECKPOINT_NAME,
                                                           kattn.CHECKPOINT_NAME)
# "dots" policies also save gpt.kernels.gemm's products and gpt.kernels.attention's outputs (custom
# calls, not dots: named instead).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots, _SAVE_GEMM),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _SAVE_GEMM),
}
ATTENTION_IMPLS = ("blocked", "kernel", "xla", "cudnn", "auto")
OUTPUT_LOSSES = ("auto", "fused", "logits")
# model.matmul_dtype: "auto" multiplies in the compute dtype (model.dtype); "bfloat16" rounds the
# dense layers' and tied head's inputs to bfloat16 and accumulates in float32 (gpt.matmul's
# bf16_matmul), everything else staying in model.dtype: torch autocast's recipe.
MATMUL_DTYPES = ("auto", "bfloat16")
QUANTIZE = ("none", "int8")
# Layers per iteration of the rolled scan (model.scan_layers=True); bench_train's `-unroll2` sets 2
# to measure it (the scan's bookkeeping is per iteration; a larger body compiles slower).
SCAN_UNROLL = 1
# The dense layers low-rank adapters can go into, named as Hugging Face PEFT's target_modules
# suffixes name them (`c_attn` and `c_fc` are unique; the two `c_proj` need their parent).
LORA_TARGETS = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Hyperparameters of one GPT-2 (hashable, so it can be a static jit argument)."""

  n_vocab: int = 50257
  n_ctx: int = 1024
  n_embd: int = 768
  n_head: int = 12
  n_layer: int = 12
  embd_pdrop: float = 0.0
  attn_pdrop: float = 0.0
  resid_pdrop: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat: str = "none"
  attention_impl: str = "auto"
  # The training loss's output layer: "fused" (gpt.output_loss), "logits" (whole logits, optax) or
  # "auto" (fused where `matmul` resolved to "mkl", logits elsewhere).
  output_loss: str = "auto"
  # Low-rank adapters (gpt.lora): rank 0 = none. Training sets these from `config.train.lora_*`.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = ("c_attn",)
  # Weight-only quantization (gpt.quantize): "int8" stores every Conv1D `w` and `wte` as int8 with
  # per-output-channel float32 scales (`w_scale`, `wte_scale`); activations stay float.
  quantize: str = "none"
  # With int8 weights, in a model prepared for decoding: quantize each activation row to int8 too
  # (per-row scale, as CTranslate2 does) and multiply in integers (gpt.kernels.gemv, AVX-512 VNNI).
  int8_activations: bool = False
  # With int8 weights, in a model prepared for decoding: at 2+ rows quantize each activation row to
  # int16 (per-row scale) and multiply with VNNI's vpdpwssd (gpt.kernels.gemv): float activations'
  # results to within half an int16 step, fewer instructions than the float loop.
  int16_activations: bool = False
  # Set by gpt.decoding.prepare_for_decoding (never by configs): Conv1D weights stored [n_out, n_in], one output
  # per row, the layout gpt.kernels.gemv streams.
  weights_by_row: bool = False
  # The dense layers' and tied head's float32 matmuls (gpt.kernels.gemm.MATMULS): "auto" runs MKL's
  # sgemm (gpt.kernels.gemm) in a training program on one CPU device where MKL loads, XLA's einsum
  # elsewhere; "xla" always XLA's; "mkl" insists on MKL. Training resolves it (gemm.resolve).
  matmul: str = "auto"
  # MATMUL_DTYPES: "bfloat16" runs the dense layers' and tied head's products (forward and both
  # backward products) as bf16 x bf16 -> float32 (gpt.matmul.bf16_matmul) whatever model.dtype
  # is; with float32 activations and parameters that is torch's autocast (train-bf16, session 9).
  matmul_dtype: str = "auto"

  def __post_init__(self):
    # JSON and ConfigDicts hand lists or comma-separated strings; the config must stay hashable.
    targets = self.lora_targets
    if isinstance(targets, str):
      targets = [t.strip() for t in targets.split(",") if t.strip()]
    object.__setattr__(self, "lora_targets", tuple(targets))
    if self.n_embd % self.n_head:
      raise GPTError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise GPTError(f"model.{name}={getattr(self, name)!r}; choose one of {sorted(DTYPES)}")
    if self.remat not in REMAT_POLICIES:
      raise GPTError(f"model.remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    if self.quantize not in QUANTIZE:
      raise GPTError(f"model.quantize={self.quantize!r}; choose one of {QUANTIZE}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise GPTError(f"model.attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}")
    if self.matmul not in gemm.MATMULS:
      raise GPTError(f"model.matmul={self.matmul!r}; choose one of {gemm.MATMULS}")
    if self.matmul_dtype not in MATMUL_DTYPES:
      raise GPTError(f"model.matmul_dtype={self.matmul_dtype!r}; choose one of {MATMUL_DTYPES}")
    if self.output_loss not in OUTPUT_LOSSES:
      raise GPTError(f"model.output_loss={self.output_loss!r}; choose one of {OUTPUT_LOSSES}")
    if self.lora_rank:
      bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
      if bad or not self.lora_targets:
        raise GPTError(f"train.lora_targets={','.join(self.lora_targets)!r}: choose one or more of "
                       f"{', '.join(LORA_TARGETS)} (comma-separated)")

  def lora_rank_of(self, target: str) -> int:
    """The adapter rank of dense layer `target` (one of LORA_TARGETS): 0 when it has none."""
    return self.lora_rank if target in self.lora_targets else 0

  @classmethod
  def from_config(cls, model_cfg: Any) -> "GPTConfig":
    """Builds from the `model` section of an experiment config (a ConfigDict or dict)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = dict(model_cfg.items()) if hasattr(model_cfg, "items") else dict(model_cfg)
    return cls(**{k: v for k, v in values.items() if k in fields})

  def replace(self, **changes) -> "GPTConfig":
    return dataclasses.replace(self, **changes)

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def product_impl(self) -> str:
    """gpt.matmul's `impl` for the dense layers and the tied head: "bf16" with
    matmul_dtype=bfloat16, else the (resolved) `matmul`."""
    return "bf16" if self.matmul_dtype == "bfloat16" else self.matmul

  def num_params(self) -> int:
    """Parameter count with the tied embedding counted once."""
    d, v, L = self.n_embd, self.n_vocab, self.n_layer
    per_layer = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    return v * d + self.n_ctx * d + L * per_layer + 2 * d

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), attention included (PaLM's 6N + 12LTD)."""
    non_embedding = self.num_params() - self.n_vocab * self.n_embd - self.n_ctx * self.n_embd
    return 6 * (non_embedding + self.n_vocab * self.n_embd) + 12 * self.n_layer * seq_len * self.n_embd


def _fold(rng: jax.Array | None, i: int) -> jax.Array | None:
  """An independent key for sub-layer `i` (None stays None: no dropout)."""
  return None if rng is None else jax.random.fold_in(rng, i)


def _lora_args(cfg: GPTConfig, target: str) -> dict:
  """Conv1D's layout and adapter arguments for dense layer `target` (adapters only when it is a
  LoRA target)."""
  rank = cfg.lora_rank_of(target)
  layout = dict(quantize=cfg.quantize, by_row=cfg.weights_by_row, int8_activations=cfg.int8_activations,
                int16_activations=cfg.int16_activations,
                matmul=cfg.product_impl)
  return {**layout, **(dict(lora_rank=rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout)
                       if rank else {})}


class Attention(nnx.Module):
  """Causal multi-head self-attention (gpt.attention.attention), optionally over a KV cache layer."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, stack: int = 0):
    d, pdt = cfg.n_embd, DTYPES[cfg.param_dtype]
    self.cfg = cfg
    self.c_attn = Conv1D(d, 3 * d, ("embed", "heads"), std=0.02, rngs=rngs, stack=stack, dtype=pdt,
                         **_lora_args(cfg, "c_attn"))
    # GPT-2 scales residual projections by 1/sqrt(2 * n_layer) at init.
    self.c_proj = Conv1D(d, d, ("heads", "embed"), std=0.02 / math.sqrt(2 * cfg.n_layer),
                         rngs=rngs, stack=stack, dtype=pdt, **_lora_args(cfg, "attn.c_proj"))

  def __call__(self, x, *, mask, cache_kv=None, cache_index=None, rng=None, return_probs=False,
               project=True):
    """(output [B, T, D], updated (k, v) cache layer or None, probabilities or None); with
    project=False the output is the heads' [B, T, H * K] before c_proj (Block's fused tail)."""
    cfg = self.cfg
    B, T, _ = x.shape
    H, K = cfg.n_head, cfg.head_dim
    heads = lambda a: a.reshape(B, T, H, K).transpose(0, 2, 1, 3)  # [B, H, T, K]
    q, k, v = map(heads, jnp.split(self.c_attn(x, _fold(rng, 1)), 3, axis=-1))
    impl = cfg.attention_impl
    if cache_kv is not None:  # cache layers are [B * H, S, K]; the reshapes are free
      ck, cv = cache_kv
      S = ck.shape[1]
      ck = jax.lax.dynamic_update_slice(ck, k.reshape(B * H, T, K).astype(ck.dtype), (0, cache_index, 0))
      cv = jax.lax.dynamic_update_slice(cv, v.reshape(B * H, T, K).astype(cv.dtype), (0, cache_index, 0))
      cache_kv, impl = (ck, cv), "cache"
      k, v = ck.reshape(B, H, S, K), cv.reshape(B, H, S, K)
    out = attention(q, k, v, mask, impl=impl, dropout=cfg.attn_pdrop, rng=rng,
                    return_probs=return_probs, bf16_products=cfg.matmul_dtype == "bfloat16")
    y, probs = out if return_probs else (out, None)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, H * K)
    return (self.c_proj(y, _fold(rng, 2)) if project else y), cache_kv, probs


class MLP(nnx.Module):
  """Position-wise feed-forward: c_fc (4x), tanh-approximate GELU, c_proj."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, stack: int = 0):
    d, pdt = cfg.n_embd, DTYPES[cfg.param_dtype]
    self.c_fc = Conv1D(d, 4 * d, ("embed", "mlp"), std=0.02, rngs=rngs, stack=stack, dtype=pdt,
                       **_lora_args(cfg, "c_fc"))
    self.c_proj = Conv1D(4 * d, d, ("mlp", "embed"), std=0.02 / math.sqrt(2 * cfg.n_layer),
                         rngs=rngs, stack=stack, dtype=pdt, **_lora_args(cfg, "mlp.c_proj"))

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """`rng` turns the adapters' dropout on (training); None means deterministic."""
    fc, proj = self.c_fc, self.c_proj
    if (fc.by_row and not fc.lora_scale and x.dtype == jnp.float32
        and gemv.fuses_mlp(math.prod(x.shape[:-1]), fc.w[...], int16_activations=fc.int16_activations)):
      # Decoding (weights by row): c_fc, GELU and c_proj in one kernel call (gemv.mlp).
      scale = lambda c: c.w_scale[...] if hasattr(c, "w_scale") else None
      return gemv.mlp(x, fc.w[...], fc.b[...], proj.w[...], proj.b[...], scale1=scale(fc),
                      scale2=scale(proj), int8_activations=fc.int8_activations)
    # One kernel pass for c_fc's bias, the GELU's backward and c_fc's bias gradient, where it runs.
    fused = fused_mlp(fc, proj, x)
    if fused is not None:
      return fused
    return proj.after_gelu(fc(x, _fold(rng, 1)), _fold(rng, 2))


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, stack: int = 0):
    pdt = DTYPES[cfg.param_dtype]
    self.cfg = cfg
    self.ln_1 = LayerNorm(cfg.n_embd, stack=stack, dtype=pdt, kernel=cfg.matmul == "mkl")
    self.attn = Attention(cfg, rngs=rngs, stack=stack)
    self.ln_2 = LayerNorm(cfg.n_embd, stack=stack, dtype=pdt, kernel=cfg.matmul == "mkl")
    self.mlp = MLP(cfg, rngs=rngs, stack=stack)

  def __call__(self, x, *, mask=None, cache_kv=None, cache_index=None, rng=None, return_probs=False):
    if rng is None and not return_probs and self.fuses_tail(x):
      heads_out, cache_kv, _ = self.attn(self.ln_1(x), mask=mask, cache_kv=cache_kv,
                                         cache_index=cache_index, project=False)
      return self.fused_tail(heads_out, x), cache_kv, None
    rngs = (None, None, None) if rng is None else tuple(jax.random.split(rng, 3))
    a, cache_kv, probs = self.attn(self.ln_1(x), mask=mask, cache_kv=cache_kv,
                                   cache_index=cache_index, rng=rngs[0], return_probs=return_probs)
    x = x + apply_dropout(a, self.cfg.resid_pdrop, rngs[1])
    x = x + apply_dropout(self.mlp(self.ln_2(x), rngs[2]), self.cfg.resid_pdrop, rngs[2])
    return x, cache_kv, probs

  def fuses_tail(self, x: jax.Array) -> bool:
    """Whether this block (prepared for decoding: weights by row, no adapters) runs everything after
    its attention as one gpt.kernels.gemv.layer_tail call for x (gemv.fuses_layer_tail)."""
    convs = (self.attn.c_proj, self.mlp.c_fc, self.mlp.c_proj)
    return (all(c.by_row and not c.lora_scale for c in convs) and x.dtype == jnp.float32
            and gemv.fuses_layer_tail(math.prod(x.shape[:-1]), self.mlp.c_fc.w[...],
                                      int16_activations=self.mlp.c_fc.int16_activations))

  def fused_tail(self, heads_out: jax.Array, x: jax.Array) -> jax.Array:
    """x + attn c_proj(heads_out), then + mlp(ln_2(...)): the block's output, in one kernel call."""
    o, fc, proj = self.attn.c_proj, self.mlp.c_fc, self.mlp.c_proj
    scale = lambda c: c.w_scale[...] if hasattr(c, "w_scale") else None
    return gemv.layer_tail(heads_out, x, o.w[...], o.b[...], self.ln_2.g[...], self.ln_2.b[...],
                           fc.w[...], fc.b[...], proj.w[...], proj.b[...], scale_o=scale(o),
                           scale1=scale(fc), scale2=scale(proj),
                           int8_activations=fc.int8_activations).astype(x.dtype)


class GPT(nnx.Module):
  """GPT-2 language model with the output projection tied to `wte`.

  `h` holds the blocks stacked (one Block whose parameters have a leading [n_layer] axis, run by
  `lax.scan`); gpt.decoding.prepare_for_decoding gives the same model with one Block per layer instead.
  """

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, per_layer: bool = False):
    pdt = DTYPES[cfg.param_dtype]
    self.cfg = cfg
    if cfg.quantize == "int8":  # wte = wte_int8 * wte_scale (one scale per word: per output)
      self.wte = param(None, (cfg.n_vocab, cfg.n_embd), ("vocab", "embed"), "zeros", 0, 0, jnp.int8)
      self.wte_scale = param(None, (cfg.n_vocab,), ("vocab",), "ones", 0, 0, jnp.float32)
    else:
      self.wte = param(rngs, (cfg.n_vocab, cfg.n_embd), ("vocab", "embed"), "normal", 0.02, 0, pdt)
    self.wpe = param(rngs, (cfg.n_ctx, cfg.n_embd), (None, "embed"), "normal", 0.01, 0, pdt)
    if per_layer:
      self.h = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
    else:
      self.h = Block(cfg, rngs=rngs, stack=cfg.n_layer)
    self.ln_f = LayerNorm(cfg.n_embd, dtype=pdt, kernel=cfg.matmul == "mkl")

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               mask: jax.Array | None = None, *, cache: KVCache | None = None,
               rng: jax.Array | None = None, logits_at: Any = "all"):
    """The forward pass of every mode: training, scoring, sampling (tokens [B, T] int).

    positions [B, T]: position ids (default 0..T-1). mask [B, 1, T, S]: which keys each query
    sees (default causal); `attention_inputs` builds both for left-padded rows, and rows that
    pack several sequences (the eval scorer's) pass their own. `cache`: attend over, and write
    the new keys and values into, a KVCache at `cache.index`; without positions and mask they
    are built from the cache (`attention_inputs(tokens, None, cache)`).
    `rng` turns dropout on (training); None means deterministic.
    `logits_at` chooses the output: "all" float32 logits [B, T, V]; "last" the last column's
    [B, 1, V] (decoding); an int array [M] of flat indices b * T + t, logits [M, V] of just those
    states (the eval scorer's head where needed); None the final hidden states [B, T, D] (after
    ln_f, before the tied head).
    Returns the output, or (output, updated cache) when `cache` is given.
    """
    if cache is not None and positions is None and mask is None:
      positions, mask, cache = attention_inputs(tokens, None, cache)
    x, cache = self.trunk(tokens, positions, mask, cache, rng)
    out = heads.output(self, x, logits_at)
    return out if cache is None else (out, cache)

  def decode(self, tokens: jax.Array, cache: KVCache, token_mask: jax.Array | None = None, *,
             logits_at: Any = "all") -> tuple[jax.Array, KVCache]:
    """`tokens` [B, T] (left-padded when `token_mask` is given) run against `cache`: a whole
    prompt at once (prefill) or one token per step. Returns (logits, updated cache)."""
    positions, mask, cache = attention_inputs(tokens, token_mask, cache)
    return self(tokens, positions, mask, cache=cache, logits_at=logits_at)

  def tied_scale(self) -> jax.Array | None:
    """wte's per-word float32 scale [V] when it is int8 (`quantize="int8"`), else None."""
    return self.wte_scale[...] if self.cfg.quantize == "int8" else None

  def _embed(self, tokens: jax.Array) -> jax.Array:
    """wte rows of `tokens` in float32 (dequantized when wte is int8)."""
    # Out-of-range ids clamp (as indexing does) rather than give NaN (jnp.take's default fill).
    x = take_rows(self.wte[...], tokens)
    scale = self.tied_scale()
    if scale is None:
      return x
    return x.astype(jnp.float32) * jnp.take(scale, tokens, axis=0, mode="clip")[..., None]

  def trunk(self, tokens, positions, mask, cache, rng, return_probs=False):
    """Embeddings and blocks, the pass every output starts from (gpt.heads): (x [B, T, D] before
    ln_f, the updated cache), or (x, every layer's attention probabilities) with return_probs."""
    cfg = self.cfg
    B, T = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    x = self._embed(tokens) + take_rows(self.wpe[...], positions)
    rng_embd, rng_layers = (None, None) if rng is None else jax.random.split(rng)
    x = apply_dropout(x.astype(cfg.compute_dtype), cfg.embd_pdrop, rng_embd)
    layer_rngs = None if rng_layers is None else jax.random.split(rng_layers, cfg.n_layer)
    index = None if cache is None else cache.index
    if isinstance(self.h, Block):
      x, extra = self._scan(x, mask, cache, index, layer_rngs, return_probs)
    else:  # prepared for decoding: one Block per layer, each with its own cache arrays
      ks, vs, probs = [], [], []
      for i, block in enumerate(self.h):
        kv = None if cache is None else (cache.k[i], cache.v[i])
        x, kv, p = block(x, mask=mask, cache_kv=kv, cache_index=index,
                         rng=None if layer_rngs is None else layer_rngs[i], return_probs=return_probs)
        if cache is not None:
          ks.append(kv[0])
          vs.append(kv[1])
        probs.append(p)
      extra = (jnp.stack(probs) if return_probs else
               None if cache is None else (tuple(ks), tuple(vs)))
    if return_probs:
      return x, extra
    if cache is not None:
      cache = cache._replace(k=extra[0], v=extra[1], index=cache.index + T)
    return x, cache

  def _scan(self, x, mask, cache, index, layer_rngs, return_probs):
    """The stacked blocks as one lax.scan; returns (x, new (k, v) per layer or probabilities)."""
    cfg = self.cfg
    graphdef, layer_params = nnx.split(self.h)

    def layer(x, xs):
      params, kv, layer_rng = xs
      x, kv, probs = nnx.merge(graphdef, params)(x, mask=mask, cache_kv=kv, cache_index=index,
                                                 rng=layer_rng, return_probs=return_probs)
      return x, (probs if return_probs else kv)

    if cfg.remat != "none":
      layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    kv = None if cache is None else (jnp.stack(cache.k), jnp.stack(cache.v))
    x, out = jax.lax.scan(layer, x, (layer_params, kv, layer_rngs),
                               unroll=SCAN_UNROLL if cfg.scan_layers else cfg.n_layer)
    if cache is not None and not return_probs:
      out = (tuple(out[0]), tuple(out[1]))
    return x, out


def init_model(cfg: GPTConfig, seed: int = 0) -> GPT:
  """A freshly initialised GPT-2 (GPT-2's init: N(0, 0.02), residual projections scaled)."""
  return GPT(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: GPTConfig) -> GPT:
  """The model with ShapeDtypeStruct leaves: shapes and counts without allocating anything."""
  return nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(params=0)))


def count_params(model: GPT) -> int:
  """Number of parameters in a (possibly abstract) model; the tied embedding counts once."""
  state = nnx.state(model, nnx.Param)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))


def param_axes(model: GPT):
  """The logical axis names of every parameter, as a pytree shaped like `nnx.state(model, nnx.Param)`."""
  state = nnx.state(model, nnx.Param)
  return jax.tree.map(lambda v: v.get_metadata().get("axes"), state,
                      is_leaf=lambda v: isinstance(v, nnx.Variable))
