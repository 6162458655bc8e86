"""Renames between our parameter tree and OpenAI's flat checkpoint names, and the shape fields.

The interchange form is a flat dict of numpy arrays keyed by OpenAI's names without the `model/`
prefix: `wte`, `wpe`, `h0/ln_1/g`, `h0/attn/c_attn/w` ([n_in, n_out]), ..., `ln_f/b`. Every
loader (OpenAI TF, Hugging Face) produces it and every exporter consumes it, so there is exactly one
place that knows how our stacked `h/...` layout maps onto per-layer names.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx

from gpt.errors import GPTError
from gpt.model import GPT, GPTConfig, abstract_model

# The fields of a model config that a checkpoint fixes (OpenAI's hparams.json keys); everything else
# (dtypes, dropout, scan, remat, the attention kernel) is the run's choice.
SHAPE_FIELDS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")

# Per-layer parameter names and their shapes as functions of n_embd (d).
LAYER_PARAMS = {
    "ln_1/g": lambda d: (d,), "ln_1/b": lambda d: (d,),
    "attn/c_attn/w": lambda d: (d, 3 * d), "attn/c_attn/b": lambda d: (3 * d,),
    "attn/c_proj/w": lambda d: (d, d), "attn/c_proj/b": lambda d: (d,),
    "ln_2/g": lambda d: (d,), "ln_2/b": lambda d: (d,),
    "mlp/c_fc/w": lambda d: (d, 4 * d), "mlp/c_fc/b": lambda d: (4 * d,),
    "mlp/c_proj/w": lambda d: (4 * d, d), "mlp/c_proj/b": lambda d: (d,),
}


class WeightsError(GPTError):
  """A checkpoint that does not fit the model: missing, unexpected or wrongly shaped tensors."""


def hparams_of(cfg: GPTConfig) -> dict[str, int]:
  """OpenAI's hparams.json (the shape fields) for a model config."""
  return {k: int(getattr(cfg, k)) for k in SHAPE_FIELDS}


def expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
  """OpenAI-named tensor shapes for a model of this config."""
  d = cfg.n_embd
  shapes = {"wte": (cfg.n_vocab, d), "wpe": (cfg.n_ctx, d), "ln_f/g": (d,), "ln_f/b": (d,)}
  for i in range(cfg.n_layer):
    for name, shape in LAYER_PARAMS.items():
      shapes[f"h{i}/{name}"] = shape(d)
  return shapes


def check_flat(flat: dict[str, np.ndarray], cfg: GPTConfig, source: str) -> None:
  """Raises WeightsError naming `source`, the tensor and expected vs found shape on any mismatch."""
  want = expected_shapes(cfg)
  missing = sorted(set(want) - set(flat), key=_natural)
  if missing:
    raise WeightsError(f"{source}: missing tensor {missing[0]!r} (and {len(missing) - 1} more) for a "
                       f"{cfg.n_layer}-layer, {cfg.n_embd}-wide model")
  extra = sorted(set(flat) - set(want), key=_natural)
  if extra:
    raise WeightsError(f"{source}: unexpected tensor {extra[0]!r} (and {len(extra) - 1} more) for a "
                       f"{cfg.n_layer}-layer model; do the hparams match the weights?")
  for name, shape in want.items():
    found = tuple(np.shape(flat[name]))
    if found != shape:
      raise WeightsError(f"{source}: tensor {name!r} has shape {found}, expected {shape} "
                         f"(n_embd={cfg.n_embd}, n_vocab={cfg.n_vocab}, n_ctx={cfg.n_ctx})")


def flat_to_model(flat: dict[str, np.ndarray], cfg: GPTConfig, source: str = "weights") -> GPT:
  """Builds a GPT (arrays on the default device, in cfg.param_dtype) from OpenAI-named tensors."""
  check_flat(flat, cfg, source)
  model = abstract_model(cfg)
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  pdt = np.dtype(cfg.param_dtype) if cfg.param_dtype != "bfloat16" else jax.numpy.bfloat16

  def put(x):
    return jax.numpy.asarray(np.asarray(x, np.float32)).astype(pdt)

  pure["wte"], pure["wpe"] = put(flat["wte"]), put(flat["wpe"])
  pure["ln_f"] = {"g": put(flat["ln_f/g"]), "b": put(flat["ln_f/b"])}
  for name in LAYER_PARAMS:
    stacked = np.stack([np.asarray(flat[f"h{i}/{name}"], np.float32) for i in range(cfg.n_layer)])
    node = pure["h"]
    *parents, leaf = name.split("/")
    for p in parents:
      node = node[p]
    node[leaf] = put(stacked)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def model_to_flat(model: GPT, extra_layer_params: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """OpenAI-named numpy arrays (contiguous, ready for safetensors) from a model: float32, except
  int8 tensors (a quantized model's weights), which stay int8. `extra_layer_params` are per-layer
  names beyond OpenAI's (e.g. an int8 model's `attn/c_attn/w_scale`); top-level extras such as
  `wte_scale` are included when the model has them."""
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  def get(x):
    a = np.asarray(jax.device_get(x))
    return np.ascontiguousarray(a if a.dtype == np.int8 else a.astype(np.float32))

  flat = {"wte": get(pure["wte"]), "wpe": get(pure["wpe"]),
          "ln_f/g": get(pure["ln_f"]["g"]), "ln_f/b": get(pure["ln_f"]["b"])}
  if "wte_scale" in pure:
    flat["wte_scale"] = get(pure["wte_scale"])
  for name in tuple(LAYER_PARAMS) + tuple(extra_layer_params):
    node = pure["h"]
    for p in name.split("/"):
      node = node[p]
    stacked = get(node)
    for i in range(stacked.shape[0]):
      flat[f"h{i}/{name}"] = np.ascontiguousarray(stacked[i])
  return flat


def _natural(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
