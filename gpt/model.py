"""GPT-2 in Flax NNX, parameter for parameter the model OpenAI released.

Parameter names follow OpenAI's checkpoint (`wte`, `wpe`, `h/ln_1/g`, `h/attn/c_attn/w`, ...,
`ln_f/b`), so loading and exporting are renames (`gpt.convert`). The blocks are stored stacked:
every parameter under `h` has a leading `[n_layer]` axis, and the forward pass runs them with
`lax.scan` (rolled, fast to compile) or fully unrolled (a little faster per step on CPU). Both
layouts share one parameter tree, so checkpoints move freely between them.

Every parameter carries logical axis names in its `axes` metadata ("vocab", "embed", "heads",
"mlp", "layers"); `gpt.sharding` maps them to mesh axes.

Shape legend: B batch, T new tokens, S cached key slots, L layers, D width, H heads, K head dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gpt.errors import GPTError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_IMPLS = ("xla", "cudnn", "auto")
LN_EPS = 1e-5
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
  attention: str = "xla"
  # Low-rank adapters (gpt.lora): rank 0 = none. Training sets these from `config.train.lora_*`.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = ("c_attn",)

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
    if self.attention not in ATTENTION_IMPLS:
      raise GPTError(f"model.attention={self.attention!r}; choose one of {ATTENTION_IMPLS}")
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

  def num_params(self) -> int:
    """Parameter count with the tied embedding counted once."""
    d, v, L = self.n_embd, self.n_vocab, self.n_layer
    per_layer = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    return v * d + self.n_ctx * d + L * per_layer + 2 * d

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), attention included (PaLM's 6N + 12LTD)."""
    non_embedding = self.num_params() - self.n_vocab * self.n_embd - self.n_ctx * self.n_embd
    return 6 * (non_embedding + self.n_vocab * self.n_embd) + 12 * self.n_layer * seq_len * self.n_embd


class KVCache(NamedTuple):
  """Fixed-size decoding cache.

  k, v: [L, B, S, H, K] keys and values per layer and slot. `mask` [B, S] marks the slots that hold
  real tokens (left-padding stays False). `index` is the next slot to write (shared by all rows);
  `pos` [B] is each row's next position id.
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array
  index: jax.Array
  pos: jax.Array

  @classmethod
  def init(cls, cfg: GPTConfig, batch: int, length: int | None = None, dtype=None) -> "KVCache":
    length = cfg.n_ctx if length is None else length
    shape = (cfg.n_layer, batch, length, cfg.n_head, cfg.head_dim)
    dtype = cfg.compute_dtype if dtype is None else dtype
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               mask=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32),
               pos=jnp.zeros((batch,), jnp.int32))


def _param(rngs: nnx.Rngs | None, shape, axes, init: str, std: float, stack: int, dtype) -> nnx.Param:
  """A parameter of `shape` (with a leading [stack] axis when stack > 0) and logical `axes`."""
  if stack:
    shape, axes = (stack, *shape), ("layers", *axes)
  if init == "normal":
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  else:
    value = jnp.zeros(shape, jnp.float32)
  return nnx.Param(value.astype(dtype), axes=axes)


class LayerNorm(nnx.Module):
  """LayerNorm with OpenAI's names `g` (scale) and `b` (bias); computed in float32."""

  def __init__(self, d: int, *, stack: int = 0, dtype=jnp.float32):
    self.g = _param(None, (d,), ("embed",), "ones", 0.0, stack, dtype)
    self.b = _param(None, (d,), ("embed",), "zeros", 0.0, stack, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + LN_EPS)
    return (y * self.g[...].astype(jnp.float32) + self.b[...].astype(jnp.float32)).astype(x.dtype)


