"""Orbax checkpoints of a training run: `<workdir>/checkpoints/<step>/`.

Each checkpoint holds four items:
  params     the model parameters (pure nested dict, OpenAI names under `h` stacked over layers)
  opt_state  the optimizer state
  train      {step, rng}: the step counter and the run's base PRNG key
  meta       json: step, data position, seed, token counts, last loss, the model config

Orbax writes a checkpoint into a temporary folder and renames it into place once every array is on
disk, so a process killed at any moment (even with SIGKILL mid-write) leaves only complete
checkpoints; unfinished temporary folders are removed when the next run opens the manager.
Saving is asynchronous: the training loop continues while the arrays are written.

Verifiable checkpoints: once every file of a save is written, and before orbax renames the folder
into place, `checksums.json` records the size and sha256 of each file in it, so the manifest is
part of the checkpoint atomically. Orbax's own checksums cover only the index of its array
files, not the data, so a flipped byte in a weight would otherwise restore silently. On resume
(`restore_intact`) each checkpoint is checked against its manifest, newest first; a damaged one
(truncated, deleted or changed file, missing metadata) is moved aside to
`<workdir>/damaged_checkpoints/` (never deleted) with one warning line, and the newest intact one
is used. Checkpoints from before manifests existed are restored unverified.

A save that fails (a full disk, most often) raises SaveFailed, one line that says how much space
the checkpoint needed and where; the partial folder is removed and the earlier checkpoints stay
intact (orbax deletes old checkpoints only after a new one is complete).

`restore_model(workdir, cfg)` loads the latest parameters of a workdir into a GPT (what
`gpt.weights.load_model` calls for `--config.init=<workdir>`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from gpt.errors import GPTError
from gpt.hashing import hash_file
from gpt.model import GPT, GPTConfig, abstract_model

ITEMS = ("params", "opt_state", "train", "meta")
ARRAY_ITEMS = ("params", "opt_state", "train")
MANIFEST = "checksums.json"
# Orbax rewrites these after the manifest is written (commit time, success marker): checked for
# presence only.
LATE_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")
DAMAGED_DIR = "damaged_checkpoints"


class SaveFailed(GPTError):
  """A checkpoint could not be written (the run must stop: continuing would lose work)."""


class NoIntactCheckpoint(GPTError):
  """Every checkpoint of a workdir is damaged."""


def _array_handler() -> ocp.PyTreeCheckpointHandler:
  """A pytree handler that writes each array from one replica. Orbax's default splits replicated
  arrays across replicas, which compiles a slicing program per array shape: tens of seconds per
  first save of a data-parallel run on CPU, for no gain on one host."""
  th = ocp.type_handlers
  registry = th.create_type_handler_registry(
      (int, th.ScalarHandler()), (float, th.ScalarHandler()), (np.number, th.ScalarHandler()),
      (np.ndarray, th.NumpyHandler()), (jax.Array, th.ArrayHandler(use_replica_parallel=False)))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _restore_args(abstract: Any) -> ocp.args.PyTreeRestore:
  return ocp.args.PyTreeRestore(item=abstract,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


def checkpoint_dir(workdir: str | Path) -> Path:
  return Path(workdir).expanduser().resolve() / "checkpoints"


def write_manifest(folder: Path) -> None:
  """Records size and sha256 of every file under `folder` in `folder/checksums.json`."""
  files = {}
  for path in sorted(p for p in folder.rglob("*") if p.is_file()):
    rel = path.relative_to(folder).as_posix()
    if rel == MANIFEST or rel.startswith(f".{MANIFEST}"):
      continue
    files[rel] = None if rel in LATE_FILES else {"size": path.stat().st_size,
                                                 "sha256": hash_file(path)}
  tmp = folder / f".{MANIFEST}.tmp"
  with open(tmp, "w") as f:
    json.dump({"algorithm": "sha256", "files": files}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, folder / MANIFEST)


def verify_folder(folder: Path) -> str | None:
  """What is wrong with checkpoint `folder` according to its manifest; None if intact or if it
  has no manifest (a checkpoint written before manifests existed: unverifiable)."""
  if not folder.is_dir():
    return "its folder is missing"
  manifest = folder / MANIFEST
  if not manifest.exists():
    return None
  try:
    files = json.loads(manifest.read_text())["files"]
  except (OSError, ValueError, KeyError, TypeError):
    return f"{MANIFEST} is unreadable"
  for rel, want in files.items():
    path = folder / rel
    if not path.is_file():
      return f"{rel} is missing"
    if want is None:
      continue
    size = path.stat().st_size
    if size != want["size"]:
      return f"{rel} has {size} bytes instead of {want['size']}"
    if hash_file(path) != want["sha256"]:
      return f"{rel} does not match its checksum"
  return None


def _is_disk_full(e: BaseException) -> bool:
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(e)
    if "No space left" in text or "OS error 28" in text or "Disk quota exceeded" in text:
      return True
    e = e.__cause__ or e.__context__
  return False


def _first_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return (lines[0] if lines else type(e).__name__)[:300]


def _mb(n: float) -> str:
  return f"{n / 1e6:,.1f} MB"


def _sync(name: str) -> None:
  """A barrier across processes in a multi-host run (no-op on one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _is_closed_loop_callback(exc_type, exc, tb) -> bool:
  """True for the traceback tensorstore prints (through sys.excepthook or sys.unraisablehook)
  when a write finishes
  after orbax's event loop closed because another write of the same save failed: a
  RuntimeError raised by call_soon_threadsafe called straight from C, with no Python caller."""
  frames = []
  while tb is not None:
    frames.append(tb.tb_frame.f_code.co_name)
    tb = tb.tb_next
  return (exc_type is RuntimeError and str(exc) == "Event loop is closed"
          and frames[:1] == ["call_soon_threadsafe"])


def quiet_failed_write_callbacks() -> None:
  """Drops those tracebacks (several per failed save; the failure itself is reported as
  SaveFailed); every other exception reaches the previous hooks. Idempotent."""
  if not getattr(sys.excepthook, "gpt_quiet", False):
    previous_except = sys.excepthook

    def excepthook(exc_type, exc, tb):
      if not _is_closed_loop_callback(exc_type, exc, tb):
        previous_except(exc_type, exc, tb)

    excepthook.gpt_quiet = True
    sys.excepthook = excepthook
  if not getattr(sys.unraisablehook, "gpt_quiet", False):
    previous_unraisable = sys.unraisablehook

    def unraisablehook(u):
      if not _is_closed_loop_callback(u.exc_type, u.exc_value, u.exc_traceback):
        previous_unraisable(u)

    unraisablehook.gpt_quiet = True
    sys.unraisablehook = unraisablehook


class Checkpointer:
  """Saves and restores TrainStates under `<workdir>/checkpoints`, keeping the newest `keep`."""

  def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True,
               read_only: bool = False):
    self.directory = Path(directory)
    self.async_save = async_save
    self._saving: tuple[int, int] | None = None  # (step, bytes) of the save in flight
    self.failed: SaveFailed | None = None
    if not read_only:
      quiet_failed_write_callbacks()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only,
        cleanup_tmp_directories=not read_only, read_only=read_only,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._on_written)
        if async_save and not read_only else None)
    handlers = {name: _array_handler() for name in ARRAY_ITEMS}
    handlers["meta"] = ocp.JsonCheckpointHandler()
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def step_dir(self, step: int) -> Path:
    return self.directory / str(step)

  def _on_written(self) -> None:
    """Orbax's post-finalization callback (process 0, every file written, folder not yet renamed
    into place): writes the manifest into the temporary folder, so it is committed with it."""
    step = self._saving[0]
    tmp = sorted(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"), key=lambda p: p.stat().st_mtime)
    write_manifest(tmp[-1] if tmp else self.step_dir(step))

  def save(self, state: Any, meta: dict) -> None:
    """Starts writing `state` (a TrainState) as checkpoint `state.step`; returns before it is done.

    Raises SaveFailed when this save or the previous one failed."""
    if self.failed is not None:
      raise self.failed
    self.wait()
    step = int(meta["step"])
    size = sum(int(x.nbytes) for x in jax.tree.leaves((state.params, state.opt_state)))
    args = ocp.args.Composite(
        params=ocp.args.PyTreeSave(state.params),
        opt_state=ocp.args.PyTreeSave(state.opt_state),
        train=ocp.args.PyTreeSave({"step": state.step, "rng": state.rng}),
        meta=ocp.args.JsonSave(meta))
    self._saving = (step, size)
    self.check_space(size)
    try:
      self.manager.save(step, args=args, force=True)
    except Exception as e:  # noqa: BLE001 - any failure to write must stop the run
      raise self._failure(e) from None
    if not self.async_save:
      self._saving = None
      if jax.process_index() == 0:
        write_manifest(self.step_dir(step))

  def check_space(self, size: int) -> None:
    """Raises SaveFailed before writing anything when the disk cannot hold `size` more bytes
    (old checkpoints are deleted only after the new one is complete, so all of it is needed).
    One process only: in a multi-host run orbax's own failure is what stops the run."""
    if jax.process_count() > 1:
      return
    free = shutil.disk_usage(self.directory).free
    if free < size:
      raise self._failure(OSError(errno.ENOSPC, "No space left on device (checked before saving)"))

  def check(self) -> None:
    """Raises SaveFailed as soon as a background save has failed (cheap: call it every step).
    In a multi-host run the failure surfaces at the next save or wait instead, which every
    process reaches at the same step."""
    if self._saving is not None and jax.process_count() == 1 and \
        not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until the last save is complete on disk; raises SaveFailed if it failed (once:
    afterwards the failure has been reported and waiting returns at once)."""
    if self._saving is None:
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._failure(e) from None
    self._saving = None

  def _failure(self, e: BaseException) -> SaveFailed:
    """SaveFailed for the save in flight; removes its partial folder (never a complete one)."""
    step, size = self._saving
    self._saving = None
    if jax.process_index() == 0:
      for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)
    self.manager.reload()
    kept = [s for s in self.all_steps() if s != step and verify_folder(self.step_dir(s)) is None]
    intact = (f"checkpoint step {max(kept)} is intact" if kept else "no earlier checkpoint exists")
    if _is_disk_full(e):
      free = shutil.disk_usage(self.directory).free
      why = (f"the disk is full: the checkpoint needs about {_mb(size)} and {_mb(free)} are free "
             f"in {self.directory}; free some space")
    else:
      why = f"{_first_line(e)}; fix that"
    self.failed = SaveFailed(f"saving checkpoint step {step} failed, so training stopped: {why}, "
                             f"then run the same command to resume ({intact})")
    return self.failed

  def set_aside(self, step: int, problem: str) -> Path:
    """Moves damaged checkpoint `step` to <workdir>/damaged_checkpoints/ (never deletes it)."""
    target = self.directory.parent / DAMAGED_DIR / str(step)
    if jax.process_index() == 0:
      target.parent.mkdir(exist_ok=True)
      n = 1
      while target.exists():
        n += 1
        target = target.with_name(f"{step}.{n}")
      os.replace(self.step_dir(step), target)
      logging.warning("checkpoint step %d is damaged (%s): moved to %s; using the newest intact "
                      "one", step, problem, target)
    _sync(f"set_aside_{step}")
    self.manager.reload()
    return target

  def restore_intact(self, abstract_state: Any) -> tuple[Any, dict, int]:
    """(TrainState, meta, step) of the newest intact checkpoint; damaged newer ones are set
    aside. Raises NoIntactCheckpoint if none is intact."""
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      problem = verify_folder(self.step_dir(step))
      _sync(f"verified_{step}")
      if problem is None:
        state, meta = self.restore(abstract_state, step)
        return state, meta, step
      damaged.append(f"{step} ({problem})")
      self.set_aside(step, problem)
    raise NoIntactCheckpoint(
        f"no intact checkpoint in {self.directory}: every one is damaged ({', '.join(damaged)}); "
        f"they were moved to {self.directory.parent / DAMAGED_DIR}. Start again with "
        f"--config.train.restore_from=fresh, or restore the files from a backup")

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """(TrainState, meta) of checkpoint `step` (default latest), laid out as `abstract_state`'s
    ShapeDtypeStructs (with shardings) say."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise GPTError(f"no checkpoint in {self.directory}")
    s = abstract_state
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          params=_restore_args(s.params),
          opt_state=_restore_args(s.opt_state),
          train=_restore_args({"step": s.step, "rng": s.rng}),
          meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, OSError, FileNotFoundError) as e:
      raise GPTError(f"cannot restore checkpoint step {step} in {self.directory}: {_first_line(e)} "
                     f"(does the config match the run that wrote it?)") from None
    train = restored["train"]
    state = s.replace(step=train["step"], params=restored["params"],
                      opt_state=restored["opt_state"], rng=train["rng"])
    return state, restored["meta"]

  def read_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
    """Only the parameters of checkpoint `step` (default latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise GPTError(f"no checkpoint in {self.directory}")
    return self.manager.restore(step, args=ocp.args.Composite(
        params=_restore_args(abstract_params)))["params"]

  def close(self) -> None:
    """Waits for the last save and closes the manager (after a failed save: closes quietly,
    the failure has been reported)."""
    try:
      self.wait()
    finally:
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001
        if self.failed is None:
          raise


def abstract_params(cfg: GPTConfig, shardings: Any = None) -> Any:
  """ShapeDtypeStructs of the model's pure params dict (with `shardings` when given)."""
  params = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=device), params)
  return jax.tree.map(lambda p, sh: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=sh),
                      params, shardings)


