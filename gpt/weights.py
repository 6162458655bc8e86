"""The one way weights come in and go out: resolves `config.init` into a model and its tokenizer,
and exports a model in either format.

`config.init` may be:
  scratch                      a fresh GPT-2 shaped by `config.model`
  117M / 124M / gpt2-medium... a released size: `<models_dir>/<124M|355M|...>`, downloaded if missing
  a folder                     OpenAI TF checkpoint (hparams.json + model.ckpt.*), Hugging Face folder
                               (config.json + model.safetensors), our int8 export (config.json +
                               model.int8.safetensors, gpt.quantize) or a training workdir (config.json +
                               checkpoints/; a LoRA workdir's adapters come merged into its base)
`config.model.quantize=int8` quantizes whatever was loaded (gpt.quantize), here, once for every mode.
For pretrained weights the checkpoint decides the shape (n_layer, n_embd, ...); `config.model` still
decides everything else (dtypes, dropout, scan, remat, attention kernel). Every mode, training
included, asks this module for the model config and the tokenizer, so that the rule is written once.

The file formats themselves live in `gpt/formats/` (OpenAI's TF checkpoint and its table reader,
Hugging Face safetensors, and the renames between them and our parameter tree); nothing outside
this module needs to import them to load or export a model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from gpt.config import MODEL_SIZES, canonical_model_name, is_model_name
from gpt.errors import GPTError
from gpt.formats import convert
from gpt.formats.convert import SHAPE_FIELDS, hparams_of
from gpt.model import GPT, GPTConfig, init_model

EXPORT_FORMATS = ("hf", "openai", "int8")

@dataclasses.dataclass
class Loaded:
  """A model ready to use, with the tokenizer that goes with its weights."""

  model: GPT
  tokenizer: Any
  cfg: GPTConfig
  source: str  # human-readable origin, e.g. "OpenAI checkpoint models/124M"
  kind: str  # scratch | openai | hf | workdir


def is_openai_folder(folder: Path) -> bool:
  return (folder / "hparams.json").is_file() and (folder / "model.ckpt.index").is_file()


def is_workdir(folder: Path) -> bool:
  return (folder / "checkpoints").is_dir() and (folder / "config.json").is_file()


def read_weights(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict, str]:
  """(OpenAI-named tensors, hparams, 'openai'|'hf') from an OpenAI or Hugging Face folder."""
  from gpt.formats import hf_checkpoint

  folder = Path(folder)
  if is_openai_folder(folder):
    from gpt.formats import tf_checkpoint
    flat, hparams = tf_checkpoint.load_openai(folder)
    return flat, hparams, "openai"
  if hf_checkpoint.is_hf_folder(folder):
    flat, hparams = hf_checkpoint.load_hf(folder)
    return flat, hparams, "hf"
  raise GPTError(f"{folder} is neither an OpenAI checkpoint folder (hparams.json + model.ckpt.*) nor a "
                 f"Hugging Face folder (config.json + model.safetensors) nor a training workdir")


def model_config(model_section: Any, hparams: dict | None) -> GPTConfig:
  """config.model, with the shape taken from a checkpoint's hparams (or a workdir's saved `model`
  section) when there are any."""
  if hparams is None:
    return GPTConfig.from_config(model_section)
  values = dict(model_section.items()) if hasattr(model_section, "items") else dict(model_section)
  shape = {k: int(hparams[k]) for k in SHAPE_FIELDS}
  differs = {k: values[k] for k, v in shape.items() if k in values and values[k] != v}
  if differs:
    logging.info("model shape taken from the checkpoint (config had %s)",
                 ", ".join(f"{k}={v}" for k, v in differs.items()))
  return GPTConfig.from_config({**values, **shape})


class DamagedWorkdirConfig(GPTError):
  """A workdir's config.json that cannot be read (truncated by a full disk, hand-edited)."""

  def __init__(self, problem: str):
    self.problem = problem
    super().__init__(f"{problem}; it records the trained model's shape: restore it, or delete it "
                     f"and pass the shape as --config.model.*")


