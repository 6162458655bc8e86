"""Sharded training equals single-device training (8 fake CPU devices, see conftest)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gpt import sharding, train
from gpt.errors import GPTError
from gpt.model import GPTConfig, abstract_model

from train_utils import final_params, max_abs_diff, read_metrics, tiny_config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """5 steps of the tiny model on one device."""
  tmp = tmp_path_factory.mktemp("ref")
  config = tiny_config(tmp)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  train.run(config, str(tmp / "run"))
  return tmp, read_metrics(tmp / "run"), final_params(tmp / "run", config.model)


@pytest.mark.slow
@pytest.mark.parametrize("data,fsdp,tensor", [(8, 1, 1), (2, 4, 1), (4, 1, 2)])
def test_sharded_training_equals_one_device(reference, data, fsdp, tensor):
  tmp, ref_losses, ref_params = reference
  config = tiny_config(tmp)  # same data file and hyperparameters
  config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  workdir = tmp / f"run_{data}_{fsdp}_{tensor}"
  train.run(config, str(workdir))
  losses = read_metrics(workdir)
  assert sorted(losses) == [1, 2, 3, 4, 5]
  for step, values in ref_losses.items():
    assert abs(losses[step][0] - values[0]) < 1e-5, step
  assert max_abs_diff(final_params(workdir, config.model), ref_params) < 1e-5


def test_parameters_are_laid_out_by_logical_axes():
  mesh_cfg = tiny_config.__globals__["base_config"]().mesh
  mesh_cfg.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(mesh_cfg)
  cfg = GPTConfig(n_vocab=50257, n_ctx=64, n_embd=64, n_head=4, n_layer=2)
  model = abstract_model(cfg)
  axes = sharding.logical_axes(model)
  from flax import nnx
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(params, axes, mesh))
  assert axes["h"]["attn"]["c_attn"]["w"] == ("layers", "embed", "heads")
  assert specs["h"]["attn"]["c_attn"]["w"] == P(None, "fsdp", "tensor")
  assert specs["h"]["mlp"]["c_proj"]["w"] == P(None, "tensor", "fsdp")
  assert specs["h"]["ln_1"]["g"] == P(None, "fsdp")
  # 50257 is not divisible by 2: the vocabulary axis stays whole, the width is still split.
  assert specs["wte"] == P(None, "fsdp")
  assert specs["wpe"] == P(None, "fsdp")


def test_optimizer_state_follows_parameters():
  import optax
  mesh_cfg = tiny_config.__globals__["base_config"]().mesh
  mesh_cfg.update(data=4, tensor=2)
  mesh = sharding.make_mesh(mesh_cfg)
  params = {"h": {"w": jax.ShapeDtypeStruct((2, 8, 16), np.float32)}}
  axes = {"h": {"w": ("layers", "embed", "mlp")}}
  psh = sharding.param_shardings(params, axes, mesh)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  state = jax.eval_shape(tx.init, params)
  osh = sharding.opt_state_shardings(tx, state, psh, mesh)
  adam = osh[1][0]
  assert adam.mu["h"]["w"].spec == P(None, None, "tensor") == adam.nu["h"]["w"].spec
  assert adam.count.spec == P()



def test_optimizer_state_of_frozen_parameters_keeps_its_masks():
  """train.only_train_transformer_layers: optax.multi_transform leaves MaskedNode where the frozen
  parameters' moments would be; their shardings keep it (the train mode failed here before)."""
  import optax
  from gpt import optim
  from gpt.config import base_config
  mesh_cfg = base_config().mesh
  mesh_cfg.update(data=4, tensor=2)
  mesh = sharding.make_mesh(mesh_cfg)
  params = {"h": {"w": jax.ShapeDtypeStruct((2, 8, 16), np.float32)},
            "wte": jax.ShapeDtypeStruct((32, 8), np.float32)}
  axes = {"h": {"w": ("layers", "embed", "mlp")}, "wte": ("vocab", "embed")}
  psh = sharding.param_shardings(params, axes, mesh)
  t = base_config().train
  t.update(optimizer="adam", only_train_transformer_layers=True)
  tx = optim.make_optimizer(t, params)
  state = jax.eval_shape(tx.init, params)
  osh = sharding.opt_state_shardings(tx, state, psh, mesh)
  specs = [x for x in jax.tree.leaves(osh, is_leaf=lambda x: isinstance(x, optax.MaskedNode))]
  assert sum(isinstance(x, optax.MaskedNode) for x in specs) == 2  # wte's mu and nu
  assert P(None, None, "tensor") in [x.spec for x in specs if not isinstance(x, optax.MaskedNode)]
  assert jax.tree.structure(osh, is_leaf=lambda x: isinstance(x, optax.MaskedNode)) == \
      jax.tree.structure(state, is_leaf=lambda x: isinstance(x, optax.MaskedNode))

def test_mesh_sizes():
  from gpt.config import base_config
  m = base_config().mesh
  assert sharding.mesh_shape(m, 8) == (8, 1, 1)
  m.update(fsdp=2, tensor=2)
  assert sharding.mesh_shape(m, 8) == (2, 2, 2)
  m.update(data=1)
  assert sharding.mesh_shape(m, 8) == (1, 2, 2)  # the first 4 devices
  m.update(data=-1, fsdp=3, tensor=1)
  with pytest.raises(GPTError, match="cannot be split"):
    sharding.mesh_shape(m, 8)
  m.update(data=4, fsdp=4)
  with pytest.raises(GPTError, match="only 8 are available"):
    sharding.mesh_shape(m, 8)
