"""Compile mode (`--config.mode=compile`): will this run fit on a TPU slice, and how fast will it go?

  python -m gpt.main --config=configs/1542m.py --config.mode=compile --config.mesh.topology=v5e:4x4 \
      --config.mesh.fsdp=16 --config.train.batch_size=32 --config.model.remat=full \
      --config.model.dtype=bfloat16 [--config.compile.search=true] [--workdir=runs/plan]

Why: a pod slice is paid by the hour, and "does 1558M with fsdp=16 fit a v5e-16, with which remat
and batch?" is a question the XLA TPU compiler answers on a laptop. With libtpu installed (`pip
install 'gpt[tpu]'`), `jax.experimental.topologies` describes a slice's chips without any TPU; the
train step that `train` would run (gpt.train.build_programs: same model, optimizer, remat, dtype,
mesh, batch, grad_accum), lowered with abstract sharded inputs (ShapeDtypeStructs: no weights are
read, nothing is allocated), compiles for them on the CPU. The compiler's memory analysis says what
each chip holds; a compile that runs out of HBM is the answer "does not fit", with the compiler's
own figure. The eval step (validation) is compiled the same way.

The decode step is the sampler's (gpt.sampling.Decoder.advance over gpt.sample's model prepared
for decoding), compiled for one chip of the slice, as sample mode runs on one device without a
mesh, with a KV cache of the full context for `sampling.batch_size` rows. Its tokens/s is a
roofline: every step reads all the weights and the whole cache from HBM.

With `train.lora_rank` the plan is of a LoRA run (gpt.lora.trained_config): the adapters are
trained and carry the optimizer state, the base weights are the steps' frozen argument.

The programs compile one after another (on threads they took as long for TPU targets);
`compile.programs` picks which, `compile.fast` asks XLA for its least optimisation effort (about
half the CPU for a TPU train step; the memory figures come out a few % larger).

Step times are estimates, not measurements: the model's FLOPs (GPTConfig.flops_per_token; XLA's
cost analysis counts a `scan` body once, so it undercounts the layers) plus what remat recomputes,
at the chip's published bf16 peak times an assumed utilisation (`compile.mfu`). They rank
settings; they do not model communication. With `mesh.topology` empty the local devices are used
(on CPU: memory figures only, unless `train.peak_flops` is set).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from gpt.errors import GPTError
from gpt.model import GPTConfig

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """What the estimates need to know about one accelerator chip."""

  name: str
  hbm: int | None  # bytes of HBM per chip (None: unknown, e.g. host RAM)
  peak_flops: float | None  # dense bf16 FLOP/s per chip (None: unknown)
  hbm_bandwidth: float | None = None  # bytes/s between HBM and the chip (None: unknown)


# Per-chip HBM and dense bf16 peak, keyed by jax's device_kind, from Google Cloud's TPU system
# architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e, read 2025):
#   v4   275 TFLOP/s bf16, 32 GiB HBM2,  1200 GB/s      v5e  197 TFLOP/s bf16, 16 GiB HBM2,  819 GB/s
#   v5p  459 TFLOP/s bf16, 95 GiB HBM2e, 2765 GB/s      v6e  918 TFLOP/s bf16, 32 GiB HBM, 1640 GB/s
# (The compiler keeps a little HBM for itself: it reports 15.75G available on a v5e.)
TPU_CHIPS = {
    "TPU v4": Chip("v4", 32 * GIB, 275e12, 1200e9),
    "TPU v5 lite": Chip("v5e", 16 * GIB, 197e12, 819e9),
    "TPU v5": Chip("v5p", 95 * GIB, 459e12, 2765e9),
    "TPU v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9),
    "TPU v6 lite": Chip("v6e", 32 * GIB, 918e12, 1640e9),
    "TPU v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9),
}
TOPOLOGY_RE = re.compile(r"^(v4|v5e|v5p|v6e):\d+(x\d+){1,2}$")
TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:4x4, v4:2x2x4, v5p:2x2x2, v6e:4x4"
REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")  # least recomputation (fastest) first


def libtpu_available() -> bool:
  """True when libtpu (the `[tpu]` extra) is installed, so TPU topologies can be compiled for."""
  return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str) -> list:
  """The compile-only devices of TPU slice `name` (e.g. 'v5e:4x4'): no TPU or network needed."""
  if not TOPOLOGY_RE.match(name):
    raise GPTError(f"mesh.topology={name!r}: expected <chip>:<chips per axis>, e.g. {TOPOLOGY_EXAMPLES}")
  if not libtpu_available():
    raise GPTError(f"mesh.topology={name} needs libtpu to compile for TPUs: pip install 'gpt[tpu]' "
                   f"(or jax[tpu] matching the installed jax {jax.__version__})")
  # Off a TPU VM, libtpu asks a metadata server for the accelerator type and worker hostnames and
  # prints notices when there is none, and takes /tmp/libtpu_lockfile, meant for processes that
  # share a real TPU (any jax process on the machine may hold it). A compile needs none of that.
  for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_ACCELERATOR_TYPE", "v5litepod-4"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(key, value)
  from jax.experimental import topologies

  # v4 chips run as one device of two cores ("megacore"), as jax.devices() shows on a v4 VM.
  kwargs = {"chip_config_name": "megacore"} if name.startswith("v4:") else {}
  try:
    return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices)
  except Exception as e:  # noqa: BLE001 - libtpu raises JaxRuntimeError/ValueError for bad shapes
    raise GPTError(f"mesh.topology={name}: {str(e).splitlines()[0]} (examples: "
                   f"{TOPOLOGY_EXAMPLES})") from None


def chip_of(device: Any, peak_override: float = 0.0) -> Chip:
  """The Chip of `device`: the TPU table, or what a local GPU/CPU reports about itself."""
  if device.device_kind in TPU_CHIPS:
    chip = TPU_CHIPS[device.device_kind]
    return dataclasses.replace(chip, peak_flops=peak_override or chip.peak_flops)
  hbm = None
  try:
    hbm = (device.memory_stats() or {}).get("bytes_limit")
  except Exception:  # noqa: BLE001 - CPU devices have no memory stats
    pass
  return Chip(device.device_kind, hbm, peak_override or None, None)


def recompute_flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
  """FLOPs per token that remat adds to a training step (beyond GPTConfig.flops_per_token).

  full recomputes every block's forward (2 per weight + 4 T D per layer of attention); dots saves
  every matmul output, so only cheap elementwise work is redone (counted as 0); dots_no_batch
  saves the weight matmuls but redoes the attention ones (batched: 4 T D per layer).
  """
  attention = 4 * cfg.n_layer * seq_len * cfg.n_embd
  blocks = 2 * (cfg.num_params() - cfg.n_vocab * cfg.n_embd - cfg.n_ctx * cfg.n_embd)
  return {"none": 0.0, "dots": 0.0, "dots_no_batch": float(attention),
          "full": float(blocks + attention)}[cfg.remat]


def shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  # dtype.itemsize also covers typed PRNG keys (key<fry>: 8 bytes), which np.dtype does not know.
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def memory_figures(compiled: Any) -> dict:
  """Per-chip bytes from the compiler's memory analysis of `compiled`, with the total live at the
  peak: inputs, the outputs not written over donated inputs, scratch and code."""
  ma = compiled.memory_analysis()
  mem = {"arguments": ma.argument_size_in_bytes, "outputs": ma.output_size_in_bytes,
         "aliased": ma.alias_size_in_bytes, "temporaries": ma.temp_size_in_bytes,
         "code": ma.generated_code_size_in_bytes}
  mem["total"] = mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"] + mem["code"]
  return mem


def parse_oom(message: str) -> dict:
  """The compiler's figures from an out-of-memory error: {'needed': bytes, 'available': bytes}."""
  units = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": GIB, "T": 2 ** 40}
  sizes = [float(v) * units[u] for v, u in re.findall(r"([\d.]+)([KMGT]?)i?B?\)", message)]
  if not sizes:
    sizes = [float(v) * units[u] for v, u in re.findall(r"\b([\d.]+)([KMGT])\b", message)]
  out = {}
  if sizes:
    out["needed"], out["available"] = int(sizes[0]), int(sizes[-1])
  return out