def read_workdir_config(workdir: str | os.PathLike) -> dict | None:
  """A training workdir's saved config.json (the resolved config it trained with), or None when
  the workdir has none; DamagedWorkdirConfig when it cannot be read or lacks the model's shape."""
  path = Path(workdir) / "config.json"
  if not path.is_file():
    return None
  try:
    saved = json.loads(path.read_text())
    {k: int(saved["model"][k]) for k in SHAPE_FIELDS}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DamagedWorkdirConfig(
        f"{path} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
  return saved


def workdir_model_config(model_section: Any, workdir: str | os.PathLike) -> GPTConfig | None:
  """config.model with the shape a training workdir was trained with (None when it has no
  config.json)."""
  saved = read_workdir_config(workdir)
  return None if saved is None else model_config(model_section, saved["model"])


def tokenizer_for(folder: str | os.PathLike | None):
  """The tokenizer a weights folder ships (encoder.json + vocab.bpe or vocab.json + merges.txt),
  else GPT-2's, which the package carries."""
  from gpt.tokenizer import get_tokenizer

  folder = None if folder is None else Path(folder).expanduser()
  if folder is not None and ((folder / "encoder.json").is_file() or (folder / "vocab.json").is_file()):
    return get_tokenizer(folder)
  return get_tokenizer(None)


def init_tokenizer(init: str):
  """The tokenizer that goes with `config.init`, without loading (or downloading) any weights."""
  path = Path(str(init).strip()).expanduser()
  return tokenizer_for(path if path.is_dir() else None)


def resolve_init(init: str, models_dir: str, download_url: str | None = None) -> tuple[str, Path | None]:
  """('scratch', None) or (kind, folder) for `init`, downloading a released model when needed."""
  init = init.strip()
  if init == "scratch":
    return "scratch", None
  path = Path(init).expanduser()
  if path.is_dir():
    if is_workdir(path):
      return "workdir", path
    if is_openai_folder(path):
      return "openai", path
    from gpt.quantize import is_quantized_folder
    if is_quantized_folder(path):
      return "int8", path
    from gpt.formats.hf_checkpoint import is_hf_folder
    if is_hf_folder(path):
      return "hf", path
    raise GPTError(f"--config.init={init}: the folder holds no OpenAI checkpoint, Hugging Face model "
                   f"or training checkpoints")
  if is_model_name(init):
    name = canonical_model_name(init)
    folder = Path(models_dir) / name
    if not is_openai_folder(folder):
      from gpt.download import download_model
      folder = download_model(name, models_dir, base_url=download_url or None)
    return "openai", folder
  raise GPTError(f"--config.init={init!r} is not 'scratch', a model name (117M/124M, 345M/355M, "
                 f"762M/774M, 1542M/1558M) or an existing folder")


def planned_model_config(config: Any) -> GPTConfig:
  """The GPTConfig `load_model(config)` would return, from config files alone: no weights are read
  and nothing is downloaded (a released size's shape is known), for planning a run (compile mode)."""
  init = str(config.init).strip()
  if init == "scratch":
    return model_config(config.model, None)
  path = Path(init).expanduser()
  if not path.is_dir() and is_model_name(init):
    n_layer, n_embd, n_head = MODEL_SIZES[canonical_model_name(init)]
    return model_config(config.model, {"n_vocab": 50257, "n_ctx": 1024, "n_embd": n_embd,
                                       "n_head": n_head, "n_layer": n_layer})
  kind, folder = resolve_init(init, config.get("models_dir", "models"))
  if kind == "workdir":
    return workdir_model_config(config.model, folder) or model_config(config.model, None)
  if kind == "openai":
    from gpt.formats.tf_checkpoint import read_hparams
    return model_config(config.model, read_hparams(folder / "hparams.json"))
  from gpt.formats.hf_checkpoint import read_hparams
  cfg = model_config(config.model, read_hparams(folder))
  return cfg.replace(quantize="int8") if kind == "int8" else cfg


def load_model(config: Any) -> Loaded:
  """The model and tokenizer named by `config.init`, shaped and typed as `config.model` says
  (quantized when `config.model.quantize` is int8, or when the folder is an int8 export)."""
  from gpt import quantize

  model_section = config.model
  wanted = (model_section.get("quantize", "none") if hasattr(model_section, "get") else "none")
  if wanted not in ("none", "int8"):
    GPTConfig.from_config({"quantize": wanted})  # raises the GPTError naming the choices
  if wanted == "none":
    loaded = _load_float(config)
  else:  # every loader builds the float model; quantized once, here
    import copy
    plain = copy.deepcopy(config)
    plain.model.quantize = "none"
    loaded = _load_float(plain)
  if wanted == "int8" or loaded.kind == "int8":
    model = quantize.quantize_model(loaded.model)
    source = loaded.source if loaded.kind == "int8" else f"{loaded.source}, int8 weights"
    loaded = dataclasses.replace(loaded, model=model, cfg=model.cfg, source=source)
  return loaded


def _load_float(config: Any) -> Loaded:
  """load_model before quantization (an int8 export still comes back int8)."""
  kind, folder = resolve_init(config.init, config.get("models_dir", "models"),
                              config.get("download_url", None))
  if kind == "scratch":
    cfg = model_config(config.model, None)
    return Loaded(init_model(cfg, seed=config.get("seed", 0)), tokenizer_for(None), cfg,
                  "random init", kind)
  if kind == "workdir":
    from gpt import lora
    if lora.is_lora_workdir(folder):  # adapters: merged into the base they reference
      return lora.load_workdir(folder, config)
    from gpt.checkpoint import restore_model
    cfg = workdir_model_config(config.model, folder)
    return Loaded(restore_model(str(folder), cfg), tokenizer_for(None), cfg,
                  f"training checkpoint {folder}", kind)
  if kind == "int8":
    from gpt.formats.hf_checkpoint import read_hparams
    from gpt.quantize import load_int8
    cfg = model_config(config.model, read_hparams(folder))
    model = load_int8(folder, cfg)
    return Loaded(model, tokenizer_for(folder), model.cfg, f"int8 export {folder}", kind)
  flat, hparams, kind = read_weights(folder)
  cfg = model_config(config.model, hparams)
  model = convert.flat_to_model(flat, cfg, source=str(folder))
  label = "OpenAI checkpoint" if kind == "openai" else "Hugging Face model"
  return Loaded(model, tokenizer_for(folder), cfg, f"{label} {folder}", kind)


def export_hf(model: GPT, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
  """Writes `model` as a Hugging Face GPT-2 folder (config.json, model.safetensors, vocab files);
  an int8 model is written dequantized (float32)."""
  from gpt.formats import hf_checkpoint
  from gpt.quantize import dequantize_model

  model = dequantize_model(model)
  return hf_checkpoint.export_hf(convert.model_to_flat(model), hparams_of(model.cfg), tokenizer, out_dir)


def export_openai(model: GPT, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
  """Writes `model` in OpenAI's TF checkpoint layout (hparams.json, checkpoint, model.ckpt.*,
  encoder.json, vocab.bpe), which this package and OpenAI's scripts read."""
  from gpt.formats import tf_checkpoint
  from gpt.quantize import dequantize_model

  model = dequantize_model(model)
  folder = tf_checkpoint.write_checkpoint(out_dir, convert.model_to_flat(model), hparams_of(model.cfg))
  tokenizer.save(folder, fmt="openai")
  return folder


def check_export_format(fmt: str) -> None:
  """GPTError unless `fmt` is one of EXPORT_FORMATS."""
  if fmt not in EXPORT_FORMATS:
    raise GPTError(f"--format={fmt!r}: choose {' or '.join(EXPORT_FORMATS)}")


def export(model: GPT, tokenizer: Any, out_dir: str | os.PathLike, fmt: str = "hf") -> Path:
  """Writes `model` and its tokenizer to `out_dir` in `fmt` (one of EXPORT_FORMATS; int8:
  gpt.quantize's folder, quantizing a float model first)."""
  from gpt.quantize import export_int8

  check_export_format(fmt)
  return {"hf": export_hf, "openai": export_openai, "int8": export_int8}[fmt](model, tokenizer, out_dir)
