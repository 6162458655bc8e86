"""Training (`--config.mode=train`): fine-tune or pretrain GPT-2, as the book chapter's train.py.

  python -m gpt.main --config=configs/117m.py --workdir=runs/kant
  python -m gpt.main --config=configs/tiny.py --workdir=/tmp/run \
      --config.data.path=../shared/data/kant/critique_of_pure_reason.txt

The workdir receives `config.json` (the resolved config; its `model` section is the trained
model's shape), `checkpoints/` (orbax), `samples/`, `tensorboard/` and `metrics.jsonl`. Running
the same command again resumes from the latest checkpoint (`train.restore_from=latest`) and
continues to `train.steps`. Ctrl-C (SIGINT) or SIGTERM saves a checkpoint and exits cleanly; a
second Ctrl-C aborts at once. A NaN/inf loss stops the run before anything is saved, so the last
checkpoint on disk is the last good one.

Guarding work (see gpt/workdir_lock.py and gpt/checkpoint.py): a run holds its workdir with an OS
file lock, so a second run on it is refused; a resume checks the checkpoints' checksums and falls
back past damaged ones; a failed save (a full disk) stops the run at once; and the rows a resumed
run will replay are dropped from metrics.jsonl (TensorBoard purges them too).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from gpt import data, lora, optim, sharding, weights
from gpt.checkpoint import (Checkpointer, checkpoint_dir, intact_step, load_params,
                            resolve_checkpoint)
from gpt.errors import GPTError
from gpt.kernels import attention as kattn
from gpt.kernels import gemm
from gpt.model import GPTConfig, abstract_model
from gpt.stop_signals import StopSignals
from gpt.train_log import Throughput, TrainLog, quiet_orbax
from gpt.train_step import TrainState, create_state, jit_eval_step, jit_train_step, uses_dropout
from gpt.workdir_lock import hold_workdir

class TrainingDiverged(GPTError):
  """The loss became NaN or infinite."""


def init_distributed(mesh_cfg: Any) -> None:
  """jax.distributed.initialize() for a multi-host run (`mesh.distributed=True`).

  On TPU pods and Slurm/Open MPI GPU clusters every argument is detected; elsewhere pass
  `mesh.coordinator_address`, `mesh.num_processes` and `mesh.process_id`. CPU processes talk
  through gloo collectives.
  """
  if not mesh_cfg.distributed or jax.distributed.is_initialized():
    return
  kwargs = {}
  if mesh_cfg.coordinator_address:
    kwargs["coordinator_address"] = mesh_cfg.coordinator_address
  if mesh_cfg.num_processes:
    kwargs["num_processes"] = int(mesh_cfg.num_processes)
  if mesh_cfg.process_id >= 0:
    kwargs["process_id"] = int(mesh_cfg.process_id)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    raise GPTError(f"jax.distributed.initialize() failed ({str(e).splitlines()[0]}); outside TPU pods "
                   f"and Slurm/MPI clusters pass --config.mesh.coordinator_address=host:port, "
                   f"--config.mesh.num_processes and --config.mesh.process_id") from None


def to_host(x: jax.Array) -> np.ndarray:
  """A replicated global array as numpy, also when it spans other processes' devices."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(x.addressable_data(0))


class StopRequest(StopSignals):
  """Turns the first SIGINT/SIGTERM into a request to save and stop; a second one aborts."""

  def __init__(self):
    self.signum = None

  def on_signal(self, signum: int) -> None:
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum
    logging.warning("%s received: saving a checkpoint after this step (again to abort)",
                    signal.Signals(signum).name)

  def requested(self) -> bool:
    """True when any process got a signal (all processes must stop at the same step)."""
    flag = self.signum is not None
    if jax.process_count() == 1:
      return flag
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


@dataclasses.dataclass
class Setup:
  """What the loop needs: model config, tokenizer and the (possibly restored) train state."""

  cfg: GPTConfig
  tokenizer: Any
  params: Any  # host params to start from (the trainable ones), or None when resuming
  resume_step: int | None
  source: str
  frozen: Any = None  # host params held fixed (a LoRA run's base weights), else None
  lora_cfg: GPTConfig | None = None  # the trained model (cfg with adapters) of a LoRA run

  @property
  def model_cfg(self) -> GPTConfig:
    """The model the step runs: with adapters for a LoRA run, else `cfg`."""
    return self.lora_cfg or self.cfg