@dataclasses.dataclass
class Setting:
  """One way to run the same model and global batch on a slice (what the search varies)."""

  remat: str
  fsdp: int
  grad_accum: int
  data: int = -1  # the search leaves the data axis to take the chips fsdp x tensor leaves over


@dataclasses.dataclass
class Job:
  """One lowered program of a Planner, ready to compile."""

  key: Any  # its key in the Planner's cache of rows
  lowered: Any  # jax.stages.Lowered
  run: Callable[[], dict]  # compiles `lowered` and returns the program's row


class Planner:
  """Builds and compiles the run of one config on one set of devices, many settings of it."""

  def __init__(self, config: Any, devices: list, topology: str):
    from gpt import lora
    from gpt.weights import planned_model_config

    self.config, self.devices, self.topology = config, devices, topology or "local"
    self.base_cfg = planned_model_config(config)
    # What train trains: the base model, or with train.lora_rank > 0 its adapters (base frozen).
    self.train_cfg = lora.trained_config(config.train, self.base_cfg)
    self.chip = chip_of(devices[0], float(config.train.peak_flops))
    self.hosts = len({d.process_index for d in devices})
    self._done: dict = {}  # (setting, program) -> row; the search and the table share compiles

  def configured(self) -> Setting:
    return Setting(str(self.config.model.remat), int(self.config.mesh.fsdp),
                   int(self.config.train.grad_accum), int(self.config.mesh.data))

  def _config_for(self, s: Setting):
    config = self.config.copy_and_resolve_references()
    with config.unlocked():
      config.model.remat, config.mesh.fsdp, config.train.grad_accum = s.remat, s.fsdp, s.grad_accum
      config.mesh.data = s.data
    return config

  def compile(self, s: Setting, programs: tuple[str, ...] = ("train", "eval"),
              on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per program for setting `s`: memory per chip, fit, time estimate. Programs are
    "train", "eval" and "decode" (the sampler's, which does not depend on `s`); the ones not
    compiled before are compiled in turn, and `on_row(row)` hears of each as it finishes.

    In turn, not on threads: XLA's compile releases the GIL, but three TPU compiles on threads
    took as long as in turn (libtpu seems to run one at a time: the eval step, a quarter of the
    train step's CPU, finished with it), and in turn the first table comes out sooner."""
    keys = {p: "decode" if p == "decode" else (dataclasses.astuple(s), p) for p in programs}
    for job in self.lower(s, [p for p in programs if keys[p] not in self._done]):
      self._done[job.key] = row = job.run()
      if on_row:
        on_row(row)
    return [self._done[keys[p]] for p in programs]

  def lower(self, s: Setting, programs: list[str]) -> list[Job]:
    """A Job per program of setting `s`, traced and lowered; `job.run()` compiles it and returns
    the row (XLA's compile releases the GIL, so jobs may run on threads)."""
    # The train step first: its table is the answer most runs wait for.
    decode = [self._decode_job()] if "decode" in programs else []
    programs = [p for p in programs if p != "decode"]
    if not programs:
      return decode
    jobs = []
    from gpt import sharding
    from gpt.train import build_programs, check_config

    config = self._config_for(s)
    cfg = self.train_cfg.replace(remat=s.remat)
    mesh = sharding.make_mesh(config.mesh, self.devices)
    check_config(config.train, cfg, mesh)
    built = build_programs(config, cfg, mesh, lora_run=cfg.lora_rank > 0)
    t = config.train
    batch = jax.ShapeDtypeStruct((t.batch_size, t.seq_len + 1), np.int32,
                                 sharding=built.batch_sharding)
    for program in programs:
      if program == "train":
        fn, args = built.train_step, (built.abstract_state, batch, built.abstract_frozen)
      else:
        fn, args = built.eval_step, (built.abstract_state.params, batch, built.abstract_frozen)
      row, lowered = self._row(program, args, config, cfg, mesh, built), fn.lower(*args)
      jobs.append(Job((dataclasses.astuple(s), program), lowered, functools.partial(
          self._compiled_row, row, lowered, functools.partial(self._estimate, cfg=cfg))))
    return jobs + decode

  def _row(self, program, args, config, cfg, mesh, built) -> dict:
    """A train/eval row before compiling: the setting and the bytes of its arguments."""
    t = config.train
    state = built.abstract_state
    return {
        "program": program, "topology": self.topology, "chip": self.chip.name,
        "chips": mesh.size, "hosts": self.hosts,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "model": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
                  "params": cfg.num_params(), "dtype": cfg.dtype, "param_dtype": cfg.param_dtype},
        "lora": ({"rank": cfg.lora_rank, "targets": list(cfg.lora_targets)}
                 if cfg.lora_rank > 0 else None),
        "remat": cfg.remat, "batch_size": int(t.batch_size), "seq_len": int(t.seq_len),
        "grad_accum": int(t.grad_accum) if program == "train" else 1,
        "optimizer": str(t.optimizer),
        "per_chip": {"params": shard_bytes(state.params),
                     "opt_state": shard_bytes((state.opt_state, state.step, state.rng))
                     if program == "train" else 0,
                     "frozen": shard_bytes(built.abstract_frozen),  # LoRA's base weights
                     "batch": shard_bytes(args[1])},
        "hbm": self.chip.hbm, "multihost": self._multihost(t, built),
    }

  def _compiled_row(self, row: dict, lowered: Any, estimate: Callable[[dict], dict]) -> dict:
    """`row` completed by compiling `lowered`: the compiler's memory figures and the verdict (an
    out-of-memory compile is a "does not fit" row with the compiler's figure), then `estimate`.

    With `compile.fast` on a TPU slice, XLA first compiles with its least effort (about half the
    CPU; figures a few % high). A verdict that close to the chip's HBM (`compile.exact_margin`,
    either side) could flip, so that program is compiled again at full effort for the exact one.
    """
    fast = bool(self.config.compile.fast) and self.topology != "local"
    self._compile_into(row, lowered, fast)
    if fast and self._near_limit(row):
      self._compile_into(row, lowered, False)
      row["effort"] = "full (fast compile was near the limit)"
    return estimate(row)

  def _compile_into(self, row: dict, lowered: Any, fast: bool) -> None:
    """Compiles `lowered` (at XLA's least effort if `fast`) and writes the figures into `row`."""
    options = {"exec_time_optimization_effort": -1.0} if fast else None
    row["effort"] = "fast" if fast else "full"
    start = time.perf_counter()
    try:
      compiled = lowered.compile(compiler_options=options)
    except Exception as e:  # noqa: BLE001 - XLA raises JaxRuntimeError; only OOM is an answer
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise GPTError(f"compiling the {row['program']} step for {self.topology} failed: "
                       f"{str(e).splitlines()[0][:300]}") from None
      row.update(compile_s=row.get("compile_s", 0.0) + time.perf_counter() - start, fits=False,
                 error=str(e).splitlines()[0][:300], oom=parse_oom(str(e)))
      return
    row.pop("error", None), row.pop("oom", None)
    row["compile_s"] = row.get("compile_s", 0.0) + time.perf_counter() - start
    row["per_chip"].update(memory_figures(compiled))
    row["fits"] = self.chip.hbm is None or row["per_chip"]["total"] <= self.chip.hbm

  def _near_limit(self, row: dict) -> bool:
    """Whether the row's total (or the compiler's out-of-memory figure) is within
    `compile.exact_margin` of the chip's HBM, on either side."""
    total = row["per_chip"].get("total") or row.get("oom", {}).get("needed")
    if not self.chip.hbm or not total:
      return False
    return abs(total - self.chip.hbm) <= float(self.config.compile.exact_margin) * self.chip.hbm

  def compile_decode(self) -> dict:
    """The row of the sampler's decode loop (see `_decode_job`)."""
    return self.compile(self.configured(), ("decode",))[0]

  def _decode_job(self) -> Job:
    """The sampler's decode loop (gpt.sampling.Decoder.advance: what sample mode runs per token)
    for `sampling.batch_size` rows on one chip (sample mode uses one device, no mesh): the model
    prepared for decoding (abstract, in the compute dtype) and a KV cache of the full context.
    For a TPU slice it is laid out and traced as on the TPU: without this CPU's gemv kernel."""
    from gpt.kernels import gemv

    with gemv.off() if self.topology != "local" else contextlib.nullcontext():
      return self._lower_decode()

  def _lower_decode(self) -> Job:
    """`_decode_job`'s program, laid out and lowered for the current platform choice."""
    from jax.sharding import SingleDeviceSharding

    from gpt.model import abstract_model
    from gpt.sample import decoding_params, make_decoder, options_from_config

    cfg, s = self.base_cfg, self.config.sampling  # a LoRA workdir samples the merged base model
    batch, one = int(s.batch_size), SingleDeviceSharding(self.devices[0])
    if batch < 1:
      raise GPTError(f"sampling.batch_size={batch} must be >= 1")
    # The stop token's value does not change the program's shapes; GPT-2's <|endoftext|> is the last id.
    decoder = make_decoder(cfg, options_from_config(s), stop_token=cfg.n_vocab - 1,
                           stop_at_token=True)
    graphdef, state = nnx.split(abstract_model(cfg))
    params = jax.eval_shape(lambda st: decoding_params(nnx.merge(graphdef, st)), state)
    on_chip = lambda tree: jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), tree)
    prompt = jax.ShapeDtypeStruct((batch, 1), np.int32)
    start = functools.partial(decoder.start, cache_length=cfg.n_ctx, max_new=cfg.n_ctx)
    dstate = jax.eval_shape(start, params, prompt, jax.ShapeDtypeStruct((batch, 1), bool),
                            jax.eval_shape(lambda: jax.random.key(0)))
    params, dstate = on_chip(params), on_chip(dstate)
    row = {
        "program": "decode", "topology": self.topology, "chip": self.chip.name, "chips": 1,
        "hosts": 1, "mesh": {}, "model": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
                                          "n_head": cfg.n_head, "params": cfg.num_params(),
                                          "dtype": cfg.dtype, "param_dtype": cfg.dtype},
        "lora": None, "remat": "none", "batch_size": batch, "seq_len": cfg.n_ctx, "grad_accum": 1,
        "per_chip": {"params": shard_bytes(params), "cache": shard_bytes(dstate.cache),
                     "decode_state": shard_bytes(dstate._replace(cache=()))},
        "hbm": self.chip.hbm,
    }
    lowered = decoder.lower_advance(params, dstate)
    return Job("decode", lowered, functools.partial(
        self._compiled_row, row, lowered, functools.partial(self._estimate_decode, cfg=cfg)))

  def _estimate_decode(self, row: dict, *, cfg: GPTConfig) -> dict:
    """A roofline bound on decoding speed: every step (one token per row) reads all the weights
    and the whole fixed-size cache (attention runs over every slot, masked) from HBM, and does
    2 FLOPs per weight per row; the step takes the longer of the two at the chip's HBM bandwidth
    and bf16 peak x compile.mfu. Sampling and cache writes are ignored, so it is an upper bound
    on tokens/s; None when the chip's bandwidth is unknown (local devices)."""
    pc, mfu = row["per_chip"], float(self.config.compile.mfu)
    read = pc["params"] + pc["cache"]
    flops = 2 * cfg.num_params() * row["batch_size"]
    row.update(mfu=mfu, peak_flops=self.chip.peak_flops, hbm_bandwidth=self.chip.hbm_bandwidth,
               bytes_per_step=read, flops_per_step=flops, step_s=None, tokens_per_s=None)
    if self.chip.hbm_bandwidth and self.chip.peak_flops:
      row["step_s"] = max(read / self.chip.hbm_bandwidth, flops / (self.chip.peak_flops * mfu))
      row["tokens_per_s"] = row["batch_size"] / row["step_s"]
    return row

  def _estimate(self, row: dict, *, cfg: GPTConfig) -> dict:
    """Adds the estimated step time and tokens/s at the assumed MFU (None when peak is unknown)."""
    mfu = float(self.config.compile.mfu)
    tokens = row["batch_size"] * row["seq_len"]
    per_token = cfg.flops_per_token(row["seq_len"])
    if row["program"] == "train":
      per_token += recompute_flops_per_token(cfg, row["seq_len"])
    else:
      per_token /= 3  # forward only
    row.update(mfu=mfu, peak_flops=self.chip.peak_flops, flops_per_step=per_token * tokens,
               step_s=None, tokens_per_s=None)
    if self.chip.peak_flops and mfu > 0:
      row["step_s"] = per_token * tokens / (row["chips"] * self.chip.peak_flops * mfu)
      row["tokens_per_s"] = tokens / row["step_s"]
    return row

  def _multihost(self, t: Any, built) -> dict:
    """Hosts in the slice and the batch rows each reads per step (every host runs the command)."""
    from gpt import sharding

    index_map = built.batch_sharding.devices_indices_map((int(t.batch_size), int(t.seq_len) + 1))
    rows: dict[int, set] = {}
    for device, index in index_map.items():
      rows.setdefault(device.process_index, set()).update(range(t.batch_size)[index[0]])
    per_host = sorted({len(r) for r in rows.values()})
    return {"hosts": len(rows), "chips_per_host": len(index_map) // len(rows),
            "rows_per_host": per_host[-1], "rows_per_chip_micro": int(
                t.batch_size // sharding.batch_divisor(built.batch_sharding.mesh) // t.grad_accum)}

  def search(self, progress=None) -> list[dict]:
    """Train-step rows of the settings tried, ranked: fitting first, then by estimated tokens/s
    and per-chip micro-batch (see `search_settings`). `progress(i, row)` hears of each compile."""
    limit = int(self.config.compile.search_limit)
    tried: list[dict] = []
    for s in search_settings(self, limit):
      tried.append(self.compile(s, ("train",))[0])
      if progress:
        progress(len(tried), tried[-1])
    return rank(tried)


def divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def search_settings(planner: Planner, limit: int):
  """Yields the settings to compile, at most `limit`, using that memory shrinks with a stronger
  remat policy, a larger fsdp axis and more grad_accum (fewer rows per micro-batch).

  Per remat policy, least recomputation first: for grad_accum from 1 up, the most-sharded fsdp is
  tried first; if it does not fit, nothing smaller will (more grad_accum is tried); if it does, a
  bisection finds the smallest fsdp that fits (less gathering). Once a policy fits, policies that
  recompute more are not tried: their estimated tokens/s is lower, so they cannot rank above it.
  """
  config = planner.config
  tensor = int(config.mesh.tensor)
  n = len(planner.devices)
  if n % tensor:
    raise GPTError(f"mesh.tensor={tensor} does not divide the {n} chips of {planner.topology}")
  fsdps = divisors(n // tensor)
  rows = int(config.train.batch_size) // (n // tensor)
  if rows < 1 or int(config.train.batch_size) % (n // tensor):
    raise GPTError(f"train.batch_size={config.train.batch_size} must be a multiple of the "
                   f"{n // tensor} data-parallel chips for the search")
  accums = divisors(rows)[:4]
  remats = [r.strip() for r in str(config.compile.search_remat).split(",") if r.strip()]
  unknown = [r for r in remats if r not in REMAT_ORDER]
  if unknown or not remats:
    raise GPTError(f"compile.search_remat={config.compile.search_remat!r}: a comma-separated "
                   f"list of {', '.join(REMAT_ORDER)}")
  count, fitting_cost = 0, None

  def fits(s: Setting) -> bool:
    return planner.compile(s, ("train",))[0]["fits"]

  for remat in sorted(set(remats), key=REMAT_ORDER.index):
    cost = recompute_flops_per_token(planner.base_cfg.replace(remat=remat), int(config.train.seq_len))
    if fitting_cost is not None and cost > fitting_cost:
      return
    for accum in accums:
      if count >= limit:
        return
      s = Setting(remat, fsdps[-1], accum)
      count += 1
      yield s
      if not fits(s):
        continue
      lo, hi = 0, len(fsdps) - 1  # fsdps[hi] fits
      while lo < hi and count < limit:
        mid = (lo + hi) // 2
        s = Setting(remat, fsdps[mid], accum)
        count += 1
        yield s
        lo, hi = (lo, mid) if fits(s) else (mid + 1, hi)
      fitting_cost = cost
      break


def rank(rows: list[dict]) -> list[dict]:
  """Fitting rows first, then higher estimated tokens/s, bigger micro-batches, smaller fsdp."""
  return sorted(rows, key=lambda r: (not r["fits"], -(r["tokens_per_s"] or 0.0),
                                     r["grad_accum"], r["mesh"]["fsdp"]))


def human_bytes(n: int | None) -> str:
  if n is None:
    return "-"
  if n >= GIB:
    return f"{n / GIB:.2f} GiB"
  if n >= 2 ** 20:
    return f"{n / 2 ** 20:.1f} MiB"
  return f"{n / 2 ** 10:.1f} KiB"


def human_rate(r: float | None) -> str:
  return "-" if r is None else f"{r:,.0f}"


def format_table(row: dict) -> str:
  """One program's table: per-chip memory, fit, compile time and the estimates."""
  m, pc = row["model"], row["per_chip"]
  decode = row["program"] == "decode"
  head = (f"{m['n_layer']} layers x {m['n_embd']} ({m['params'] / 1e6:.0f}M params), "
          f"{m['dtype']} compute")
  if decode:
    lines = [f"decode step (sampler, one chip as sample mode uses): {head}, {row['batch_size']} row(s), "
             f"KV cache of {row['seq_len']} slots; on 1 {row['chip']} of {row['topology']}"]
    items = [("parameters", pc["params"]), ("KV cache", pc["cache"]),
             ("decode state", pc["decode_state"])]
  else:
    mesh = " ".join(f"{k}={v}" for k, v in row["mesh"].items())
    lora = row.get("lora")
    lines = [f"{row['program']} step: {head}, remat={row['remat']}, batch {row['batch_size']} x "
             f"{row['seq_len']}" + (f", grad_accum {row['grad_accum']}" if row["program"] == "train" else "")
             + (f", LoRA rank {lora['rank']} on {','.join(lora['targets'])}" if lora else "")
             + f"; mesh {mesh} on {row['topology']} ({row['chips']} x {row['chip']})"]
    items = [("parameters" + (" (adapters)" if lora else ""), pc["params"]),
             ("optimizer state", pc["opt_state"])]
    if pc.get("frozen"):
      items.append(("frozen base weights", pc["frozen"]))
    items.append(("batch", pc["batch"]))
  if "temporaries" in pc:
    items += [("temporaries", pc["temporaries"]), ("code", pc["code"]),
              ("outputs not donated", pc["outputs"] - pc["aliased"]),
              ("total (compiler)", pc["total"])]
  items.append(("chip HBM", row["hbm"]))
  width = max(len(k) for k, _ in items) + 2
  lines += [f"  {k:<{width}}{human_bytes(v):>12}" for k, v in items]
  if row["fits"]:
    verdict = "fits" if row["hbm"] else "compiles (no HBM figure for this device)"
  else:
    oom = row.get("oom", {})
    verdict = (f"DOES NOT FIT: the compiler needs {human_bytes(oom.get('needed'))} of "
               f"{human_bytes(oom.get('available'))} ({row.get('error', '')})" if "error" in row else
               "DOES NOT FIT: total exceeds the chip's HBM")
  lines.append(f"  {'verdict':<{width}}{verdict}")
  lines.append(f"  {'compile time':<{width}}{row['compile_s']:>10.1f} s"
               + (f" (XLA effort: {row['effort']})" if row.get("effort") else ""))
  if row["step_s"] is None:
    what = "HBM bandwidth" if decode else "peak FLOP/s"
    lines.append(f"  {'est. step':<{width}}- ({what} of {row['chip']} unknown"
                 + ("" if decode else ": set --config.train.peak_flops") + ")")
  elif decode:
    lines.append(f"  {'est. step':<{width}}{row['step_s'] * 1e3:>10.2f} ms = "
                 f"{human_rate(row['tokens_per_s'])} tokens/s at most: each step reads "
                 f"{human_bytes(row['bytes_per_step'])} at {row['hbm_bandwidth'] / 1e9:.0f} GB/s HBM")
  else:
    lines.append(f"  {'est. step':<{width}}{row['step_s']:>10.3f} s = {human_rate(row['tokens_per_s'])} "
                 f"tokens/s at {row['mfu']:.0%} MFU of {row['peak_flops'] / 1e12:.0f} TFLOP/s bf16 per chip")
  return "\n".join(lines)


def format_multihost(row: dict) -> str:
  mh = row["multihost"]
  return (f"multi-host: {row['chips']} chips on {mh['hosts']} host(s), {mh['chips_per_host']} each; "
          f"run the same command on every host with --config.mesh.distributed=true (and the mode "
          f"you want); each host reads {mh['rows_per_host']} of the {row['batch_size']} rows per "
          f"step, {mh['rows_per_chip_micro']} per chip per micro-batch")


def format_search(rows: list[dict]) -> str:
  """The search's ranking as a Markdown table."""
  out = ["| rank | remat | fsdp | data | grad_accum | rows/chip/micro | per-chip total | fits | "
         "est. tokens/s | compile |", "|---|---|---|---|---|---|---|---|---|---|"]
  for i, r in enumerate(rows, 1):
    total = r["per_chip"].get("total") or r.get("oom", {}).get("needed")
    out.append(f"| {i} | {r['remat']} | {r['mesh']['fsdp']} | {r['mesh']['data']} | {r['grad_accum']} | "
               f"{r['multihost']['rows_per_chip_micro']} | {human_bytes(total)} | "
               f"{'yes' if r['fits'] else 'no'} | {human_rate(r['tokens_per_s'])} | {r['compile_s']:.0f}s |")
  return "\n".join(out)


def devices_for(topology: str) -> list:
  """The devices to compile for: the TPU slice named `topology`, or the local ones when empty."""
  if not topology:
    return jax.devices()
  if "JAX_PLATFORMS" not in os.environ:
    # The host only traces and lowers: keep jax from opening a local TPU another run may be using.
    jax.config.update("jax_platforms", "cpu")
  return topology_devices(topology)


def fit(config: Any, topology: str) -> dict:
  """The train-step row of `config` on TPU slice `topology` (for sweeps' --check_fit)."""
  planner = Planner(config, devices_for(topology), topology)
  return planner.compile(planner.configured(), ("train",))[0]


def run(config: Any, workdir: str | None) -> None:
  """Compiles the configured run (and with compile.search, a grid of settings) and prints tables."""
  topology = str(config.mesh.topology or "")
  if not 0 < float(config.compile.mfu) <= 1:
    raise GPTError(f"compile.mfu={config.compile.mfu} must be in (0, 1]")
  devices = devices_for(topology)
  planner = Planner(config, devices, topology)
  print(f"compiling for {topology or 'the local devices'}: {len(devices)} x {devices[0].device_kind} "
        f"on {planner.hosts} host(s); no weights are loaded, nothing is allocated", flush=True)
  programs = tuple(p.strip() for p in str(config.compile.programs).split(",") if p.strip())
  if not programs or set(programs) - {"train", "eval", "decode"} or "train" not in programs:
    raise GPTError(f"compile.programs={config.compile.programs!r}: train, optionally with eval "
                   f"and decode (comma-separated)")
  print(f"\ncompiling the {', '.join(programs)} step{'s' if len(programs) > 1 else ''}...",
        flush=True)
  # Each table as soon as its program is compiled.
  rows = planner.compile(planner.configured(), programs,
                         on_row=lambda row: print("\n" + format_table(row), flush=True))
  print("\n" + format_multihost(rows[programs.index("train")]))
  result = {"topology": topology or "local", "jax": jax.__version__, "programs": rows}
  if config.compile.search:
    print(f"\nsearching remat x fsdp x grad_accum (at most {config.compile.search_limit} compiles)...",
          flush=True)
    def progress(i: int, row: dict) -> None:
      total = row["per_chip"].get("total") or row.get("oom", {}).get("needed")
      print(f"  [{i}] remat={row['remat']} fsdp={row['mesh']['fsdp']} grad_accum={row['grad_accum']}: "
            f"{'fits' if row['fits'] else 'does not fit'} ({human_bytes(total)} per chip, "
            f"{row['compile_s']:.0f} s)", flush=True)

    ranked = planner.search(progress)
    print(format_search(ranked))
    best = next((r for r in ranked if r["fits"]), None)
    print(f"\n{len(ranked)} setting(s) compiled; " + (
        f"best: --config.model.remat={best['remat']} --config.mesh.fsdp={best['mesh']['fsdp']} "
        f"--config.train.grad_accum={best['grad_accum']}" if best else "none fits: use a bigger "
        "slice, a smaller batch or --config.mesh.tensor"))
    result["search"] = ranked
  if workdir:
    out = Path(workdir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compile.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    print(f"\nwrote {path}")
