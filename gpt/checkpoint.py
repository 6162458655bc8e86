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

`restore_model(workdir, cfg)` loads the latest parameters of a workdir into a GPT (what
`gpt.weights.load_model` calls for `--config.init=<workdir>`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from gpt.errors import GPTError
from gpt.model import GPT, GPTConfig, abstract_model

ITEMS = ("params", "opt_state", "train", "meta")
ARRAY_ITEMS = ("params", "opt_state", "train")


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


class Checkpointer:
  """Saves and restores TrainStates under `<workdir>/checkpoints`, keeping the newest `keep`."""

  def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True,
               read_only: bool = False):
    self.directory = Path(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only,
        cleanup_tmp_directories=not read_only, read_only=read_only)
    handlers = {name: _array_handler() for name in ARRAY_ITEMS}
    handlers["meta"] = ocp.JsonCheckpointHandler()
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, state: Any, meta: dict) -> None:
    """Starts writing `state` (a TrainState) as checkpoint `state.step`; returns before it is done."""
    step = int(meta["step"])
    args = ocp.args.Composite(
        params=ocp.args.PyTreeSave(state.params),
        opt_state=ocp.args.PyTreeSave(state.opt_state),
        train=ocp.args.PyTreeSave({"step": state.step, "rng": state.rng}),
        meta=ocp.args.JsonSave(meta))
    self.manager.save(step, args=args, force=True)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """(TrainState, meta) of checkpoint `step` (default latest), laid out as `abstract_state`'s
    ShapeDtypeStructs (with shardings) say."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise GPTError(f"no checkpoint in {self.directory}")
    s = abstract_state
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=_restore_args(s.params),
        opt_state=_restore_args(s.opt_state),
        train=_restore_args({"step": s.step, "rng": s.rng}),
        meta=ocp.args.JsonRestore()))
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

  def wait(self) -> None:
    """Blocks until the last save is complete on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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


def load_params(path: str | Path, cfg: GPTConfig, shardings: Any = None) -> Any:
  """The parameters (pure dict) saved at `path` (see resolve_checkpoint) for a model shaped `cfg`."""
  directory, step = resolve_checkpoint(path)
  ckpt = Checkpointer(directory, read_only=True)
  try:
    if ckpt.latest_step() is None:
      raise GPTError(f"{directory} holds no finished checkpoint")
    try:
      return ckpt.restore_params(abstract_params(cfg, shardings), step)
    except (ValueError, KeyError) as e:
      raise GPTError(f"the checkpoint in {directory} does not fit model {cfg.n_layer} layers x "
                     f"{cfg.n_embd} wide, vocab {cfg.n_vocab}, n_ctx {cfg.n_ctx}: "
                     f"{str(e).splitlines()[0][:200]}") from None
  finally:
    ckpt.close()


def restore_model(workdir: str | Path, cfg: GPTConfig) -> GPT:
  """The GPT with the latest parameters saved in `workdir` (a training workdir)."""
  params = load_params(workdir, cfg)
  graphdef, _ = nnx.split(abstract_model(cfg))
  return nnx.merge(graphdef, params)