def _saved_cfg(config: Any, workdir: Path, ckpt: Checkpointer | None = None) -> GPTConfig | None:
  """config.model with the shape saved in a workdir's config.json (None when there is none), as
  gpt.weights reads it for every mode.

  A damaged config.json (truncated, hand-edited) is not fatal when `ckpt` has checkpoints: each
  one's metadata records the model too, so the shape is read from there (one warning line) and
  config.json is rewritten by the run."""
  try:
    return weights.workdir_model_config(config.model, workdir)
  except weights.DamagedWorkdirConfig as e:
    if ckpt is None or ckpt.latest_step() is None:
      raise
    try:
      step = intact_step(ckpt)
      cfg = weights.model_config(config.model, ckpt.read_meta(step)["model"])
    except (GPTError, OSError, ValueError, KeyError, TypeError):
      raise GPTError(f"{e.problem}, and the checkpoints' metadata does not say the model's shape "
                     f"either: restore config.json from a backup") from None
    logging.warning("%s; the model shape is taken from checkpoint step %d and config.json will be "
                    "rewritten", e.problem, step)
    return cfg


def _setup(config: Any, workdir: Path, ckpt: Checkpointer) -> Setup:
  """Decides where the weights come from: the workdir's latest checkpoint, a checkpoint path
  (`restore_from`), or `config.init` (scratch, OpenAI/HF weights, another workdir)."""
  restore_from = str(config.train.restore_from)
  latest = ckpt.latest_step()
  if restore_from == "latest" and latest is not None:
    cfg = _saved_cfg(config, workdir, ckpt)
    if cfg is None:
      raise GPTError(f"{workdir} has checkpoints but no config.json; cannot tell the model shape")
    return Setup(cfg, weights.init_tokenizer(config.init), None, latest,
                 f"checkpoint step {latest} in {workdir}")
  if latest is not None:
    raise GPTError(f"{workdir} already has checkpoints (latest step {latest}); to continue them use "
                   f"--config.train.restore_from=latest, or pick a new --workdir")
  if restore_from not in ("latest", "fresh"):
    directory, _ = resolve_checkpoint(restore_from)
    cfg = _saved_cfg(config, directory.parent) or weights.model_config(config.model, None)
    params = jax.device_get(load_params(restore_from, cfg))
    return Setup(cfg, weights.init_tokenizer(config.init), params, None, f"weights of {restore_from}")
  loaded = weights.load_model(config)
  if loaded.cfg.quantize != "none":  # int8 weights have no gradients worth taking
    raise GPTError(f"model.quantize={loaded.cfg.quantize} is for inference (sample, interactive, "
                   f"eval); train with float weights (model.quantize=none, a float checkpoint)")
  params = jax.device_get(nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param)))
  return Setup(loaded.cfg, loaded.tokenizer, params, None, loaded.source)


def check_config(t: Any, cfg: GPTConfig, mesh) -> None:
  """GPTError for `config.train` settings that cannot run with this model on this mesh."""
  if t.seq_len > cfg.n_ctx:
    raise GPTError(f"train.seq_len={t.seq_len} exceeds the model's context n_ctx={cfg.n_ctx}")
  need = t.grad_accum * sharding.batch_divisor(mesh)
  if t.grad_accum < 1 or t.batch_size % need:
    raise GPTError(f"train.batch_size={t.batch_size} must be a multiple of grad_accum={t.grad_accum} "
                   f"x {sharding.batch_divisor(mesh)} data-parallel devices (mesh data x fsdp)")
  for name in ("steps", "log_every", "keep", "seq_len", "batch_size"):
    if t[name] < 1:
      raise GPTError(f"train.{name}={t[name]} must be >= 1")
  for name in ("val_every", "sample_every", "save_every"):
    if t[name] < 0:
      raise GPTError(f"train.{name}={t[name]} must be >= 0 (0 turns it off)")
  if not 0 <= t.noise < 1:
    raise GPTError(f"train.noise={t.noise} must be in [0, 1)")


def _write_json(path: Path, obj: Any) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  os.replace(tmp, path)


def _put_global(tree: Any, shardings: Any) -> Any:
  """Host arrays -> global arrays laid out by `shardings` (each host fills its own devices)."""
  return jax.tree.map(lambda x, sh: jax.make_array_from_callback(
      x.shape, sh, lambda idx, x=np.asarray(x): x[idx]), tree, shardings)


