"""The device mesh and how parameters, optimizer state and batches are laid out on it.

The mesh has three axes, sized by `config.mesh`:
  data    plain data parallelism: parameters replicated, the batch split
  fsdp    fully-sharded data parallelism: the batch split, and parameters/optimizer state split
          along their `embed` axis (gathered by XLA when used)
  tensor  tensor (model) parallelism: attention heads, MLP width and the vocabulary split

Every model parameter carries logical axis names (gpt.model.param_axes); LOGICAL_RULES maps them
to mesh axes. A parameter dimension that the mesh axis does not divide stays replicated (GPT-2's
vocabulary of 50257 = 29 x 1733 is an example), so any mesh works with any model. jit then
partitions the step (GSPMD) from these layouts; the numbers do not depend on the mesh beyond
float reduction order.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gpt.errors import GPTError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the global batch is split over both data-parallel axes
# logical parameter axis -> mesh axis (None: replicated).
LOGICAL_RULES = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "layers": None,
}


def mesh_shape(mesh_cfg: Any, n_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes; data=-1 takes every device the other axes leave over. Explicit
  sizes may use fewer devices than there are (the first ones), never more."""
  data, fsdp, tensor = int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)
  if fsdp < 1 or tensor < 1 or data == 0 or data < -1:
    raise GPTError(f"mesh data={data} fsdp={fsdp} tensor={tensor}: sizes must be >= 1 (data may be -1)")
  if data == -1:
    if n_devices % (fsdp * tensor):
      raise GPTError(f"{n_devices} devices cannot be split into fsdp={fsdp} x tensor={tensor}")
    data = n_devices // (fsdp * tensor)
  if data * fsdp * tensor > n_devices:
    raise GPTError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} "
                   f"devices, but only {n_devices} are available")
  return data, fsdp, tensor


def make_mesh(mesh_cfg: Any, devices: list | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  if math.prod(shape) < len(devices):
    logging.warning("mesh %s uses %d of the %d devices", shape, math.prod(shape), len(devices))
    devices = devices[:math.prod(shape)]
  # Auto axes: GSPMD-style annotations (Explicit axes break nnx.Embed-style gathers; stack notes).
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
  """The PartitionSpec for one parameter: its logical axes through LOGICAL_RULES, dropping mesh
  axes of size 1, axes that do not divide the dimension, and axes already used."""
  spec, used = [], set()
  for name, dim in zip(axes, shape):
    axis = LOGICAL_RULES.get(name) if name is not None else None
    if axis is None or axis in used or mesh.shape[axis] == 1 or dim % mesh.shape[axis]:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  return P(*spec)


def logical_axes(model: Any) -> dict:
  """The logical axes of every parameter, as a pure nested dict shaped like the params."""
  state = nnx.state(model, nnx.Param)
  axes = jax.tree.map(lambda v: tuple(v.get_metadata().get("axes") or ()), state,
                      is_leaf=lambda v: isinstance(v, nnx.Variable))
  flat = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]
  out: dict = {}
  for path, value in flat:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
  return out


def param_shardings(params: Any, axes: dict, mesh: Mesh) -> Any:
  """NamedShardings for a params tree (arrays or ShapeDtypeStructs) from its logical axes."""
  return jax.tree.map(
      lambda p, a: NamedSharding(mesh, logical_to_spec(a, p.shape, mesh)), params, axes,
      is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(e, (str, type(None))) for e in x))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def opt_state_shardings(tx: Any, opt_state: Any, params_sharding: Any, mesh: Mesh) -> Any:
  """Optimizer-state shardings: parameter-shaped slots (Adam's mu and nu) follow their parameter,
  everything else (counts, scalars) is replicated."""
  import optax

  rep = replicated(mesh)
  # Frozen parameters (train.only_train_transformer_layers: optax.multi_transform) have no slots:
  # optax's MaskedNode stands where their moments would be, and stays.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  return optax.tree_map_params(tx, lambda v, s: v if masked(v) else s, opt_state, params_sharding,
                               transform_non_params=lambda _: rep,
                               is_leaf=lambda x: isinstance(x, NamedSharding) or masked(x))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sequences [B, T] split along B over the data and fsdp axes."""
  return NamedSharding(mesh, P(BATCH_AXES, None))


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def global_batch(shape: tuple[int, int], sharding: NamedSharding,
                 rows_fn: Callable[[np.ndarray], np.ndarray]) -> jax.Array:
  """A global [B, T] array whose rows come from `rows_fn(row_indices)`, reading on each host only
  the rows its own devices hold (multi-host: every host reads its own slice of the data)."""
  cache: dict = {}

  def fetch(index):
    rows = np.arange(shape[0])[index[0]]
    key = (rows[0], rows[-1]) if rows.size else (0, -1)
    if key not in cache:
      cache[key] = rows_fn(rows)
    return cache[key][:, index[1]]

  return jax.make_array_from_callback(shape, sharding, fetch)
