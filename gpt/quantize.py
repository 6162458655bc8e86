"""int8 weight-only quantization (`model.quantize=int8`): the weights a decode step streams, in a
quarter of float32's bytes.

Batch-1 decoding on a CPU is bound by how fast the weights come from memory, so storing them as
int8 makes each step read 4x fewer bytes than float32. Every Conv1D weight `w` and the tied `wte`
become int8 with one float32 scale per output channel (`w_scale` [n_out]; `wte_scale` [n_vocab]:
the output layer's outputs are words), symmetric: w ~= w_int8 * scale, scale = max|w| / 127 over
the channel's inputs. Biases, LayerNorms and `wpe` stay float (they are a few percent of the bytes
and sensitive); activations stay float, unless `model.int8_activations` (`with_int8_activations`)
asks decoding to quantize each activation row to int8 as well (gpt.kernels.gemv's VNNI kernel),
or `model.int16_activations` (`with_int16_activations`) to int16 (vpdpwssd, at 2+ rows). gpt.model multiplies int8 weights either through
gpt.kernels.gemv (decoding: converted in registers, scaled per output) or, for many rows (the eval
scorer), by converting inside the jitted program and scaling the float32 result.

Models are quantized when loaded (gpt.weights.load_model, so sample, interactive, eval and the
harness model all get it) and can be exported quantized (`export.py --format=int8`): a folder with
`model.int8.safetensors` (OpenAI's tensor names; int8 `.../w` and `wte`, float32 `.../w_scale` and
`wte_scale`, the rest float32), `config.json` (the shape in Hugging Face GPT-2 keys plus a
`quantization` entry) and the tokenizer files. gpt.weights loads that folder back as an int8 model.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt.errors import GPTError
from gpt.model import GPT, GPTConfig, abstract_model

DENSE = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))
WEIGHTS_FILE = "model.int8.safetensors"
FORMAT = {"method": "int8 weight-only", "scales": "float32, per output channel, symmetric",
          "version": 1}


@partial(jax.jit, static_argnames="axis")
def quantize(w: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """(int8 w, float32 scales) with w ~= q * scale; `axis` is the input axis reduced per output
  (scales have w's shape without it). An all-zero channel gets scale 1 (and zeros)."""
  w = jnp.asarray(w, jnp.float32)
  amax = jnp.max(jnp.abs(w), axis=axis, keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
  return q, jnp.squeeze(scale, axis)


def dequantize(q: jax.Array, scale: jax.Array, axis: int) -> jax.Array:
  """float32 q * scale, the scale broadcast along `axis` (the axis `quantize` reduced)."""
  return q.astype(jnp.float32) * jnp.expand_dims(scale.astype(jnp.float32), axis)


def _rebuild(pure: dict, cfg: GPTConfig) -> GPT:
  graphdef, state = nnx.split(abstract_model(cfg))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def _check_stacked(model: GPT) -> None:
  if model.cfg.weights_by_row or model.cfg.lora_rank:
    raise GPTError("quantize a plain model (adapters merged, not prepared for decoding)")


def quantize_model(model: GPT) -> GPT:
  """The model with int8 Conv1D weights and wte (per-output-channel scales); the same model if it
  already is."""
  if model.cfg.quantize == "int8":
    return model
  _check_stacked(model)
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  pure["wte"], pure["wte_scale"] = quantize(pure["wte"], axis=1)  # [V, D]: one scale per word
  for sub, name in DENSE:
    node = pure["h"][sub][name]
    node["w"], node["w_scale"] = quantize(node["w"], axis=-2)  # [L, n_in, n_out]: per n_out
  return _rebuild(pure, model.cfg.replace(quantize="int8"))


def dequantize_model(model: GPT) -> GPT:
  """A float model (in cfg.param_dtype) computing what the int8 model computes; the same model if
  it is not quantized."""
  cfg = model.cfg
  if cfg.quantize != "int8":
    return model
  _check_stacked(model)
  pdt = jnp.dtype(cfg.param_dtype)
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  pure["wte"] = dequantize(pure["wte"], pure.pop("wte_scale"), 1).astype(pdt)
  for sub, name in DENSE:
    node = pure["h"][sub][name]
    node["w"] = dequantize(node["w"], node.pop("w_scale"), -2).astype(pdt)
  return _rebuild(pure, cfg.replace(quantize="none"))


def with_int8_activations(model: GPT, on: bool = True) -> GPT:
  """The same int8 model whose decoding quantizes activation rows to int8 too
  (`model.int8_activations`; the weights are shared, only the config differs)."""
  if model.cfg.quantize != "int8":
    raise GPTError("model.int8_activations needs int8 weights: set model.quantize=int8 as well")
  _check_stacked(model)
  return _rebuild(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.cfg.replace(int8_activations=on))


def with_int16_activations(model: GPT, on: bool = True) -> GPT:
  """The same int8 model whose decoding (2+ rows) quantizes activation rows to int16 and multiplies
  with VNNI (`model.int16_activations`; the weights are shared, only the config differs)."""
  if model.cfg.quantize != "int8":
    raise GPTError("model.int16_activations needs int8 weights: set model.quantize=int8 as well")
  _check_stacked(model)
  return _rebuild(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.cfg.replace(int16_activations=on))


# ---- the quantized folder ----

def is_quantized_folder(folder: str | os.PathLike) -> bool:
  folder = Path(folder)
  return (folder / WEIGHTS_FILE).is_file() and (folder / "config.json").is_file()


def to_flat(model: GPT) -> dict[str, np.ndarray]:
  """OpenAI-named numpy tensors of an int8 model: `h3/attn/c_attn/w` int8, `.../w_scale`, `wte`
  int8, `wte_scale`, everything else float32."""
  from gpt.formats.convert import model_to_flat

  return model_to_flat(quantize_model(model), tuple(f"{sub}/{name}/w_scale" for sub, name in DENSE))


def export_int8(model: GPT, tokenizer, out_dir: str | os.PathLike) -> Path:
  """Writes the int8 model (quantizing a float one first) as a folder gpt.weights loads back."""
  from safetensors.numpy import save_file

  from gpt.formats.convert import hparams_of

  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tmp = out / f"{WEIGHTS_FILE}.tmp"
  save_file(to_flat(model), str(tmp), metadata={"format": "gpt-int8"})
  os.replace(tmp, out / WEIGHTS_FILE)
  h = hparams_of(model.cfg)
  config = {"model_type": "gpt2", "vocab_size": h["n_vocab"], "n_positions": h["n_ctx"],
            "n_embd": h["n_embd"], "n_head": h["n_head"], "n_layer": h["n_layer"],
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "quantization": FORMAT}
  (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  tokenizer.save(out, fmt="hf")
  return out


def load_int8(folder: str | os.PathLike, cfg: GPTConfig) -> GPT:
  """The int8 model of a quantized folder; `cfg` (its shape from the folder's config.json, e.g.
  gpt.weights.model_config) decides the rest. Every tensor is checked by name, shape and dtype."""
  from safetensors.numpy import load_file

  from gpt.formats.convert import LAYER_PARAMS, WeightsError, expected_shapes

  path = Path(folder) / WEIGHTS_FILE
  try:
    flat = load_file(str(path))
  except Exception as e:  # safetensors raises its own error types for corrupt headers
    raise GPTError(f"{path} is not a readable safetensors file ({e}); export it again") from None
  cfg = cfg.replace(quantize="int8")
  want = {k: (s, np.int8 if k == "wte" or k.endswith("/w") else np.float32)
          for k, s in expected_shapes(cfg).items()}
  want["wte_scale"] = ((cfg.n_vocab,), np.float32)
  for i in range(cfg.n_layer):
    for sub, name in DENSE:
      want[f"h{i}/{sub}/{name}/w_scale"] = (want[f"h{i}/{sub}/{name}/w"][0][1:], np.float32)
  for name, (shape, dtype) in want.items():
    if name not in flat:
      raise WeightsError(f"{path}: missing tensor {name!r}")
    if flat[name].shape != shape or flat[name].dtype != dtype:
      raise WeightsError(f"{path}: tensor {name!r} is {flat[name].dtype}{list(flat[name].shape)}, "
                         f"expected {np.dtype(dtype)}{list(shape)}")
  if set(flat) - set(want):
    raise WeightsError(f"{path}: unexpected tensor {sorted(set(flat) - set(want))[0]!r}")
  pdt = jnp.dtype(cfg.param_dtype)
  pure = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))

  def leaf(name, a):
    return jnp.asarray(a) if a.dtype == np.int8 or name.endswith("_scale") else jnp.asarray(a, pdt)

  pure["wte"], pure["wte_scale"] = leaf("wte", flat["wte"]), leaf("wte_scale", flat["wte_scale"])
  pure["wpe"] = leaf("wpe", flat["wpe"])
  pure["ln_f"] = {"g": leaf("g", flat["ln_f/g"]), "b": leaf("b", flat["ln_f/b"])}
  for name in list(LAYER_PARAMS) + [f"{sub}/{n}/w_scale" for sub, n in DENSE]:
    node = pure["h"]
    *parents, last = name.split("/")
    for p in parents:
      node = node[p]
    node[last] = leaf(name, np.stack([flat[f"h{i}/{name}"] for i in range(cfg.n_layer)]))
  return _rebuild(pure, cfg)