def run(config: Any, workdir: str | None) -> None:
  """Trains as `config` says, in `workdir` (see the module docstring)."""
  if not workdir:
    raise GPTError("training needs --workdir=<folder> (checkpoints, samples and logs go there)")
  init_distributed(config.mesh)
  quiet_orbax()
  workdir = Path(workdir).expanduser().resolve()
  created = [d for d in (checkpoint_dir(workdir), workdir) if not d.exists()]
  workdir.mkdir(parents=True, exist_ok=True)
  main_process = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh)
  lock = hold_workdir(workdir)  # before anything in the workdir is touched
  try:
    _train(config, workdir, mesh, main_process)
  finally:
    if lock is not None:
      lock.release()
    if main_process:  # a run that failed before saving anything (offline, say) leaves no empty folders
      _remove_empty(created)


def _train(config: Any, workdir: Path, mesh, main_process: bool) -> None:
  t = config.train
  ckpt = Checkpointer(checkpoint_dir(workdir), keep=t.keep)
  try:
    setup = lora.prepare_training(config, workdir, _setup(config, workdir, ckpt), main_process)
    check_config(t, setup.cfg, mesh)
    if main_process:
      resolved = config.to_dict()
      resolved["model"] = dataclasses.asdict(setup.cfg)
      _write_json(workdir / "config.json", resolved)
    dataset = data.load_dataset(config.data, setup.tokenizer, t.seq_len, setup.cfg.n_vocab)
    logging.info("model: %s (%s params), data: %s (%d train / %s val tokens), mesh %s",
                 setup.source, f"{setup.cfg.num_params():,}", dataset.source, len(dataset.train),
                 "no" if dataset.val is None else len(dataset.val), dict(mesh.shape))
    Loop(config, workdir, setup, dataset, mesh, ckpt, main_process).run()
  finally:
    ckpt.close()


def _remove_empty(folders: list[Path]) -> None:
  """Removes each of `folders` (innermost first) that exists and is empty."""
  for folder in folders:
    try:
      folder.rmdir()
    except OSError:  # not empty, or already gone
      pass


@dataclasses.dataclass
class Programs:
  """The jitted train and eval steps for one model on one mesh, the abstract (shape-only) train
  state and the layouts they take: what `Loop` runs, and what compile mode (gpt.compile) compiles
  ahead of time, so both see the same program."""

  graphdef: Any
  tx: Any  # the optax transformation
  schedule: Any  # the learning-rate schedule
  abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings; nothing allocated
  state_sharding: TrainState
  params_sharding: Any
  batch_sharding: NamedSharding  # token windows [B, T+1]
  train_step: Any  # jitted (state, batch, frozen) -> (state, metrics), state donated
  eval_step: Any  # jitted (params, batch, frozen) -> mean loss
  abstract_frozen: Any  # the parameters held fixed (a LoRA run's base), as abstract_state; else {}
  frozen_sharding: Any


def build_programs(config: Any, cfg: GPTConfig, mesh, lora_run: bool = False) -> Programs:
  """The train/eval programs of `config.train` for model `cfg` on `mesh` (see Programs). With
  `lora_run`, only the adapters are trained: the rest is the steps' separate `frozen` argument."""
  t = config.train
  # model.matmul "auto": MKL's sgemm where this program runs on one CPU device (gpt.kernels.gemm).
  cfg = cfg.replace(matmul=gemm.resolve(cfg.matmul, mesh.devices.flat))
  # model.attention_impl "auto": the fused CPU kernel where it runs (gpt.kernels.attention).
  cfg = cfg.replace(attention_impl=kattn.resolve(cfg.attention_impl, mesh.devices.flat))
  graphdef = nnx.graphdef(abstract_model(cfg))
  abs_params = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
  axes = sharding.logical_axes(abstract_model(cfg))
  abs_frozen, frozen_axes = {}, {}
  if lora_run:  # LoRA: only the adapters are trained (and checkpointed)
    (abs_params, abs_frozen), (axes, frozen_axes) = lora.split(abs_params), lora.split(axes)
  # train.adam_impl "auto": Adam's one-pass kernel where the step runs on one CPU device.
  tx = optim.make_optimizer(t, abs_params, devices=mesh.devices.flat)
  schedule = optim.learning_rate_schedule(t)
  psh = sharding.param_shardings(abs_params, axes, mesh)
  fsh = sharding.param_shardings(abs_frozen, frozen_axes, mesh)
  rep = sharding.replicated(mesh)
  abs_state = jax.eval_shape(lambda p: create_state(p, tx, config.seed), abs_params)
  state_sharding = TrainState(
      step=rep, params=psh, opt_state=sharding.opt_state_shardings(tx, abs_state.opt_state, psh, mesh),
      rng=rep)
  batch_sharding = sharding.batch_sharding(mesh)
  step_fn = jit_train_step(
      graphdef, tx, schedule, grad_accum=t.grad_accum, noise=t.noise, dropout=uses_dropout(cfg),
      state_sharding=state_sharding, batch_sharding=batch_sharding, scalar_sharding=rep,
      frozen_sharding=fsh, micro_sharding=NamedSharding(mesh, P(None, sharding.BATCH_AXES, None)),
      held=optim.held_names(t, abs_params))
  eval_fn = jit_eval_step(graphdef, params_sharding=psh, frozen_sharding=fsh,
                          batch_sharding=batch_sharding, scalar_sharding=rep)

  def with_sharding(tree, shardings):
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree,
                        shardings)

  return Programs(graphdef, tx, schedule, with_sharding(abs_state, state_sharding), state_sharding,
                  psh, batch_sharding, step_fn, eval_fn, with_sharding(abs_frozen, fsh), fsh)


