"""Low-rank adapters (LoRA, Hu et al. 2021): fine-tune a frozen GPT-2 through a few MB of weights.

Full fine-tuning keeps Adam's two moments for every parameter (3 x params in float32 with the
weights themselves), which is what stops 774M/1558M on one GPU or a laptop. With
`--config.train.lora_rank=8` the chosen dense layers (`train.lora_targets`) get adapters inside
`gpt.layers.Conv1D` (y = x W + b + (alpha/r) dropout(x) A B, B zero at the start, so the model
starts exactly as the base); training differentiates and optimizes only the adapters, the base
weights ride along as a frozen, un-donated argument of the jitted step (`gpt.train_step`).

A LoRA workdir stores only the adapters (and their optimizer state) in its checkpoints, plus
`lora.json`: the adapter settings and a reference to the base weights (`config.init` as given,
folders made absolute) with a fingerprint of them. Resuming against a different base, or loading
the workdir when the base has changed, is one error line.

Every consumer of `config.init` (sampling, interactive, eval, the harness, the attention view,
export) gets a LoRA workdir through `gpt.weights.load_model`, which calls `load_workdir` here:
the adapters are merged into the base (W + (alpha/r) A B), so consumers see a plain GPT-2 and need
no second code path. `export_peft` writes the adapters alone as Hugging Face PEFT loads them.

Params here are pure nested dicts (`nnx.to_pure_dict`); adapter leaves are the ones named
`lora_a` / `lora_b`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt.errors import GPTError
from gpt.model import GPT, LORA_TARGETS, GPTConfig, abstract_model

REFERENCE_FILE = "lora.json"
ADAPTER_LEAVES = ("lora_a", "lora_b")
# Where each target lives in the params tree, under the stacked blocks `h` (the same path as in
# Hugging Face's GPT-2 under `transformer.h.<i>`).
TARGET_PATHS = {"c_attn": ("attn", "c_attn"), "attn.c_proj": ("attn", "c_proj"),
                "c_fc": ("mlp", "c_fc"), "mlp.c_proj": ("mlp", "c_proj")}


# ----------------------------------------------------------------------------- settings


def settings(t: Any) -> dict:
  """The LoRA settings of `config.train` ({} when lora_rank is 0), checked."""
  rank = int(t.get("lora_rank", 0))
  if rank < 0:
    raise GPTError(f"train.lora_rank={rank} must be >= 0 (0 = full fine-tuning)")
  if rank == 0:
    return {}
  alpha, dropout = float(t.lora_alpha), float(t.lora_dropout)
  if alpha <= 0:
    raise GPTError(f"train.lora_alpha={alpha} must be > 0 (the adapter output is scaled by alpha/rank)")
  if not 0 <= dropout < 1:
    raise GPTError(f"train.lora_dropout={dropout} must be in [0, 1)")
  targets = t.lora_targets
  targets = [s.strip() for s in targets.split(",")] if isinstance(targets, str) else list(targets)
  targets = [s for s in targets if s]
  bad = [s for s in targets if s not in LORA_TARGETS]
  if bad or not targets:
    raise GPTError(f"train.lora_targets={','.join(targets)!r}: choose one or more of "
                   f"{', '.join(LORA_TARGETS)} (comma-separated)")
  return {"rank": rank, "alpha": alpha, "dropout": dropout,
          "targets": [s for s in LORA_TARGETS if s in targets]}


def with_adapters(cfg: GPTConfig, lora: dict) -> GPTConfig:
  """`cfg` with the adapters of `lora` (settings()) switched on."""
  return cfg.replace(lora_rank=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                     lora_targets=tuple(lora["targets"]))


def trained_config(t: Any, cfg: GPTConfig) -> GPTConfig:
  """The model a training run with `config.train` = `t` trains, from base model `cfg`: `cfg` with
  the adapters of `t.lora_*` (checked by settings()), or `cfg` itself for full fine-tuning. Needs
  no workdir or weights, so a run can be planned (compile mode) before it exists; a LoRA run is
  one whose trained config has `lora_rank > 0`."""
  lora = settings(t)
  return with_adapters(cfg, lora) if lora else cfg


# ----------------------------------------------------------------------------- params trees


def _is_adapter_key(key: str) -> bool:
  return key in ADAPTER_LEAVES


def split(tree: dict) -> tuple[dict, dict]:
  """(adapters, rest) of a nested dict shaped like the params (params, axes, shardings...)."""
  adapters, rest = {}, {}
  for k, v in tree.items():
    if isinstance(v, dict):
      a, r = split(v)
      if a:
        adapters[k] = a
      if r:
        rest[k] = r
    elif _is_adapter_key(k):
      adapters[k] = v
    else:
      rest[k] = v
  return adapters, rest


def combine(a: dict, b: dict | None) -> dict:
  """The union of two disjoint nested dicts (adapters and frozen base) as one params tree."""
  if not b:
    return a
  out = dict(a)
  for k, v in b.items():
    out[k] = combine(out[k], v) if k in out and isinstance(v, dict) else v
  return out


def init_adapters(cfg: GPTConfig, seed: int) -> dict:
  """Fresh adapters for `cfg` (lora_rank > 0): A as PEFT's Kaiming-uniform (bound 1/sqrt(n_in)),
  B zero. Shapes come from the abstract model, so nothing of the base is allocated."""
  shapes, _ = split(nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param)))
  key = jax.random.key(seed)
  out: dict = {"h": {}}
  for i, target in enumerate(cfg.lora_targets):
    parent, name = TARGET_PATHS[target]
    node = shapes["h"][parent][name]
    a, b = node["lora_a"], node["lora_b"]
    bound = 1.0 / np.sqrt(a.shape[-2])
    pdt = a.dtype
    out["h"].setdefault(parent, {})[name] = {
        "lora_a": jax.random.uniform(jax.random.fold_in(key, i), a.shape, jnp.float32, -bound,
                                     bound).astype(pdt),
        "lora_b": jnp.zeros(b.shape, pdt)}
  return out


def merged_params(params: dict, cfg: GPTConfig) -> dict:
  """Pure params of a model with adapters -> those of the plain model: W + (alpha/r) A B."""
  adapters, base = split(params)
  out = copy.copy(base)
  out["h"] = {p: dict(v) for p, v in base["h"].items()}
  scale = cfg.lora_alpha / cfg.lora_rank
  for target in cfg.lora_targets:
    parent, name = TARGET_PATHS[target]
    layer, ad = dict(base["h"][parent][name]), adapters["h"][parent][name]
    w = layer["w"]
    delta = jnp.einsum("lir,lro->lio", jnp.asarray(ad["lora_a"], jnp.float32),
                       jnp.asarray(ad["lora_b"], jnp.float32), precision=jax.lax.Precision.HIGHEST)
    layer["w"] = (jnp.asarray(w, jnp.float32) + scale * delta).astype(w.dtype)
    out["h"][parent][name] = layer
  return out


def merge(model: GPT) -> GPT:
  """A plain GPT (no adapters) equal to `model`: every adapter folded into its weight matrix."""
  cfg = model.cfg
  if not cfg.lora_rank:
    return model
  plain = cfg.replace(lora_rank=0)
  params = merged_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg)
  return nnx.merge(nnx.graphdef(abstract_model(plain)), params)


def fingerprint(params: dict) -> str:
  """A hash of base weights (every tensor rounded to bfloat16, so a float32 and a bfloat16 copy of
  the same weights agree) that tells whether adapters are applied to the base they were trained on."""
  import ml_dtypes

  h = hashlib.blake2b(digest_size=16)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(flat, key=lambda pl: jax.tree_util.keystr(pl[0])):
    x = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}:{x.shape};".encode())
    h.update(np.ascontiguousarray(x.astype(ml_dtypes.bfloat16)).view(np.uint16).tobytes())
  return h.hexdigest()


# ----------------------------------------------------------------------------- workdirs


def is_lora_workdir(folder: str | os.PathLike) -> bool:
  return (Path(folder) / REFERENCE_FILE).is_file()


def base_reference(init: str) -> str:
  """`config.init` as a LoRA workdir records its base: folders absolute, names as given."""
  path = Path(str(init).strip()).expanduser()
  return str(path.resolve()) if path.is_dir() else str(init).strip()


def read_reference(folder: str | os.PathLike) -> dict:
  path = Path(folder) / REFERENCE_FILE
  try:
    ref = json.loads(path.read_text())
    _ = ref["base"], ref["fingerprint"], ref["rank"], ref["alpha"], ref["targets"]
    return ref
  except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise GPTError(f"cannot read the LoRA base reference {path} ({e}); it is written when a LoRA "
                   f"run starts: copy it from a backup or start a new workdir") from None


def write_reference(folder: str | os.PathLike, base: str, print_: str, lora: dict) -> None:
  """Writes `lora.json` atomically: the adapter settings, the base and its fingerprint."""
  path = Path(folder) / REFERENCE_FILE
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps({**lora, "base": base, "fingerprint": print_}, indent=2, sort_keys=True))
  os.replace(tmp, path)


def check_base(ref: dict, base_params: dict, base: str, folder: str | os.PathLike, hint: str) -> None:
  """Raises one line (ending in `hint`: what to do) when `base_params` are not the weights the
  adapters in `folder` were trained on."""
  found = fingerprint(base_params)
  if found != ref["fingerprint"]:
    raise GPTError(f"the adapters in {folder} were trained on base {ref['base']} (fingerprint "
                   f"{ref['fingerprint'][:12]}), but {base} has fingerprint {found[:12]}: {hint}")


def restore_adapters(folder: str | os.PathLike, cfg: GPTConfig, step: int | None = None) -> dict:
  """The adapters (pure dict) of the latest (or `step`) checkpoint of LoRA workdir `folder`."""
  from gpt.checkpoint import checkpoint_dir, restore_verified

  adapters, _ = split(nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param)))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=device), adapters)
  # Checksums as for full checkpoints: a damaged checkpoint is skipped for the newest intact one.
  return restore_verified(checkpoint_dir(folder), abstract, step, folder,
                          f"the adapters in {folder} do not fit rank {cfg.lora_rank} on "
                          f"{', '.join(cfg.lora_targets)} of a {cfg.n_layer}-layer model")


def load_base(config: Any, init: str, workdir: Path | None = None):
  """gpt.weights.Loaded of base `init` with `config`'s model settings. A random base ('scratch')
  is rebuilt with the shape and seed saved in LoRA `workdir`'s config.json."""
  from gpt.weights import SHAPE_FIELDS, load_model

  base_config = copy.deepcopy(config)
  base_config.init = init
  if init == "scratch" and workdir is not None:
    saved = json.loads((Path(workdir) / "config.json").read_text())
    base_config.model.update({k: saved["model"][k] for k in SHAPE_FIELDS})
    base_config.seed = saved.get("seed", base_config.seed)
  return load_model(base_config)


