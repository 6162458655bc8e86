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

The chips' figures, the devices of a slice and the step-time estimates are gpt.chips (published,
not compiled); the tables printed are gpt.compile_tables. With `mesh.topology` empty the local
devices are used (on CPU: memory figures only, unless `train.peak_flops` is set).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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

from gpt import chips
from gpt.compile_tables import format_multihost, format_search, format_table, human_bytes
from gpt.errors import GPTError
from gpt.model import GPTConfig

REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")  # least recomputation (fastest) first


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
  units = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": chips.GIB, "T": 2 ** 40}
  sizes = [float(v) * units[u] for v, u in re.findall(r"([\d.]+)([KMGT]?)i?B?\)", message)]
  if not sizes:
    sizes = [float(v) * units[u] for v, u in re.findall(r"\b([\d.]+)([KMGT])\b", message)]
  out = {}
  if sizes:
    out["needed"], out["available"] = int(sizes[0]), int(sizes[-1])
  return out


@contextlib.contextmanager
def persistent_cache_off():
  """JAX's persistent compilation cache off inside the block (for compiles for a TPU slice).

  Why: a program compiled for a slice's compile-only devices can be written to the cache but never
  read back (that client cannot deserialize an executable), so with a cache folder set (the test
  suite's, or JAX_COMPILATION_CACHE_DIR) every later run warned "Error reading persistent
  compilation cache entry" and compiled again, and the dead entries pushed CPU programs out of a
  size-bounded cache. After the block the cache applies again (JAX decides once per process
  whether it is in use, so it is reset on the way in and out; nothing is deleted from its folder).
  """
  from jax.experimental.compilation_cache import compilation_cache

  if not (jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir):
    yield
    return
  compilation_cache.reset_cache()
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", True)
    compilation_cache.reset_cache()


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
    self.chip = chips.chip_of(devices[0], float(config.train.peak_flops))
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
    """Compiles `lowered` (at XLA's least effort if `fast`) and writes the figures into `row`.
    A slice's programs skip the persistent compilation cache (see `persistent_cache_off`)."""
    options = {"exec_time_optimization_effort": -1.0} if fast else None
    row["effort"] = "fast" if fast else "full"
    start = time.perf_counter()
    try:
      with persistent_cache_off() if self.topology != "local" else contextlib.nullcontext():
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
    For a TPU slice it is laid out and traced as on the TPU: without this CPU's gemv and
    decode_attention kernels."""
    from gpt.kernels import decode_attention, gemv

    if self.topology == "local":
      return self._lower_decode()
    with gemv.off(), decode_attention.off():
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
    """`row` with the decode step's HBM roofline (chips.decode_estimate): the weights and the
    whole cache are read per step."""
    pc = row["per_chip"]
    row.update(chips.decode_estimate(self.chip, cfg, batch_size=row["batch_size"],
                                     bytes_per_step=pc["params"] + pc["cache"],
                                     mfu=float(self.config.compile.mfu)))
    return row

  def _estimate(self, row: dict, *, cfg: GPTConfig) -> dict:
    """`row` with the estimated step time and tokens/s at the assumed MFU (chips.step_estimate)."""
    row.update(chips.step_estimate(self.chip, cfg, train=row["program"] == "train",
                                   batch_size=row["batch_size"], seq_len=row["seq_len"],
                                   chips=row["chips"], mfu=float(self.config.compile.mfu)))
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
    cost = chips.recompute_flops_per_token(planner.base_cfg.replace(remat=remat), int(config.train.seq_len))
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


def fit(config: Any, topology: str) -> dict:
  """The train-step row of `config` on TPU slice `topology` (for sweeps' --check_fit)."""
  planner = Planner(config, chips.devices_for(topology), topology)
  return planner.compile(planner.configured(), ("train",))[0]


def run(config: Any, workdir: str | None) -> None:
  """Compiles the configured run (and with compile.search, a grid of settings) and prints tables."""
  topology = str(config.mesh.topology or "")
  if not 0 < float(config.compile.mfu) <= 1:
    raise GPTError(f"compile.mfu={config.compile.mfu} must be in (0, 1]")
  devices = chips.devices_for(topology)
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
