"""Resolves `config.init` into a ready model and its tokenizer.

`config.init` may be:
  scratch                      a fresh GPT-2 shaped by `config.model`
  117M / 124M / gpt2-medium... a released size: `<models_dir>/<124M|355M|...>`, downloaded if missing
  a folder                     OpenAI TF checkpoint (hparams.json + model.ckpt.*), Hugging Face folder
                               (config.json + model.safetensors) or a training workdir (config.json +
                               checkpoints/; a LoRA workdir's adapters come merged into its base)
For pretrained weights the checkpoint decides the shape (n_layer, n_embd, ...); `config.model` still
decides everything else (dtypes, dropout, scan, remat, attention kernel).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from gpt import convert
from gpt.config import MODEL_SIZES, canonical_model_name, is_model_name
from gpt.errors import GPTError
from gpt.model import GPT, GPTConfig, init_model

SHAPE_FIELDS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")


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
  from gpt import hf_checkpoint

  folder = Path(folder)
  if is_openai_folder(folder):
    from gpt import tf_checkpoint
    flat, hparams = tf_checkpoint.load_openai(folder)
    return flat, hparams, "openai"
  if hf_checkpoint.is_hf_folder(folder):
    flat, hparams = hf_checkpoint.load_hf(folder)
    return flat, hparams, "hf"
  raise GPTError(f"{folder} is neither an OpenAI checkpoint folder (hparams.json + model.ckpt.*) nor a "
                 f"Hugging Face folder (config.json + model.safetensors) nor a training workdir")


def _model_config(model_section: Any, hparams: dict | None) -> GPTConfig:
  """config.model, with the shape taken from the checkpoint's hparams when there are any."""
  cfg = GPTConfig.from_config(model_section)
  if hparams is None:
    return cfg
  shape = {k: int(hparams[k]) for k in SHAPE_FIELDS}
  differs = {k: (getattr(cfg, k), v) for k, v in shape.items() if getattr(cfg, k) != v}
  if differs:
    logging.info("model shape taken from the checkpoint (config had %s)",
                 ", ".join(f"{k}={a}" for k, (a, _) in differs.items()))
  return cfg.replace(**shape)


def _tokenizer_for(folder: Path | None):
  from gpt.tokenizer import get_tokenizer

  if folder is not None and ((folder / "encoder.json").is_file() or (folder / "vocab.json").is_file()):
    return get_tokenizer(folder)
  return get_tokenizer(None)


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
    from gpt.hf_checkpoint import is_hf_folder
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


def model_config(config: Any) -> GPTConfig:
  """The GPTConfig `load_model(config)` would return, from config files alone: no weights are read
  and nothing is downloaded (a released size's shape is known), for planning a run (compile mode)."""
  init = str(config.init).strip()
  if init == "scratch":
    return _model_config(config.model, None)
  path = Path(init).expanduser()
  if not path.is_dir() and is_model_name(init):
    n_layer, n_embd, n_head = MODEL_SIZES[canonical_model_name(init)]
    return _model_config(config.model, {"n_vocab": 50257, "n_ctx": 1024, "n_embd": n_embd,
                                        "n_head": n_head, "n_layer": n_layer})
  kind, folder = resolve_init(init, config.get("models_dir", "models"))
  if kind == "workdir":
    try:
      return _model_config(config.model, json.loads((folder / "config.json").read_text())["model"])
    except (OSError, json.JSONDecodeError, KeyError) as e:
      raise GPTError(f"cannot read the model shape from {folder / 'config.json'}: {e}") from None
  if kind == "openai":
    from gpt.tf_checkpoint import read_hparams
    return _model_config(config.model, read_hparams(folder / "hparams.json"))
  from gpt.hf_checkpoint import read_hparams
  return _model_config(config.model, read_hparams(folder))


def load_model(config: Any) -> Loaded:
  """The model and tokenizer named by `config.init`, shaped and typed as `config.model` says."""
  kind, folder = resolve_init(config.init, config.get("models_dir", "models"),
                              config.get("download_url", None))
  if kind == "scratch":
    cfg = _model_config(config.model, None)
    return Loaded(init_model(cfg, seed=config.get("seed", 0)), _tokenizer_for(None), cfg,
                  "random init", kind)
  if kind == "workdir":
    from gpt import lora
    if lora.is_lora_workdir(folder):  # adapters: merged into the base they reference
      return lora.load_workdir(folder, config)
    from gpt.checkpoint import restore_model
    try:
      saved = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise GPTError(f"cannot read {folder / 'config.json'}: {e}") from None
    cfg = _model_config(config.model, saved["model"])
    return Loaded(restore_model(str(folder), cfg), _tokenizer_for(None), cfg,
                  f"training checkpoint {folder}", kind)
  flat, hparams, kind = read_weights(folder)
  cfg = _model_config(config.model, hparams)
  model = convert.flat_to_model(flat, cfg, source=str(folder))
  label = "OpenAI checkpoint" if kind == "openai" else "Hugging Face model"
  return Loaded(model, _tokenizer_for(folder), cfg, f"{label} {folder}", kind)


def hparams_of(cfg: GPTConfig) -> dict:
  """OpenAI's hparams.json for a model config."""
  return {k: getattr(cfg, k) for k in SHAPE_FIELDS}


def export_hf(model: GPT, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
  """Writes `model` as a Hugging Face GPT-2 folder (config.json, model.safetensors, vocab files)."""
  from gpt.hf_checkpoint import export_hf as _export

  return _export(convert.model_to_flat(model), hparams_of(model.cfg), tokenizer, out_dir)