def load_workdir(folder: Path, config: Any, *, merge_adapters: bool = True):
  """gpt.weights.Loaded for a LoRA workdir: its base (checked against the fingerprint) with the
  latest adapters merged in (or, `merge_adapters=False`, kept as adapters: a model with lora_rank)."""
  ref = read_reference(folder)
  base = load_base(config, ref["base"], folder)
  base_params = nnx.to_pure_dict(nnx.state(base.model, nnx.Param))
  check_base(ref, base_params, ref["base"], folder,
             f"its weights changed; put the original ones back there (or point `base` in "
             f"{Path(folder) / REFERENCE_FILE} at a copy of them)")
  cfg = with_adapters(base.cfg, ref)
  params = combine(restore_adapters(folder, cfg), base_params)
  if merge_adapters:
    model = nnx.merge(nnx.graphdef(base.model), merged_params(params, cfg))
  else:
    model = nnx.merge(nnx.graphdef(abstract_model(cfg)), params)
  base.model, base.cfg = model, model.cfg
  base.source = f"LoRA adapters {folder} (rank {cfg.lora_rank}) on {base.source}"
  base.kind = "workdir"
  return base


def prepare_training(config: Any, workdir: Path, setup: Any, main_process: bool) -> Any:
  """Turns gpt.train's Setup into a LoRA run's (no change for full fine-tuning): `params` become
  the adapters (fresh ones, or None when resuming), `frozen` the base weights and `lora_cfg` the
  model with adapters. Checks that a resumed run has the same settings and the same base."""
  lora = settings(config.train)
  saved = read_reference(workdir) if is_lora_workdir(workdir) else None
  resuming = setup.resume_step is not None
  if not lora:
    if saved is not None and resuming:
      raise GPTError(f"{workdir} holds a LoRA run (rank {saved['rank']} on "
                     f"{','.join(saved['targets'])}); resume it with --config.train.lora_rank="
                     f"{saved['rank']} (and the same lora_* settings), or pick a new --workdir")
    return setup
  if resuming and saved is None:
    raise GPTError(f"{workdir} holds a full fine-tuning run; LoRA (train.lora_rank={lora['rank']}) "
                   f"cannot continue it: pick a new --workdir, with --config.init={workdir} as base")
  if str(config.train.restore_from) not in ("latest", "fresh"):
    raise GPTError("train.restore_from=<checkpoint> cannot be combined with LoRA; give the weights "
                   "to adapt as --config.init=<workdir or folder>")
  base_name = base_reference(config.init)
  if resuming:
    differs = {k: (saved.get(k), v) for k, v in lora.items() if saved.get(k) != v}
    if differs:
      k, (was, now) = next(iter(differs.items()))
      raise GPTError(f"{workdir} was trained with train.lora_{k}={was}, now {now}: resume with the "
                     f"same LoRA settings, or pick a new --workdir")
    base = load_base(config, config.init)
    base_params = jax.device_get(nnx.to_pure_dict(nnx.state(base.model, nnx.Param)))
    check_base(saved, base_params, base_name, workdir,
               f"resume with --config.init={saved['base']} holding the same weights, or pick a new "
               f"--workdir")
    setup.cfg, setup.tokenizer = base.cfg, base.tokenizer
  else:
    base_params = setup.params
    if main_process:
      write_reference(workdir, base_name, fingerprint(base_params), lora)
  setup.frozen = base_params
  setup.lora_cfg = trained_config(config.train, setup.cfg)
  setup.params = None if resuming else jax.device_get(init_adapters(setup.lora_cfg, config.seed))
  setup.source = f"LoRA rank {lora['rank']} on {','.join(lora['targets'])} of {setup.source}"
  return setup