class Loop:
  """The training loop and its periodic validation, sampling and checkpointing."""

  def __init__(self, config, workdir: Path, setup: Setup, dataset: data.Dataset, mesh, ckpt,
               main_process: bool):
    self.config, self.t, self.workdir, self.setup = config, config.train, workdir, setup
    self.dataset, self.mesh, self.ckpt, self.main = dataset, mesh, ckpt, main_process
    cfg, t = setup.model_cfg, config.train
    programs = build_programs(config, cfg, mesh, lora_run=setup.lora_cfg is not None)
    self.graphdef, self.tx, self.schedule = programs.graphdef, programs.tx, programs.schedule
    self.state_sharding, self.batch_sharding = programs.state_sharding, programs.batch_sharding
    self.step_fn, self.eval_fn = programs.train_step, programs.eval_step
    self.frozen = (_put_global(setup.frozen, programs.frozen_sharding)
                   if setup.lora_cfg is not None else {})
    setup.frozen = None  # the host copy is no longer needed (1558M: 6 GB)
    self.windows = data.Windows(dataset.train, t.seq_len, t.batch_size, config.seed)
    self.last_saved = None
    if setup.resume_step is not None:
      self.state, meta, setup.resume_step = ckpt.restore_intact(programs.abstract_state)
      self.last_saved = setup.resume_step
      loss = meta.get("loss")
      logging.info("resumed from checkpoint step %d (loss %s)", setup.resume_step,
                   "unknown" if loss is None else f"{float(loss):.4f}")
    else:
      params = _put_global(setup.params, programs.params_sharding)
      setup.params = None
      self.state = jax.jit(lambda p: create_state(p, self.tx, config.seed),
                           out_shardings=self.state_sharding)(params)
    self.decoder = None

  def batch(self, starts: np.ndarray, tokens: np.ndarray) -> jax.Array:
    shape = (len(starts), self.t.seq_len + 1)
    return sharding.global_batch(
        shape, self.batch_sharding, lambda rows: data.window_rows(tokens, starts[rows], self.t.seq_len))

  def run(self) -> None:
    step = int(to_host(self.state.step))
    if step >= self.t.steps:
      logging.info("already trained to step %d (train.steps=%d): nothing to do", step, self.t.steps)
      return
    self.log = TrainLog(self.workdir, enabled=self.main, start_step=step)
    try:
      with StopRequest() as stop:
        self.loop(step, stop)
    finally:
      self.ckpt.wait()
      self.log.close()

  def loop(self, step: int, stop: StopRequest) -> None:
    """Steps from `step` to train.steps, with logging, validation, samples and checkpoints."""
    t = self.t
    pending, window = None, []
    self.meter = Throughput(self.setup.cfg, t, jax.device_count())
    while step < t.steps:
      self.state, metrics = self.step_fn(self.state, self.batch(self.windows.starts(step),
                                                                self.dataset.train), self.frozen)
      step += 1
      self.ckpt.check()  # a background save that failed stops the run here, not steps later
      if pending is not None:
        self.check(*pending)  # the previous step: its result is (nearly always) ready
      pending = (step, metrics)
      window.append(metrics)
      if self.meter.mark is None:  # the first step (compile) is left out of tokens/s
        self.check(step, metrics)
        self.meter.restart(step)
      stopping, final = stop.requested(), step == t.steps
      if step % t.log_every == 0 or final or stopping:
        self.check(step, metrics)
        values = {k: float(np.mean([to_host(m[k]) for m in window])) for k in ("loss", "grad_norm")}
        values["lr"] = float(to_host(metrics["lr"]))
        values.update(self.meter.rates(step))
        self.log.scalars(step, values, "train")
        window = []
        self.meter.restart(step)
      if t.val_every and (step % t.val_every == 0 or final) and self.dataset.val is not None:
        self.log.scalars(step, {"loss": self.validate()}, "val")
        self.meter.restart(step)
      if t.sample_every and (step % t.sample_every == 0 or final):
        self.write_samples(step)
        self.meter.restart(step)
      if (t.save_every and step % t.save_every == 0) or final or stopping:
        self.check(step, metrics)
        self.save(step, float(to_host(metrics["loss"])))
        self.meter.restart(step)
      if stopping:
        logging.warning("stopped by %s at step %d; checkpoint saved in %s; run the same command "
                        "to resume", signal.Signals(stop.signum).name, step, self.ckpt.directory)
        return
    logging.info("finished %d steps; checkpoints in %s", step, self.ckpt.directory)

  def check(self, step: int, metrics: dict) -> None:
    """Raises TrainingDiverged if the loss of `step` is not finite (nothing is saved after it)."""
    loss = float(to_host(metrics["loss"]))
    if not np.isfinite(loss):
      kept = (f"the last good checkpoint is step {self.last_saved} in {self.ckpt.directory}"
              if self.last_saved is not None else "no checkpoint was saved")
      raise TrainingDiverged(f"loss is {loss} at step {step}: training diverged and stopped; {kept}. "
                             f"Lower --config.train.learning_rate or set --config.train.grad_clip")

  def save(self, step: int, loss: float) -> None:
    if step == self.last_saved:
      return
    meta = {"step": step, "data_step": step, "seed": int(self.config.seed), "loss": loss,
            "train_tokens": int(len(self.dataset.train)), "model": dataclasses.asdict(self.setup.cfg)}
    self.ckpt.save(self.state, meta)
    self.last_saved = step

  def validate(self) -> float:
    """Mean loss over the fixed validation windows."""
    t, val = self.t, self.dataset.val
    starts = data.eval_starts(len(val), t.seq_len, t.val_batches, t.batch_size)
    losses = [self.eval_fn(self.state.params, self.batch(s, val), self.frozen) for s in starts]
    return float(np.mean([to_host(x) for x in losses]))

  def write_samples(self, step: int) -> None:
    """Unconditional samples (from <|endoftext|>) into samples/step_<step>.txt, as nshepperd's."""
    from gpt.sample import decoding_params, make_decoder
    from gpt.sampling import SamplingOptions, trim

    cfg, t, s = self.setup.cfg, self.t, self.config.sampling
    tok = self.setup.tokenizer
    length = max(1, min(t.sample_length, cfg.n_ctx - 1))
    if self.decoder is None:  # the `sample` mode's decoder, kept: it compiles once per run
      self.decoder = make_decoder(
          cfg, SamplingOptions(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p),
          stop_token=tok.eot_id, stop_at_token=False)
      graphdef = self.graphdef
      self.prepare = jax.jit(lambda p: decoding_params(nnx.merge(graphdef, p)))
    n = max(1, t.sample_num)
    prompt = np.full((n, 1), tok.eot_id, np.int32)
    key = jax.random.fold_in(jax.random.key(s.seed), step)
    # The current weights (a LoRA run's adapters joined to the frozen base), laid out for decoding.
    params = self.prepare(lora.combine(self.state.params, self.frozen))
    tokens = self.decoder.generate(params, prompt, np.ones_like(prompt, bool), key,
                                   length, cache_length=length + 1)
    rows = trim(to_host(tokens), tok.eot_id, False, length)
    text = "".join(f"{'=' * 20} SAMPLE {i + 1} {'=' * 20}\n{tok.decode(r)}\n"
                   for i, r in enumerate(rows))
    if self.main:
      out = self.workdir / "samples"
      out.mkdir(exist_ok=True)
      (out / f"step_{step:06d}.txt").write_text(text, encoding="utf-8")
      self.log.text(step, "samples", text)
      logging.info("samples at step %d:\n%s", step, text)