class Conv1D(nnx.Module):
  """OpenAI's 'conv1d' (a dense layer): `w` [n_in, n_out], `b` [n_out], and with `lora_rank` > 0 a
  low-rank adapter (Hu et al. 2021): `lora_a` [n_in, r], `lora_b` [r, n_out], so that

      y = x w + b + (alpha / r) * dropout(x) lora_a lora_b.

  `lora_b` starts at zero, so a fresh adapter leaves the layer exactly as it was; `lora_a` starts
  as PEFT's does (Kaiming-uniform, bound 1/sqrt(n_in)). The adapter's axes are the layer's own on
  the outer dimensions and unnamed (replicated) on the rank, so gpt.sharding lays it out like `w`.
  """

  def __init__(self, n_in: int, n_out: int, axes: tuple[str | None, str | None], *, std: float,
               rngs: nnx.Rngs, stack: int = 0, dtype=jnp.float32, lora_rank: int = 0,
               lora_alpha: float = 16.0, lora_dropout: float = 0.0):
    self.w = _param(rngs, (n_in, n_out), axes, "normal", std, stack, dtype)
    self.b = _param(None, (n_out,), axes[1:], "zeros", 0.0, stack, dtype)
    self.lora_scale = lora_alpha / lora_rank if lora_rank else 0.0
    self.lora_dropout = lora_dropout
    if lora_rank:
      bound = 1.0 / math.sqrt(n_in)
      shape = (stack, n_in, lora_rank) if stack else (n_in, lora_rank)
      a = jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)
      self.lora_a = nnx.Param(a.astype(dtype), axes=(("layers",) if stack else ()) + (axes[0], None))
      self.lora_b = _param(None, (lora_rank, n_out), (None, axes[1]), "zeros", 0.0, stack, dtype)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """`rng` turns the adapter's input dropout on (training); None means deterministic."""
    y = x @ self.w[...].astype(x.dtype) + self.b[...].astype(x.dtype)
    if not self.lora_scale:
      return y
    h = _dropout(x, self.lora_dropout, rng) @ self.lora_a[...].astype(x.dtype)
    return y + self.lora_scale * (h @ self.lora_b[...].astype(x.dtype))


def _fold(rng: jax.Array | None, i: int) -> jax.Array | None:
  """An independent key for sub-layer `i` (None stays None: no dropout)."""
  return None if rng is None else jax.random.fold_in(rng, i)


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _lora_args(cfg: GPTConfig, target: str) -> dict:
  """Conv1D's adapter arguments for dense layer `target` (none when it is not a LoRA target)."""
  rank = cfg.lora_rank_of(target)
  return dict(lora_rank=rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout) if rank else {}