# ----------------------------------------------------------------------------- PEFT export


def peft_tensors(adapters: dict, cfg: GPTConfig) -> dict[str, np.ndarray]:
  """Adapters as PEFT's GPT-2 state dict: `base_model.model.transformer.h.<i>.<target>.lora_A.weight`
  [r, n_in] and `lora_B.weight` [n_out, r] (nn.Linear layouts, i.e. our A and B transposed)."""
  out = {}
  for target in cfg.lora_targets:
    parent, name = TARGET_PATHS[target]
    node = adapters["h"][parent][name]
    a = np.asarray(jax.device_get(node["lora_a"]), np.float32)
    b = np.asarray(jax.device_get(node["lora_b"]), np.float32)
    for i in range(cfg.n_layer):
      prefix = f"base_model.model.transformer.h.{i}.{parent}.{name}"
      out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
      out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
  return out


def peft_config(cfg: GPTConfig, base: str) -> dict:
  """adapter_config.json for PEFT's LoraConfig. GPT-2's HF layers are Conv1D (weight [in, out]):
  fan_in_fan_out. Targets are name suffixes, so `attn.c_proj` and `mlp.c_proj` stay apart."""
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
      "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
      "target_modules": list(cfg.lora_targets), "fan_in_fan_out": True, "bias": "none",
      "use_rslora": False, "use_dora": False, "modules_to_save": None, "inference_mode": True,
      "init_lora_weights": True,
  }


def export_peft(folder: str | os.PathLike, out: str | os.PathLike, config: Any) -> Path:
  """Writes the adapters of LoRA workdir `folder` as a PEFT adapter folder
  (adapter_config.json + adapter_model.safetensors) for the base its lora.json names."""
  from safetensors.numpy import save_file

  folder = Path(folder).expanduser()
  if not (folder.is_dir() and is_lora_workdir(folder)):
    raise GPTError(f"--format=adapters needs a LoRA training workdir (with {REFERENCE_FILE}); "
                   f"{folder} is not one")
  ref = read_reference(folder)
  saved = json.loads((folder / "config.json").read_text())["model"]
  cfg = with_adapters(GPTConfig.from_config({k: saved[k] for k in
                                             ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")}), ref)
  adapters = restore_adapters(folder, cfg)
  out = Path(out).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  save_file(peft_tensors(adapters, cfg), str(out / "adapter_model.safetensors"),
            metadata={"format": "pt"})
  (out / "adapter_config.json").write_text(json.dumps(peft_config(cfg, ref["base"]), indent=2) + "\n")
  return out
