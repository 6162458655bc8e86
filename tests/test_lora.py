"""Low-rank adapters (gpt.lora): the base is unchanged at B = 0, only adapters train, merged equals
unmerged, LoRA workdirs resume exactly and load merged everywhere, PEFT loads the exported adapters."""

import json
import shutil
import signal
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt import lora, optim, train
from gpt.config import base_config
from gpt.errors import GPTError
from gpt.model import GPTConfig, abstract_model, init_model
from gpt.train_step import create_state, train_step
from gpt.weights import load_model

from train_utils import (VOCAB, compile_cache, max_abs_diff, read_metrics, subprocess_env,
                         tiny_config, train_command)
from conftest import forward

TINY = GPTConfig(n_vocab=VOCAB, n_ctx=64, n_embd=64, n_head=4, n_layer=2)
ALL_TARGETS = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
  yield from compile_cache(tmp_path_factory)


def pure(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def adapter_model(cfg, adapters, base_params):
  return nnx.merge(nnx.graphdef(abstract_model(cfg)), lora.combine(adapters, base_params))


def tokens(n=2, t=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (n, t)), jnp.int32)


def test_fresh_adapters_leave_the_model_exactly_the_base():
  base = init_model(TINY, 0)
  cfg = TINY.replace(lora_rank=4, lora_targets=ALL_TARGETS)
  adapters = lora.init_adapters(cfg, seed=3)
  assert all(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(lora.split(adapters)[0])
             if a.shape[-1] == 4)  # A is random, B is zero
  x = tokens()
  np.testing.assert_array_equal(np.asarray(forward(adapter_model(cfg, adapters, pure(base)), x)),
                                np.asarray(forward(base, x)))
  # The model built with adapters has them where the targets say, with the layers axis first.
  shapes = jax.tree.map(lambda a: a.shape, lora.split(pure(abstract_model(cfg)))[0])
  assert shapes["h"]["attn"]["c_attn"] == {"lora_a": (2, 64, 4), "lora_b": (2, 4, 192)}
  assert shapes["h"]["mlp"]["c_proj"] == {"lora_a": (2, 256, 4), "lora_b": (2, 4, 64)}


@pytest.mark.slow  # trains the adapters for four steps
def test_only_adapters_train_and_the_merged_model_equals_the_adapter_model():
  base = init_model(TINY, 0)
  base_params = pure(base)
  cfg = TINY.replace(lora_rank=4, lora_targets=("c_attn", "mlp.c_proj"), lora_dropout=0.1)
  graphdef = nnx.graphdef(abstract_model(cfg))
  t = base_config().train
  t.update(optimizer="adamw", learning_rate=1e-2, weight_decay=0.1, lora_rank=4)
  adapters = lora.init_adapters(cfg, 0)
  tx = optim.make_optimizer(t, adapters)
  step = jax.jit(lambda s, b, f: train_step(s, b, f, graphdef=graphdef, tx=tx,
                                            schedule=optim.learning_rate_schedule(t), grad_accum=2,
                                            noise=0.0, dropout=True))
  state = create_state(adapters, tx, 0)
  # The optimizer state covers the adapters only: Adam's two moments of each adapter leaf.
  n_adapter = sum(a.size for a in jax.tree.leaves(adapters))
  assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * n_adapter
  losses = []
  for i in range(4):
    state, metrics = step(state, tokens(8, 33, seed=i), base_params)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  assert jax.tree.structure(state.params) == jax.tree.structure(adapters)
  assert max_abs_diff(state.params, adapters) > 1e-4
  # Merging: same logits as the adapters applied on the fly; only the target weights differ.
  with_adapters = adapter_model(cfg, state.params, base_params)
  merged = lora.merge(with_adapters)
  assert merged.cfg.lora_rank == 0 and not lora.split(pure(merged))[0]
  x = tokens(seed=9)
  np.testing.assert_allclose(np.asarray(forward(merged, x)), np.asarray(forward(with_adapters, x)),
                             atol=1e-5)
  assert float(jnp.abs(forward(merged, x) - forward(base, x)).max()) > 1e-3
  flat_merged = dict(jax.tree_util.tree_flatten_with_path(pure(merged))[0])
  for path, value in jax.tree_util.tree_flatten_with_path(base_params)[0]:
    name = jax.tree_util.keystr(path)
    changed = name in ("['h']['attn']['c_attn']['w']", "['h']['mlp']['c_proj']['w']")
    assert (max_abs_diff(flat_merged[path], value) > 0) == changed, name