def resolve_checkpoint(path: str | Path) -> tuple[Path, int | None]:
  """(checkpoints folder, step or None=latest) for a workdir, its checkpoints/ or one <step>/."""
  path = Path(path).expanduser().resolve()
  if (path / "checkpoints").is_dir():
    return path / "checkpoints", None
  if path.name.isdigit() and (path / "params").is_dir():
    return path.parent, int(path.name)
  if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
    return path, None
  raise GPTError(f"{path} is not a training workdir, its checkpoints/ folder or a checkpoint step "
                 f"folder")


def intact_step(ckpt: Checkpointer, step: int | None = None) -> int:
  """`step` if its checkpoint is intact, else a one-line error; for step None, the newest intact
  checkpoint, with a warning line for each damaged newer one (left in place: readers move
  nothing; the next training run sets them aside)."""
  if step is not None:
    problem = verify_folder(ckpt.step_dir(step))
    if problem:
      raise GPTError(f"checkpoint step {step} in {ckpt.directory} is damaged: {problem}")
    return step
  damaged = []
  for s in sorted(ckpt.all_steps(), reverse=True):
    problem = verify_folder(ckpt.step_dir(s))
    if problem is None:
      return s
    damaged.append(f"{s} ({problem})")
    logging.warning("checkpoint step %d in %s is damaged (%s); trying the previous one", s,
                    ckpt.directory, problem)
  raise NoIntactCheckpoint(f"no intact checkpoint in {ckpt.directory}: {', '.join(damaged)}")


