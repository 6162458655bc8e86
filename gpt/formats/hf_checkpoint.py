"""Hugging Face GPT-2 folders in and out (`config.json` + `model.safetensors`), numpy only.

HF's GPT2LMHeadModel uses OpenAI's Conv1D layout ([n_in, n_out] weights), so converting is a rename:
`transformer.h.3.attn.c_attn.weight` <-> `h3/attn/c_attn/w`. The output head is tied to `wte`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np

from gpt.errors import GPTError

_SKIP = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")  # causal-mask buffers in older checkpoints
_LN = {"weight": "g", "bias": "b"}
_DENSE = {"weight": "w", "bias": "b"}


def is_hf_folder(folder: str | os.PathLike) -> bool:
  folder = Path(folder)
  return (folder / "config.json").is_file() and (
      any(folder.glob("*.safetensors")) or (folder / "pytorch_model.bin").is_file())


def _hf_to_openai_name(name: str) -> str | None:
  """'transformer.h.0.attn.c_attn.weight' -> 'h0/attn/c_attn/w'; None for tensors to ignore."""
  name = name.removeprefix("transformer.")
  if name == "lm_head.weight" or _SKIP.search(name):
    return None
  parts = name.split(".")
  if parts[0] in ("wte", "wpe") and parts[1:] == ["weight"]:
    return parts[0]
  if parts[0] == "ln_f":
    return f"ln_f/{_LN[parts[1]]}"
  if parts[0] == "h" and len(parts) >= 4:
    layer, rest = parts[1], parts[2:]
    if rest[0] in ("ln_1", "ln_2"):
      return f"h{layer}/{rest[0]}/{_LN[rest[1]]}"
    return f"h{layer}/{'/'.join(rest[:-1])}/{_DENSE[rest[-1]]}"
  raise GPTError(f"unexpected tensor {name!r} in a Hugging Face GPT-2 checkpoint")


def _openai_to_hf_name(name: str) -> str:
  if name in ("wte", "wpe"):
    return f"transformer.{name}.weight"
  parts = name.split("/")
  leaf = {"g": "weight", "w": "weight", "b": "bias"}[parts[-1]]
  if parts[0] == "ln_f":
    return f"transformer.ln_f.{leaf}"
  layer = parts[0][1:]
  return f"transformer.h.{layer}.{'.'.join(parts[1:-1])}.{leaf}"


def _read_tensors(folder: Path) -> dict[str, np.ndarray]:
  shards = sorted(folder.glob("*.safetensors"))
  if shards:
    from safetensors.numpy import load_file
    tensors = {}
    for shard in shards:
      try:
        tensors.update(load_file(str(shard)))
      except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise GPTError(f"{shard} is not a readable safetensors file ({e}); re-download it") from None
    return tensors
  try:
    import torch
  except ImportError:
    raise GPTError(f"{folder} has only pytorch_model.bin, which needs torch (pip install torch); "
                   f"or convert it to model.safetensors") from None
  path = folder / "pytorch_model.bin"
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:  # weights_only=True met something that is not plain tensors
    detail = re.search(r"WeightsUnpickler error:\s*(.*?\.)(\s|$)", str(e), re.S)
    reason = " ".join((detail.group(1) if detail else str(e).splitlines()[0]).split())[:200]
    raise GPTError(f"{path} was refused: loading it with weights_only=True found Python objects "
                   f"besides tensors, which can run code when unpickled ({reason}); if you trust "
                   f"its source, convert it to model.safetensors with transformers") from None
  except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated, not a torch file
    first = re.match(r".*?\.(?=\s|$)", " ".join(str(e).split()))
    raise GPTError(f"{path} is not a readable PyTorch checkpoint "
                   f"({(first.group(0) if first else str(e))[:200]}); download it again") from None
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise GPTError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
  return {k: v.float().numpy() for k, v in state.items()}


def read_hparams(folder: str | os.PathLike) -> dict:
  """The model shape of an HF GPT-2 folder (its config.json) in OpenAI's hparams.json keys."""
  config_path = Path(folder) / "config.json"
  try:
    hf_config = json.loads(config_path.read_text())
  except (OSError, ValueError) as e:  # ValueError: not JSON or not UTF-8
    raise GPTError(f"cannot read {config_path}: {e}") from None
  if not isinstance(hf_config, dict):
    raise GPTError(f"{config_path} is not a JSON object; it is not a Hugging Face config")
  if hf_config.get("model_type", "gpt2") != "gpt2":
    raise GPTError(f"{config_path}: model_type is {hf_config.get('model_type')!r}, expected 'gpt2'")
  if hf_config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
    raise GPTError(f"{config_path}: activation_function {hf_config['activation_function']!r} is not "
                   f"GPT-2's tanh GELU")
  defaults = {"vocab_size": None, "n_embd": None, "n_head": None, "n_layer": None, "n_positions": 1024}
  missing = [k for k, d in defaults.items() if type(hf_config.get(k, d)) is not int]
  if missing:
    raise GPTError(f"{config_path} has no integer {', '.join(missing)}: it is not a GPT-2 config.json "
                   f"(or it is damaged); download it again")
  return {"n_vocab": hf_config["vocab_size"], "n_ctx": hf_config.get("n_positions", 1024),
          "n_embd": hf_config["n_embd"], "n_head": hf_config["n_head"],
          "n_layer": hf_config["n_layer"]}


def load_hf(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
  """Reads an HF GPT-2 folder: (OpenAI-named float32 tensors, hparams in OpenAI's hparams.json keys)."""
  folder = Path(folder)
  hparams = read_hparams(folder)
  flat = {}
  for name, value in _read_tensors(folder).items():
    ours = _hf_to_openai_name(name)
    if ours is not None:
      flat[ours] = np.asarray(value, np.float32)
  return flat, hparams


def _permissions_like_open(path: Path) -> None:
  """The mode a plain open() would give (0666 less the umask): safetensors writes its file
  through a private temporary file (0600), which other users could not read."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def export_hf(flat: dict[str, np.ndarray], hparams: dict, tokenizer, out_dir: str | os.PathLike) -> Path:
  """Writes an HF folder that `GPT2LMHeadModel.from_pretrained(out_dir)` loads.

  `flat` holds OpenAI-named tensors (gpt.formats.convert.model_to_flat), `hparams` OpenAI's keys
  (n_vocab, n_ctx, n_embd, n_head, n_layer). The tokenizer files are written beside the weights.
  """
  from safetensors.numpy import save_file

  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  # safetensors writes the raw buffer and ignores strides: make every tensor contiguous first.
  tensors = {_openai_to_hf_name(k): np.ascontiguousarray(v, dtype=np.float32) for k, v in flat.items()}
  tmp = out / "model.safetensors.tmp"
  save_file(tensors, str(tmp), metadata={"format": "pt"})
  _permissions_like_open(tmp)
  os.replace(tmp, out / "model.safetensors")
  config = {
      "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
      "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
      "vocab_size": hparams["n_vocab"], "n_positions": hparams["n_ctx"], "n_ctx": hparams["n_ctx"],
      "n_embd": hparams["n_embd"], "n_head": hparams["n_head"], "n_layer": hparams["n_layer"],
      "n_inner": None, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
      "scale_attn_weights": True, "tie_word_embeddings": True, "use_cache": True,
      "bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id,
  }
  (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  (out / "generation_config.json").write_text(json.dumps(
      {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}, indent=2) + "\n")
  tokenizer.save(out, fmt="hf")
  return out