class Attention(nnx.Module):
  """Causal multi-head self-attention with an optional fixed-size KV cache."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, stack: int = 0):
    d, pdt = cfg.n_embd, DTYPES[cfg.param_dtype]
    self.cfg = cfg
    self.c_attn = Conv1D(d, 3 * d, ("embed", "heads"), std=0.02, rngs=rngs, stack=stack, dtype=pdt,
                         **_lora_args(cfg, "c_attn"))
    # GPT-2 scales residual projections by 1/sqrt(2 * n_layer) at init.
    self.c_proj = Conv1D(d, d, ("heads", "embed"), std=0.02 / math.sqrt(2 * cfg.n_layer),
                         rngs=rngs, stack=stack, dtype=pdt, **_lora_args(cfg, "attn.c_proj"))

  def __call__(self, x, *, mask, cache_kv, cache_index, rng) -> tuple[jax.Array, Any]:
    cfg = self.cfg
    B, T, _ = x.shape
    q, k, v = jnp.split(self.c_attn(x, _fold(rng, 1)), 3, axis=-1)
    q, k, v = (a.reshape(B, T, cfg.n_head, cfg.head_dim) for a in (q, k, v))
    if cache_kv is not None:
      ck, cv = cache_kv
      k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
      v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
      cache_kv = (k, v)
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    y = _attend(q, k, v, mask, cfg, rng)
    return self.c_proj(y.reshape(B, T, cfg.n_embd), _fold(rng, 2)), cache_kv


def _attend(q, k, v, mask, cfg: GPTConfig, rng) -> jax.Array:
  """softmax(q k^T / sqrt(K)) v. `mask` is None (plain causal) or a [B, 1, T, S] boolean."""
  if rng is not None and cfg.attn_pdrop > 0:
    # jax.nn.dot_product_attention has no dropout: spell the attention out.
    scores = jnp.einsum("bthk,bshk->bhts", q, k).astype(jnp.float32) / math.sqrt(cfg.head_dim)
    if mask is None:
      T, S = q.shape[1], k.shape[1]
      mask = jnp.tril(jnp.ones((T, S), bool), S - T)[None, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
    probs = _dropout(probs, cfg.attn_pdrop, rng).astype(v.dtype)
    return jnp.einsum("bhts,bshk->bthk", probs, v)
  impl = cfg.attention
  if impl == "auto":
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
  if mask is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl if impl == "xla" else None)


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
    return self.c_proj(jax.nn.gelu(self.c_fc(x, _fold(rng, 1)), approximate=True), _fold(rng, 2))


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, stack: int = 0):
    pdt = DTYPES[cfg.param_dtype]
    self.cfg = cfg
    self.ln_1 = LayerNorm(cfg.n_embd, stack=stack, dtype=pdt)
    self.attn = Attention(cfg, rngs=rngs, stack=stack)
    self.ln_2 = LayerNorm(cfg.n_embd, stack=stack, dtype=pdt)
    self.mlp = MLP(cfg, rngs=rngs, stack=stack)

  def __call__(self, x, *, mask=None, cache_kv=None, cache_index=None, rng=None):
    rngs = (None, None, None) if rng is None else tuple(jax.random.split(rng, 3))
    a, cache_kv = self.attn(self.ln_1(x), mask=mask, cache_kv=cache_kv, cache_index=cache_index,
                            rng=rngs[0])
    x = x + _dropout(a, self.cfg.resid_pdrop, rngs[1])
    x = x + _dropout(self.mlp(self.ln_2(x), rngs[2]), self.cfg.resid_pdrop, rngs[2])
    return x, cache_kv


class GPT(nnx.Module):
  """GPT-2 language model with the output projection tied to `wte`."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    pdt = DTYPES[cfg.param_dtype]
    self.cfg = cfg
    self.wte = _param(rngs, (cfg.n_vocab, cfg.n_embd), ("vocab", "embed"), "normal", 0.02, 0, pdt)
    self.wpe = _param(rngs, (cfg.n_ctx, cfg.n_embd), (None, "embed"), "normal", 0.01, 0, pdt)
    self.h = Block(cfg, rngs=rngs, stack=cfg.n_layer)
    self.ln_f = LayerNorm(cfg.n_embd, dtype=pdt)

  def __call__(self, tokens: jax.Array, *, token_mask: jax.Array | None = None,
               rng: jax.Array | None = None) -> jax.Array:
    """Logits [B, T, V] (float32) for `tokens` [B, T].

    `token_mask` [B, T] marks real tokens when rows are left-padded: pads get no attention and
    position ids count real tokens only. Right padding needs no mask (attention is causal).
    `rng` turns dropout on (training); None means deterministic.
    """
    mask, positions = None, None
    if token_mask is not None:
      positions = jnp.maximum(jnp.cumsum(token_mask, axis=1) - 1, 0)
      T = tokens.shape[1]
      mask = jnp.tril(jnp.ones((T, T), bool))[None, None] & token_mask[:, None, None, :].astype(bool)
    logits, _ = self._forward(tokens, positions, mask, None, rng)
    return logits

  def decode(self, tokens: jax.Array, cache: KVCache, *,
             token_mask: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Runs `tokens` [B, T] through the model against `cache`, writing them at `cache.index`.

    Works for a whole (left-padded) prompt at once (prefill) and for one token per step.
    Returns float32 logits [B, T, V] and the updated cache.
    """
    B, T = tokens.shape
    S = cache.k.shape[2]
    valid = jnp.ones((B, T), bool) if token_mask is None else token_mask.astype(bool)
    positions = cache.pos[:, None] + jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    slot_mask = jax.lax.dynamic_update_slice(cache.mask, valid, (0, cache.index))
    slots = jnp.arange(S)
    causal = slots[None, :] <= (cache.index + jnp.arange(T))[:, None]  # [T, S]
    mask = causal[None, None] & slot_mask[:, None, None, :]
    logits, (k, v) = self._forward(tokens, positions, mask, (cache.k, cache.v, cache.index), None)
    new_cache = KVCache(k=k, v=v, mask=slot_mask, index=cache.index + T,
                        pos=cache.pos + valid.sum(axis=1, dtype=jnp.int32))
    return logits, new_cache

  def hidden_states(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                    mask: jax.Array | None = None) -> jax.Array:
    """Final-LayerNorm output [B, T, D] (before the tied output projection).

    `positions` [B, T] are the position ids (default 0..T-1 in every row) and `mask` [B, 1, T, T]
    says which keys each query sees (default causal). Rows that pack several sequences, as the
    evaluation scorer's do, pass both: each sequence restarts its positions and sees only itself.
    """
    x, _ = self._trunk(tokens, positions, mask, None, None)
    return self.ln_f(x)

  def attention_probs(self, tokens: jax.Array) -> jax.Array:
    """Every layer's attention probabilities, float32 [L, B, H, T, T] (query x key), for inspection."""
    cfg = self.cfg
    B, T = tokens.shape
    x = (jnp.take(self.wte[...], tokens, axis=0) + self.wpe[...][:T]).astype(cfg.compute_dtype)
    graphdef, layer_params = nnx.split(self.h)
    causal = jnp.tril(jnp.ones((T, T), bool))

    def layer(x, params):
      block = nnx.merge(graphdef, params)
      q, k, _ = jnp.split(block.attn.c_attn(block.ln_1(x)), 3, axis=-1)
      q, k = (a.reshape(B, T, cfg.n_head, cfg.head_dim) for a in (q, k))
      scores = jnp.einsum("bthk,bshk->bhts", q, k).astype(jnp.float32) / math.sqrt(cfg.head_dim)
      probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
      x, _ = block(x)
      return x, probs

    _, probs = jax.lax.scan(layer, x, layer_params)
    return probs

  def _forward(self, tokens, positions, mask, cache, rng):
    x, new_kv = self._trunk(tokens, positions, mask, cache, rng)
    x = self.ln_f(x)
    wte = self.wte[...].astype(x.dtype)
    logits = jnp.einsum("btd,vd->btv", x, wte, preferred_element_type=jnp.float32)
    return logits, new_kv

  def _trunk(self, tokens, positions, mask, cache, rng):
    cfg = self.cfg
    dtype = cfg.compute_dtype
    B, T = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    x = (jnp.take(self.wte[...], tokens, axis=0) + jnp.take(self.wpe[...], positions, axis=0))
    rng_embd, rng_layers = (None, None) if rng is None else jax.random.split(rng)
    x = _dropout(x.astype(dtype), cfg.embd_pdrop, rng_embd)

    graphdef, layer_params = nnx.split(self.h)
    cache_index = None if cache is None else cache[2]

    def layer(x, xs):
      params, kv, layer_rng = xs
      block = nnx.merge(graphdef, params)
      x, kv = block(x, mask=mask, cache_kv=kv, cache_index=cache_index, rng=layer_rng)
      return x, kv

    if cfg.remat != "none":
      layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    kv = None if cache is None else (cache[0], cache[1])
    layer_rngs = None if rng_layers is None else jax.random.split(rng_layers, cfg.n_layer)
    x, new_kv = jax.lax.scan(layer, x, (layer_params, kv, layer_rngs),
                             unroll=1 if cfg.scan_layers else cfg.n_layer)
    return x, new_kv


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