def test_bad_lora_settings_are_one_line():
  t = base_config().train
  for field, value, message in (("lora_targets", "c_attn,mlp.c_fcc", "choose one or more of"),
                                ("lora_rank", -1, "must be >= 0"),
                                ("lora_alpha", 0.0, "must be > 0"),
                                ("lora_dropout", 1.0, "must be in [0, 1)")):
    bad = base_config().train
    bad.update(lora_rank=8)
    bad[field] = value
    with pytest.raises(GPTError, match=message.replace("[", r"\[").replace(")", r"\)")):
      lora.settings(bad)
  assert lora.settings(t) == {}
  t.update(lora_rank=8, lora_targets="mlp.c_proj, c_attn")
  assert lora.settings(t)["targets"] == ["c_attn", "mlp.c_proj"]  # canonical order


def test_peft_tensor_names_and_layouts():
  cfg = TINY.replace(lora_rank=4, lora_targets=("attn.c_proj", "mlp.c_proj"))
  adapters = lora.init_adapters(cfg, 0)
  tensors = lora.peft_tensors(adapters, cfg)
  assert tensors["base_model.model.transformer.h.1.attn.c_proj.lora_A.weight"].shape == (4, 64)
  assert tensors["base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight"].shape == (4, 256)
  assert tensors["base_model.model.transformer.h.0.mlp.c_proj.lora_B.weight"].shape == (64, 4)
  np.testing.assert_array_equal(tensors["base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight"],
                                np.asarray(adapters["h"]["mlp"]["c_proj"]["lora_a"][1]).T)
  assert len(tensors) == 2 * 2 * cfg.n_layer
  config = lora.peft_config(cfg, "gpt2")
  assert config["fan_in_fan_out"] and config["target_modules"] == ["attn.c_proj", "mlp.c_proj"]


def _modified_copy(src, dst):
  """A copy of HF folder `src` with one weight nudged: a different base."""
  from safetensors.numpy import load_file, save_file

  shutil.copytree(src, dst)
  tensors = load_file(str(dst / "model.safetensors"))
  name = next(k for k in tensors if k.endswith("c_fc.weight"))
  tensors[name] = tensors[name] + np.float32(0.01)
  save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
  return dst