def restore_verified(directory: Path, abstract: Any, step: int | None, name: str | Path,
                     mismatch: str) -> Any:
  """The parameters (pure dict) of checkpoint `step` (None: the newest intact one, see
  intact_step) in checkpoints folder `directory`, restored into `abstract`. One-line GPTErrors:
  `name` (the folder as the user gave it) holds no finished checkpoint; or `mismatch` (what the
  parameters were expected to be), when they do not fit `abstract`."""
  ckpt = Checkpointer(directory, read_only=True)
  try:
    if ckpt.latest_step() is None:
      raise GPTError(f"{name} holds no finished checkpoint")
    step = intact_step(ckpt, step)
    try:
      return ckpt.restore_params(abstract, step)
    except (ValueError, KeyError) as e:
      raise GPTError(f"{mismatch}: {str(e).splitlines()[0][:200]}") from None
  finally:
    ckpt.close()


def load_params(path: str | Path, cfg: GPTConfig, shardings: Any = None) -> Any:
  """The parameters (pure dict) saved at `path` (see resolve_checkpoint) for a model shaped `cfg`."""
  directory, step = resolve_checkpoint(path)
  return restore_verified(directory, abstract_params(cfg, shardings), step, directory,
                          f"the checkpoint in {directory} does not fit model {cfg.n_layer} layers "
                          f"x {cfg.n_embd} wide, vocab {cfg.n_vocab}, n_ctx {cfg.n_ctx}")


def restore_model(workdir: str | Path, cfg: GPTConfig) -> GPT:
  """The GPT with the latest parameters saved in `workdir` (a training workdir)."""
  params = load_params(workdir, cfg)
  graphdef, _ = nnx.split(abstract_model(cfg))
  return nnx.merge(graphdef, params)