@pytest.mark.slow
def test_lora_workdir_stores_adapters_resumes_loads_merged_and_exports(tmp_path, hf_fixture):
  targets = ",".join(ALL_TARGETS)
  config = tiny_config(tmp_path, steps=4, lora_rank=4, lora_targets=targets, lora_alpha=8.0,
                       learning_rate=1e-2, save_every=2, val_every=2)
  config.init = str(hf_fixture)
  workdir = tmp_path / "run"
  train.run(config, str(workdir))
  ref = json.loads((workdir / "lora.json").read_text())
  assert ref["base"] == str(hf_fixture.resolve()) and ref["rank"] == 4 and ref["alpha"] == 8.0
  assert ref["targets"] == list(ALL_TARGETS)
  assert sorted(read_metrics(workdir)) == [1, 2, 3, 4] and sorted(read_metrics(workdir, "val")) == [2, 4]
  # The checkpoint holds only adapters (rank-4 matrices) and their optimizer state.
  base = load_model(_with_init(hf_fixture))
  cfg = lora.with_adapters(base.cfg, ref)
  adapters = lora.restore_adapters(workdir, cfg)
  assert all(4 in a.shape[1:] for a in jax.tree.leaves(adapters))
  assert max_abs_diff(adapters, lora.init_adapters(cfg, config.seed)) > 1e-4

  # A base given in another format with the same weights is the same base (OpenAI fixture).
  openai = hf_fixture.parent / "openai-gpt2-tiny"
  if openai.is_dir():
    config2 = tiny_config(tmp_path, steps=5, lora_rank=4, lora_targets=targets, lora_alpha=8.0,
                          learning_rate=1e-2, save_every=2, val_every=2)
    config2.init = str(openai)
    train.run(config2, str(workdir))
    assert sorted(read_metrics(workdir)) == [1, 2, 3, 4, 5]
  # config.init=<workdir>: the base with the adapters merged, equal to the adapters applied live.
  loaded = load_model(_with_init(workdir))
  assert loaded.cfg.lora_rank == 0 and loaded.tokenizer.encode("Hello world") == [15496, 995]
  live = lora.load_workdir(workdir, _with_init(workdir), merge_adapters=False).model
  x = tokens(2, 16)
  np.testing.assert_allclose(np.asarray(forward(loaded.model, x)), np.asarray(forward(live, x)),
                             atol=1e-5)

  # Resuming on a different base, or with other LoRA settings, is one line.
  other = _modified_copy(hf_fixture, tmp_path / "other-base")
  config.train.steps = 6
  config.init = str(other)
  with pytest.raises(GPTError, match="were trained on base") as e:
    train.run(config, str(workdir))
  assert "\n" not in str(e.value)
  config.init = str(hf_fixture)
  config.train.lora_rank = 8
  with pytest.raises(GPTError, match="lora_rank=4, now 8"):
    train.run(config, str(workdir))
  # Loading the workdir when its base has changed is one line too.
  ref_path = workdir / "lora.json"
  saved = ref_path.read_text()
  ref_path.write_text(json.dumps({**json.loads(saved), "base": str(other)}))
  with pytest.raises(GPTError, match="were trained on base"):
    load_model(_with_init(workdir))
  ref_path.write_text(saved)

  # A damaged latest adapter checkpoint is caught by its checksums: the newest intact one loads.
  damaged = tmp_path / "damaged-run"
  shutil.copytree(workdir, damaged)
  ckpts = damaged / "checkpoints"
  steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  biggest = max((p for p in (ckpts / str(steps[-1])).rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  data[len(data) // 2] ^= 0x01
  biggest.write_bytes(bytes(data))
  assert max_abs_diff(lora.restore_adapters(damaged, cfg),
                      lora.restore_adapters(workdir, cfg, step=steps[-2])) == 0

  # Export: merged HF folder loads back to the same logits; --format=adapters loads in PEFT.
  from gpt.export import export

  hf_out = export(str(workdir), str(tmp_path / "merged-hf"), "hf")
  np.testing.assert_allclose(np.asarray(forward(load_model(_with_init(hf_out)).model, x)),
                             np.asarray(forward(loaded.model, x)), atol=1e-5)
  peft_out = export(str(workdir), str(tmp_path / "peft"), "adapters")
  assert {p.name for p in peft_out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
  _check_peft(hf_fixture, peft_out, live, x)


def _with_init(init):
  c = base_config()
  c.init = str(init)
  return c


def _check_peft(base_folder, adapters_folder, ours, x):
  peft = pytest.importorskip("peft", reason="Hugging Face PEFT is not installed")
  torch = pytest.importorskip("torch")
  from transformers import GPT2LMHeadModel

  model = GPT2LMHeadModel.from_pretrained(str(base_folder), torch_dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(model, str(adapters_folder)).eval()
  n_lora = sum(1 for name, _ in model.named_parameters() if "lora_" in name)
  assert n_lora == 2 * 4 * ours.cfg.n_layer  # A and B in all four targets of every layer
  with torch.no_grad():
    theirs = model(torch.as_tensor(np.array(x), dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(theirs, np.asarray(forward(ours, x)), atol=1e-4)


def _kill_after(proc, ckpt_dir, step, timeout=600):
  import time

  deadline = time.time() + timeout
  while not (ckpt_dir / str(step)).is_dir():
    if proc.poll() is not None or time.time() > deadline:
      raise AssertionError(f"run ended or stalled before checkpoint {step} (rc {proc.returncode})")
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)


@pytest.mark.slow
def test_lora_kill_9_and_resume_equals_uninterrupted_run(tmp_path):
  steps = 12
  overrides = dict(steps=steps, log_every=1, save_every=1, keep=3, lora_rank=4, lora_dropout=0.1,
                   lora_targets="c_attn,c_fc", grad_accum=2, batch_size=16)
  config = tiny_config(tmp_path, **overrides)
  train.run(config, str(tmp_path / "straight"))
  straight = read_metrics(tmp_path / "straight")

  workdir = tmp_path / "killed"
  proc = subprocess.Popen(train_command(tmp_path, workdir, train=overrides), env=subprocess_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    _kill_after(proc, workdir / "checkpoints", 5)
  finally:
    proc.kill()
  assert proc.returncode == -signal.SIGKILL
  assert 5 <= max(read_metrics(workdir)) < steps
  train.run(config, str(workdir))
  resumed = read_metrics(workdir)
  assert sorted(resumed) == list(range(1, steps + 1))
  for step, losses in resumed.items():
    for loss in losses:
      assert abs(loss - straight[step][0]) < 1e-6, (step, loss, straight[step][0])
  cfg = lora.with_adapters(GPTConfig.from_config(config.model), lora.settings(config.train))
  assert max_abs_diff(lora.restore_adapters(workdir, cfg),
                      lora.restore_adapters(tmp_path / "straight", cfg)) < 1e-6


@pytest.mark.slow
def test_lora_fine_tune_of_the_tiny_model_on_kant_lowers_the_validation_loss(tmp_path, shared_dir):
  config = _tiny_kant(tmp_path, shared_dir)
  workdir = tmp_path / "kant"
  train.run(config, str(workdir))
  val = read_metrics(workdir, "val")
  assert val[30][0] < _base_val_loss(config) - 0.5, val
  assert json.loads((workdir / "lora.json").read_text())["base"] == "scratch"
  # A random base is rebuilt from the workdir's saved shape and seed, whatever config.model says.
  loaded = load_model(_with_init(workdir))
  assert (loaded.cfg.n_layer, loaded.cfg.n_embd, loaded.cfg.lora_rank) == (4, 256, 0)


def _base_val_loss(config):
  """The validation loss of the untrained base (what the adapters started from), on the windows
  the run validated on."""
  from gpt import data
  from gpt.train_step import eval_step

  base = load_model(config)
  t = config.train
  dataset = data.load_dataset(config.data, base.tokenizer, t.seq_len, base.cfg.n_vocab)
  starts = data.eval_starts(len(dataset.val), t.seq_len, t.val_batches, t.batch_size)
  graphdef, params = nnx.graphdef(base.model), pure(base.model)
  return float(np.mean([eval_step(params, jnp.asarray(data.window_rows(dataset.val, s, t.seq_len)),
                                  graphdef=graphdef) for s in starts]))


def _tiny_kant(tmp_path, shared_dir):
  """configs/tiny.py, shrunk to a short LoRA run on the Kant text."""
  import importlib.util
  from pathlib import Path

  path = Path(__file__).resolve().parent.parent / "configs" / "tiny.py"
  spec = importlib.util.spec_from_file_location("tiny_config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.path = str(shared_dir / "data" / "kant" / "critique_of_pure_reason.txt")
  c.data.cache_dir = str(tmp_path / "cache")
  c.train.update(steps=30, seq_len=64, batch_size=4, learning_rate=1e-2, warmup_steps=0,
                 schedule="constant", val_every=15, val_batches=2, sample_every=0, save_every=0,
                 log_every=10, lora_rank=8, lora_targets="c_attn,attn.c_proj,c_fc,mlp.c_proj",
                 peak_flops=1e12)
  c.mesh.data = 1  # one device: the batch of 4 is not split over the 8 fake ones
  return c


def test_adapters_are_laid_out_by_the_logical_axes_of_their_weight():
  from jax.sharding import PartitionSpec as P

  from gpt import sharding

  mesh_cfg = base_config().mesh
  mesh_cfg.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(mesh_cfg)
  model = abstract_model(TINY.replace(lora_rank=4, lora_targets=ALL_TARGETS))
  axes, _ = lora.split(sharding.logical_axes(model))
  adapters, _ = lora.split(pure(model))
  specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(adapters, axes, mesh))
  assert specs["h"]["attn"]["c_attn"] == {"lora_a": P(None, "fsdp", None),
                                          "lora_b": P(None, None, "tensor")}
  assert specs["h"]["mlp"]["c_proj"] == {"lora_a": P(None, "tensor", None),
                                         "lora_b": P(None, None, "fsdp")}


@pytest.mark.slow
def test_sharded_lora_training_equals_one_device(tmp_path, monkeypatch):
  runs = {}
  for mesh in ((1, 1, 1), (2, 2, 2)):
    config = tiny_config(tmp_path, steps=3, lora_rank=4, lora_targets="c_attn,mlp.c_proj",
                         learning_rate=1e-2)
    config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    # The mesh is what is compared: both runs keep XLA's dots (one device alone would take MKL's
    # GEMM, model.matmul=auto, which sums in another order; tests/test_gemm.py compares those).
    config.model.matmul = "xla"
    # Likewise the attention: one device alone would take the fused CPU kernel (gpt.kernels.attention,
    # another summation order; tests/test_attention_kernel.py compares it with blocked).
    config.model.attention_impl = "blocked"
    workdir = tmp_path / f"run_{'_'.join(map(str, mesh))}"
    train.run(config, str(workdir))
    cfg = lora.with_adapters(GPTConfig.from_config(config.model), lora.settings(config.train))
    runs[mesh] = (read_metrics(workdir), lora.restore_adapters(workdir, cfg))
  (ref_losses, ref_adapters), (losses, adapters) = runs[(1, 1, 1)], runs[(2, 2, 2)]
  assert sorted(losses) == [1, 2, 3]
  for step, values in ref_losses.items():
    assert abs(losses[step][0] - values[0]) < 1e-5, step
  assert max_abs_diff(adapters, ref_adapters) < 1e-5


def test_1558m_lora_training_state_is_under_one_percent_of_full_fine_tuning(repo_dir):
  """The issue's goal, from shapes alone (jax.eval_shape), with experiments/bench_lora.py's own
  accounting: rank 8 on c_attn, AdamW, float32."""
  import importlib.util

  from gpt.train_step import create_state

  spec = importlib.util.spec_from_file_location("bench_lora", repo_dir / "experiments" / "bench_lora.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  state_bytes, parts = {}, {}
  for rank in (0, 8):
    parts[rank] = bench.abstract_parts(bench.model_cfg("1558M"), bench.train_settings(rank, "c_attn"))
    _, trainable, _, tx = parts[rank]
    state = jax.eval_shape(lambda p, tx=tx: create_state(p, tx, 0), trainable)
    state_bytes[rank] = bench.nbytes(state.opt_state) + bench.nbytes(trainable)
  assert bench.count(parts[8][1]) == 48 * 8 * (1600 + 3 * 1600)  # A [1600, 8] + B [8, 4800] a layer
  assert bench.nbytes(parts[8][2]) == bench.nbytes(parts[0][1])  # the frozen base is all of the model
  assert state_bytes[8] < 0.01 * state_bytes[0]
